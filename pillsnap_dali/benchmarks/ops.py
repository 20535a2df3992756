"""``python -m pillsnap_dali.bench ops``: the training sample op by op, one thread, per arm.

Where a peer arm of ``bench decode`` beats ``dali-cpu``, this says which op makes the difference: CPU
milliseconds (process CPU time, so a busy machine does not inflate them) per 384 px training sample on one
thread (median over the images, each op timed alone on the
previous op's output) for OpenCV (header, full decode, reduced decode, crop + INTER_AREA resize, flip + RGB
CHW copy), torchvision (decode, resized_crop, flip), PIL draft (draft decode, resize with box, flip + copy),
the batch colour step all arms share, and the DALI graph built up op by op on one thread (decode; fused
decode + random crop, which decodes only the crop's region of a JPEG; + resize; + flip to uint8 CHW).
"""
from __future__ import annotations

import io
import logging
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pillsnap_dali.benchmarks.peers import Drawer, _crop_flip_tensor, is_jpeg
from pillsnap_dali.config import AugmentConfig
from pillsnap_dali.loaders.augment import draw_augment

_logger = logging.getLogger(__name__)


def _ms(fn: Callable, items: Sequence, repeat: int = 3) -> float:
    """Median over ``items`` of the best of ``repeat`` calls of ``fn(item)``: CPU ms of this process (not wall
    time: on a shared machine the figure stays the op's own cost)."""
    per = []
    for item in items:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            fn(item)
            best = min(best, time.process_time() - t0)
        per.append(best * 1000.0)
    return statistics.median(per)


