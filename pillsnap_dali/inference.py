"""Prediction: ``single`` classifies the whole image; ``combo`` detects pills, crops each box and classifies it,
with the checkpoint's own preprocessing (``loaders.pil_eval_transform``), the class map's drug metadata per
K-code, latency per image and the two-stage accuracy of a detection manifest. The command and its options:
``pillsnap_dali.commands.predict``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pillsnap_dali.geometry import (PAD_VALUE, BoxRules, clean_boxes, iou_xyxy, letterbox_geometry, on_image,
                                    unletterbox)
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, open_rgb
from pillsnap_dali.weights import load_yolo
from pillsnap_dali.loaders import pil_eval_transform
from pillsnap_dali.data.yolo import image_size

_logger = logging.getLogger(__name__)

MODES = ("single", "combo")
SHOWN_META = ("dl_name", "drug_shape", "color_class1", "color_class2", "print_front", "print_back")
MATCH_IOU = 0.5


@dataclass
class PredictOptions:
    """The prediction knobs, unpacked from ``cfg.predict`` / ``cfg.detect`` at one seam (``options_from``)."""
    mode: str = "single"
    topk: int = 5
    crop_padding: float = 0.1   # each side of a box grows by this fraction of the box's width/height
    conf: float = 0.25
    iou: float = 0.7
    det_imgsz: int = 640        # used only when the detector weights do not say their training size
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_det: int = 300          # detector's cap on boxes per image (Ultralytics' default)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.topk < 1 or self.crop_padding < 0:
            raise ValueError("topk must be >= 1 and crop_padding >= 0")


def options_from(cfg, mode: str, topk: int | None = None) -> PredictOptions:
    p = cfg.predict
    return PredictOptions(mode=mode, topk=p.topk if topk is None else topk, crop_padding=p.crop_padding, conf=p.conf, iou=p.iou,
                          det_imgsz=cfg.detect.imgsz, max_pixels=cfg.data.max_pixels)


def load_detector(weights: str | Path):
    """An Ultralytics YOLO from LOCAL weights (never downloaded), loaded with ``weights_only=True`` against
    an allow-list (``weights.load_yolo``): a crafted file is refused, never executed. Note: its CPU predictor
    sets torch threads to min(8, cores - 1)."""
    return load_yolo(weights, task="detect")  # a .pt is name-checked there before Ultralytics sees it


def detector_imgsz(detector, default: int) -> int:
    """The letterbox size the detector was trained at (stored in its weights), else ``default``; a multiple
    of the detector's stride (32), as Ultralytics' trainer rounds it."""
    if getattr(detector, "pillsnap_imgsz", None):  # an ONNX detector: the fixed size it was exported at
        return int(detector.pillsnap_imgsz)
    args = getattr(getattr(detector, "model", None), "args", None) or {}
    size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    size = int(size) if isinstance(size, (int, float)) else int(default)
    return -(-size // 32) * 32


def padded_box(box, width: int, height: int, padding: float) -> tuple[int, int, int, int]:
    """xyxy grown by ``padding`` x its width (height) on each side, clipped to the image, in whole pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * padding, (y2 - y1) * padding
    return (max(int(np.floor(x1 - dx)), 0), max(int(np.floor(y1 - dy)), 0),
            min(int(np.ceil(x2 + dx)), width), min(int(np.ceil(y2 + dy)), height))


class Classify:
    """The classifier with its own preprocessing: PIL crops in, top-k K-codes with metadata out."""

    def __init__(self, loaded, topk: int):
        self.loaded, self.topk = loaded, min(topk, len(loaded.class_map))
        self.transform = pil_eval_transform(loaded.preprocess)
        self.device = getattr(loaded, "device", None) or next(loaded.model.parameters()).device  # ONNX: cpu

    @torch.inference_mode()
    def __call__(self, crops: list) -> list[list[dict]]:
        if not crops:
            return []
        x = torch.stack([self.transform(c) for c in crops]).to(self.device)
        probs = torch.softmax(self.loaded.model(x).float(), dim=1)
        conf, idx = probs.topk(self.topk, dim=1)
        conf, idx = conf.cpu().tolist(), idx.cpu().tolist()  # one host sync per image
        cm = self.loaded.class_map
        return [[{"code": cm.codes[i], "confidence": round(c, 5), **_meta(cm, cm.codes[i])}
                 for c, i in zip(cs, ids)] for cs, ids in zip(conf, idx)]


def _meta(class_map, code: str) -> dict:
    d = class_map.describe(code)
    return {k: d[k] for k in SHOWN_META if d.get(k) not in (None, "")}


