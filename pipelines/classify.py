"""Classification graphs: a training graph and an evaluation graph, each written once for both devices.

The reader is not part of the graph: each pipeline factory takes a ``source`` callable for
``fn.external_source`` that returns ``(list of encoded images as uint8 arrays, int64 row ids)`` per batch
(the loader owns file reading, sharding and corrupt-file recovery). The row id travels through the graph
untouched so every output sample stays traceable to its manifest row.

Training: ``decoders.image_slice`` (decode fused with the crop window drawn on the host, input ``AUG``) -> resize to
``img_size`` x ``img_size`` (linear, antialiased) -> then, with ``TrainSpec.colour="graph"``,
``color_twist`` (brightness, contrast, saturation, hue) -> ``crop_mirror_normalize`` (random horizontal flip,
ImageNet normalization, float16/32, CHW or HWC); with ``colour="batch"`` the graph ends with the random flip
to uint8 CHW and ``pipelines.colour.BatchColour`` applies jitter + normalization to the batch on the
training device (one per-sample affine: ~10x less CPU than the two DALI ops, see that module).
Evaluation: ``squash`` = decode -> resize to (S, S); ``crop`` = decode -> resize the shorter side to
``round(S / crop_pct)`` -> centre crop S x S; then the same normalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline

from .common import (AIHUB_HEIGHT, AIHUB_WIDTH, IMAGENET_MEAN, IMAGENET_STD, Input, PipelineOptions,
                     build_pipeline, dali_dtype, dali_layout, decoder_device)

# Names of the external-source outputs when a pipeline is fed with ``feed_input`` instead of a callable.
ENCODED = "encoded"
ROWS = "rows"
# The training graph's per-sample augmentation, drawn on the host (``pillsnap_dali.loaders.augment``): float32
# [crop_x, crop_y, crop_w, crop_h] relative to the upright image, flip (0/1), then the colour factors
# (brightness, contrast, saturation: 1 = unchanged; hue: a fraction of a full turn, 0 = unchanged).
AUG = "aug"
AUG_FIELDS = ("crop_x", "crop_y", "crop_w", "crop_h", "flip", "brightness", "contrast", "saturation", "hue")
RESIZE_MODES = ("squash", "crop")
COLOUR_MODES = ("graph", "batch")


@dataclass(frozen=True)
class OutputSpec:
    """What the last op produces: normalization on 0..1 pixel values, dtype and batch layout."""
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dtype: str = "float32"
    layout: str = "NCHW"


@dataclass(frozen=True)
class TrainSpec:
    img_size: int
    random_area: tuple = (0.25, 1.0)
    random_aspect_ratio: tuple = (0.75, 4 / 3)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # fraction of a full turn
    output: OutputSpec = OutputSpec()
    hw_decoder_load: float = 0.65
    colour: str = "graph"  # "graph": jitter + normalize in DALI; "batch": the graph ends at uint8 CHW

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
    kw = {"device": decoder_device(device), "output_type": types.RGB}
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


def _colour_jitter(images, spec: TrainSpec, aug):
    """Brightness, contrast, saturation and hue in one pass (``fn.color_twist``), with the sample's factors
    from ``aug`` (hue in turns): one op instead of ``hsv`` + ``brightness_contrast`` saves a full pass over
    every image (measured ~3-5 % on 2 CPU cores)."""
    if not any((spec.hue, spec.saturation, spec.brightness, spec.contrast)):
        return images
    return fn.color_twist(images, brightness=aug[AUG_FIELDS.index("brightness")],
                          contrast=aug[AUG_FIELDS.index("contrast")],
                          saturation=aug[AUG_FIELDS.index("saturation")],
                          hue=aug[AUG_FIELDS.index("hue")] * 360.0)


def train_graph(encoded, spec: TrainSpec, device: str = "cpu", aug=None):
    """Training images from encoded bytes and each sample's host-drawn augmentation ``aug`` (``AUG_FIELDS``):
    fused decode + crop of the drawn window, resize, colour jitter, flip, normalize. No random op: the same
    draws give the same pixels in any pipeline, rebuilt or not.

    With ``spec.colour == "batch"``: decode + crop, resize, flip, uint8 CHW (the colour jitter and the
    normalization are ``pipelines.colour.BatchColour``'s, on the batch, with the same drawn factors)."""
    if aug is None:
        raise ValueError("the training graph needs the per-sample augmentation input (AUG)")
    images = fn.decoders.image_slice(encoded, rel_start=aug[0:2], rel_shape=aug[2:4],
                                     **_decoder_kwargs(device, spec.hw_decoder_load))
    images = fn.resize(images, resize_x=spec.img_size, resize_y=spec.img_size, antialias=True,
                       interp_type=types.INTERP_LINEAR)
    mirror = fn.cast(aug[AUG_FIELDS.index("flip")], dtype=types.INT32) if spec.hflip > 0 else None
    if spec.colour == "batch":
        kw = {"mirror": mirror} if mirror is not None else {}
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mean=[0.0], std=[1.0],
                                        **kw)
    images = _colour_jitter(images, spec, aug)
    return _normalize(images, spec.output, mirror=mirror)


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
