"""Stage manifests: scan an AI Hub tree, sample the stage, split, verify, write.

    python -m pillsnap_dali.manifest --data-root DIR --stage {demo,1,2,3,4} --out DIR [--seed S]
        [--verify none|header|full] [--config FILE] [--set key=value ...] [--force]
    python -m pillsnap_dali.manifest --legacy TRAIN.csv [VAL.csv [TEST.csv]] --out DIR [--verify ...]

Writes into ``--out``: ``manifest_{train,val,test}.csv`` (classification; test = the AI Hub Validation part,
never sampled for training), ``detect_{train,val,test}.csv`` (every combination image, raw boxes),
``class_map.json``, ``quarantine.csv`` (path, reason) and ``report.json`` (what was asked, what was got,
counts per split, class and defect, the dl_idx convention, and the inputs that allow reuse).

Every discovered image ends in exactly one place: a classification split, ``quarantine.csv``, or the
report's ``not_sampled`` count (``report["accounting"]`` adds them up). Sampling is seeded: the same inputs
give byte-identical files. Train/val is stratified by class, every class has val rows, and a combination
is never split across train and val (its images move together).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.config import Config, ManifestConfig, stage_name
from pillsnap_dali.data.checks import check_manifests
from pillsnap_dali.data.manifest import (Manifest, ManifestError, read_manifest, split_missing,
                                         write_manifest)
from pillsnap_dali.data.scan import ScanResult, missing_codes, scan_tree, tree_fingerprint
from pillsnap_dali.imageio import regular_file
from pillsnap_dali.data.verify import CACHE_NAME, MODES as VERIFY_MODES, Verifier, VerifySettings
from pillsnap_dali.data.synth import ensure_demo_data

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: detection-val combinations are never in classifier train
SPLITS = ("train", "val", "test")
OUTPUTS = tuple(f"manifest_{s}.csv" for s in SPLITS) + tuple(f"detect_{s}.csv" for s in SPLITS) + (
    "class_map.json", "quarantine.csv")


@dataclass
class _Unit:
    """What moves between splits as one: a single image, or the images of one combination."""
    key: str
    records: list

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class _Build:
    """One build's shared state: what was scanned, the verifier, and everything quarantined so far."""
    scan: ScanResult
    verifier: Verifier
    seed: int
    quarantine: dict = field(default_factory=dict)    # image path -> reason (verification failures)
    notes: list = field(default_factory=list)         # human-readable remarks for the report

    def verified(self, records: list) -> list:
        """The records whose images pass verification; the others are quarantined."""
        bad = self.verifier.bad([r.image_path for r in records])
        for p, why in bad.items():
            if p not in self.quarantine:
                self.quarantine[p] = why
                _logger.warning("quarantined %s: %s", p, why)
        return [r for r in records if r.image_path not in bad]


def _units(records: list) -> dict:
    """Class -> units (singles one by one, combinations grouped by combo_id), sorted by key."""
    by_class: dict = {}
    for r in records:
        key = f"combo:{r.combo_id}" if r.image_type == "combination" else r.image_path
        by_class.setdefault(r.code, {}).setdefault(key, []).append(r)
    return {c: [_Unit(k, v) for k, v in sorted(units.items())] for c, units in by_class.items()}


def plan_quotas(sizes: dict, n_units: dict, m: ManifestConfig, seed: int) -> tuple[dict, list]:
    """Class -> images to sample, for the stage's sampling choice; and notes on what could not be met."""
    eligible = sorted(c for c in sizes if sizes[c] >= max(2, m.min_images_per_class) and n_units[c] >= 2)
    notes = []
    if len(eligible) < len(sizes):
        notes.append(f"{len(sizes) - len(eligible)} classes have fewer than "
                     f"{max(2, m.min_images_per_class)} usable images or a single combination: left out")
    by_size = sorted(eligible, key=lambda c: (-sizes[c], c))
    if m.sampling == "tiered":
        quotas, i = {}, 0
        for n_cls, per in m.tiers:
            for c in by_size[i:i + int(n_cls)]:
                quotas[c] = int(per)
            i += int(n_cls)
        return quotas, notes
    n = min(m.classes, len(eligible))
    if n == 0:
        return {}, notes
    per, extra = divmod(m.images, n)
    full = [c for c in eligible if sizes[c] >= per]
    rng = random.Random(f"{seed}:classes")
    full_set = set(full)
    chosen = rng.sample(full, n) if len(full) >= n else full + [c for c in by_size if c not in full_set][:n - len(full)]
    return {c: per + (1 if i < extra else 0) for i, c in enumerate(sorted(chosen))}, notes


