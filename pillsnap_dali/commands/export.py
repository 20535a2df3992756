"""``python -m pillsnap_dali.export``: the trained models as ONNX, with a parity proof before anything is written.

    python -m pillsnap_dali.export --classifier runs/demo/checkpoints/best.pt --format onnx --out export/demo
    python -m pillsnap_dali.export --classifier runs/stage3/checkpoints/best.pt \\
        --detector runs/detect_3/weights/best.pt --format onnx --out export/stage3 --fp16

The classifier: opset 17, dynamic batch, input ``input`` (normalized NCHW float), output ``output`` (logits),
the deployed weights (the EMA when ``best.pt`` chose it), with the K-codes, drug names and preprocessing
(size, resize mode, mean/std) in the ONNX metadata and in ``classifier.json`` beside it (the full class
map, the parity figures and latency too). Before writing, onnxruntime runs the model on real validation
images (the validation manifest the run recorded in its checkpoint, or ``--images``) against torch: the
max abs logit difference and the top-1 agreement must be within bounds (``--atol``, ``--min-agreement``;
the same for ``--fp16`` with looser bounds), else nothing is written. Files are written atomically (an
export over an existing one replaces it whole or not at all). The detector goes through Ultralytics' own
export at its training letterbox size (640 for the users' detector) into ``detector.onnx`` + ``detector.json``.

This module is the command (its parser and ``main``); the work is done by ``pillsnap_dali.onnx_export``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pillsnap_dali.commands.common import add_shared_flags, config_from_args, existing_file, run_cli
from pillsnap_dali.onnx_runtime import CLASSIFIER, DETECTOR
from pillsnap_dali.training.checkpoint import load_checkpoint
from pillsnap_dali.training.model import load_classifier
from pillsnap_dali.onnx_export import Bounds, ParityError, export_classifier, export_detector, parity_images, preprocess, val_manifest_of


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True, help="classifier checkpoint (best.pt, or a plain state dict "
                   "with --class-map)")
    p.add_argument("--detector", default=None, help="YOLO weights (.pt) to export too (default: none)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="output dir for classifier.onnx/.json (and detector.onnx/.json)")
    p.add_argument("--class-map", default=None, help="class map JSON of a plain state dict (default: none)")
    p.add_argument("--model-name", default=None, help="timm model of a plain state dict (default tf_efficientnetv2_s)")
    p.add_argument("--images", nargs="*", default=[], help="parity images or folders (default: the run's "
                   "validation manifest)")
    p.add_argument("--val-manifest", default=None, help="manifest whose images prove parity (default: the "
                   "validation manifest the checkpoint recorded, e.g. the run's --val-manifest, else "
                   "<artifacts>/<stage>/manifest_val.csv from its config)")
    p.add_argument("--max-images", type=int, default=64, help="parity images used at most (default: 64)")
    p.add_argument("--fp16", action="store_true", help="also write classifier_fp16.onnx (its own parity bounds)")
    p.add_argument("--atol", type=float, default=Bounds.atol, help=f"max abs logit difference allowed, fp32 "
                   f"(default: {Bounds.atol:g}; fp16: {Bounds.atol_fp16:g})")
    p.add_argument("--min-agreement", type=float, default=Bounds.min_agreement, help="top-1 agreement required, "
                   f"fp32 (default: {Bounds.min_agreement:g}; fp16: {Bounds.min_agreement_fp16:g})")
    p.add_argument("--imgsz", type=int, default=None, help="detector letterbox size (default: its training size)")
    add_shared_flags(p, ("stage", "config", "set"), helps={
        "stage": "config stage overlay (a plain state dict's preprocessing); one of %(choices)s (default: none)"})
    return p


def _load(args, cfg):
    given = args.config or args.stage or any(s.strip().startswith("preprocess.") for s in args.set)
    loaded = load_classifier(args.classifier, class_map_json=args.class_map, model_name=args.model_name,
                             preprocess=cfg.preprocess if given else None, device="cpu")
    return loaded, load_checkpoint(args.classifier)


def _run(args, cfg) -> dict:
    """Export the classifier (and the detector) after the parity check: what was written and measured."""
    loaded, ck = _load(args, cfg)
    val = Path(args.val_manifest) if args.val_manifest else val_manifest_of(ck)
    x, used = preprocess(parity_images(args.images, val, args.max_images, ck), loaded.preprocess, cfg.data.max_pixels)
    out = Path(args.out)
    bounds = Bounds(atol=args.atol, min_agreement=args.min_agreement)
    meta = export_classifier(loaded, ck, args.classifier, x, out, bounds, fp16=args.fp16)
    det = export_detector(args.detector, out, args.imgsz) if args.detector else None
    return {"meta": meta, "images": len(used), "source": "given" if args.images else str(val), "out": out,
            "detector": det}


def _print_export(r: dict) -> None:
    meta, out = r["meta"], r["out"]
    print(f"parity on {r['images']} images ({r['source']}):")
    for name, f in meta["parity"].items():
        lat = meta["latency_batch1"][name]
        print(f"  {name}.onnx: max abs logit diff {f['max_abs_diff']:.3g} (bound {f['atol']:g}), top-1 agreement "
              f"{f['top1_agreement']:.2%}; onnxruntime batch 1: p50 {lat['p50_ms']:.2f} ms, p95 {lat['p95_ms']:.2f} ms")
    t = meta["latency_batch1"]["torch"]
    print(f"  torch batch 1 (same machine, 1 thread): p50 {t['p50_ms']:.2f} ms, p95 {t['p95_ms']:.2f} ms")
    print(f"wrote {out / (CLASSIFIER + '.onnx')} and {CLASSIFIER}.json ({meta['model_name']}, {meta['num_classes']} "
          f"K-codes, {meta['preprocess']['img_size']} px {meta['preprocess']['resize_mode']}, weights: "
          f"{meta['weights']})")
    if r["detector"]:
        print(f"wrote {out / (DETECTOR + '.onnx')} and {DETECTOR}.json (Ultralytics export, "
              f"{r['detector']['imgsz']} px)")


def _main(args) -> int:
    existing_file(args.classifier, "--classifier")
    try:
        result = _run(args, config_from_args(args, {}))
    except ParityError as e:  # the export ran and did not prove parity: nothing written, status 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_export(result)
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
