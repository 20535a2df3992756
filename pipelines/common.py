"""Pieces shared by every DALI graph: devices, dtypes, pipeline options and the shard order.

Imports ``nvidia.dali`` and numpy only (never ``pillsnap_dali``), so a graph can be built and tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The AI Hub images are all 976 wide x 1280 high: the GPU decoder preallocates for that size.
AIHUB_WIDTH = 976
AIHUB_HEIGHT = 1280

DEVICES = ("cpu", "gpu")
_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
_LAYOUTS = {"NCHW": "CHW", "NHWC": "HWC"}


@dataclass(frozen=True)
class PipelineOptions:
    """How a pipeline runs (not what it computes).

    ``device="gpu"`` decodes with ``device="mixed"`` and keeps every later op on the GPU of ``device_id``;
    ``device="cpu"`` runs the same graph on ``num_threads`` CPU threads with ``device_id=None``.
    """
    batch_size: int
    device: str = "cpu"
    device_id: Optional[int] = None
    num_threads: int = 2
    prefetch: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.device == "gpu" and self.device_id is None:
            raise ValueError("device='gpu' needs a device_id (the CUDA device index)")
        if self.batch_size < 1 or self.num_threads < 1 or self.prefetch < 1:
            raise ValueError("batch_size, num_threads and prefetch must be >= 1")

    def new_pipeline(self) -> Pipeline:
        return Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device_id if self.device == "gpu" else None,
                        seed=self.seed % (2 ** 31), prefetch_queue_depth=self.prefetch)


def decoder_device(device: str) -> str:
    """The decoder's device for a graph device: ``gpu`` decodes with the hybrid ``mixed`` decoder."""
    return "mixed" if device == "gpu" else "cpu"


def dali_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {name!r}") from None


def dali_layout(layout: str) -> str:
    """Per-sample layout for a batch layout: NCHW -> CHW, NHWC (channels_last) -> HWC."""
    try:
        return _LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"layout must be one of {list(_LAYOUTS)}, got {layout!r}") from None


def shard_order(num_rows: int, *, shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
                seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Row ids one shard reads in one epoch (int64).

    Shuffled: the permutation ``np.random.default_rng([seed, epoch])`` of all rows (the same on every
    shard), of which shard ``r`` takes every ``num_shards``-th element starting at ``r``. Not shuffled:
    ``arange(num_rows)[r::num_shards]``. The shards are disjoint and together cover all rows; their
    lengths differ by at most one.
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rows = (np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle
            else np.arange(num_rows))
    return rows[shard_id::num_shards].astype(np.int64)
