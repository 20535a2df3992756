"""Detector training: Ultralytics YOLO fed by the DALI graph of ``pipelines/detect.py``.

``python -m pillsnap_dali.detect --stage N [--model yolo11m.yaml|PATH] [--epochs E] [--imgsz 640]
[--backend dali|dali-cpu|ultralytics]`` converts the stage's combination images to a YOLO dataset
(``yolo_convert``), then trains. The DALI backends plug into Ultralytics through its extension hooks only:
a ``DetectionTrainer`` subclass whose ``get_dataloader`` returns a ``DaliDetectLoader``
(``pillsnap_dali.loaders.detect``, on the DALI runner the classification loader uses too) yielding the batch
dict its trainer and validator expect (``img`` uint8 BCHW, ``cls``, ``bboxes`` normalized xywh,
``batch_idx``, ``im_file``, ``ori_shape``, ``resized_shape``, ``ratio_pad``). ``--backend ultralytics``
uses its own loader (mosaic and the rest of its augmentation).

Fully offline: ``YOLO_OFFLINE`` is set before Ultralytics is imported (lazily, here only), plots are off
(no font download), models are built from a yaml or a local ``.pt`` (never fetched, loaded ``weights_only``:
``pillsnap_dali.weights``). Precision: ``amp="bf16"`` where the GPU has native bf16 and the installed
Ultralytics accepts it, else fp16 AMP (its AMP check cannot download its reference model offline: it is
skipped with a warning), off on the CPU. ``--device cuda:N``: DALI, torch and the detector on GPU N
(``pillsnap_dali.device``). OS errors while writing are one line naming the path (``OutputError``).

Run dir ``<train.out>/detect_<stage>/``: ``weights/{best,last}.pt``, ``metrics.json`` (P, R, mAP50,
mAP50-95), ``skipped.csv`` (row, path, reason, backend, epoch: the images the DALI loaders could not use, written
as they are found, not retried by a rerun in the same dir), Ultralytics' ``results.csv``/``args.yaml``.

``--resume [CKPT]`` continues an interrupted run from ``weights/last.pt`` (or CKPT) with Ultralytics' own resume
(``resume=<last.pt>``: its settings, weights, optimizer, EMA and epoch; ``results.csv`` is appended to). The
checkpoint is scanned and checked first (``resume_state``): a missing file or a finished run's is one line.
The DALI trainer sets its training loader's epoch from the trainer's at each epoch start, and the detection
graph's flips and HSV factors are drawn on the host from (seed, epoch, image row)
(``loaders.augment.draw_detect``), so a resumed epoch gets the order and draws of the interrupted one.

This module is the command (its parser and ``main``); the work is done by ``pillsnap_dali.training.detector``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pillsnap_dali.commands.common import SHARED_KEYS, add_shared_flags, config_from_args, existing_file, key_help, run_cli
from pillsnap_dali.data.yolo import convert_stage
from pillsnap_dali.training.detector import resumed, run_from_config, train_detector
from pillsnap_dali.training.resume import LAST


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.detect", description=__doc__.split("\n\n")[0])
    add_shared_flags(p, ("stage", "config", "data-root"), helps={
        "stage": "stage whose manifests (combination images) are converted; one of %(choices)s (default: the "
                 "config's stage, demo)"})
    p.add_argument("--model", default=None, help=key_help("Ultralytics model yaml (from scratch) or a local .pt",
                                                           "detect.model"))
    p.add_argument("--epochs", type=int, default=None, help=key_help("detector training epochs", "detect.epochs"))
    p.add_argument("--imgsz", type=int, default=None, help=key_help("letterbox size", "detect.imgsz"))
    p.add_argument("--batch-size", type=int, default=None, help=key_help("images per step", "detect.batch_size"))
    p.add_argument("--backend", choices=("dali", "dali-cpu", "ultralytics"), default=None,
                   help=key_help("detector loader, one of %(choices)s", "detect.backend"))
    p.add_argument("--data", default=None, help="an existing YOLO data.yaml: skip the conversion (default: convert "
                                                "the stage's manifests)")
    p.add_argument("--convert-only", action="store_true", help="write the YOLO dataset and stop (default: off)")
    add_shared_flags(p, ("resume",), helps={"resume": (
        "continue an interrupted detector run from CHECKPOINT with Ultralytics' own resume (its settings, "
        "weights, optimizer and epoch; default when given alone: <run dir>/weights/last.pt)")})
    add_shared_flags(p, ("out", "name", "device", "set"), helps={
        "out": "runs folder; the detector's run goes to <out>/detect_<name or stage> (config train.out; "
               "default: runs)",
        "name": "run name: the run folder is detect_<name> (config train.name; default: detect_<stage>)"})
    return p


# each flag's config key (the shared flags' from cli.SHARED_KEYS)
_FLAG_KEYS = {"model": "detect.model", "epochs": "detect.epochs", "imgsz": "detect.imgsz",
              "batch_size": "detect.batch_size", "backend": "detect.backend"}


def resolve_config(args: argparse.Namespace):
    return config_from_args(args, {**SHARED_KEYS, **_FLAG_KEYS})


def _main(args) -> int:
    existing_file(args.data, "--data")
    cfg = resolve_config(args)
    resume = None
    if args.resume is not None and not args.convert_only:  # checked before anything is converted or trained
        resume = resumed(run_from_config(cfg, Path(args.data or "")), None if args.resume == LAST else Path(args.resume))
    data_yaml = Path(args.data) if args.data else convert_stage(cfg)
    if args.convert_only:
        print(f"YOLO dataset: {data_yaml}")
        return 0
    run = dataclasses.replace(resume, data_yaml=data_yaml) if resume else run_from_config(cfg, data_yaml)
    summary = train_detector(run)
    print(json.dumps({k: summary[k] for k in ("precision", "recall", "mAP50", "mAP50-95", "weights")}, indent=1))
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
