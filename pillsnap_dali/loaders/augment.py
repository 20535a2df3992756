"""PLACEHOLDER (helper "runner"): a minimal ``draw_augment`` so that the DALI runner can feed the training
graph's ``AUG`` input before helper "augment"'s module lands. Replace this whole file with theirs at merge;
the contract (signature, columns, units) is the one below and in ``pipelines.classify.AUG_FIELDS``.
"""
from __future__ import annotations

import math

import numpy as np

from pillsnap_dali.config import AugmentConfig


def draw_augment(aug_cfg: AugmentConfig, seed: int, epoch: int, rows: np.ndarray,
                 sizes: list[tuple[int, int]]) -> np.ndarray:
    """(n, 9) float32: [crop_x, crop_y, crop_w, crop_h] relative to the upright (w, h) in ``sizes``, flip
    (0/1), brightness, contrast, saturation (1 = unchanged), hue (turns, 0 = unchanged); one generator per
    (seed, epoch, row), so a row's draw depends on nothing else."""
    out = np.zeros((len(rows), 9), np.float32)
    for k, (row, (w, h)) in enumerate(zip(rows, sizes)):
        rng = np.random.default_rng([int(seed), int(epoch), int(row)])
        out[k, :4] = _crop(rng, aug_cfg, w, h)
        out[k, 4] = float(rng.random() < aug_cfg.hflip)
        for j, amount in enumerate((aug_cfg.brightness, aug_cfg.contrast, aug_cfg.saturation)):
            out[k, 5 + j] = rng.uniform(1 - amount, 1 + amount) if amount > 0 else 1.0
        out[k, 8] = rng.uniform(-aug_cfg.hue, aug_cfg.hue) if aug_cfg.hue > 0 else 0.0
    return out


def _crop(rng: np.random.Generator, cfg: AugmentConfig, w: int, h: int) -> tuple:
    """A random-resized-crop window (torchvision's rule: 10 tries, then the whole image)."""
    lo, hi = math.log(cfg.random_aspect_ratio[0]), math.log(cfg.random_aspect_ratio[1])
    for _ in range(10):
        area = rng.uniform(*cfg.random_area) * w * h
        ratio = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return x / w, y / h, cw / w, ch / h
    return 0.0, 0.0, 1.0, 1.0