def letterbox(image, imgsz: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The detector's training letterbox, for inference: a 1x3xSxS float tensor in 0..1 and its geometry
    ``(new_h, new_w, top, left)``.

    The same geometry as the DALI detection graph (``pipelines.detect.letterbox_geometry``), the same padding
    value and an antialiased bilinear resize like the graph's (torch's; tests/test_predict.py bounds the
    difference). Ultralytics' own letterbox (cv2 bilinear, no antialiasing) differs from what the detector saw
    in training by 0.4-0.8 grey levels on average at the users' 976x1280 -> 640 / 320 sizes.
    """
    geometry = letterbox_geometry(image.height, image.width, imgsz)
    new_h, new_w, top, left = geometry
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float()
    if (new_w, new_h) != image.size:  # float, like DALI (torch's uint8 path rounds like PIL: 0.26 levels off)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255)  # the graph's output is uint8
    out = torch.full((1, 3, imgsz, imgsz), float(PAD_VALUE))
    out[:, :, top:top + new_h, left:left + new_w] = x
    return out.div_(255.0), geometry


def _detect(detector, image, opts: PredictOptions, imgsz: int, device) -> list[tuple[list[float], float]]:
    """[(xyxy in original pixels, confidence)], best first, on the classifier's device (Ultralytics would
    otherwise pick CUDA whenever it exists, whatever --device says). The image is letterboxed here exactly as
    in training (``letterbox``) and handed to Ultralytics as a tensor, which it takes as it is."""
    x, geometry = letterbox(image, imgsz)
    res = detector.predict(x.to(device), conf=opts.conf, iou=opts.iou, max_det=opts.max_det, verbose=False,
                           device=str(device))[0]
    boxes = res.boxes
    xyxy = unletterbox(boxes.xyxy.cpu().numpy(), geometry, image.width, image.height)
    conf = boxes.conf.cpu().numpy()
    real = on_image(xyxy)
    if not real.all():
        _logger.debug("%d detection(s) outside the image (in the letterbox padding) left out", int((~real).sum()))
    order = [i for i in np.argsort(-conf) if real[i]]
    return [(xyxy[i].tolist(), float(conf[i])) for i in order]


def predict_one(path: str, classify: Classify, detector, opts: PredictOptions, det_imgsz: int) -> dict:
    """One image -> {"image", "mode", "pills": [{"box"?, "det_conf"?, "topk"}], "latency_ms"} or "error"."""
    t0 = time.perf_counter()
    try:
        image = open_rgb(path, opts.max_pixels)
    except Exception as e:  # any unusable file: reported per image, never a silent drop
        _logger.warning("cannot read %s: %s", path, e)
        return {"image": str(path), "mode": opts.mode, "error": f"unreadable image: {e}", "pills": []}
    try:
        if opts.mode == "single":
            pills = [{"topk": classify([image])[0]}]
        else:
            found = _detect(detector, image, opts, det_imgsz, classify.device)
            boxes = [padded_box(b, image.width, image.height, opts.crop_padding) for b, _ in found]
            tops = classify([image.crop(b) for b in boxes])
            pills = [{"box": [round(v, 1) for v in b], "det_conf": round(c, 4), "topk": t}
                     for (b, c), t in zip(found, tops)]
            if not pills:
                _logger.warning("%s: no pill detected (conf >= %.2f)", path, opts.conf)
    except (RuntimeError, ValueError, ZeroDivisionError, OSError) as e:  # this image's failure, not the run's
        _logger.warning("prediction failed on %s: %s: %s", path, type(e).__name__, e)
        return {"image": str(path), "mode": opts.mode, "error": f"prediction failed: {type(e).__name__}: {e}",
                "pills": []}
    return {"image": str(path), "mode": opts.mode, "pills": pills,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}


def make_predictor(classifier, detector, opts: PredictOptions):
    """A callable ``path -> result dict`` with the classifier, detector and options bound once."""
    if opts.mode == "combo" and detector is None:
        raise ValueError("--mode combo needs a detector (--detector WEIGHTS)")
    classify = Classify(classifier, opts.topk)
    det_imgsz = detector_imgsz(detector, opts.det_imgsz) if detector is not None else 0
    return lambda path: predict_one(str(path), classify, detector, opts, det_imgsz)


def predict_images(paths, classifier, detector, mode: str, topk: int, cfg) -> list[dict]:
    """Predict every image of ``paths`` (LoadedClassifier, YOLO or None, "single"|"combo", top-k, Config)."""
    predict = make_predictor(classifier, detector, options_from(cfg, mode, topk))
    return [predict(p) for p in paths]


def latency_summary(results: list[dict]) -> dict:
    ms = [r["latency_ms"] for r in results if "latency_ms" in r]
    if not ms:
        return {"images": 0}
    return {"images": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "mean_ms": round(float(np.mean(ms)), 2)}


def bench_predict(paths, classifier, detector, opts: PredictOptions, *, warmup: int = 2) -> dict:
    """Latency per image (p50/p95/mean ms over ``paths``) after ``warmup`` untimed images, and the device.

    Each image is timed from file to top-k (load, detect, crop, classify), one image at a time as a user
    would call it. For a compute-equivalent figure with untrained weights, pass ``conf=0`` and ``max_det=4``
    (four pills per combination image, as in the real data).
    """
    paths = list(paths)
    predict = make_predictor(classifier, detector, opts)
    for p in paths[:warmup]:
        predict(p)
    results = [predict(p) for p in paths]
    device = next(classifier.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    crops = [len(r["pills"]) for r in results if "error" not in r]
    return {"mode": opts.mode, "device": name, "pills_per_image": round(float(np.mean(crops)), 2) if crops else 0,
            **latency_summary(results)}


def _ground_truth(raw_boxes: list, width: int, height: int, cfg) -> list[tuple[list[float], set]]:
    """[(xyxy, accepted K-codes)]: the converter's clean boxes, each with the codes labelled on it."""
    rules = BoxRules.from_config(cfg)
    boxes, _ = clean_boxes(raw_boxes, width, height, rules)
    out = []
    for box in boxes:
        codes = {str(r.get("code")) for r in raw_boxes if isinstance(r, dict)
                 and (b := clean_boxes([r], width, height, rules)[0]) and iou_xyxy(b[0], box) >= MATCH_IOU}
        out.append((box, codes))
    return out


