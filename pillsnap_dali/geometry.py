"""Box geometry, in one place: IoU (one name per box format), conversions, the detection box rules, the
letterbox of the detector and its inverse. Pure numpy / Python, so the scanner can use it without torch.

Box formats, named the same everywhere:
- ``xywh``: COCO, [x, y, w, h] in pixels, top-left corner + size (the AI Hub label JSONs, the manifests);
- ``xyxy`` (also ``ltrb``): corners [x1, y1, x2, y2] (the YOLO set after ``clean_boxes``, predictions);
- ``cxcywh``: centre + size (the YOLO label rows, normalized).

Box rules (``clean_boxes``, used by the YOLO conversion and by prediction's scoring; each raw box is checked):
``bad_length`` (not 4 values), ``not_numeric`` (a value not a finite number), ``non_positive_size``
(w or h <= 0), ``outside_image`` (further outside than ``clip_tolerance`` of the image side, or < 1 px left
after clipping) are dropped; ``clipped`` (outside by at most the tolerance) is clipped and kept; ``merged``
(IoU >= ``merge_iou`` with a kept box: one pill labelled twice) becomes one box, the mean of the two.

Letterbox: the long side scaled to ``imgsz`` keeping the aspect, the rest padded with ``PAD_VALUE`` and
centred, rounded like Ultralytics' LetterBox; the DALI detection graph, the detection loader and prediction
share ``letterbox_geometry``, and ``unletterbox`` maps boxes back to the original pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PAD_VALUE = 114  # the letterbox padding grey level (Ultralytics' LetterBox value)

DROP_REASONS = ("bad_length", "not_numeric", "non_positive_size", "outside_image")
KEEP_REASONS = ("clipped", "merged")


@dataclass
class BoxRules:
    clip_tolerance: float = 0.02  # fraction of the image side a box may stick out and still be clipped
    merge_iou: float = 0.9        # boxes with IoU >= this are one pill labelled twice
    drop_incomplete: bool = False  # leave out combination images with fewer boxes than drugs in their name

    @classmethod
    def from_config(cls, cfg) -> "BoxRules":
        d = cfg.detect
        return cls(clip_tolerance=d.clip_tolerance, merge_iou=d.merge_iou, drop_incomplete=d.drop_incomplete)


@dataclass
class BoxEvent:
    image: str
    reason: str
    bbox: object
    code: str = ""
    detail: str = ""


def _as_numbers(bbox) -> list[float] | None:
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    if any(isinstance(v, bool) for v in bbox) or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def check_box(bbox, width: int, height: int, rules: BoxRules) -> tuple[list[float] | None, str, str]:
    """(xyxy or None, reason, detail): reason "" for a clean box, "clipped" for a kept clipped one."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        n = len(bbox) if isinstance(bbox, (list, tuple)) else "not a list"
        return None, "bad_length", f"{n} values"
    vals = _as_numbers(bbox)
    if vals is None:
        return None, "not_numeric", "non-numeric or non-finite value"
    x, y, w, h = vals
    if w <= 0 or h <= 0:
        return None, "non_positive_size", f"w={w:g} h={h:g}"
    tol_x, tol_y = rules.clip_tolerance * width, rules.clip_tolerance * height
    out = max(-x / width, -y / height, (x + w - width) / width, (y + h - height) / height)
    if x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y:
        return None, "outside_image", f"{out:.3f} of the image side outside (tolerance {rules.clip_tolerance})"
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None, "outside_image", "less than 1 px left inside the image"
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        return [x1, y1, x2, y2], "clipped", f"{out:.4f} of the image side outside, clipped"
    return [x1, y1, x2, y2], "", ""


def clean_boxes(raw: list, width: int, height: int, rules: BoxRules,
                image: str = "") -> tuple[list[list[float]], list[BoxEvent]]:
    """Validate, clip and merge the raw boxes of one image; returns (xyxy pixel boxes, events)."""
    kept: list[list[float]] = []
    kept_codes: list[str] = []
    events: list[BoxEvent] = []
    for item in raw:
        bbox = item.get("bbox") if isinstance(item, dict) else item
        code = str(item.get("code", "")) if isinstance(item, dict) else ""
        box, reason, detail = check_box(bbox, width, height, rules)
        if reason:
            events.append(BoxEvent(image, reason, bbox, code, detail))
        if box is None:
            continue
        twin = next((i for i, k in enumerate(kept) if iou_xyxy(k, box) >= rules.merge_iou), None)
        if twin is not None:
            events.append(BoxEvent(image, "merged", bbox, code, f"IoU {iou_xyxy(kept[twin], box):.3f} with the box "
                                                                 f"of {kept_codes[twin] or '?'}: one pill"))
            kept[twin] = [(p + q) / 2 for p, q in zip(kept[twin], box)]
            continue
        kept.append(box)
        kept_codes.append(code)
    return kept, events


def iou_xyxy(a, b) -> float:
    """IoU of two corner boxes [x1, y1, x2, y2] (the detection set's, the predictions')."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_xywh(a, b) -> float:
    """IoU of two COCO boxes [x, y, w, h] (top-left corner and size, as the label JSONs hold them)."""
    return iou_xyxy(xywh_to_xyxy(a), xywh_to_xyxy(b))


def xywh_to_xyxy(b) -> list:
    """A COCO box [x, y, w, h] as corners [x1, y1, x2, y2]."""
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def cxcywh_to_ltrb(b: np.ndarray) -> np.ndarray:
    """(N, 4) centre-x, centre-y, width, height (the YOLO label rows) -> left, top, right, bottom, float32."""
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1).astype(np.float32)


def letterbox_geometry(height: int, width: int, imgsz: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left): scale the long side to ``imgsz`` keeping the aspect, centre the rest.

    Rounds like Ultralytics' LetterBox (each side rounded, padding split with the smaller half first).
    """
    gain = min(imgsz / height, imgsz / width)
    new_h, new_w = max(int(round(height * gain)), 1), max(int(round(width * gain)), 1)
    top = int(round((imgsz - new_h) / 2 - 0.1))
    left = int(round((imgsz - new_w) / 2 - 0.1))
    return new_h, new_w, top, left


def unletterbox(xyxy: np.ndarray, geometry: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Boxes (N x 4 xyxy) from the letterboxed frame back to the original image's pixels, clipped to it."""
    new_h, new_w, top, left = geometry
    out = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - left) * (width / new_w)
    out[:, [1, 3]] = (out[:, [1, 3]] - top) * (height / new_h)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def on_image(xyxy: np.ndarray) -> np.ndarray:
    """Which mapped-back boxes cover at least a pixel of the image (one lying in the letterbox padding is
    clipped to nothing: there is no pill to crop)."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    return ((xyxy[:, 2] - xyxy[:, 0]) >= 1.0) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1.0)
