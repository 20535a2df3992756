"""Prediction: ``single`` classifies the whole image; ``combo`` detects pills, crops each box and classifies it.

``python -m pillsnap_dali.predict IMAGE|DIR ... --classifier CKPT [--detector WEIGHTS] --mode single|combo
[--topk 5] [--json]``. The mode is the user's choice and is never switched automatically (a combo image
without detections gives an empty pill list and a warning, not a whole-image guess).

The classifier input is exactly the preprocessing stored in its checkpoint (image size, resize mode,
mean/std), applied by ``loaders.pil_eval_transform``, the PIL twin of the DALI evaluation graph. The
existing project's checkpoints load too: a timm EfficientNetV2 state dict (``_orig_mod.`` prefixes
stripped) plus its class map as JSON (``--class-map``). Each pill gets its top-k K-codes with confidence and
the drug metadata of the class map (dl_name, shape, colours, imprint). Per-image latency (load, detect,
crop, classify) is measured and p50/p95 printed.

With ``--eval MANIFEST`` (a ``detect_*.csv``) it reports the two-stage accuracy instead: the share of
labelled pills whose K-code is right at top-1 (a pill counts when a detection overlaps its box with
IoU >= 0.5 and that detection's top-1 is its code); in ``single`` mode, on a classification manifest, the
whole-image top-1/top-5 of predict's own path. ``--eval`` alone reads the test manifest the checkpoint's
run recorded.

This module is the command (its parser and ``main``); the work is done by ``pillsnap_dali.inference``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pillsnap_dali.commands.common import add_shared_flags, config_from_args, existing_file, key_help, run_cli
from pillsnap_dali.errors import UsageError
from pillsnap_dali.device import select_device
from pillsnap_dali.training.checkpoint import load_checkpoint
from pillsnap_dali.training.evaluation import recorded_manifest, recorded_test_note, single_accuracy
from pillsnap_dali.training.model import load_classifier
from pillsnap_dali.onnx_runtime import load_classifier_dir, load_detector_dir
from pillsnap_dali.data.manifest import read_manifest
from pillsnap_dali.inference import MODES, collect_images, format_table, latency_summary, load_detector, predict_images, two_stage_accuracy

_logger = logging.getLogger("pillsnap_dali.predict")
RUN = "__run__"  # --eval without a value: the run's recorded manifests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="images or folders of images (default: none; give some, or --eval)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint, ours or the existing project's "
                                                      "(default: none; give it or --onnx)")
    p.add_argument("--onnx", default=None, metavar="DIR", help="run the models of an export dir "
                   "(python -m pillsnap_dali.export) with onnxruntime instead: classifier.onnx, and detector.onnx "
                   "for --mode combo unless --detector is given (default: none)")
    p.add_argument("--class-map", default=None, help="class map JSON (needed for a plain state dict; default: "
                                                     "the checkpoint's own)")
    p.add_argument("--model-name", default=None, help="timm model of a plain state dict (default: "
                                                      "tf_efficientnetv2_s)")
    p.add_argument("--detector", default=None, help="YOLO weights (.pt), needed for --mode combo (default: none)")
    p.add_argument("--mode", choices=MODES, required=True, help="single: whole image; combo: detect then classify "
                                                                "(required)")
    p.add_argument("--topk", type=int, default=None, help=key_help("K-codes listed per pill", "predict.topk"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    p.add_argument("--eval", nargs="?", const=RUN, default=None, metavar="MANIFEST",
                   help="score instead of predicting inputs: --mode combo, two-stage top-1 on a detect_*.csv "
                        "manifest; --mode single, whole-image top-1/top-5 on a classification manifest; without "
                        "a value, the checkpoint's run's recorded test manifest (combo: the detect_test.csv "
                        "beside it) (default: predict the inputs)")
    add_shared_flags(p, ("device", "stage", "config", "set"), helps={
        "device": "auto | cpu | cuda | cuda:N (default: auto, cuda when available)",
        "stage": "config stage overlay (predict.*, detect.imgsz, data.max_pixels); one of %(choices)s "
                 "(default: none, base.yaml alone)",
        "set": "override a config key, e.g. predict.conf=0.4; preprocess.* sets a plain state dict's "
               "preprocessing (default: none; a plain state dict gets 384 px squash)"})
    return p


def _load_models(args, cfg):
    if args.onnx:
        return _load_onnx(args)
    device = select_device(args.device or "auto").torch  # the detector follows the classifier's device
    # a plain state dict carries no preprocessing: the users' Stage 3 model's (384 px, squash) unless the
    # command names one (--set preprocess.*, --config, --stage); our checkpoints always use their own
    given = args.config or args.stage or any(s.strip().startswith("preprocess.") for s in args.set)
    classifier = load_classifier(args.classifier, class_map_json=args.class_map, model_name=args.model_name,
                                 preprocess=cfg.preprocess if given else None, device=device)
    if given and classifier.source != "legacy":
        _logger.warning("%s carries its own preprocessing (%d px, %s): the preprocessing of the command line is "
                        "not used", args.classifier, classifier.preprocess.img_size, classifier.preprocess.resize_mode)
    detector = load_detector(args.detector) if args.detector else None
    return classifier, detector


def _load_onnx(args):
    """The export dir's classifier (and detector, for combo mode) under onnxruntime."""
    classifier = load_classifier_dir(args.onnx, device=args.device or "cpu")
    if args.mode != "combo":
        return classifier, None
    return classifier, load_detector(args.detector) if args.detector else load_detector_dir(args.onnx)


