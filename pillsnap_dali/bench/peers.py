"""Peer arms of ``bench decode``: what an engineer would pick instead of DALI, each producing the
``dali-cpu`` arm's training batch.

Every arm draws the same random-resized crop and flip for a row (``np.random.default_rng([seed, epoch,
row])``, torchvision's RandomResizedCrop rule), decodes and resizes in a torch DataLoader with ``threads``
worker processes (one torch / OpenCV thread each) to uint8 CHW at the training size, and finishes the batch
with the same colour step as ``dali-cpu`` (``pipelines.BatchColour``: hue, saturation, brightness,
contrast and ImageNet normalization in one affine, float32 NCHW). So the arms differ only in decode, crop
and resize, the part the library chooses:

- ``opencv``: ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_2/4/8`` (DCT-domain downscale of a JPEG) when the
  crop stays at least the training size after it, ``cv2.resize`` with ``INTER_AREA``;
- ``torchvision``: ``torchvision.io.decode_image`` + ``v2.functional.resized_crop`` (antialiased bilinear)
  on uint8 tensors;
- ``pil-draft``: PIL with ``Image.draft`` (JPEG DCT scaling) under the same rule, then one
  ``Image.resize(box=...)`` (crop + antialiased bilinear resize in one pass);
- ``torchvision-gpu`` (CUDA only, JPEG only): workers read the files, ``torchvision.io.decode_jpeg`` decodes
  the batch on the GPU, ``resized_crop`` + flip there, then the same colour step on the GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pillsnap_dali.config import Config
from pillsnap_dali.loaders.pil_loader import random_resized_crop_box

_logger = logging.getLogger(__name__)

CPU_PEERS = ("opencv", "torchvision", "pil-draft")
GPU_PEERS = ("torchvision-gpu",)
PEERS = CPU_PEERS + GPU_PEERS
_NEEDS = {"opencv": ("cv2",), "torchvision": ("torchvision",), "pil-draft": (), "torchvision-gpu": ("torchvision",)}
REDUCTIONS = (8, 4, 2)


def missing_note(name: str) -> Optional[str]:
    """One line saying why peer arm ``name`` cannot run here (a module of the ``bench`` extra is missing,
    or it needs CUDA), or None."""
    absent = [m for m in _NEEDS[name] if importlib.util.find_spec(m) is None]
    if absent:
        return f"{name} arm skipped: {', '.join(absent)} not installed (pip install -e '.[bench]')"
    if name in GPU_PEERS and not torch.cuda.is_available():
        return f"{name} arm skipped: needs CUDA"
    return None


def input_note(name: str, paths: Sequence[str]) -> Optional[str]:
    """One line saying why peer arm ``name`` does not apply to these files, or None."""
    if name in GPU_PEERS and not all(str(p).lower().endswith((".jpg", ".jpeg")) for p in paths):
        return f"{name} arm skipped on this input: torchvision decodes JPEG only on the GPU"
    return None


@dataclass(frozen=True)
class Draw:
    """One row's augmentation: crop box (top, left, h, w) on the full image and the flip."""
    top: int
    left: int
    h: int
    w: int
    flip: bool


@dataclass(frozen=True)
class Drawer:
    size: int
    area: tuple
    ratio: tuple
    hflip: float
    seed: int = 0

    def __call__(self, width: int, height: int, row: int, epoch: int) -> Draw:
        rng = np.random.default_rng([self.seed, epoch, row])
        top, left, h, w = random_resized_crop_box(width, height, self.area, self.ratio, rng)
        return Draw(top, left, h, w, bool(rng.random() < self.hflip))

    def reduction(self, d: Draw) -> int:
        """The largest DCT downscale (8, 4, 2) that keeps the crop at least the training size, else 1."""
        return next((s for s in REDUCTIONS if min(d.h, d.w) / s >= self.size), 1)


def is_jpeg(buf: np.ndarray) -> bool:
    return buf.size > 2 and buf[0] == 0xFF and buf[1] == 0xD8


def _header_size(buf: np.ndarray) -> tuple[int, int]:
    with Image.open(io.BytesIO(buf.data)) as im:  # header only: no pixels decoded
        return im.size


def opencv_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int) -> torch.Tensor:
    import cv2
    d = drawer(*_header_size(buf), row, epoch)
    s = drawer.reduction(d) if is_jpeg(buf) else 1
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[s] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise ValueError("cv2.imdecode failed")
    crop = img[d.top // s:(d.top + d.h) // s, d.left // s:(d.left + d.w) // s]
    out = cv2.resize(crop, (drawer.size, drawer.size), interpolation=cv2.INTER_AREA)
    if d.flip:
        out = cv2.flip(out, 1)
    return torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1)))  # BGR HWC -> RGB CHW


def torchvision_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    img = decode_image(torch.from_numpy(buf), mode=ImageReadMode.RGB)
    return _crop_flip_tensor(img, drawer(img.shape[2], img.shape[1], row, epoch), drawer.size)


def _crop_flip_tensor(img: torch.Tensor, d: Draw, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    out = F.resized_crop(img, d.top, d.left, d.h, d.w, [size, size], antialias=True)
    return F.horizontal_flip(out) if d.flip else out


def pil_draft_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int) -> torch.Tensor:
    img = Image.open(io.BytesIO(buf.data))
    width, height = img.size
    d = drawer(width, height, row, epoch)
    s = drawer.reduction(d) if img.format == "JPEG" else 1
    if s > 1:
        img.draft("RGB", (math.ceil(width / s), math.ceil(height / s)))
    fx, fy = img.size[0] / width, img.size[1] / height
    box = (d.left * fx, d.top * fy, (d.left + d.w) * fx, (d.top + d.h) * fy)
    out = img.convert("RGB").resize((drawer.size, drawer.size), Image.BILINEAR, box=box)
    if d.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())


