"""What every backend shares: the batch contract, the skip log, the per-epoch row plan, the header check."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from pillsnap_dali import seeds
from pillsnap_dali.config import AugmentConfig, Config, LoaderConfig, PreprocessConfig
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One step's input. ``images``: normalized float16/32, logical shape NCHW (channels_last strides when
    ``loader.layout`` is NHWC), on the training device; ``labels``: int64 class ids; ``rows``: int64
    row indices of the manifest given to the loader (``Manifest.file_row`` maps them to the file's rows, which
    is what skipped.csv reports). All three are on the training device."""
    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader reads from the config, unpacked at one seam (``from_config``)."""
    train: bool
    batch_size: int
    drop_last: bool
    preprocess: PreprocessConfig
    augment: AugmentConfig
    loader: LoaderConfig
    max_pixels: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    sample_weights: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @property
    def row_order(self) -> RowOrder:
        """Training: shuffled (and weighted when ``sample_weights``); evaluation: manifest order."""
        return RowOrder(shuffle=self.train, seed=self.seed, rank=self.rank, world_size=self.world_size,
                        sample_weights=self.sample_weights)

    @classmethod
    def from_config(cls, cfg: Config, *, train: bool, seed: int = 0, rank: int = 0,
                    world_size: int = 1) -> "LoaderSpec":
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return cls(train=train, batch_size=cfg.train.batch_size, drop_last=bool(train and cfg.loader.drop_last),
                   preprocess=cfg.preprocess, augment=cfg.augment, loader=cfg.loader,
                   max_pixels=cfg.data.max_pixels, seed=seed, rank=rank, world_size=world_size)


def shard_order(num_rows: int, *, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
                seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Row ids one shard reads in one epoch (int64).

    Shuffled: the permutation ``seeds.rng(seed, epoch)`` of all rows (the same on every
    shard), of which shard ``r`` takes every ``num_shards``-th element starting at ``r``. Not shuffled:
    ``arange(num_rows)[r::num_shards]``. The shards are disjoint and together cover all rows; their
    lengths differ by at most one.
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rows = (seeds.rng(seed, epoch).permutation(num_rows) if shuffle
            else np.arange(num_rows))
    return rows[shard_id::num_shards].astype(np.int64)


def steps_for(num_rows: int, batch_size: int, drop_last: bool) -> int:
    return num_rows // batch_size if drop_last else -(-num_rows // batch_size)


@dataclass(frozen=True)
class RowOrder:
    """How an epoch's rows are ordered and shared out: shuffled (``shard_order``) or in manifest order, this
    rank's shard of ``world_size``, optionally drawn by ``sample_weights`` (``weighted_order``)."""
    shuffle: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    sample_weights: Optional[np.ndarray] = field(default=None, compare=False, repr=False)


class EpochPlan:
    """The rows one rank reads in one epoch and the epoch's accounting: the one row plan and skip bookkeeping
    of every loader (classification and detection).

    ``order``: this rank's shard (``shard_order``: seeded permutation per epoch when shuffled, manifest order
    otherwise) from position ``start`` on (a resumed epoch), minus files already in the skip log. Invariant
    after a full epoch: ``yielded + skipped + excluded + dropped == rows`` (the rows from ``start`` on); the
    loader counts ``yielded``, ``skipped`` and ``dropped`` in ``stats`` as it goes.
    """

    def __init__(self, paths: Sequence[str], how: RowOrder, epoch: int, skip_paths: set, start: int = 0,
                 skipped_before: Optional[set] = None):
        shard = shard_order(len(paths), shard_id=how.rank, num_shards=how.world_size, shuffle=how.shuffle,
                            seed=how.seed, epoch=epoch)
        if how.shuffle and how.sample_weights is not None:
            # the draw leaves out files skipped in EARLIER epochs only, so a resumed epoch draws what the
            # interrupted one drew (files it skipped are then excluded by ``keep``, as they were skipped)
            shard = weighted_order(paths, how, epoch, len(shard), skip_paths if skipped_before is None
                                   else skipped_before)
        self.start = min(max(int(start), 0), len(shard))
        shard = shard[self.start:]
        keep = np.fromiter((paths[r] not in skip_paths for r in shard), dtype=bool, count=len(shard))
        self.epoch = epoch
        self.order = shard[keep]
        self.shard_pos = np.flatnonzero(keep) + self.start  # each order entry's position in the whole shard
        self.stats = {"rows": int(len(shard)), "excluded": int((~keep).sum()), "yielded": 0, "skipped": 0,
                      "dropped": 0}

    def steps(self, spec: LoaderSpec) -> int:
        return steps_for(len(self.order), spec.batch_size, spec.drop_last)

    def position(self, consumed: int) -> int:
        """The shard position after the first ``consumed`` entries of ``order`` (yielded or skipped): where a
        resumed epoch starts so that no row is trained twice or left out."""
        return int(self.shard_pos[consumed - 1]) + 1 if consumed > 0 else self.start


