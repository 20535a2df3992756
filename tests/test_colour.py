"""The batch colour step (pipelines.colour.BatchColour): torchvision's jitter semantics + normalization with the
factors of the host-side draws, and the dali-cpu loader giving the same batches with the colour step on the
batch or in the graph (the benchmark arm)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from pillsnap_dali.benchmarks.loaders import bench_manifest, colour_in_graph
from pillsnap_dali.config import ConfigError, load_config
from pillsnap_dali.loaders import build_loader
from pipelines import AUG_FIELDS, AUG_INDEX, IMAGENET_MEAN, IMAGENET_STD, BatchColour

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _images(b=4, h=12, w=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(30, 220, (b, 3, h, w), dtype=torch.uint8, generator=g)


def _factors(b, hue=0.0, saturation=1.0, brightness=1.0, contrast=1.0) -> np.ndarray:
    """(b, 9) draws: the whole image, no flip, these jitter factors."""
    aug = np.zeros((b, len(AUG_FIELDS)), dtype=np.float32)
    aug[:, AUG_INDEX["crop_w"]] = aug[:, AUG_INDEX["crop_h"]] = 1.0
    for name, v in (("hue", hue), ("saturation", saturation), ("brightness", brightness), ("contrast", contrast)):
        aug[:, AUG_INDEX[name]] = v
    return aug


def _pixels(y: torch.Tensor) -> torch.Tensor:
    """Normalized output back to 0..255 values."""
    return (y.float() * STD + MEAN) * 255.0


def _colour(**kw) -> BatchColour:
    return BatchColour(mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


def test_no_jitter_is_exactly_the_imagenet_normalization():
    x = _images()
    y = _colour()(x, _factors(len(x)))
    expected = (x.float() / 255.0 - MEAN) / STD
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("factors", [dict(saturation=0.7), dict(brightness=1.15), dict(contrast=0.8),
                                     dict(saturation=1.2, brightness=0.9, contrast=1.1)])
def test_saturation_brightness_contrast_follow_torchvision(factors):
    """The pil backend's semantics (torchvision, in its order); values chosen so nothing clamps."""
    x = torch.randint(90, 160, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = _pixels(_colour()(x, _factors(3, **factors)))
    ref = x.float() / 255.0
    if "saturation" in factors:
        ref = F.adjust_saturation(ref, factors["saturation"])
    if "brightness" in factors:
        ref = F.adjust_brightness(ref, factors["brightness"])
    if "contrast" in factors:
        ref = F.adjust_contrast(ref, factors["contrast"])
    assert (got - ref * 255.0).abs().max() < 0.05


def test_hue_rotates_colour_keeps_gray_and_a_full_turn_is_identity():
    x = _images(2)
    gray = torch.full((1, 3, 4, 4), 117, dtype=torch.uint8)
    c = _colour()
    assert (_pixels(c(gray, _factors(1, hue=0.2))) - 117).abs().max() < 0.05
    assert (_pixels(c(x, _factors(2, hue=1.0))) - x.float()).abs().max() < 0.05
    shifted = _pixels(c(x, _factors(2, hue=0.1)))
    assert (shifted - x.float()).abs().mean() > 3.0
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # YIQ rotation keeps luma (up to clamping)
    assert ((shifted * luma).sum(1) - (x.float() * luma).sum(1)).abs().mean() < 1.0


def test_output_is_clamped_to_the_normalized_pixel_range():
    x = torch.full((1, 3, 4, 4), 250, dtype=torch.uint8)
    y = _pixels(_colour()(x, _factors(1, brightness=1.5)))
    assert torch.allclose(y, torch.full_like(y, 255.0), atol=0.01)


def test_the_factors_are_the_draws_own_and_dtype_layout_follow():
    """The colour step draws nothing: per sample it applies the jitter columns of the draws it is given."""
    x = _images(2, 8, 8)
    aug = np.concatenate([_factors(1, brightness=1.2), _factors(1, brightness=0.8)])
    y = _pixels(_colour()(x, aug))
    assert torch.allclose(y[0], (x[0].float() * 1.2).clamp(0, 255), atol=0.05)
    assert torch.allclose(y[1], x[1].float() * 0.8, atol=0.05)
    y = _colour(dtype="float16", layout="NHWC")(x, _factors(2, brightness=1.1))
    assert y.dtype == torch.float16 and y.shape == (2, 3, 8, 8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        _colour()(torch.zeros(1, 3, 4, 4), _factors(1))
    with pytest.raises(ValueError, match="one draw"):
        _colour()(x, _factors(3))



def test_dali_cpu_loader_gives_the_same_batches_with_colour_on_the_batch_or_in_the_graph(tmp_path):
    """No jitter, full-image crop, no flip: the batch colour step and the graph's normalization agree."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    out = {}
    for mode in ("batch", "graph"):
        cfg = load_config(stage="demo", sets=[
            "preprocess.img_size=32", "train.batch_size=3", "loader.threads=1",
            "augment.random_area=[1.0,1.0]", "augment.random_aspect_ratio=[0.8,0.8]", "augment.hflip=0",
            "augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0"])
        loader = build_loader(bench_manifest(paths), [0] * 6, cfg, train=True, device=torch.device("cpu"),
                              backend="dali-cpu")
        if mode == "graph":
            colour_in_graph(loader)
        batches = list(loader)
        order = torch.cat([b.rows for b in batches]).argsort()
        out[mode] = torch.cat([b.images for b in batches])[order]
    assert out["batch"].shape == (6, 3, 32, 32)
    assert (out["batch"] - out["graph"]).abs().max() < 1e-4


def test_colour_in_the_graph_is_no_training_option():
    """``loader.colour`` is gone (one colour step for training): a config that sets it is told what to do."""
    for sets in (["loader.colour=graph"], ["loader.colour=batch"]):
        with pytest.raises(ConfigError, match="loader.colour' was removed: .*benchmark arm"):
            load_config(stage="demo", sets=sets)
    with pytest.raises(ConfigError, match="was removed"):
        load_config(stage="demo", overrides={"loader": {"colour": "graph"}})


def test_dali_cpu_training_batches_in_float16_channels_last_with_jitter(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"img_{i}.png"
        a = np.zeros((80, 64, 3), np.uint8)
        a[..., 0], a[..., 1], a[..., 2] = np.arange(64)[None] * 4, 100, 30 * i
        Image.fromarray(a).save(path)
        paths.append(path)
    cfg = load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=4", "loader.threads=1",
                                          "loader.dtype=float16", "loader.layout=NHWC"])
    loader = build_loader(bench_manifest(paths), [0] * 5, cfg, train=True, device=torch.device("cpu"),
                          backend="dali-cpu")
    batches = list(loader)
    assert [len(b.rows) for b in batches] == [4, 1]
    b = batches[0].images
    assert b.dtype == torch.float16 and b.shape == (4, 3, 32, 32) and b.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(b).all() and float(b.float().std()) > 0.1


def test_hue_turns_like_dali_color_twist_and_the_way_torchvision_does():
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    import torchvision.transforms.functional as F
    from nvidia.dali.pipeline import Pipeline

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 8, 8), dtype=np.uint8))
    x[0, :, 0, 0] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # pure red
    for hue in (0.1, -0.05):
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=None)
        with pipe:
            img = fn.external_source(name="x", dtype=types.UINT8, layout="HWC")
            pipe.set_outputs(fn.color_twist(img, hue=hue * 360.0))
        pipe.build()
        pipe.feed_input("x", [x[0].permute(1, 2, 0).contiguous().numpy()])
        dali = torch.from_numpy(np.array(pipe.run()[0].as_tensor())[0]).permute(2, 0, 1).float()
        ours = _pixels(_colour()(x, _factors(1, hue=hue)))[0]
        assert (ours - dali).abs().max() <= 1.01, (ours - dali).abs().max()
        tv = F.adjust_hue(x.float() / 255.0, hue)[0] * 255.0
        # red turns towards yellow (green up) for hue > 0, towards magenta (blue up) for hue < 0, in both
        towards = 1 if hue > 0 else 2
        assert ours[towards, 0, 0] > 5 and tv[towards, 0, 0] > 5