SAMPLERS: dict[str, Callable] = {"opencv": opencv_sample, "torchvision": torchvision_sample,
                                 "pil-draft": pil_draft_sample}


class _PeerDataset(Dataset):
    """(row, epoch) -> (uint8 CHW at the training size, row); ``sample=None`` returns the file's bytes instead."""

    def __init__(self, paths: Sequence[str], sample: Optional[Callable], drawer: Drawer):
        self.paths, self.sample, self.drawer = paths, sample, drawer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        row, epoch = item
        buf = np.fromfile(self.paths[row], dtype=np.uint8)
        if self.sample is None:
            return torch.from_numpy(buf), row
        return self.sample(buf, self.drawer, row, epoch), row


class _EpochBatches:
    """The batch sampler: a seeded shuffle of the rows per epoch (``epoch`` is set before each pass), each
    item ``(row, epoch)`` so the persistent workers draw that epoch's augmentation."""

    def __init__(self, rows: int, batch: int, seed: int):
        self.rows, self.batch, self.seed, self.epoch = rows, batch, seed, 0

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows).tolist()
        for i in range(0, len(order), self.batch):
            yield [(r, self.epoch) for r in order[i:i + self.batch]]

    def __len__(self) -> int:
        return -(-self.rows // self.batch)


def _stack(samples):
    return torch.stack([x for x, _ in samples]), torch.tensor([r for _, r in samples])


def _as_list(samples):
    return [x for x, _ in samples], torch.tensor([r for _, r in samples])


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker is one process on one core, as in the pil loader
    if importlib.util.find_spec("cv2") is not None:
        import cv2
        cv2.setNumThreads(1)


def _colour(cfg: Config, epoch: int):
    from pipelines import BatchColour
    a, p = cfg.augment, cfg.preprocess
    return BatchColour(hue=a.hue, saturation=a.saturation, brightness=a.brightness, contrast=a.contrast,
                       mean=p.mean, std=p.std, dtype=cfg.loader.dtype, seed=[cfg.train.seed, epoch, 0, 0xC0])


def drawer_for(cfg: Config) -> Drawer:
    a = cfg.augment
    return Drawer(cfg.preprocess.img_size, tuple(a.random_area), tuple(a.random_aspect_ratio), a.hflip,
                  cfg.train.seed)


class PeerLoader:
    """A DataLoader of ``threads`` persistent worker processes started from a fork server (forking this
    process once DALI's threads run can deadlock a worker): the workers start once, in the warm-up epoch,
    like a training run's; each later epoch only pays for its batches."""

    def __init__(self, paths: Sequence[str], sample: Optional[Callable], cfg: Config, threads: int, collate):
        self.batches = _EpochBatches(len(paths), cfg.train.batch_size, cfg.train.seed)
        ctx = "forkserver" if threads else None
        self.loader = DataLoader(_PeerDataset(paths, sample, drawer_for(cfg)), batch_sampler=self.batches,
                                 num_workers=threads, collate_fn=collate, worker_init_fn=_worker_init,
                                 prefetch_factor=cfg.loader.prefetch if threads else None,
                                 persistent_workers=threads > 0, multiprocessing_context=ctx)

    def epoch(self, epoch: int):
        self.batches.epoch = epoch
        return iter(self.loader)


def cpu_epoch(loader: PeerLoader, cfg: Config, epoch: int) -> float:
    """Seconds for one epoch of a CPU peer: every batch normalized float NCHW on the CPU."""
    t0 = time.perf_counter()
    colour = _colour(cfg, epoch)
    for images, _rows in loader.epoch(epoch):
        colour(images)
    return time.perf_counter() - t0


def gpu_batch(encoded: list, rows: torch.Tensor, drawer: Drawer, epoch: int, colour) -> torch.Tensor:
    """torchvision on the GPU: batched ``decode_jpeg`` there, then crop + resize + flip and the colour step."""
    from torchvision.io import ImageReadMode, decode_jpeg
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    out = [_crop_flip_tensor(img, drawer(img.shape[2], img.shape[1], int(r), epoch), drawer.size)
           for img, r in zip(images, rows)]
    return colour(torch.stack(out))


def gpu_epoch(loader: PeerLoader, cfg: Config, epoch: int) -> float:
    """Seconds for one epoch of ``torchvision-gpu`` (workers read the files; decode and the rest on the GPU)."""
    drawer, colour = drawer_for(cfg), _colour(cfg, epoch)
    t0 = time.perf_counter()
    for encoded, rows in loader.epoch(epoch):
        gpu_batch(encoded, rows, drawer, epoch, colour)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_peer_runner(name: str, paths: Sequence[str], cfg: Config, threads: int) -> Callable[[int], float]:
    """A callable ``epoch -> seconds`` for peer arm ``name``."""
    if name == "torchvision-gpu":
        if note := input_note(name, paths):
            raise ValueError(note)
        return functools.partial(gpu_epoch, PeerLoader(paths, None, cfg, threads, _as_list), cfg)
    if name not in SAMPLERS:
        raise ValueError(f"unknown peer arm {name!r}; choose from {list(PEERS)}")
    return functools.partial(cpu_epoch, PeerLoader(paths, SAMPLERS[name], cfg, threads, _stack), cfg)