def _pick(build: _Build, units: dict, quotas: dict) -> dict:
    """Class -> chosen units, filled in rounds: images failing verification are replaced from the same class."""
    order = {c: list(units[c]) for c in quotas}
    for c in order:
        random.Random(f"{build.seed}:{c}").shuffle(order[c])
    chosen = {c: [] for c in quotas}
    pos = dict.fromkeys(quotas, 0)
    while True:
        batch = {}
        for c, quota in quotas.items():
            need = quota - sum(len(u) for u in chosen[c])
            while need > 0 and pos[c] < len(order[c]):
                u = order[c][pos[c]]
                pos[c] += 1
                batch.setdefault(c, []).append(_Unit(u.key, u.records[:need]))
                need -= min(need, len(u))
        if not batch:
            return chosen
        ok = {r.image_path for r in build.verified([r for us in batch.values() for u in us for r in u.records])}
        for c, us in batch.items():
            for u in us:
                u.records = [r for r in u.records if r.image_path in ok]
                if u.records:
                    chosen[c].append(u)


def _split_units(chosen: dict, val_fraction: float, held_out: frozenset = frozenset()) -> tuple[list, list, dict]:
    """Stratified by class, by unit: (train records, val records, {dropped class: reason}).

    Units whose key is in ``held_out`` (the combinations of the detection val split) go to val whatever the
    draw, so the two-stage score on ``detect_val.csv`` never sees a combination the classifier trained on.
    """
    train, val, dropped = [], [], {}
    for c in sorted(chosen):
        us = chosen[c]  # already in the class's seeded random order
        if len(us) < 2:
            dropped[c] = f"only {len(us)} usable unit(s) after verification: cannot be in train and val"
            continue
        n_val = min(len(us) - 1, max(1, round(val_fraction * len(us))))
        forced = [u for u in us if u.key in held_out]
        rest = [u for u in us if u.key not in held_out]
        more = max(0, n_val - len(forced))
        if not rest[more:]:
            dropped[c] = "every usable unit is a combination held out for detection validation"
            continue
        val.extend(r for u in forced + rest[:more] for r in u.records)
        train.extend(r for u in rest[more:] for r in u.records)
    return train, val, dropped


def _classification(build: _Build, m: ManifestConfig, held_out: frozenset = frozenset()) -> tuple[dict, list, dict]:
    """({split: records}, class codes, dropped classes) for the stage; ``held_out``: see ``_split_units``."""
    use = [r for r in build.scan.records if m.include_combinations or r.image_type == "single"]
    units = _units([r for r in use if r.part == "train"])
    sizes = {c: sum(len(u) for u in us) for c, us in units.items()}
    quotas, notes = plan_quotas(sizes, {c: len(us) for c, us in units.items()}, m, build.seed)
    build.notes.extend(notes)
    train, val, dropped = _split_units(_pick(build, units, quotas), m.val_fraction, held_out)
    codes = sorted({r.code for r in train} | {r.code for r in val})
    code_set = set(codes)
    test = build.verified([r for r in use if r.part == "val" and r.code in code_set])
    val_only = sorted({r.code for r in use if r.part == "val"} - set(units))
    if val_only:
        build.notes.append(f"{len(val_only)} K-codes occur only in the Validation part (not in the class map): "
                           + ", ".join(val_only[:20]))
    return {"train": train, "val": val, "test": test}, codes, dropped