def _score_image(result: dict, truth: list[tuple[list[float], set]]) -> tuple[int, int]:
    """(pills found by a detection, pills whose matched detection has the right top-1 code)."""
    free = list(range(len(truth)))
    found = right = 0
    for pill in result["pills"]:  # best detection first
        if not free:
            break
        best = max(free, key=lambda g: iou_xyxy(pill["box"], truth[g][0]))
        if iou_xyxy(pill["box"], truth[best][0]) < MATCH_IOU:
            continue
        free.remove(best)
        found += 1
        right += pill["topk"][0]["code"] in truth[best][1]
    return found, right


def two_stage_accuracy(manifest, classifier, detector, cfg) -> dict:
    """Share of labelled pills of a ``detect_*.csv`` manifest whose K-code is right at top-1 (combo mode).

    Padded crops are scored against the converter's clean boxes (IoU >= 0.5 to count as found).
    """
    predict = make_predictor(classifier, detector, options_from(cfg, "combo", 1))
    pills = found = right = images = unreadable = 0
    for i in range(len(manifest)):
        path = manifest.source_path(i)
        if Path(path).name.endswith("_index.png") or not manifest.boxes[i]:
            continue
        result = predict(path)
        if "error" in result:  # left out of the scores, counted and logged
            unreadable += 1
            _logger.warning("two-stage accuracy: %s left out: %s", path, result["error"])
            continue
        w, h = image_size(path, manifest.sizes[i] if manifest.sizes else (0, 0))
        truth = _ground_truth(manifest.boxes[i], w, h, cfg)
        f, r = _score_image(result, truth)
        images, pills, found, right = images + 1, pills + len(truth), found + f, right + r
    return {"images": images, "unreadable": unreadable, "pills": pills, "detected": found, "top1_right": right,
            "two_stage_top1": round(right / pills, 4) if pills else None,
            "detection_recall": round(found / pills, 4) if pills else None,
            "top1_of_detected": round(right / found, 4) if found else None}


# --------------------------------------------------------------------------------------------------- CLI
def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to their images, layout pictures left out."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            index = [f for f in found if f.name.endswith("_index.png")]
            if index:
                _logger.info("%s: %d *_index.png layout pictures left out", p, len(index))
            out.extend(f for f in found if f not in index)
        elif p.exists():  # a FIFO or a device too: predict_one reports it per image ("not a regular file")
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not out:
        raise FileNotFoundError(f"no images found in {inputs}")
    return out


def format_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['image']}  [{r['mode']}]" + (f"  {r['latency_ms']:.1f} ms" if "latency_ms" in r else ""))
        if "error" in r:
            lines.append(f"  ERROR {r['error']}")
        elif not r["pills"]:
            lines.append("  no pill detected")
        for k, pill in enumerate(r["pills"]):
            where = f"box {pill['box']} det {pill['det_conf']:.2f}" if "box" in pill else "whole image"
            lines.append(f"  pill {k + 1}: {where}")
            for t in pill["topk"]:
                meta = ", ".join(str(t[m]) for m in SHOWN_META if m in t)
                lines.append(f"    {t['code']}  {t['confidence']:.3f}  {meta}")
    return "\n".join(lines)