def opencv_ops(bufs: list, draws: list, drawer: Drawer) -> dict:
    import cv2
    pairs = list(zip(bufs, draws))
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
    scale = [drawer.reduction(d) if is_jpeg(b) else 1 for b, d in pairs]
    full = [cv2.imdecode(b, cv2.IMREAD_COLOR) for b in bufs]
    reduced = [cv2.imdecode(b, flags[s]) for b, s in zip(bufs, scale)]
    crops = [img[d.top // s:(d.top + d.h) // s, d.left // s:(d.left + d.w) // s]
             for img, d, s in zip(reduced, draws, scale)]
    resized = [cv2.resize(c, (drawer.size, drawer.size), interpolation=cv2.INTER_AREA) for c in crops]
    return {"opencv: header (PIL)": _ms(lambda b: Image.open(io.BytesIO(b.data)).size, bufs),
            "opencv: imdecode full": _ms(lambda b: cv2.imdecode(b, cv2.IMREAD_COLOR), bufs),
            "opencv: imdecode reduced": _ms(lambda i: cv2.imdecode(bufs[i], flags[scale[i]]), range(len(bufs))),
            "opencv: crop + resize INTER_AREA": _ms(
                lambda c: cv2.resize(c, (drawer.size, drawer.size), interpolation=cv2.INTER_AREA), crops),
            "opencv: resize of the full decode instead": _ms(
                lambda i: cv2.resize(full[i][draws[i].top:draws[i].top + draws[i].h,
                                             draws[i].left:draws[i].left + draws[i].w],
                                     (drawer.size, drawer.size), interpolation=cv2.INTER_AREA), range(len(bufs))),
            "opencv: flip + RGB CHW copy": _ms(
                lambda r: torch.from_numpy(np.ascontiguousarray(cv2.flip(r, 1)[:, :, ::-1].transpose(2, 0, 1))),
                resized)}


def torchvision_ops(bufs: list, draws: list, drawer: Drawer) -> dict:
    import dataclasses

    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F
    tensors = [torch.from_numpy(b) for b in bufs]
    images = [decode_image(t, mode=ImageReadMode.RGB) for t in tensors]
    plain = [dataclasses.replace(d, flip=False) for d in draws]
    out = [_crop_flip_tensor(img, d, drawer.size) for img, d in zip(images, plain)]
    return {"torchvision: decode_image": _ms(lambda t: decode_image(t, mode=ImageReadMode.RGB), tensors),
            "torchvision: resized_crop (antialias)": _ms(
                lambda i: _crop_flip_tensor(images[i], plain[i], drawer.size), range(len(images))),
            "torchvision: horizontal_flip": _ms(F.horizontal_flip, out)}


def pil_draft_ops(bufs: list, draws: list, drawer: Drawer) -> dict:
    def decode(i):
        img = Image.open(io.BytesIO(bufs[i].data))
        s = drawer.reduction(draws[i]) if img.format == "JPEG" else 1
        if s > 1:
            img.draft("RGB", (-(-img.size[0] // s), -(-img.size[1] // s)))
        return img.convert("RGB")
    decoded = [decode(i) for i in range(len(bufs))]

    def resize(i):
        d, img = draws[i], decoded[i]
        f = img.size[0] / Image.open(io.BytesIO(bufs[i].data)).size[0]
        return img.resize((drawer.size, drawer.size), Image.BILINEAR,
                          box=(d.left * f, d.top * f, (d.left + d.w) * f, (d.top + d.h) * f))
    resized = [resize(i) for i in range(len(bufs))]
    return {"pil-draft: open + draft + decode": _ms(decode, range(len(bufs))),
            "pil-draft: resize(box) bilinear": _ms(resize, range(len(bufs))),
            "pil-draft: flip + CHW copy": _ms(
                lambda r: torch.from_numpy(np.asarray(r.transpose(Image.FLIP_LEFT_RIGHT)).transpose(2, 0, 1).copy()),
                resized)}


def colour_ops(size: int, batch: int = 16) -> dict:
    from pipelines import BatchColour
    colour = BatchColour(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    aug = draw_augment(AugmentConfig(), 0, 0, np.arange(batch), [(size, size)] * batch)  # the default jitter
    return {"all arms: batch colour + normalize (per image)": _ms(lambda _: colour(x, aug), range(3)) / batch}


class _Cycle:
    """External source: the encoded files, ``batch`` at a time, round and round (with their draws ``augs``
    for the training graph)."""

    def __init__(self, bufs: list, batch: int, augs: Optional[np.ndarray] = None):
        self.bufs, self.batch, self.augs, self.pos = bufs, batch, augs, 0

    def __call__(self):
        idx = [(self.pos + i) % len(self.bufs) for i in range(self.batch)]
        self.pos += self.batch
        out = [self.bufs[i] for i in idx], np.arange(self.batch, dtype=np.int64)
        return out if self.augs is None else (*out, self.augs[idx])


def _dali_graphs(size: int) -> dict:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    aug = AugmentConfig()  # the training defaults' crop settings (DALI's own random crop: the same ROI decode)

    def crop(enc):
        return fn.decoders.image_random_crop(enc, random_area=list(aug.random_area),
                                             random_aspect_ratio=list(aug.random_aspect_ratio),
                                             device="cpu", output_type=types.RGB)

    def resize(img, **kw):
        return fn.resize(img, resize_x=size, resize_y=size, **kw)
    return {"dali: decode": lambda enc: fn.decoders.image(enc, device="cpu", output_type=types.RGB),
            "dali: decode + random crop (ROI decode)": crop,
            "dali: + resize linear antialias": lambda enc: resize(crop(enc), antialias=True,
                                                                  interp_type=types.INTERP_LINEAR),
            "dali: + resize linear, no antialias": lambda enc: resize(crop(enc), antialias=False,
                                                                      interp_type=types.INTERP_LINEAR),
            "dali: + resize triangular minification": lambda enc: resize(
                crop(enc), interp_type=types.INTERP_LINEAR, min_filter=types.INTERP_TRIANGULAR),
            "dali: full graph (flip in the resize, uint8 HWC)": None}  # train_graph itself, on the peers' draws



def dali_ops(bufs: list, augs: np.ndarray, size: int, batch: int = 16, iters: int = 4) -> dict:
    """CPU ms per sample of each DALI graph on one thread (the process's CPU time over ``iters`` batches of
    ``batch`` after one warm-up batch); the training graph decodes the windows of the files' draws ``augs``."""
    from pipelines import PipelineOptions, classify_pipeline
    from pipelines.classify import TrainSpec
    out = {}
    for name, graph in _dali_graphs(size).items():
        pipe = classify_pipeline(_Cycle(bufs, batch, augs if graph is None else None), TrainSpec(img_size=size),
                                 PipelineOptions(batch_size=batch, num_threads=1, prefetch=1),
                                 graph=None if graph is None else (lambda enc, spec, device, g=graph: g(enc)))
        pipe.run()
        t0 = time.process_time()
        for _ in range(iters):
            pipe.run()
        out[name] = (time.process_time() - t0) * 1000.0 / (iters * batch)
        del pipe
    return out


def bench_ops(paths: Sequence[str], *, size: int = 384, seed: int = 0) -> dict:
    """Every op table above for these files (one thread: torch and OpenCV set to 1 for the call)."""
    import cv2
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        bufs = [np.fromfile(p, dtype=np.uint8) for p in paths]
        drawer = Drawer(size, (0.25, 1.0), (0.75, 4 / 3), 0.5, seed)
        draws = [drawer.of_file(b, row, 0) for row, b in enumerate(bufs)]
        ops = {**opencv_ops(bufs, draws, drawer), **torchvision_ops(bufs, draws, drawer),
               **pil_draft_ops(bufs, draws, drawer), **colour_ops(size),
               **dali_ops(bufs, np.stack([d.aug for d in draws]), size)}
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    _logger.info("ops: %s", ", ".join(f"{k} {v:.2f} ms" for k, v in ops.items()))
    return {"files": len(paths), "size": size, "ms_per_sample": ops,
            "reductions": {s: sum(drawer.reduction(d) == s for d in draws) for s in (1, 2, 4, 8)}}
