"""DALI graph for the detector: decode, letterbox, flips with their box transforms, HSV jitter.

One graph, written once, with a ``device`` parameter: ``"gpu"`` decodes with ``device="mixed"`` and keeps
every image op on the GPU; ``"cpu"`` runs the same ops on the CPU (``device_id=None`` works without a GPU).
Boxes (a few per image) stay on the CPU in both cases: they are ragged and tiny, and the trainer moves the
collated targets to its device itself.

The graph is fed per sample through its external inputs (``DETECT_INPUTS``, built like the classification
graphs by ``common.build_pipeline``: a batch source, or named inputs for ``feed_input``):

- ``encoded``: the encoded image file (uint8, 1-D)
- ``rows``: the sample's row id (int64), returned untouched as the third output
- ``boxes``: ``[N, 4]`` float32 ltrb normalized to the ORIGINAL image (N may be 0)
- ``geometry``: int32 ``[new_h, new_w, top, left]``: the letterbox resize size and the padding offsets,
  computed by the feeder from the image header (``letterbox_geometry``) so the caller knows the exact
  ``ratio_pad`` the validator needs to map predictions back to the original pixels.
- ``draws`` (training graph only, ``detect_inputs``): float32 ``[flip_h, flip_v, hue, saturation, value]``
  (``colour.DETECT_FIELDS``), the sample's augmentation drawn on the host from (seed, epoch, row)
  (``pillsnap_dali.loaders.augment.draw_detect``) and fed to the ops as per-sample argument inputs: the
  graph draws nothing itself, so a resumed epoch (or a rebuilt pipeline) gives every row the same flips and
  colours, like the classification graph's ``AUG``.

Outputs: ``images`` uint8 CHW ``imgsz x imgsz`` (padding value 114, like Ultralytics' LetterBox) and
``boxes`` ``[N, 4]`` float32 normalized center-xywh in the letterboxed frame (the Ultralytics batch format),
and ``rows``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import Pipeline

from .classify import ENCODED, ROWS
from .common import Input, PipelineOptions, build_pipeline, decoder_kwargs

# ltrb -> center xywh, as the 4x4 matrix coord_transform applies to each box row
_LTRB_TO_CXYWH = [0.5, 0.0, 0.5, 0.0,
                  0.0, 0.5, 0.0, 0.5,
                  -1.0, 0.0, 1.0, 0.0,
                  0.0, -1.0, 0.0, 1.0]


def _box_affine(geometry, imgsz: int):
    """Per-sample M (4x4, flattened) and T (4) mapping original-normalized ltrb to letterboxed ltrb."""
    geometry = fn.cast(geometry, dtype=types.FLOAT)
    sy = geometry[0] / imgsz      # new_h / imgsz
    sx = geometry[1] / imgsz      # new_w / imgsz
    ty = geometry[2] / imgsz      # top / imgsz
    tx = geometry[3] / imgsz      # left / imgsz
    zero = sx * 0.0
    m = fn.stack(sx, zero, zero, zero,
                 zero, sy, zero, zero,
                 zero, zero, sx, zero,
                 zero, zero, zero, sy)
    t = fn.stack(tx, ty, tx, ty)
    return fn.reshape(m, shape=[4, 4]), t


def _letterbox_image(images, geometry, imgsz: int, pad_value: int):
    """Resize to (new_h, new_w), then pad to imgsz x imgsz with the image at (top, left)."""
    size = fn.cast(geometry, dtype=types.FLOAT)
    images = fn.resize(images, resize_y=size[0], resize_x=size[1], interp_type=types.INTERP_LINEAR,
                       antialias=True)
    start = fn.stack(-geometry[2], -geometry[3])
    return fn.slice(images, start=start, shape=[imgsz, imgsz], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=pad_value)


def _jitter(images, boxes, aug: dict, draws):
    """Flips (image and boxes together) and HSV colour jitter, as the sample's host-drawn ``draws`` say
    (``DETECT_FIELDS``); ``aug`` only tells which ops the graph holds."""
    if aug["fliplr"] > 0 or aug["flipud"] > 0:
        flip_h = fn.cast(draws[0], dtype=types.INT32)
        flip_v = fn.cast(draws[1], dtype=types.INT32)
        images = fn.flip(images, horizontal=flip_h, vertical=flip_v)
        boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip_h, vertical=flip_v)
    if aug["hsv_h"] > 0 or aug["hsv_s"] > 0 or aug["hsv_v"] > 0:
        images = fn.hsv(images, hue=draws[2], saturation=draws[3], value=draws[4], dtype=types.UINT8)
    return images, boxes


NO_AUGMENT = {"fliplr": 0.0, "flipud": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
BOXES = "boxes"
GEOMETRY = "geometry"
DRAWS = "draws"  # training graph: (len(DETECT_FIELDS),) float32 per sample, drawn on the host
DETECT_INPUTS = (Input(ENCODED, types.UINT8, 1), Input(ROWS, types.INT64, 0), Input(BOXES, types.FLOAT, 2),
                 Input(GEOMETRY, types.INT32, 1))


@dataclass(frozen=True)
class DetectSpec:
    """What the detection graph computes: letterbox size and the augmentation (None: the validation graph).

    ``augment`` keys: fliplr, flipud probabilities; hsv_h (fraction of the hue circle), hsv_s, hsv_v
    (relative gains), the Ultralytics hyperparameter names and meanings.
    """
    imgsz: int = 640
    augment: Optional[dict] = None
    pad_value: int = 114  # the letterbox grey; the caller passes the library's (pillsnap_dali.geometry.PAD_VALUE)


def augments(spec: DetectSpec) -> bool:
    """Whether the graph holds any random op (then it takes the ``DRAWS`` input)."""
    return any(v > 0 for v in dict(NO_AUGMENT, **(spec.augment or {})).values())


def detect_inputs(spec: DetectSpec) -> tuple:
    """The graph's external inputs: ``DETECT_INPUTS``, and ``DRAWS`` when it augments."""
    return DETECT_INPUTS + ((Input(DRAWS, types.FLOAT, 1),) if augments(spec) else ())


def detect_graph(nodes: dict, spec: DetectSpec, device: str):
    """``(images, boxes, rows)`` from the inputs of ``detect_inputs(spec)``."""
    aug = dict(NO_AUGMENT, **(spec.augment or {}))
    if augments(spec) and DRAWS not in nodes:
        raise ValueError(f"the augmenting detection graph needs the per-sample draws (external input {DRAWS!r})")
    images = fn.decoders.image(nodes[ENCODED], **decoder_kwargs(device))  # the pixels of cpu and PIL
    geometry = nodes[GEOMETRY]
    images = _letterbox_image(images, geometry, spec.imgsz, spec.pad_value)
    m, t = _box_affine(geometry, spec.imgsz)
    boxes = fn.coord_transform(nodes[BOXES], M=m, T=t)
    if augments(spec):
        images, boxes = _jitter(images, boxes, aug, nodes[DRAWS])
    boxes = fn.coord_transform(boxes, M=_LTRB_TO_CXYWH)
    images = fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")
    return images, boxes, nodes[ROWS]


def detect_pipeline(source: Optional[Callable], spec: DetectSpec, opts: PipelineOptions) -> Pipeline:
    """A built pipeline of the detector's input graph (``common.build_pipeline``, as the classification
    graphs): ``source()`` returns one batch with a list per input of ``detect_inputs(spec)``; ``source=None``:
    the inputs are named for ``pipe.feed_input``."""
    return build_pipeline(source, detect_inputs(spec), lambda nodes: detect_graph(nodes, spec, opts.device), opts)
