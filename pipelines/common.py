"""Pieces shared by every DALI graph: devices, dtypes, pipeline options and the shard order.

Imports ``nvidia.dali`` and numpy only (never ``pillsnap_dali``), so a graph can be built and tested alone.
(The shard order the readers feed lives with the loaders, ``pillsnap_dali.loaders.common.shard_order``: the
``pil`` backend must work where DALI is not installed.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
