"""The DALI classification graphs on the CPU (device="cpu", device_id=None): shapes, dtypes, layouts, values."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pillsnap_dali.config import AugmentConfig
from pillsnap_dali.loaders.augment import draw_augment
from pipelines import (AUG_FIELDS, AUG_INDEX, IMAGENET_MEAN, IMAGENET_STD, EvalSpec, OutputSpec, PipelineOptions,
                       TrainSpec, classify_pipeline)


def _png(arr: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _Source:
    """Hands out the given encoded images in batches (with ``aug``, a (n, 9) array, their draws), then
    StopIteration."""

    def __init__(self, encoded: list, batch: int, aug=None):
        self.encoded, self.batch, self.pos, self.aug = encoded, batch, 0, aug

    def __call__(self):
        if self.pos >= len(self.encoded):
            raise StopIteration
        chunk = self.encoded[self.pos:self.pos + self.batch]
        rows = np.arange(self.pos, self.pos + len(chunk), dtype=np.int64)
        self.pos += len(chunk)
        return (chunk, rows) if self.aug is None else (chunk, rows, self.aug[rows])


def _draws(n: int, size=(64, 80), epoch: int = 0, seed: int = 0, **aug) -> np.ndarray:
    return draw_augment(AugmentConfig(**aug), seed, epoch, np.arange(n), [size] * n)


def _run_all(pipe) -> list:
    out = []
    try:
        while True:
            images, rows = pipe.run()
            out.append((np.array(images.as_tensor()), np.array(rows.as_tensor()).reshape(-1)))
    except StopIteration:
        return out


def _gradient(h: int = 80, w: int = 64, shift: int = 0) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = (np.arange(w)[None] * 3 + shift) % 256
    a[..., 1] = np.arange(h)[:, None] * 2
    a[..., 2] = 90
    return a


@pytest.mark.parametrize("dtype,layout,shape", [("float32", "NCHW", (3, 32, 32)), ("float16", "NHWC", (32, 32, 3))])
def test_train_graph_outputs_normalized_batches_and_partial_last_batch(dtype, layout, shape):
    """The benchmark arm (colour in the graph) normalizes; the training graph ends at uint8 CHW."""
    encoded = [_png(_gradient(shift=i * 20)) for i in range(5)]
    spec = TrainSpec(img_size=32, output=OutputSpec(dtype=dtype, layout=layout), colour="graph")
    pipe = classify_pipeline(_Source(encoded, 4, _draws(5)), spec, PipelineOptions(batch_size=4, num_threads=1))
    out = _run_all(pipe)
    assert [len(r) for _, r in out] == [4, 1]  # the last partial batch comes through as it is
    assert np.concatenate([r for _, r in out]).tolist() == [0, 1, 2, 3, 4]
    images = out[0][0]
    assert images.shape == (4,) + shape and images.dtype == np.dtype(dtype)
    assert np.isfinite(images).all() and -3.0 < images.min() and images.max() < 3.0
    assert images.std() > 0.1  # not a constant image
    pipe = classify_pipeline(_Source(encoded, 4, _draws(5)), TrainSpec(img_size=32),
                             PipelineOptions(batch_size=4, num_threads=1))
    images = _run_all(pipe)[0][0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 10  # uint8 HWC


def test_eval_graph_normalizes_a_flat_colour_exactly():
    colour = np.array([200, 100, 50], np.uint8)
    encoded = [_png(np.broadcast_to(colour, (80, 64, 3)).copy())]
    expected = (colour / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for mode, size in (("squash", 24), ("crop", 24)):
        pipe = classify_pipeline(_Source(encoded, 1), EvalSpec(img_size=size, resize_mode=mode),
                                 PipelineOptions(batch_size=1, num_threads=1))
        (images, rows), = _run_all(pipe)
        assert images.shape == (1, 3, size, size)
        assert np.abs(images[0].mean(axis=(1, 2)) - expected).max() < 0.01


def test_eval_crop_mode_keeps_the_centre_and_squash_keeps_everything():
    a = np.zeros((100, 50, 3), np.uint8)  # tall image: bright band top and bottom 10 % only
    a[:10], a[-10:] = 255, 255
    encoded = [_png(a)]
    results = {}
    for mode in ("squash", "crop"):
        pipe = classify_pipeline(_Source(encoded, 1), EvalSpec(img_size=40, resize_mode=mode, crop_pct=1.0),
                                 PipelineOptions(batch_size=1, num_threads=1))
        results[mode] = _run_all(pipe)[0][0][0]
    assert results["squash"][:, 0, :].mean() > 1.0  # the top band survives a squash
    assert results["crop"].max() < -1.0  # the centre 50x50 of 50x100 holds no bright band


def test_training_augmentation_is_seeded():
    """The training graph has no random op of its own: the host draws (seeded) decide every pixel."""
    encoded = [_png(_gradient(shift=i * 30)) for i in range(4)]
    spec = TrainSpec(img_size=32)

    def run(seed):
        pipe = classify_pipeline(_Source(encoded, 4, _draws(4, seed=seed)), spec,
                                 PipelineOptions(batch_size=4, num_threads=2, seed=seed + 100))
        return _run_all(pipe)[0][0]
    assert np.array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_the_training_graph_draws_nothing_itself():
    """Its output is a function of the fed draws alone: the pipeline's own seed changes nothing, other draws
    change the pixels (so a pipeline can live across epochs and a rebuilt one gives the same batch)."""
    encoded = [_png(_gradient(shift=i * 30)) for i in range(4)]
    spec = TrainSpec(img_size=32)

    def run(seed, epoch):
        pipe = classify_pipeline(_Source(encoded, 4, _draws(4, epoch=epoch)), spec,
                                 PipelineOptions(batch_size=4, num_threads=2, seed=seed))
        return _run_all(pipe)[0][0]
    assert np.array_equal(run(7, 0), run(8, 0))
    assert not np.array_equal(run(7, 0), run(7, 1))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_training_graph_decodes_the_drawn_window_and_flips_as_drawn(fmt):
    """Windows of the output size (no resampling): the pixels are exactly the window of the image (the JPEG:
    as PIL decodes it), mirrored where the draw says flip; the window is in pixels of the upright image."""
    w, h, size = 97, 131, 24
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = np.arange(w)[None] * 2, np.arange(h)[:, None], 77
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    boxes = [(0, 0), (73, 107), (40, 9)]  # (left, top) of size x size windows
    aug = np.zeros((3, len(AUG_FIELDS)), np.float32)
    for i, (left, top) in enumerate(boxes):
        aug[i, :4] = (left / w, top / h, size / w, size / h)
        aug[i, AUG_INDEX["flip"]] = i % 2
        aug[i, [AUG_INDEX[k] for k in ("brightness", "contrast", "saturation")]] = 1.0
    encoded = [np.frombuffer(buf.getvalue(), np.uint8)] * 3
    out = _run_all(classify_pipeline(_Source(encoded, 3, aug), TrainSpec(img_size=size),
                                     PipelineOptions(batch_size=3, num_threads=1)))[0][0]
    for i, (left, top) in enumerate(boxes):
        want = ref[top:top + size, left:left + size]  # uint8 HWC: the flip is the resize's reversed x range
        want = want[:, ::-1] if i % 2 else want
        assert np.array_equal(out[i], want), (i, np.abs(out[i].astype(int) - want).max())


def test_pipeline_options_reject_bad_values():
    with pytest.raises(ValueError, match="device_id"):
        PipelineOptions(batch_size=2, device="gpu")
    with pytest.raises(ValueError, match="device"):
        PipelineOptions(batch_size=2, device="tpu")
    with pytest.raises(ValueError, match="resize_mode"):
        EvalSpec(img_size=32, resize_mode="letterbox")


def test_gpu_graphs_are_well_formed_without_a_gpu():
    """The device="gpu" graphs are defined (not built) here: DALI checks every op's device placement at
    definition, so a CPU op fed GPU data, or a wrong argument, fails on this CPU machine too."""
    import nvidia.dali.fn as fn
    from pipelines import AUG, ENCODED, ROWS, EvalSpec, PipelineOptions, TrainSpec
    from pipelines.classify import classify_inputs, eval_graph, train_graph
    from pipelines.detect import DetectSpec, detect_graph, detect_inputs

    def inputs(declared):
        return {i.name: fn.external_source(name=i.name, dtype=i.dtype, ndim=i.ndim) for i in declared}
    opts = PipelineOptions(batch_size=4, device="gpu", device_id=0)
    for spec, graph in ((TrainSpec(img_size=64), train_graph), (TrainSpec(img_size=64, colour="graph"), train_graph),
                        (EvalSpec(img_size=64), eval_graph),
                        (EvalSpec(img_size=64, resize_mode="crop"), eval_graph)):
        pipe = opts.new_pipeline()
        with pipe:
            nodes = inputs(classify_inputs(graph))
            out = graph(nodes[ENCODED], spec, "gpu", **({"aug": nodes[AUG]} if AUG in nodes else {}))
            pipe.set_outputs(out, nodes[ROWS])
        assert out.device == "gpu"
    det = opts.new_pipeline()
    with det:  # defined, not built
        spec = DetectSpec(imgsz=64, augment={"fliplr": 0.5, "hsv_h": 0.015})
        outs = detect_graph(inputs(detect_inputs(spec)), spec,
                            "gpu")
    assert [o.device for o in outs] == ["gpu", "cpu", "cpu"]  # images on the GPU; boxes (and rows) on the host
    bad = opts.new_pipeline()
    with pytest.raises(RuntimeError, match="IsCompatibleDevice"):
        with bad:
            encoded = inputs(classify_inputs(eval_graph))[ENCODED]
            bad.set_outputs(fn.resize(fn.decoders.image(encoded, device="mixed"), size=8, device="cpu"))
