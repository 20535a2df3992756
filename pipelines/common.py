"""Pieces shared by every DALI graph: devices, dtypes, the one pipeline-options type and the one builder.

Imports ``nvidia.dali`` and numpy only (never ``pillsnap_dali``), so a graph can be built and tested alone.
(The shard order the readers feed lives with the loaders, ``pillsnap_dali.loaders.common.shard_order``: the
``pil`` backend must work where DALI is not installed.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import nvidia.dali.fn as fn
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
    """How a pipeline runs (not what it computes); the one options type of every graph and loader.

    ``device="gpu"`` decodes with ``device="mixed"`` and keeps every later op on the GPU of ``device_id``;
    ``device="cpu"`` runs the same graph on ``num_threads`` CPU threads with ``device_id=None``.
    """
    batch_size: int = 1
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


def decoder_kwargs(device: str) -> dict:
    """What every graph's image decoder is given: its device, RGB output, and fancy (smooth) chroma upsampling
    on every device, as libjpeg-turbo and PIL do (the ``mixed`` decoder's default is off, unlike the CPU's), so
    ``mixed`` decodes the pixels of ``cpu`` and of PIL."""
    return {"device": decoder_device(device), "output_type": types.RGB, "jpeg_fancy_upsampling": True}


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


@dataclass(frozen=True)
class Input:
    """One external input of a graph: fed per sample, by name (``feed_input``) or by a batch ``source``."""
    name: str
    dtype: types.DALIDataType
    ndim: int


def build_pipeline(source: Optional[Callable], inputs: Sequence[Input], graph: Callable[[dict], Sequence],
                   opts: PipelineOptions) -> Pipeline:
    """A built pipeline of ``graph`` (``{input name: node} -> outputs``): how every graph is built.

    ``source()`` returns one batch as a tuple with one list (or array) of per-sample values per input, in the
    order of ``inputs`` (a batch may be shorter than ``opts.batch_size``), or raises ``StopIteration`` at the
    end of an epoch. ``source=None``: the inputs are named for ``pipe.feed_input``.
    """
    pipe = opts.new_pipeline()
    with pipe:
        if source is not None:
            nodes = fn.external_source(source=source, num_outputs=len(inputs), batch=True,
                                       dtype=[i.dtype for i in inputs], ndim=[i.ndim for i in inputs])
        else:
            nodes = [fn.external_source(name=i.name, dtype=i.dtype, ndim=i.ndim, batch=True) for i in inputs]
        pipe.set_outputs(*graph(dict(zip((i.name for i in inputs), nodes))))
    pipe.build()
    return pipe
