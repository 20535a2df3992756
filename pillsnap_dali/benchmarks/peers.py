"""Peer arms of ``bench decode``: what an engineer would pick instead of DALI, each producing the
``dali-cpu`` arm's training batch.

Every arm applies the very draws of ``dali-cpu`` (``loaders.augment.draw_augment`` for (seed, epoch, row)
from the upright size in the file's header, as the loaders draw them): the same crop window
(``augment.crop_box``), flip and jitter factors. It decodes and resizes in a torch DataLoader with
``threads`` worker processes (one torch / OpenCV thread each) to uint8 CHW at the training size (EXIF
orientation applied as the DALI decoder applies it, to the resized crop), and finishes the batch with the
same colour step as ``dali-cpu`` (``pipelines.BatchColour`` with the rows' stacked draws: hue, saturation,
brightness, contrast and ImageNet normalization in one affine). So the arms make the same training batch
and differ only in decode, crop and resize, the part the library chooses:

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
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pillsnap_dali.config import AugmentConfig, Config, memory_layout
from pillsnap_dali.imageio import exif_orientation, header_info, upright
from pillsnap_dali.loaders.augment import crop_box, draw_augment
from pipelines.colour import AUG_INDEX, JITTER_FIELDS, BatchColour

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
    """One row's augmentation (``loaders.augment.draw_augment``, as ``dali-cpu`` draws it) on the image as
    decoded: crop box (top, left, h, w) in the file's own frame, ``orientation`` (EXIF, 1-8) turning the
    resized crop upright, then the flip; ``aug`` the row's draw vector for the colour step."""
    top: int
    left: int
    h: int
    w: int
    flip: bool
    aug: np.ndarray = field(compare=False, repr=False)
    orientation: int = 1


# EXIF orientation -> the (height, width) dims of a CHW image flipped after the transpose of 5-8
_FLIPS = {2: (2,), 3: (1, 2), 4: (1,), 6: (2,), 7: (1, 2), 8: (1,)}


def _file_box(box: tuple, orientation: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) on the upright ``width`` x ``height`` image -> the same window in the file's frame,
    where the upright image is the file's transposed (orientation 5-8), then flipped (``_FLIPS``)."""
    top, left, h, w = box
    flip_h, flip_w = (d in _FLIPS.get(orientation, ()) for d in (1, 2))
    top, left = (height - top - h if flip_h else top), (width - left - w if flip_w else left)
    return (left, top, w, h) if orientation >= 5 else (top, left, h, w)


def turn_upright(img: torch.Tensor, d: Draw) -> torch.Tensor:
    """A CHW crop in the file's frame turned upright (EXIF orientation, as the DALI decoder turns it), then
    the draw's flip."""
    if d.orientation >= 5:
        img = img.transpose(1, 2)
    dims = _FLIPS.get(d.orientation, ())
    if d.flip:
        dims = tuple(sorted(set(dims) ^ {2}))
    return img.flip(dims).contiguous() if dims else img


@dataclass(frozen=True)
class Drawer:
    """The draws of ``dali-cpu`` for a row: ``draw_augment`` with these settings (``jitter``: the brightness,
    contrast, saturation and hue amounts) from the upright size in the file's header."""
    size: int
    area: tuple
    ratio: tuple
    hflip: float
    seed: int = 0
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)

    @functools.cached_property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(random_area=list(self.area), random_aspect_ratio=list(self.ratio), hflip=self.hflip,
                             **dict(zip(JITTER_FIELDS, self.jitter)))

    def __call__(self, width: int, height: int, row: int, epoch: int, orientation: int = 1) -> Draw:
        """The draw for a row whose upright size is ``width`` x ``height``."""
        aug = draw_augment(self.augment, self.seed, epoch, np.array([row]), [(width, height)])[0]
        box = _file_box(crop_box(aug, width, height), orientation, width, height)
        return Draw(*box, bool(aug[AUG_INDEX["flip"]]), aug, orientation)

    def of_file(self, buf: np.ndarray, row: int, epoch: int) -> Draw:
        """The draw for a row from its file's header (upright size and EXIF orientation, as the loaders read
        them; no pixel decoded)."""
        width, height, exif = header_info(io.BytesIO(buf.data))
        return self(*upright(width, height, exif), row, epoch, exif_orientation(exif))

    def reduction(self, d: Draw) -> int:
        """The largest DCT downscale (8, 4, 2) that keeps the crop at least the training size, else 1."""
        return next((s for s in REDUCTIONS if min(d.h, d.w) / s >= self.size), 1)


def is_jpeg(buf: np.ndarray) -> bool:
    return buf.size > 2 and buf[0] == 0xFF and buf[1] == 0xD8