def _detection(build: _Build, val_fraction: float) -> dict:
    """Every combination image: Training part split by combination, Validation part as test."""
    combos = build.verified([r for r in build.scan.records if r.image_type == "combination"])
    units = [u for us in _units([r for r in combos if r.part == "train"]).values() for u in us]
    units.sort(key=lambda u: u.key)
    random.Random(f"{build.seed}:detect").shuffle(units)
    n_val = min(len(units) - 1, max(1, round(val_fraction * len(units)))) if len(units) >= 2 else 0
    return {"train": [r for u in units[n_val:] for r in u.records],
            "val": [r for u in units[:n_val] for r in u.records],
            "test": [r for r in combos if r.part == "val"]}


def to_manifest(records: list) -> Manifest:
    """Our manifest rows for these records, sorted by image path."""
    rs = sorted(records, key=lambda r: r.image_path)
    return Manifest(None, [r.image_path for r in rs], [r.code for r in rs], [r.image_type for r in rs],
                    [r.source for r in rs], [r.combo_id for r in rs], [r.boxes for r in rs], [""] * len(rs),
                    [(r.width, r.height) for r in rs])


def write_quarantine(rows: list, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(sorted(set(rows)))
    atomic_write_text(path, buf.getvalue())


def _reason_counts(rows: list) -> dict:
    return dict(sorted(Counter(r.split(":", 1)[0] for _, r in rows).items()))


def _report(build: _Build, cfg: Config, inputs: dict, splits: dict, detect: dict, codes: list,
            dropped: dict) -> dict:
    scan, m = build.scan, cfg.manifest
    qrows = scan.quarantine + sorted(build.quarantine.items())
    in_splits = sum(len(v) for v in splits.values())
    q_images = len(scan.quarantined_images()) + len(build.quarantine)
    per_class = {c: dict.fromkeys(SPLITS, 0) for c in codes}
    for s, rs in splits.items():
        for r in rs:
            per_class[r.code][s] += 1
    got = len(splits["train"]) + len(splits["val"])
    asked = sum(int(n) * int(p) for n, p in m.tiers) if m.sampling == "tiered" else m.images
    asked_cls = sum(int(n) for n, _ in m.tiers) if m.sampling == "tiered" else m.classes
    notes = list(build.notes)
    defects = dict(scan.defects)
    found = Counter(r.split(":", 1)[0] for r in build.quarantine.values())
    defects["truncated_png"] += found["truncated png"]
    defects["empty_file"] += found["empty file"]
    if build.verifier.s.mode == "none":
        notes.append("verify=none: image contents were not checked (truncated or unreadable images are found "
                     "by --verify header|full, or skipped and logged by the loaders)")
    if cfg.stage == "demo":
        notes.append("demo stage: every usable image is taken")
    elif got < asked or len(codes) < asked_cls:
        notes.append(f"the tree is smaller than the stage: asked {asked} images / {asked_cls} classes, "
                     f"got {got} / {len(codes)}")
    return {
        "inputs": inputs,
        "requested": {"images": asked, "classes": asked_cls, "sampling": m.sampling},
        "got": {"images": got, "classes": len(codes), "smaller_than_stage": got < asked or len(codes) < asked_cls},
        "splits": {s: len(v) for s, v in splits.items()},
        "detect": {s: len(v) for s, v in detect.items()} | {"incomplete_labels": sum(
            1 for v in detect.values() for r in v if missing_codes(r.codes, r.boxes))},
        "per_class": per_class, "classes_dropped": dropped,
        "defects": defects, "dl_idx_convention": scan.dl_idx_convention, "scan": scan.counts,
        "quarantine": {"rows": len(qrows), "images": q_images, "by_reason": _reason_counts(qrows)},
        "accounting": {"discovered_images": scan.counts["images"], "in_splits": in_splits,
                       "quarantined_images": q_images,
                       "not_sampled": len(scan.records) - in_splits - len(build.quarantine)},
        "not_sampled": len(scan.records) - in_splits - len(build.quarantine),
        "verify": {"mode": build.verifier.s.mode, "checked": build.verifier.checked},
        "notes": notes,
    }


def _inputs(cfg: Config, data_root: Path, seed: int, verify: str) -> dict:
    m = cfg.manifest
    return {"format_version": FORMAT_VERSION, "data_root": str(data_root), "stage": cfg.stage, "seed": seed,
            "files": tree_fingerprint(data_root), "verify": verify, "max_pixels": cfg.data.max_pixels,
            "sampling": {"images": m.images, "classes": m.classes, "sampling": m.sampling, "tiers": m.tiers,
                         "val_fraction": m.val_fraction, "include_combinations": m.include_combinations,
                         "min_images_per_class": m.min_images_per_class},
            "detect_val_fraction": cfg.detect.val_fraction}


def _built_report(out_dir: Path) -> dict | None:
    """report.json of a build in ``out_dir`` (None when there is none or it cannot be read)."""
    try:
        with open(out_dir / "report.json", encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _reusable(out_dir: Path, inputs: dict) -> dict | None:
    old = _built_report(out_dir)
    if old is None:
        return None
    if old.get("inputs") != inputs or not all((out_dir / f).exists() for f in OUTPUTS):
        changed = sorted(k for k in inputs if (old.get("inputs") or {}).get(k) != inputs[k])
        _logger.warning("manifests in %s are stale (changed: %s): rebuilding", out_dir, ", ".join(changed) or "files")
        return None
    return old


def build_manifests(cfg: Config, data_root: str | Path, out_dir: str | Path, *, verify: str | None = None,
                    seed: int | None = None, force: bool = False) -> dict:
    """Scan ``data_root``, write the stage's manifests into ``out_dir``; returns the report.

    Existing outputs are reused when their recorded inputs (data root, stage, seed, file count, verify
    mode, sampling settings) all match, unless ``force``. ``verify``/``seed`` default to the config's.
    """
    verify = verify or cfg.data.verify
    seed = cfg.manifest.seed if seed is None else int(seed)
    data_root, out_dir = Path(data_root).resolve(), Path(out_dir)
    if not data_root.is_dir():
        raise ManifestError(f"data root {data_root} is not a directory")
    inputs = _inputs(cfg, data_root, seed, verify)
    old = None if force else _reusable(out_dir, inputs)
    if old is not None:
        _logger.info("reusing the manifests in %s (same inputs)", out_dir)
        return old
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").unlink(missing_ok=True)  # a half-written build must never look reusable
    scan = scan_tree(data_root)
    if not scan.records:
        raise ManifestError(f"no usable labelled images under {data_root} ({scan.counts['images']} images, "
                            f"{scan.counts['labels']} labels found); expected the AI Hub layout "
                            "(TS_n_단일/<K-code>/*.png with TL_n_단일/<K-code>_json/*.json)")
    settings = VerifySettings(verify, cfg.data.max_pixels, cfg.loader.workers, out_dir / CACHE_NAME)
    build = _Build(scan, Verifier(settings), seed)
    detect = _detection(build, cfg.detect.val_fraction)  # first: its val combinations stay out of classifier train
    held_out = frozenset(f"combo:{r.combo_id}" for r in detect["val"])
    splits, codes, dropped = _classification(build, cfg.manifest, held_out)
    build.verifier.save()
    report = _report(build, cfg, inputs, splits, detect, codes, dropped)
    _write_all(out_dir, scan, build, splits, detect, codes, report)
    return report


def _write_all(out_dir: Path, scan: ScanResult, build: _Build, splits: dict, detect: dict, codes: list,
               report: dict) -> None:
    for s in SPLITS:
        write_manifest(to_manifest(splits[s]), out_dir / f"manifest_{s}.csv")
        write_manifest(to_manifest(detect[s]), out_dir / f"detect_{s}.csv")
    ClassMap(codes, {c: scan.meta.get(c, {}) for c in codes}).save(out_dir / "class_map.json")
    write_quarantine(scan.quarantine + list(build.quarantine.items()), out_dir / "quarantine.csv")
    atomic_write_text(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=1))  # last
    _logger.info("wrote %s: train %d, val %d, test %d rows, %d classes; detect %d/%d/%d; %d quarantined; "
                 "%d not sampled", out_dir, *(len(splits[s]) for s in SPLITS), len(codes),
                 *(len(detect[s]) for s in SPLITS), report["quarantine"]["images"], report["not_sampled"])


def _demo_root(cfg: Config) -> Path:
    made = ensure_demo_data(cfg)
    return Path(made) if isinstance(made, (str, Path)) else Path(made.root)


def demo_root(cfg: Config) -> Path:
    """No data.root: the synthetic tree for the demo; a real stage never trains on it by accident."""
    if cfg.stage == "demo":
        return _demo_root(cfg)
    raise ManifestError(f"stage {cfg.stage} needs the AI Hub tree: pass --data-root DIR (or set data.root in a "
                        "config), or --manifest CSV; only --stage demo generates synthetic data")


def _strictness(mode) -> int:
    """Verify modes in the order of ``verify.MODES`` (none < header < full)."""
    return VERIFY_MODES.index(mode) if mode in VERIFY_MODES else 0


def ensure_manifests(cfg: Config) -> Path:
    """Build (or reuse) the stage's manifests in ``<data.artifacts>/<stageN|demo>/`` for training and detection;
    returns that dir.

    The data root is ``cfg.data.root``; when it is null, a real stage uses the manifests already built in that
    dir (``--stage 3 --resume`` needs no ``--data-root``) and the demo stage its synthetic tree. The split is
    the manifest step's: an existing build of the same tree keeps its seed and its verification when that was
    stricter (``python -m pillsnap_dali.manifest --verify header --seed S`` then ``train`` does not re-split or
    un-verify); the tree or the sampling settings changing rebuilds it (with that seed and verification)."""
    out = Path(cfg.data.artifacts) / stage_name(cfg.stage)
    old = _recorded_inputs(out)
    if cfg.data.root:
        root = Path(cfg.data.root)
    elif old is not None and cfg.stage != "demo":
        recorded = Path(str(old.get("data_root")))
        if recorded.is_dir():  # checked against the tree they were built from: reused, or rebuilt if it changed
            root = recorded
            _logger.info("no data.root: the stage %s manifests in %s were built from %s", cfg.stage, out, root)
        elif old.get("format_version") == FORMAT_VERSION:
            _logger.warning("no data.root, and %s (the tree the manifests in %s were built from) is gone: using "
                            "them as they are", recorded, out)
            return out
        else:
            raise ManifestError(f"the manifests in {out} are of an older format and the tree they were built from "
                                f"({recorded}) is gone: pass --data-root")
    else:
        root = demo_root(cfg)
    seed, verify = None, cfg.data.verify
    if old is not None and old.get("data_root") == str(root.resolve()) and old.get("stage") == cfg.stage:
        if old.get("seed") != cfg.manifest.seed:
            _logger.info("keeping the split of the existing build (manifest seed %s, not %s): rebuild with "
                         "python -m pillsnap_dali.manifest --seed N to change it", old.get("seed"), cfg.manifest.seed)
            seed = old.get("seed")
        if _strictness(old.get("verify")) > _strictness(verify):
            _logger.info("keeping the existing build's verification (%s, stricter than data.verify=%s)",
                         old.get("verify"), verify)
            verify = old.get("verify")
    build_manifests(cfg, root, out, verify=verify, seed=seed)
    return out


def _recorded_inputs(out_dir: Path) -> dict | None:
    """The inputs report.json recorded for a complete build in ``out_dir``, else None."""
    inputs = (_built_report(out_dir) or {}).get("inputs")
    return inputs if isinstance(inputs, dict) and all((out_dir / f).exists() for f in OUTPUTS) else None


def split_leaks(manifests: dict) -> dict:
    """Rows one split shares with the training split: the same image file, or a shot of the same combination
    (the old pipeline split by image, so near-duplicate shots of a combination reached validation). Counted
    and logged, never moved: an imported split stays the user's; building from the tree splits by
    combination."""
    train = manifests.get("train")
    out = {}
    if train is None:
        return out
    paths = set(train.paths)
    combos = {c for c, t in zip(train.combo_ids, train.image_types) if t == "combination" and c}
    for split, m in manifests.items():
        if split == "train":
            continue
        same_image = [p for p in m.paths if p in paths]
        same_combo = [p for p, c, t in zip(m.paths, m.combo_ids, m.image_types)
                      if t == "combination" and c in combos and p not in paths]
        out[split] = {"same_image": len(same_image), "same_combination": len(same_combo)}
        if same_image or same_combo:
            _logger.warning("legacy %s split shares %d image(s) and %d shot(s) of training combinations with the "
                            "training split (e.g. %s): its scores are optimistic; building manifests from the tree "
                            "splits by combination", split, len(same_image), len(same_combo),
                            (same_image or same_combo)[0])
    return out


def import_legacy(paths: list, cfg: Config, out_dir: str | Path, *, verify: str | None = None) -> dict:
    """The existing project's manifests (train[, val[, test]]) -> ours, in ``out_dir``.

    The class map is the sorted unique K-codes of the training manifest (the existing project's rule);
    rows of other splits with a code outside it, rows whose file is missing or empty, and images failing
    verification go to ``quarantine.csv`` with the reason."""
    if not 1 <= len(paths) <= 3:
        raise ManifestError("give 1 to 3 legacy manifests: train [val [test]]")
    out_dir = Path(out_dir)
    verifier = Verifier(VerifySettings(verify or cfg.data.verify, cfg.data.max_pixels, cfg.loader.workers,
                                       out_dir / CACHE_NAME))
    manifests = [read_manifest(p) for p in paths]
    checks = check_manifests(manifests[0], manifests[1] if len(manifests) > 1 else None)
    checks.raise_errors()
    codes = sorted(set(manifests[0].codes))
    code_set = set(codes)
    qrows, counts = [], {}
    for split, m in zip(SPLITS, manifests):
        known = [c in code_set for c in m.codes]
        qrows += [(m.paths[i], f"class not in training manifest: {m.codes[i]}") for i, k in enumerate(known) if not k]
        special = {p: why for p in m.paths if (why := regular_file(p)) and why.startswith("not a regular")}
        qrows += sorted(special.items())  # a FIFO or a device is never opened (nor called an empty file)
        kept, missing = split_missing(m.subset(i for i, k in enumerate(known) if k and m.paths[i] not in special))
        bad = verifier.bad(kept.paths)
        qrows += missing + sorted(bad.items())
        kept = kept.subset(i for i, p in enumerate(kept.paths) if p not in bad)
        write_manifest(kept, out_dir / f"manifest_{split}.csv")
        counts[split] = len(kept)
    verifier.save()
    ClassMap(codes).save(out_dir / "class_map.json")
    write_quarantine(qrows, out_dir / "quarantine.csv")
    leaks = split_leaks(dict(zip(SPLITS, manifests)))
    report = {"inputs": {"legacy": [str(Path(p).resolve()) for p in paths], "verify": verifier.s.mode},
              "splits": counts, "classes": len(codes), "leaks": leaks, "checks": checks.as_dict(),
              "quarantine": {"rows": len(qrows), "by_reason": _reason_counts(qrows)},
              "accounting": {"rows_in": sum(len(m) for m in manifests), "rows_out": sum(counts.values()),
                             "quarantined": len(qrows)}}
    atomic_write_text(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=1))
    _logger.info("imported %d legacy rows into %s: %s kept, %d quarantined", report["accounting"]["rows_in"],
                 out_dir, counts, len(qrows))
    return report
