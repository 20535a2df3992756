"""``python -m pillsnap_dali.evaluate``: the score users report, on the test split (never trained on).

    python -m pillsnap_dali.evaluate --checkpoint runs/stage3/checkpoints/best.pt \\
        --manifest artifacts/stage3/manifest_test.csv

The deployed weights of the checkpoint (the EMA when it chose it), with its own preprocessing, through the
project's evaluation loader (``--backend``, as training): top-1/top-5, macro precision/recall/F1, a per-class
CSV, the worst classes by recall, the stage targets (``evaluate.target_*``; Stage 3: 85 % top-1, 95 % top-5,
every class's precision and recall >= 80 %) checked, and the test rows whose K-code the model never learned
(absent from its class map) reported and left out, never a crash. Files go to ``--out`` (default: the run's
``test/`` dir beside ``checkpoints/``): ``metrics.json``, ``per_class.csv``, ``report.md`` with pictures,
``skipped.csv``. Training runs the same after its last epoch (``evaluate.after_training``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.cli import add_shared_flags, check_device, existing_file, run_cli
from pillsnap_dali.config import Config, load_config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.data.manifest import Manifest, ManifestError, read_manifest, split_missing
from pillsnap_dali.device import select_device
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.training.model import load_classifier
from pillsnap_dali.training.report import write_test_report
from pillsnap_dali.training.checkpoint import checkpoint_stage

_logger = logging.getLogger(__name__)


def find_test_manifest(train_manifest: str | Path) -> Path | None:
    """``manifest_test.csv`` (or ``test.csv``) beside a training manifest, when it exists and has rows."""
    p = Path(train_manifest)
    for a, b in (("manifest_train", "manifest_test"), ("train", "test")):
        if a in p.name:
            cand = p.with_name(p.name.replace(a, b, 1))
            return cand if cand.is_file() and cand.stat().st_size > 0 else None
    return None


def split_known(m: Manifest, class_map: ClassMap) -> tuple[Manifest, dict[str, int]]:
    """(rows whose K-code the class map knows, {absent K-code: rows}): a class the model never learned
    cannot be scored; its rows are counted and reported, not remapped and not a crash."""
    absent = Counter(c for c in m.codes if c not in class_map.index)
    if absent:
        _logger.warning("%d test rows of %d K-code(s) absent from training (%s): reported, not scored",
                        sum(absent.values()), len(absent), ", ".join(sorted(absent)[:10]))
    return m.subset(i for i, c in enumerate(m.codes) if c in class_map.index), dict(sorted(absent.items()))


@torch.no_grad()
def score(model: torch.nn.Module, m: Manifest, class_map: ClassMap, cfg: Config, device: torch.device,
          skip_log) -> dict:
    """EvalAccumulator over the evaluation loader of ``m`` (``cfg.preprocess`` must be the model's)."""
    loader = build_loader(m, m.labels(class_map), cfg, train=False, device=device, backend=cfg.loader.backend,
                          skip_log=skip_log, seed=cfg.train.seed)
    acc = EvalAccumulator(len(class_map), device)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    try:
        loader.set_epoch(0)
        for batch in loader:
            logits = model(batch.images.float()).float()
            acc.update(logits, batch.labels, loss(logits, batch.labels))
    finally:
        loader.close()
    return acc.compute()  # no all_reduce: one process evaluates (rank 0 after a torchrun training)


def check_targets(res: dict, cfg: Config) -> list[dict]:
    """Each configured target: {"target", "goal", "value", "met"} (per-class ones: the worst class's value
    and the classes below the goal)."""
    e, out = cfg.evaluate, []
    precision, recall, support = res["_per_class"]
    present = support > 0
    for name, goal, value in (("top-1", e.target_top1, res["top1"]), ("top-5", e.target_top5, res["top5"])):
        if goal is not None:
            out.append({"target": name, "goal": goal, "value": value, "met": value >= goal})
    for name, goal, per in (("class precision", e.target_class_precision, precision),
                            ("class recall", e.target_class_recall, recall)):
        if goal is not None and present.any():
            below = int(((per < goal) & present).sum())
            out.append({"target": f"every {name}", "goal": goal, "value": float(per[present].min()),
                        "met": below == 0, "classes_below": below})
    return out


def worst_classes(res: dict, class_map: ClassMap, n: int) -> list[dict]:
    precision, recall, support = res["_per_class"]
    ids = [i for i in range(len(class_map)) if support[i] > 0]
    ids.sort(key=lambda i: (float(recall[i]), float(precision[i])))
    return [{"k_code": class_map.codes[i], "dl_name": class_map.meta.get(class_map.codes[i], {}).get("dl_name", ""),
             "support": int(support[i]), "precision": round(float(precision[i]), 4),
             "recall": round(float(recall[i]), 4)} for i in ids[:n]]


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, cfg: Config, device: torch.device,
                        out_dir: str | Path, class_map_json: str | None = None, model_name: str | None = None,
                        legacy_preprocess=None) -> dict:
    """Score ``checkpoint``'s deployed weights on ``manifest``; write metrics.json, per_class.csv, skipped.csv
    and report.md (with pictures) into ``out_dir``; return the summary (also in metrics.json). A plain state
    dict needs ``class_map_json`` (``model_name``, ``legacy_preprocess``: as ``checkpoint.load_classifier``)."""
    loaded = load_classifier(checkpoint, class_map_json=class_map_json, model_name=model_name,
                             preprocess=legacy_preprocess, device=device)
    cfg = dataclasses.replace(cfg, preprocess=loaded.preprocess)  # the model's preprocessing, never the config's
    m, missing = split_missing(read_manifest(manifest))
    m, absent = split_known(m, loaded.class_map)
    if not len(m):
        raise ManifestError(f"{manifest}: no test row of a class the model knows ({len(absent)} absent K-codes, "
                            f"{len(missing)} missing files)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip_log = SkipLog(out / "skipped.csv")
    skip_log.ensure_file()
    res = score(loaded.model, m, loaded.class_map, cfg, device, skip_log)
    write_per_class(out / "per_class.csv", res, loaded.class_map)
    summary = {"checkpoint": str(checkpoint), "manifest": str(manifest), "images": res["count"],
               "top1": res["top1"], "top5": res["top5"], "macro_precision": res["macro_precision"],
               "macro_recall": res["macro_recall"], "macro_f1": res["macro_f1"],
               "targets": check_targets(res, cfg), "worst_classes": worst_classes(res, loaded.class_map,
                                                                                  cfg.evaluate.worst_classes),
               "absent_classes": absent, "absent_rows": sum(absent.values()),
               "missing_files": [{"path": p, "reason": r} for p, r in missing], "skipped": len(skip_log),
               "confusions": top_confusions(res, loaded.class_map, 20)}
    summary["targets_met"] = all(t["met"] for t in summary["targets"]) if summary["targets"] else None
    atomic_write_text(out / "metrics.json", json.dumps(summary, ensure_ascii=False, indent=1))
    summary["report"] = str(write_test_report(out, summary, m, loaded.class_map))
    return summary


def after_training(run_dir: Path, train_manifest: str | None, cfg: Config, device: torch.device) -> dict | None:
    """The test-split score of a finished run's best.pt (``evaluate.after_training``), or None when there is
    no test split beside the training manifest or no best.pt; its failure is logged, never the run's end."""
    best = run_dir / "checkpoints" / "best.pt"
    test = find_test_manifest(train_manifest) if train_manifest else None
    if not cfg.evaluate.after_training or test is None or not best.is_file():
        return None
    try:
        return evaluate_checkpoint(best, test, cfg, device, run_dir / "test")
    except (ValueError, OSError, RuntimeError) as e:  # the training itself succeeded: keep its report
        _logger.warning("test split %s not evaluated: %s", test, e)
        return None


# -------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt)")
    p.add_argument("--manifest", required=True, help="the test manifest (artifacts/<stage>/manifest_test.csv)")
    p.add_argument("--class-map", default=None, help="class map JSON of a plain state dict (default: none)")
    p.add_argument("--model-name", default=None, help="timm model of a plain state dict (default "
                   "tf_efficientnetv2_s)")
    add_shared_flags(p, ("out", "stage", "config", "set", "device"), helps={
        "out": "output dir (default: <run dir>/test beside checkpoints/)",
        "stage": "config stage overlay: targets, loader settings; one of %(choices)s (default: the checkpoint's "
                 "stage)"})
    p.add_argument("--backend", default=None, choices=["auto", "dali", "dali-cpu", "pil"],
                   help="loader backend (default: loader.backend, auto)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: train.batch_size)")
    return p


def _config(args) -> Config:
    stage = args.stage
    if stage is None:  # the checkpoint's stage (its targets), when it is one of ours
        stage = checkpoint_stage(args.checkpoint)  # None for a plain state dict; ours is checked first
    sets = list(args.set) + ([f"loader.backend={args.backend}"] if args.backend else []) + (
        [f"train.batch_size={args.batch_size}"] if args.batch_size else [])
    return load_config(stage=stage, path=args.config, sets=sets)


def _print(summary: dict) -> None:
    print(f"test split: {summary['images']} images; top-1 {summary['top1']:.4f}, top-5 {summary['top5']:.4f}, "
          f"macro P {summary['macro_precision']:.4f} R {summary['macro_recall']:.4f} F1 {summary['macro_f1']:.4f}")
    for t in summary["targets"]:
        print(f"  target {t['target']} >= {t['goal']:.0%}: {t['value']:.4f} {'met' if t['met'] else 'NOT met'}"
              + (f" ({t['classes_below']} classes below)" if t.get("classes_below") else ""))
    if summary["absent_classes"]:
        print(f"  {summary['absent_rows']} rows of {len(summary['absent_classes'])} K-codes absent from training "
              "(not scored)")
    print(f"report: {summary['report']}")


def _main(args) -> int:
    existing_file(args.checkpoint, "--checkpoint")
    existing_file(args.manifest, "--manifest")
    check_device(args.device or "auto")
    cfg = _config(args)
    dev = select_device(args.device or "auto").torch
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "test"
    given = args.config or args.stage or any(s.strip().startswith("preprocess.") for s in args.set)
    summary = evaluate_checkpoint(args.checkpoint, args.manifest, cfg, dev, out, args.class_map,
                                  args.model_name, cfg.preprocess if given else None)
    _print(summary)
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