def _run(args, cfg) -> int:
    if bool(args.classifier) == bool(args.onnx):
        raise UsageError("give the classifier: --classifier CKPT or --onnx EXPORT_DIR (one of them)")
    if args.mode == "combo" and not (args.detector or args.onnx):
        raise UsageError("--mode combo needs --detector WEIGHTS")
    classifier, detector = _load_models(args, cfg)
    if args.eval:
        manifest = read_manifest(eval_manifest(args))
        score = (two_stage_accuracy(manifest, classifier, detector, cfg) if args.mode == "combo" else
                 single_accuracy(manifest, classifier, cfg))
        print(json.dumps({"manifest": str(manifest.path), **score}, indent=1))
        return 0
    results = predict_images(collect_images(args.inputs), classifier, detector, args.mode,
                             args.topk or cfg.predict.topk, cfg)
    lat = latency_summary(results)
    if args.json:
        print(json.dumps({"results": results, "latency": lat}, ensure_ascii=False, indent=1))
    else:
        print(format_table(results))
        if lat["images"]:
            print(f"latency per image: p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms "
                  f"({lat['images']} images)")
    return 1 if any("error" in r for r in results) else 0


def eval_manifest(args) -> str:
    """``--eval MANIFEST``, or (no value) the manifest the checkpoint's run recorded: its test split (combo
    mode: ``detect_test.csv`` beside it); a run without a test split says so and asks for a manifest."""
    if args.eval != RUN:
        return args.eval
    if not args.classifier:
        raise UsageError("--eval without a manifest reads the run's from --classifier CKPT: pass --eval MANIFEST")
    ck = load_checkpoint(args.classifier)
    test = recorded_manifest(ck, "test")
    if test is None:
        note = recorded_test_note(ck) or "no test manifest recorded in it"
        raise UsageError(f"{args.classifier}: {note}; pass --eval MANIFEST")
    if args.mode == "combo":
        detect = test.with_name(test.name.replace("manifest_", "detect_", 1))
        if test.name == detect.name or not detect.is_file():
            raise UsageError(f"no detect_test.csv beside the run's test manifest {test}: pass --eval DETECT_CSV")
        return str(detect)
    return str(test)


def _main(args) -> int:
    if not args.inputs and not args.eval:
        raise UsageError("give images or folders (or --eval DETECT_CSV)")
    for flag in ("classifier", "class_map", "detector", "eval"):
        if getattr(args, flag) != RUN:
            existing_file(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.device == "auto":
        args.device = None
    cfg = config_from_args(args, {})
    return _run(args, cfg)


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