def opencv_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int, d: Optional[Draw] = None) -> torch.Tensor:
    import cv2
    d = drawer.of_file(buf, row, epoch) if d is None else d
    s = drawer.reduction(d) if is_jpeg(buf) else 1
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[s] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise ValueError("cv2.imdecode failed")
    crop = img[d.top // s:(d.top + d.h) // s, d.left // s:(d.left + d.w) // s]
    out = cv2.resize(crop, (drawer.size, drawer.size), interpolation=cv2.INTER_AREA)
    return turn_upright(torch.from_numpy(out[:, :, ::-1].transpose(2, 0, 1).copy()), d)  # BGR HWC -> RGB CHW


def torchvision_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int,
                       d: Optional[Draw] = None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    d = drawer.of_file(buf, row, epoch) if d is None else d
    return _crop_flip_tensor(decode_image(torch.from_numpy(buf), mode=ImageReadMode.RGB), d, drawer.size)


def _crop_flip_tensor(img: torch.Tensor, d: Draw, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    return turn_upright(F.resized_crop(img, d.top, d.left, d.h, d.w, [size, size], antialias=True), d)


def pil_draft_sample(buf: np.ndarray, drawer: Drawer, row: int, epoch: int,
                     d: Optional[Draw] = None) -> torch.Tensor:
    d = drawer.of_file(buf, row, epoch) if d is None else d
    img = Image.open(io.BytesIO(buf.data))
    width, height = img.size
    s = drawer.reduction(d) if img.format == "JPEG" else 1
    if s > 1:
        img.draft("RGB", (math.ceil(width / s), math.ceil(height / s)))
    fx, fy = img.size[0] / width, img.size[1] / height
    box = (d.left * fx, d.top * fy, (d.left + d.w) * fx, (d.top + d.h) * fy)
    out = img.convert("RGB").resize((drawer.size, drawer.size), Image.BILINEAR, box=box)
    return turn_upright(torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy()), d)


SAMPLERS: dict[str, Callable] = {"opencv": opencv_sample, "torchvision": torchvision_sample,
                                 "pil-draft": pil_draft_sample}


class _PeerDataset(Dataset):
    """(row, epoch) -> (uint8 CHW at the training size, row, the row's draw vector); ``sample=None`` gives
    (the file's bytes, row, its ``Draw``) instead (the GPU arm crops after its batched decode)."""

    def __init__(self, paths: Sequence[str], sample: Optional[Callable], drawer: Drawer):
        self.paths, self.sample, self.drawer = paths, sample, drawer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]):
        row, epoch = item
        buf = np.fromfile(self.paths[row], dtype=np.uint8)
        d = self.drawer.of_file(buf, row, epoch)
        if self.sample is None:
            return torch.from_numpy(buf), row, d
        return self.sample(buf, self.drawer, row, epoch, d), row, d.aug


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
    """CPU arms: (uint8 batch, rows, the (B, 9) draws for the colour step)."""
    return (torch.stack([x for x, _, _ in samples]), torch.tensor([r for _, r, _ in samples]),
            np.stack([a for _, _, a in samples]))


def _as_list(samples):
    """GPU arm: (encoded files, rows, their draws)."""
    return [x for x, _, _ in samples], torch.tensor([r for _, r, _ in samples]), [d for _, _, d in samples]


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker is one process on one core, as in the pil loader
    if importlib.util.find_spec("cv2") is not None:
        import cv2
        cv2.setNumThreads(1)


def _colour(cfg: Config, device: str) -> BatchColour:
    """The colour step of the training loader on ``device``: the rows' drawn jitter + the normalization."""
    p = cfg.preprocess
    return BatchColour(mean=p.mean, std=p.std, dtype=cfg.loader.dtype, layout=memory_layout(cfg.loader.layout, device))


def drawer_for(cfg: Config) -> Drawer:
    a = cfg.augment
    return Drawer(cfg.preprocess.img_size, tuple(a.random_area), tuple(a.random_aspect_ratio), a.hflip,
                  cfg.train.seed, tuple(getattr(a, name) for name in JITTER_FIELDS))


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
    """Seconds for one epoch of a CPU peer: every batch through the colour step with its rows' draws."""
    t0 = time.perf_counter()
    colour = _colour(cfg, "cpu")
    for images, _rows, aug in loader.epoch(epoch):
        colour(images, aug)
    return time.perf_counter() - t0


def gpu_batch(encoded: list, rows: torch.Tensor, drawer: Drawer, epoch: int, colour,
              draws: Optional[Sequence[Draw]] = None) -> torch.Tensor:
    """torchvision on the GPU: batched ``decode_jpeg`` there, then crop + resize + flip and ``colour(uint8
    batch, draws)``. ``draws``: the rows' ``Draw`` (default: drawn here from the files' headers)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if draws is None:
        draws = [drawer.of_file(e.numpy(), int(r), epoch) for e, r in zip(encoded, rows)]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    out = [_crop_flip_tensor(img, d, drawer.size) for img, d in zip(images, draws)]
    return colour(torch.stack(out), np.stack([d.aug for d in draws]))


def gpu_epoch(loader: PeerLoader, cfg: Config, epoch: int) -> float:
    """Seconds for one epoch of ``torchvision-gpu`` (workers read the files and draw; decode and the rest on
    the GPU)."""
    drawer, colour = drawer_for(cfg), _colour(cfg, "cuda")
    t0 = time.perf_counter()
    for encoded, rows, draws in loader.epoch(epoch):
        gpu_batch(encoded, rows, drawer, epoch, colour, draws)
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
