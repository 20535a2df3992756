"""``python -m pillsnap_dali.evaluate``: the score users report, on the test split (never trained on).

    python -m pillsnap_dali.evaluate --checkpoint runs/stage3/checkpoints/best.pt \\
        [--manifest artifacts/stage3/manifest_test.csv]    (default: the run's recorded test manifest)

The deployed weights of the checkpoint (the EMA when it chose it), with its own preprocessing, through the
project's evaluation loader (``--backend``, as training): top-1/top-5, macro precision/recall/F1, a per-class
CSV, the worst classes by recall, the stage targets (``evaluate.target_*``; Stage 3: 85 % top-1, 95 % top-5,
every class's precision and recall >= 80 %) checked, and the test rows whose K-code the model never learned
(absent from its class map) reported and left out, never a crash. Files go to ``--out`` (default: the run's
``test/`` dir beside ``checkpoints/``): ``metrics.json``, ``per_class.csv``, ``report.md`` with pictures,
``skipped.csv``. Training runs the same after its last epoch (``after_training``).

This module is the command (its parser and ``main``); the work is done by ``pillsnap_dali.training.evaluation``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pillsnap_dali.commands.common import add_shared_flags, check_device, config_from_args, existing_file, run_cli
from pillsnap_dali.config import Config
from pillsnap_dali.device import select_device
from pillsnap_dali.errors import UsageError
from pillsnap_dali.training.checkpoint import checkpoint_stage, load_checkpoint
from pillsnap_dali.training.evaluation import evaluate_checkpoint, recorded_manifest, recorded_test_note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt)")
    p.add_argument("--manifest", default=None, help="the test manifest (default: the test manifest the "
                   "checkpoint's run recorded, manifest_test.csv beside its training manifest)")
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


# each flag's config key, as in every other command; --set goes over them
_FLAG_KEYS = {"backend": "loader.backend", "batch_size": "train.batch_size"}


def _config(args) -> Config:
    """base.yaml <- the stage (``--stage``, else the checkpoint's) <- ``--config`` <- the flags <- ``--set``."""
    return config_from_args(args, _FLAG_KEYS, default_stage=None if args.stage else checkpoint_stage(args.checkpoint))


def test_manifest(args) -> str:
    """``--manifest``, else the run's recorded test manifest; a run without a test split says so plainly."""
    if args.manifest:
        existing_file(args.manifest, "--manifest")
        return args.manifest
    ck = load_checkpoint(args.checkpoint)
    found = recorded_manifest(ck, "test")
    if found is not None:
        return str(found)
    note = recorded_test_note(ck)
    raise UsageError(f"{args.checkpoint}: " + (note + "; or pass --manifest CSV" if note else
                     "no test manifest recorded in it (a run of an older version, or a plain state dict): pass "
                     "--manifest CSV"))


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
    manifest = test_manifest(args)
    check_device(args.device or "auto")
    cfg = _config(args)
    dev = select_device(args.device or "auto").torch
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "test"
    given = args.config or args.stage or any(s.strip().startswith("preprocess.") for s in args.set)
    summary = evaluate_checkpoint(args.checkpoint, manifest, cfg, dev, out, args.class_map,
                                  args.model_name, cfg.preprocess if given else None)
    _print(summary)
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