def weighted_order(paths: Sequence[str], how: RowOrder, epoch: int, n: int, skip_paths: set) -> np.ndarray:
    """``train.weighted_sampler``: this rank draws ``n`` rows with replacement, with probability proportional
    to ``how.sample_weights`` (seeded by seed, epoch, rank). Rows already skipped get weight 0. A row may
    come more than once in an epoch; the accounting counts draws."""
    w = np.asarray(how.sample_weights, dtype=np.float64).copy()
    if len(w) != len(paths):
        raise ValueError(f"{len(w)} sample weights for {len(paths)} rows")
    if skip_paths:
        w[[i for i, p in enumerate(paths) if p in skip_paths]] = 0.0
    if w.sum() <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = seeds.rng(how.seed, epoch, how.rank, seeds.WEIGHTED)
    return rng.choice(len(paths), size=n, replace=True, p=w / w.sum()).astype(np.int64)


class LoaderBase:
    """What every backend shares: the rows, the label table on the training device, the epoch and its plan."""
    backend = ""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, spec: LoaderSpec, skip_log: SkipLog,
                 file_rows: Optional[Sequence[int]] = None):
        self.paths, self.label_table, self.spec, self.skip_log = paths, labels, spec, skip_log
        self.file_rows = file_rows  # None: the rows are the file's
        self.split = "train" if spec.train else "val"  # names the rows in the skip log (row ids of splits collide)
        self.epoch = 0
        self.start = 0
        self.position = 0  # rows of this epoch's shard consumed so far (see EpochPlan.position)
        self._last_stats: dict = {}
        self._plan: tuple = (None, None)  # ((epoch, start, files in the skip log), EpochPlan) until iterated

    def log_skip(self, row: int, reason: str) -> None:
        """Write row ``row`` to the skip log under its number in the manifest file and its split."""
        file_row = self.file_rows[row] if self.file_rows is not None else row
        self.skip_log.add(file_row, self.paths[row], reason, self.backend, self.epoch, split=self.split)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration is epoch ``epoch``, from position ``start`` of its shard (``position`` of an
        interrupted iteration of the same epoch: a resumed epoch goes on where it stopped)."""
        self.epoch, self.start = int(epoch), int(start)

    def plan(self) -> EpochPlan:
        """The next iteration's plan, built once for ``len()`` and the iteration (it depends on nothing else
        than the key below)."""
        key = (self.epoch, self.start, len(self.skip_log))
        if self._plan[0] != key:
            before = self.skip_log.paths_before(self.epoch) if self.spec.sample_weights is not None else None
            self._plan = (key, EpochPlan(self.paths, self.spec.row_order, self.epoch, self.skip_log.paths, self.start,
                                         before))
        return self._plan[1]

    def take_plan(self) -> EpochPlan:
        """The plan for an iteration, which fills its stats: the next ``plan()`` is a fresh one."""
        plan = self.plan()
        self._plan = (None, None)
        return plan

    def __len__(self) -> int:
        return self.plan().steps(self.spec)

    def epoch_stats(self) -> dict:
        return dict(self._last_stats)

    def close(self) -> None:
        pass


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; CPU to CUDA through pinned memory, non_blocking (no host-device sync)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_device_batch(images: torch.Tensor, rows: torch.Tensor, label_table: torch.Tensor,
                    channels_last: bool) -> Batch:
    """Move a batch to the label table's device (if it is not there yet) and look the labels up there."""
    device = label_table.device
    images, rows = to_device(images, device), to_device(rows, device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images=images, labels=label_table[rows], rows=rows)
