"""Training augmentation drawn on the host, one vector per sample, from (seed, epoch, row) alone.

Every backend applies the very same draws: the DALI training graph takes them as per-sample argument inputs
(its external input ``pipelines.AUG``: the crop window for the ROI decoder, the flip), the ``pil`` backend
crops and flips with them, and both hand the jitter factors to the one colour step
(``pipelines.colour.BatchColour``). A sample's draw depends on nothing else (not the batch it lands in, the
rank, the worker, or how many pipelines were built), so a resumed epoch gives the same rows the same
pixels and ``pil`` and ``dali-cpu`` make near-identical batches.

The vector (``pipelines.colour.AUG_FIELDS``, float32): ``crop_x, crop_y, crop_w, crop_h`` relative to the
upright image (exact multiples of one pixel), ``flip`` (0/1), ``brightness, contrast, saturation`` factors
around 1 and ``hue`` in turns.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pillsnap_dali.config import AugmentConfig
from pipelines.colour import AUG_FIELDS, AUG_INDEX, JITTER_FIELDS

# the draws' own stream (other per-(seed, epoch) streams, e.g. the shuffle, use other entropy)
_STREAM = 0xA6
_MAX_AMOUNT = {"hue": 0.5, "saturation": 1.0, "brightness": 1.0, "contrast": 1.0}


def random_resized_crop_box(width: int, height: int, area: Sequence[float], ratio: Sequence[float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws it (area share uniform in ``area``,
    log-uniform aspect in ``ratio``, 10 tries, then the central crop of the clamped aspect)."""
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _check_amounts(cfg: AugmentConfig) -> None:
    for name, top in _MAX_AMOUNT.items():
        a = getattr(cfg, name)
        if not 0 <= a <= top:
            raise ValueError(f"augment.{name} must be in [0, {top:g}], got {a}")
    if not 0 <= cfg.hflip <= 1:
        raise ValueError(f"augment.hflip must be in [0, 1], got {cfg.hflip}")


def _draw_one(cfg: AugmentConfig, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One sample: flip and the four jitter factors first (a fixed number of draws), then the crop."""
    out = np.empty(len(AUG_FIELDS), dtype=np.float64)
    out[AUG_INDEX["flip"]] = float(rng.random() < cfg.hflip)
    for name in JITTER_FIELDS:
        centre, a = (0.0 if name == "hue" else 1.0), getattr(cfg, name)
        out[AUG_INDEX[name]] = rng.uniform(centre - a, centre + a)  # exactly the centre when a == 0
    top, left, h, w = random_resized_crop_box(width, height, cfg.random_area, cfg.random_aspect_ratio, rng)
    out[:4] = (left / width, top / height, w / width, h / height)
    return out


def draw_augment(aug_cfg: AugmentConfig, seed: int, epoch: int, rows: np.ndarray,
                 sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n, 9) float32 draws for ``rows`` whose upright ``(width, height)`` are ``sizes``.

    Row ``r``'s draw comes from ``SeedSequence([seed, epoch, r, stream])`` only."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes for {len(rows)} rows")
    _check_amounts(aug_cfg)
    out = np.empty((len(rows), len(AUG_FIELDS)), dtype=np.float32)
    for i, (row, (w, h)) in enumerate(zip(rows.tolist(), sizes)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), row, _STREAM]))
        out[i] = _draw_one(aug_cfg, rng, int(w), int(h))
    return out


def crop_box(aug: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels of one draw's crop window on a ``width`` x ``height`` upright image (the
    window DALI's ROI decoder takes from the same relative numbers)."""
    x, y, w, h = (float(v) for v in aug[:4])
    return int(round(y * height)), int(round(x * width)), int(round(h * height)), int(round(w * width))
