"""Classification graphs: a training graph and an evaluation graph, each written once for both devices.

The reader is not part of the graph: each pipeline factory takes a ``source`` callable for
``fn.external_source`` that returns ``(list of encoded images as uint8 arrays, int64 row ids)`` per batch
(the loader owns file reading, sharding and corrupt-file recovery). The row id travels through the graph
untouched so every output sample stays traceable to its manifest row.

Training: the graph draws nothing. A third external input, ``AUG``, carries each sample's augmentation drawn
on the host from (seed, epoch, row) (``pillsnap_dali.loaders.augment.draw_augment``; layout
``pipelines.colour.AUG_FIELDS``), fed to the ops as per-sample argument inputs, so a pipeline can live
across epochs and a resumed epoch gives the same pixels: ``decoders.image_slice`` (decodes the crop window
only, where the decoder can) -> resize to ``img_size`` x ``img_size`` (linear, antialiased) ->
``crop_mirror_normalize`` with the drawn flip, to uint8 CHW; ``pipelines.colour.BatchColour`` applies the
drawn jitter + normalization to the batch on the training device (one per-sample affine: ~10x less CPU than
DALI's colour ops, see that module). ``TrainSpec.colour="graph"`` is a benchmark arm only (what the batch
step saves): ``color_twist`` with the same drawn factors + normalization in the graph.
Every decoder upsamples JPEG chroma the same way (``jpeg_fancy_upsampling``, as libjpeg-turbo and PIL do):
``mixed`` decodes the pixels of ``cpu`` and of PIL (``common.decoder_kwargs``).
Evaluation: ``squash`` = decode -> resize to (S, S); ``crop`` = decode -> resize the shorter side to
``round(S / crop_pct)`` -> centre crop S x S; then the same normalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline

from .colour import AUG_INDEX
from .common import (AIHUB_HEIGHT, AIHUB_WIDTH, IMAGENET_MEAN, IMAGENET_STD, Input, PipelineOptions,
                     build_pipeline, dali_dtype, dali_layout, decoder_kwargs)

# Names of the external-source outputs when a pipeline is fed with ``feed_input`` instead of a callable.
ENCODED = "encoded"
ROWS = "rows"
AUG = "aug"  # training graph: (len(AUG_FIELDS),) float32 per sample
RESIZE_MODES = ("squash", "crop")
COLOUR_MODES = ("batch", "graph")


@dataclass(frozen=True)
class OutputSpec:
    """What the last op produces: normalization on 0..1 pixel values, dtype and batch layout."""
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dtype: str = "float32"
    layout: str = "NCHW"


@dataclass(frozen=True)
class TrainSpec:
    """The training graph: the augmentation itself comes per sample through the ``AUG`` input."""
    img_size: int
    output: OutputSpec = OutputSpec()
    hw_decoder_load: float = 0.65
    colour: str = "batch"  # "batch": the graph ends at uint8 CHW; "graph": jitter + normalize in DALI (benchmark)

    def __post_init__(self):
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"colour must be one of {COLOUR_MODES}, got {self.colour!r}")


@dataclass(frozen=True)
class EvalSpec:
    img_size: int
    resize_mode: str = "squash"
    crop_pct: float = 0.875
    output: OutputSpec = OutputSpec()
    hw_decoder_load: float = 0.65

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")


Spec = Union[TrainSpec, EvalSpec]


def _decoder_kwargs(device: str, hw_decoder_load: float) -> dict:
    kw = decoder_kwargs(device)
    if device == "gpu":
        kw.update(hw_decoder_load=hw_decoder_load, preallocate_width_hint=AIHUB_WIDTH,
                  preallocate_height_hint=AIHUB_HEIGHT)
    return kw


def _normalize(images, out: OutputSpec, mirror=None, crop: Optional[int] = None):
    kw = {"mirror": mirror} if mirror is not None else {}
    if crop is not None:
        kw.update(crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.crop_mirror_normalize(images, dtype=dali_dtype(out.dtype), output_layout=dali_layout(out.layout),
                                    mean=[m * 255.0 for m in out.mean], std=[s * 255.0 for s in out.std], **kw)


def _field(aug, name: str):
    return aug[AUG_INDEX[name]]


def _colour_jitter(images, aug):
    """The benchmark arm's colour step in the graph: ``fn.color_twist`` with the drawn factors."""
    return fn.color_twist(images, hue=_field(aug, "hue") * 360.0, saturation=_field(aug, "saturation"),
                          brightness=_field(aug, "brightness"), contrast=_field(aug, "contrast"))


