"""Test-split evaluation, the score users report: the deployed weights of a checkpoint with its own
preprocessing through the project's evaluation loader; top-1/top-5, macro precision/recall/F1, per-class CSV,
the stage targets, absent K-codes reported and left out; ``after_training`` runs it when a training ends,
``run_manifests``/``test_split`` say which manifests a run used and why it has no test split. The command and
its options: ``pillsnap_dali.commands.evaluate``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.config import Config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.errors import PillsnapError, one_line
from pillsnap_dali.data.manifest import Manifest, ManifestError, read_manifest, split_missing
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.training.model import load_classifier
from pillsnap_dali.training.report import write_test_report

_logger = logging.getLogger(__name__)


NO_TEST_HINT = ("this run is scored on its validation split only; hold out a test split for a real stage "
                "(README: Holding out a test split)")


def find_test_manifest(train_manifest: str | Path) -> Path | None:
    """``manifest_test.csv`` (or ``test.csv``) beside a training manifest, when it exists and has rows."""
    p = Path(train_manifest)
    for a, b in (("manifest_train", "manifest_test"), ("train", "test")):
        if a in p.name:
            cand = p.with_name(p.name.replace(a, b, 1))
            return cand if cand.is_file() and cand.stat().st_size > 0 else None
    return None


def test_split(train_manifest: str | Path | None) -> tuple[Path | None, str | None]:
    """(the test manifest beside a training manifest, or None; None, or a plain sentence saying why this run
    has no test split: no file beside it, or a file without rows, e.g. a stage built from a tree without the
    AI Hub Validation part, or the users' own 80/20 train/val manifests)."""
    if train_manifest is None:
        return None, f"no training manifest recorded: {NO_TEST_HINT}"
    test = find_test_manifest(train_manifest)
    if test is None:
        return None, (f"no test split: no test manifest (manifest_test.csv) beside {Path(train_manifest).resolve()}; "
                      f"{NO_TEST_HINT}")
    if not len(read_manifest(test)):
        return None, (f"no test split: {test.resolve()} has no rows (this stage's split is train/val only: its tree "
                      f"has no AI Hub Validation images of the stage's classes); {NO_TEST_HINT}")
    return test, None


def run_manifests(train: str | Path, val: str | Path) -> dict:
    """What a checkpoint records of the data its run used (``run_inputs``): absolute manifest paths (the
    test one when a test split is beside the training manifest) and the sentence saying why there is none."""
    test, note = test_split(train)
    return {"manifests": {"train": str(Path(train).resolve()), "val": str(Path(val).resolve()),
                          "test": str(test.resolve()) if test else None}, "test_note": note}


def recorded_manifest(ck, split: str) -> Path | None:
    """The ``split`` manifest a checkpoint's run recorded (``run_inputs``), when the file is still there."""
    rec = ((ck.get("run_inputs") or {}).get("manifests") or {}) if isinstance(ck, dict) else {}
    p = rec.get(split)
    return Path(p) if p and Path(p).is_file() else None


def recorded_test_note(ck) -> str | None:
    """Why a checkpoint's run had no test split (``run_inputs["test_note"]``), or None."""
    return (ck.get("run_inputs") or {}).get("test_note") if isinstance(ck, dict) else None


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
    if not len(m) and not missing:
        raise ManifestError(f"{manifest} has no rows: no test split to score; {NO_TEST_HINT}")
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
    """The test-split score of a finished run's best.pt, or ``{"not_evaluated": reason}`` (shown in the
    report and the command's summary) when the run has no test split (``test_split``'s plain sentence), no
    best.pt, or an expected fault (a bad test manifest or image loader failure, a disk error) stopped it; None
    when ``evaluate.after_training`` is off. Any other exception is a bug and propagates."""
    if not cfg.evaluate.after_training:
        return None
    best = run_dir / "checkpoints" / "best.pt"
    test, note = test_split(train_manifest)
    if test is None:
        reason = note
    elif not best.is_file():
        reason = f"no {best} (no epoch completed)"
    else:
        try:
            return evaluate_checkpoint(best, test, cfg, device, run_dir / "test")
        except (PillsnapError, OSError) as e:  # the training itself succeeded: keep its report, say why
            reason = f"{test}: {one_line(e)}"
    _logger.warning("test split not evaluated: %s", reason)
    return {"not_evaluated": reason}


@torch.no_grad()
def single_accuracy(manifest: Manifest, classifier, cfg: Config) -> dict:
    """Top-1/top-5 of predict's single-image path (whole image, the checkpoint's preprocessing, PIL) over a
    classification manifest's rows of K-codes the classifier knows; unreadable images counted, not scored."""
    from pillsnap_dali.inference import make_predictor, options_from

    m, absent = split_known(manifest, classifier.class_map)
    predict = make_predictor(classifier, None, options_from(cfg, "single", 5))
    images = top1 = top5 = unreadable = 0
    for i, code in enumerate(m.codes):
        path = m.source_path(i)  # the original image (a cached row's PNG), as a user would give it
        r = predict(path)
        if "error" in r or not r.get("pills"):
            unreadable += 1
            _logger.warning("single-image accuracy: %s left out: %s", path, r.get("error", "no prediction"))
            continue
        codes = [t["code"] for t in r["pills"][0]["topk"]]
        images, top1, top5 = images + 1, top1 + (codes[0] == code), top5 + (code in codes)
    return {"manifest": str(manifest.path), "images": images, "unreadable": unreadable,
            "absent_rows": sum(absent.values()), "top1": round(top1 / images, 4) if images else None,
            "top5": round(top5 / images, 4) if images else None}
