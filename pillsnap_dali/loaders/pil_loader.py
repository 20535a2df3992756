"""The ``pil`` backend: a torch DataLoader that opens images safely and applies the graph's transforms.

Augmentation parameters are drawn from ``np.random.default_rng([seed, epoch, row])``, so a sample's
augmentation does not depend on which worker process handles it: an epoch is reproducible with any
number of workers. A file that fails to open or decode becomes a skip marker; the collate keeps the good
samples and the main process writes the skipped rows to the skip log.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pillsnap_dali.config import AugmentConfig, PreprocessConfig
from pillsnap_dali.imageio import open_rgb  # noqa: F401  (re-exported as loaders.open_rgb)
from pillsnap_dali.loaders.common import EpochPlan, LoaderBase, LoaderSpec, to_device_batch

_logger = logging.getLogger(__name__)

BACKEND = "pil"
_BILINEAR = F.InterpolationMode.BILINEAR


def _normalize(img: Image.Image, pre: PreprocessConfig) -> torch.Tensor:
    return F.normalize(F.to_tensor(img), pre.mean, pre.std)


def pil_eval_transform(pre: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation preprocessing of ``pre`` as a PIL callable returning a normalized float32 CHW tensor.

    ``squash``: bilinear antialiased resize to (S, S); ``crop``: shorter side to ``round(S / crop_pct)``,
    then centre crop S. Matches the DALI evaluation graph (see ``tests/test_loaders.py`` for the bound).
    """
    size = pre.img_size
    if pre.resize_mode == "squash":
        def squash(img: Image.Image) -> torch.Tensor:
            return _normalize(F.resize(img, [size, size], _BILINEAR, antialias=True), pre)
        return squash
    shorter = int(round(size / pre.crop_pct))

    def crop(img: Image.Image) -> torch.Tensor:
        return _normalize(F.center_crop(F.resize(img, shorter, _BILINEAR, antialias=True), size), pre)
    return crop


def random_resized_crop_box(width: int, height: int, area: Sequence[float], ratio: Sequence[float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws it, from an explicit generator."""
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


@dataclass(frozen=True)
class PilTrainTransform:
    """The training graph in PIL: random-resized crop, resize, hue/saturation, brightness/contrast, flip."""
    pre: PreprocessConfig
    aug: AugmentConfig

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        a, size = self.aug, self.pre.img_size
        top, left, h, w = random_resized_crop_box(img.width, img.height, a.random_area, a.random_aspect_ratio, rng)
        img = F.resized_crop(img, top, left, h, w, [size, size], _BILINEAR, antialias=True)
        if a.hue > 0:
            img = F.adjust_hue(img, float(rng.uniform(-a.hue, a.hue)))
        if a.saturation > 0:
            img = F.adjust_saturation(img, float(rng.uniform(1 - a.saturation, 1 + a.saturation)))
        if a.brightness > 0:
            img = F.adjust_brightness(img, float(rng.uniform(1 - a.brightness, 1 + a.brightness)))
        if a.contrast > 0:
            img = F.adjust_contrast(img, float(rng.uniform(1 - a.contrast, 1 + a.contrast)))
        if rng.random() < a.hflip:
            img = F.hflip(img)
        return _normalize(img, self.pre)


class _RowDataset(Dataset):
    """Row id -> (image tensor, row, None) or (None, row, reason) for a file that cannot be used."""

    def __init__(self, paths: Sequence[str], spec: LoaderSpec, epoch: int):
        self.paths, self.epoch, self.seed = paths, epoch, spec.seed
        self.max_pixels = spec.max_pixels
        self.train_tf = PilTrainTransform(spec.preprocess, spec.augment) if spec.train else None
        self.eval_tf = None if spec.train else pil_eval_transform(spec.preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            img = open_rgb(self.paths[row], self.max_pixels)
            if self.train_tf is not None:
                return self.train_tf(img, np.random.default_rng([self.seed, self.epoch, row])), row, None
            return self.eval_tf(img), row, None
        except Exception as e:  # any failure on one file is that file's skip, with its reason
            return None, row, f"{type(e).__name__}: {e}"


@dataclass
class _Collated:
    images: Optional[torch.Tensor]
    rows: torch.Tensor
    skipped: list

    def pin_memory(self) -> "_Collated":
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``), off the training loop."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        self.rows = self.rows.pin_memory()
        return self


def _collate(samples, dtype: torch.dtype = torch.float32) -> _Collated:
    """In the worker: the good samples stacked in the output dtype, the bad ones as (row, reason)."""
    good = [(x, r) for x, r, why in samples if why is None]
    skipped = [(r, why) for x, r, why in samples if why is not None]
    images = torch.stack([x for x, _ in good]).to(dtype) if good else None
    return _Collated(images, torch.tensor([r for _, r in good], dtype=torch.int64), skipped)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker is one process on one core


class PilLoader(LoaderBase):
    """``pil`` backend. A file found bad mid-epoch makes its batch smaller (an all-bad batch is not
    yielded, so the epoch may be shorter than ``len()``)."""
    backend = BACKEND

    def _batches(self, plan: EpochPlan) -> list[list[int]]:
        bs, order = self.spec.batch_size, plan.order.tolist()
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if batches and self.spec.drop_last and len(batches[-1]) < bs:
            plan.stats["dropped"] = len(batches.pop())
        return batches

    def _data_loader(self, batches: list[list[int]]) -> DataLoader:
        """Workers decode, transform, stack and cast; for a CUDA device the DataLoader's own thread pins
        each batch, so the training loop only starts its non-blocking copy."""
        workers = self.spec.loader.workers
        cuda = self.label_table.device.type == "cuda"
        return DataLoader(_RowDataset(self.paths, self.spec, self.epoch), batch_sampler=batches,
                          num_workers=workers,
                          collate_fn=functools.partial(_collate, dtype=getattr(torch, self.spec.loader.dtype)),
                          worker_init_fn=_worker_init, prefetch_factor=self.spec.loader.prefetch if workers else None,
                          pin_memory=cuda)

    def __iter__(self):
        plan = self.take_plan()
        self._last_stats = plan.stats
        self.position, consumed = plan.start, 0
        for item in self._data_loader(self._batches(plan)):
            for row, reason in item.skipped:
                self.log_skip(row, reason)
            plan.stats["skipped"] += len(item.skipped)
            consumed += len(item.rows) + len(item.skipped)  # batches are consecutive slices of plan.order
            self.position = plan.position(consumed)
            if item.images is None:
                continue
            plan.stats["yielded"] += len(item.rows)
            yield to_device_batch(item.images, item.rows, self.label_table,
                                  self.spec.loader.layout == "NHWC")