def train_graph(encoded, spec: TrainSpec, device: str = "cpu", aug=None):
    """Training images from encoded bytes and the samples' draws ``aug``: decode of the drawn crop window, one
    resize that also applies the drawn flip, uint8 HWC (the jitter and the normalization are ``BatchColour``'s,
    on the batch).

    With ``spec.colour == "graph"`` (benchmark arm): drawn ``color_twist``, flip and normalization in DALI."""
    if aug is None:
        raise ValueError(f"the training graph needs the per-sample draws (external input {AUG!r})")
    crop = AUG_INDEX["crop_x"]
    images = fn.decoders.image_slice(encoded, aug[crop:crop + 2], aug[crop + 2:crop + 4],
                                     **_decoder_kwargs(device, spec.hw_decoder_load))
    if spec.colour == "batch":
        # one pass fewer than resize + crop_mirror_normalize: the drawn flip is a reversed x range of the
        # resize's ROI (DALI mirrors an axis whose ROI start is past its end) and the uint8 HWC output is the
        # batch colour step's input as it is (dali_loader reads it as logical NCHW, no copy)
        f = _field(aug, "flip")
        start, end = fn.stack(f * 0.0, f), fn.stack(f * 0.0 + 1.0, 1.0 - f)  # (y, x), relative
        return fn.resize(images, resize_x=spec.img_size, resize_y=spec.img_size, antialias=True,
                         interp_type=types.INTERP_LINEAR, roi_start=start, roi_end=end, roi_relative=True)
    images = fn.resize(images, resize_x=spec.img_size, resize_y=spec.img_size, antialias=True,
                       interp_type=types.INTERP_LINEAR)
    mirror = fn.cast(_field(aug, "flip"), dtype=types.INT32)
    return _normalize(_colour_jitter(images, aug), spec.output, mirror=mirror)


def eval_resize_shorter(spec: EvalSpec) -> int:
    """Shorter side before the centre crop in ``crop`` mode (the same rule as the PIL path)."""
    return int(round(spec.img_size / spec.crop_pct))


def eval_graph(encoded, spec: EvalSpec, device: str = "cpu"):
    """Evaluation images: decode, squash to (S, S) or shorter side + centre crop, normalize."""
    images = fn.decoders.image(encoded, **_decoder_kwargs(device, spec.hw_decoder_load))
    if spec.resize_mode == "squash":
        images = fn.resize(images, resize_x=spec.img_size, resize_y=spec.img_size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        return _normalize(images, spec.output)
    images = fn.resize(images, resize_shorter=eval_resize_shorter(spec), antialias=True,
                       interp_type=types.INTERP_LINEAR)
    return _normalize(images, spec.output, crop=spec.img_size)


def decode_graph(encoded, spec: Spec, device: str = "cpu"):
    """Decode only (the throughput ceiling of a graph: no resize, no augmentation)."""
    return fn.decoders.image(encoded, **_decoder_kwargs(device, spec.hw_decoder_load))


def classify_inputs(graph: Callable) -> tuple[Input, ...]:
    """The graph's external inputs: encoded bytes and row ids, and ``AUG`` for the training graph."""
    inputs = (Input(ENCODED, types.UINT8, 1), Input(ROWS, types.INT64, 0))
    return inputs + ((Input(AUG, types.FLOAT, 1),) if graph is train_graph else ())


def classify_pipeline(source: Optional[Callable], spec: Spec, opts: PipelineOptions,
                      graph: Optional[Callable] = None) -> Pipeline:
    """A built pipeline whose outputs are ``(images, rows)`` (``common.build_pipeline``).

    ``source()`` returns one batch ``([uint8 arrays], int64 row ids[, float32 (n, 9) AUG draws])`` (one value
    per input of ``classify_inputs(graph)``) or raises ``StopIteration`` at the end of the epoch. With
    ``source=None`` the inputs are named (``ENCODED``, ``ROWS``, ``AUG``) for ``pipe.feed_input``. ``graph``
    defaults to ``train_graph`` for a ``TrainSpec`` and ``eval_graph`` for an ``EvalSpec``.
    """
    if graph is None:
        graph = train_graph if isinstance(spec, TrainSpec) else eval_graph

    def outputs(nodes: dict):
        kw = {"aug": nodes[AUG]} if AUG in nodes else {}
        return graph(nodes[ENCODED], spec, opts.device, **kw), nodes[ROWS]
    return build_pipeline(source, classify_inputs(graph), outputs, opts)
