"""The ``pil`` backend: a torch DataLoader that opens images safely and applies the graph's transforms.

Training samples use the draws of ``loaders.augment.draw_augment`` (from seed, epoch and row only, so a
sample's augmentation does not depend on which worker process handles it): the same crop window, flip and
jitter factors as the DALI backends, and the same colour step (``pipelines.colour.BatchColour``, applied to
the batch in the worker's collate), so ``pil`` and ``dali-cpu`` give near-identical training batches. A file
that fails to open or decode with an error an image can cause (``badfiles.IMAGE_ERRORS``) becomes a skip
marker; the collate keeps the good samples and the main process writes the skipped rows to the skip log. Any
other error is a bug and propagates out of the worker.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pillsnap_dali.badfiles import IMAGE_ERRORS, image_error_reason
from pillsnap_dali.config import PreprocessConfig
from pillsnap_dali.imageio import open_rgb
from pillsnap_dali.loaders.augment import crop_box, draw_augment
from pillsnap_dali.seeds import DATALOADER, derive_seed
from pillsnap_dali.loaders.common import EpochPlan, LoaderBase, LoaderSpec, to_device_batch
from pipelines.colour import AUG_INDEX, BatchColour

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


@dataclass(frozen=True)
class PilTrainTransform:
    """The training graph in PIL, for one sample's draw (``AUG_FIELDS``): crop window, resize to S x S
    (bilinear, antialiased), flip -> uint8 CHW. The jitter and the normalization are ``BatchColour``'s."""
    pre: PreprocessConfig

    def __call__(self, img: Image.Image, aug: np.ndarray) -> torch.Tensor:
        size = self.pre.img_size
        top, left, h, w = crop_box(aug, img.width, img.height)
        img = F.resized_crop(img, top, left, h, w, [size, size], _BILINEAR, antialias=True)
        if aug[AUG_INDEX["flip"]]:
            img = F.hflip(img)
        return F.pil_to_tensor(img)


class _RowDataset(Dataset):
    """Row id -> (image tensor, row, None, draw) or (None, row, reason, None) for a file that cannot be used.

    Training: the image is uint8 CHW and ``draw`` its augmentation vector; evaluation: normalized float32,
    ``draw`` None."""

    def __init__(self, paths: Sequence[str], spec: LoaderSpec, epoch: int):
        self.paths, self.epoch, self.seed, self.augment = paths, epoch, spec.seed, spec.augment
        self.max_pixels = spec.max_pixels
        self.train_tf = PilTrainTransform(spec.preprocess) if spec.train else None
        self.eval_tf = None if spec.train else pil_eval_transform(spec.preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            img = open_rgb(self.paths[row], self.max_pixels)
        except IMAGE_ERRORS as e:  # the file's fault (badfiles.py): its skip, with its reason; a bug propagates
            return None, row, image_error_reason(e), None
        if self.train_tf is not None:
            aug = draw_augment(self.augment, self.seed, self.epoch, np.array([row]), [img.size])[0]
            return self.train_tf(img, aug), row, None, aug
        return self.eval_tf(img), row, None, None


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


def _collate(samples, dtype: torch.dtype = torch.float32, colour: Optional[BatchColour] = None) -> _Collated:
    """In the worker: the good samples stacked in the output dtype (training: uint8 through ``colour``, the
    jitter + normalization of the dali backends), the bad ones as (row, reason)."""
    good = [(x, r, aug) for x, r, why, aug in samples if why is None]
    skipped = [(r, why) for _, r, why, _ in samples if why is not None]
    images = None
    if good:
        images = torch.stack([x for x, _, _ in good])
        images = colour(images, np.stack([a for _, _, a in good])) if colour is not None else images.to(dtype)
    return _Collated(images, torch.tensor([r for _, r, _ in good], dtype=torch.int64), skipped)


def _worker_init(_worker_id: int, closing=None) -> None:
    """Each worker is one process on one core. A signal sent to the whole process group (Ctrl-C, ``kill -TERM
    -PGID``) is the parent's to handle: it finishes its step, saves and closes this loader, so the worker
    ignores SIGINT and ignores SIGTERM until its loader is ``closing`` (then the DataLoader's own shutdown ends it
    quietly, no traceback). It dies with the parent (a parent ended by force leaves no worker behind)."""
    torch.set_num_threads(1)
    signal.set_wakeup_fd(-1)  # a forked worker's signals are not the run's (training.stop watches that fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_worker_sigterm, closing))
    _die_with_parent()


def _worker_sigterm(closing, _signum, _frame) -> None:
    if closing is None or closing.is_set():
        os._exit(0)


def _die_with_parent() -> None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` where it exists (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


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
        ld, pre = self.spec.loader, self.spec.preprocess
        cuda = self.label_table.device.type == "cuda"
        colour = (BatchColour(mean=pre.mean, std=pre.std, dtype=ld.dtype, layout=ld.layout)
                  if self.spec.train else None)
        workers = ld.workers
        self._closing = multiprocessing.get_context().Event() if workers else None
        return DataLoader(_RowDataset(self.paths, self.spec, self.epoch), batch_sampler=batches,
                          num_workers=workers,
                          collate_fn=functools.partial(_collate, dtype=getattr(torch, ld.dtype), colour=colour),
                          worker_init_fn=functools.partial(_worker_init, closing=self._closing),
                          prefetch_factor=self.spec.loader.prefetch if workers else None, pin_memory=cuda,
                          generator=self._generator())

    def _generator(self) -> torch.Generator:
        """The DataLoader's own generator (its workers' base seed): iterating never draws from torch's global
        RNG, whose per-epoch stream (seeds.py) the training steps own."""
        return torch.Generator().manual_seed(derive_seed(self.spec.seed, self.epoch, self.spec.rank, DATALOADER))

    def __iter__(self):
        plan = self.take_plan()
        self._last_stats = plan.stats
        self.position, consumed = plan.start, 0
        try:
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
        finally:
            if getattr(self, "_closing", None) is not None:  # the workers may now end on the DataLoader's SIGTERM
                self._closing.set()
