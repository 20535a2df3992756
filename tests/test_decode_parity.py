"""JPEG decode parity: every DALI decoder upsamples chroma as libjpeg-turbo and PIL do
(``jpeg_fancy_upsampling``), so training on the JPEG cache, ``dali-cpu`` and predict's PIL path see the same
pixels. The ``mixed`` decoder's default is off: the gpu test shows it on and off against PIL."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.benchmarks.loaders import photo_like
from pipelines import EvalSpec, PipelineOptions, classify_pipeline, decode_graph

# 4:2:0 JPEG of a photo-like image with sharp colour edges (where chroma upsampling shows)
W, H, BATCH = 244, 320, 4


def _jpeg_420() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo_like(W, H, np.random.default_rng(3))).save(buf, "JPEG", quality=90, subsampling=2)
    return buf.getvalue()


def _decode(jpeg: bytes, device: str, **graph_kw) -> np.ndarray:
    """(BATCH, H, W, 3) uint8 through the pipelines' decoder settings (``decode_graph``) on ``device``."""
    import nvidia.dali.fn as fn

    def graph(encoded, spec, dev):
        if not graph_kw:
            return decode_graph(encoded, spec, dev)
        return fn.decoders.image(encoded, device="mixed" if dev == "gpu" else "cpu", **graph_kw)
    fed = iter([([np.frombuffer(jpeg, np.uint8)] * BATCH, np.arange(BATCH, dtype=np.int64))])
    opts = PipelineOptions(batch_size=BATCH, num_threads=1, device=device,
                           device_id=torch.cuda.current_device() if device == "gpu" else None)
    images, _ = classify_pipeline(lambda: next(fed), EvalSpec(img_size=W), opts, graph=graph).run()
    if device == "gpu":
        images = images.as_cpu()
    return np.array(images.as_tensor()).astype(np.int16)


def _pil(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)


def test_dali_cpu_decodes_a_420_jpeg_as_pil_does():
    """Bound: mean absolute difference <= 0.05 grey levels and no pixel off by more than 2 (both are
    libjpeg-turbo with fancy upsampling: measured 0 and 0); and the setting is asked of every decoder."""
    from pipelines.classify import _decoder_kwargs
    jpeg = _jpeg_420()
    diff = np.abs(_decode(jpeg, "cpu") - _pil(jpeg)[None])
    assert diff.shape == (BATCH, H, W, 3)
    assert diff.mean() <= 0.05 and diff.max() <= 2, (diff.mean(), diff.max())
    assert all(_decoder_kwargs(d, 0.65)["jpeg_fancy_upsampling"] is True for d in ("cpu", "gpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decodes_a_420_jpeg_as_pil_does():
    """Bound: mean absolute difference <= 0.5 grey levels on every sample of the batch (nvJPEG's IDCT is not
    libjpeg-turbo's), and closer to PIL than the mixed decoder with its default (fancy upsampling off)."""
    import nvidia.dali.types as types
    jpeg = _jpeg_420()
    ref = _pil(jpeg)[None]
    ours = np.abs(_decode(jpeg, "gpu") - ref).mean(axis=(1, 2, 3))
    default = np.abs(_decode(jpeg, "gpu", output_type=types.RGB, jpeg_fancy_upsampling=False) - ref
                     ).mean(axis=(1, 2, 3))
    assert ours.max() <= 0.5, ours
    assert ours.max() < default.min(), (ours, default)
