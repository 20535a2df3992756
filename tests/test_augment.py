"""Host-side augmentation draws (loaders.augment.draw_augment) and what they give the training backends:
per-sample draws from (seed, epoch, row) alone, the same batches from ``pil`` and ``dali-cpu``, other pixels
in another epoch and the same pixels in a rebuilt pipeline or a resumed epoch."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.benchmarks.loaders import bench_manifest
from pillsnap_dali.config import AugmentConfig, load_config
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.loaders.augment import central_crop, crop_box, crop_windows, draw_augment
from pipelines import AUG_FIELDS, AUG_INDEX

CPU = torch.device("cpu")
BACKENDS = ("dali-cpu", "pil")
SIZES = [(976, 1280), (300, 200), (64, 80), (1280, 976)]


def _draws(cfg=AugmentConfig(), seed=0, epoch=0, rows=range(400)):
    rows = np.asarray(list(rows))
    return draw_augment(cfg, seed, epoch, rows, [SIZES[r % len(SIZES)] for r in rows])


def test_draws_follow_the_config_ranges():
    cfg = AugmentConfig()
    d = _draws(cfg)
    assert d.shape == (400, len(AUG_FIELDS)) and d.dtype == np.float32
    x, y, w, h = (d[:, AUG_INDEX[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 1 + 1e-6).all() and (y + h <= 1 + 1e-6).all()
    sizes = np.array([SIZES[r % len(SIZES)] for r in range(400)], dtype=np.float64)
    area = w * h  # share of the image
    aspect = (w * sizes[:, 0]) / (h * sizes[:, 1])
    tried = (area >= cfg.random_area[0] * 0.9) & (area <= cfg.random_area[1])
    assert tried.mean() > 0.95 and np.abs(np.log(aspect)).max() <= math.log(4 / 3) + 0.05
    assert 0.35 < d[:, AUG_INDEX["flip"]].mean() < 0.65 and set(np.unique(d[:, AUG_INDEX["flip"]])) == {0.0, 1.0}
    for name in ("brightness", "contrast", "saturation", "hue"):
        centre, amount = (0.0 if name == "hue" else 1.0), getattr(cfg, name)
        col = d[:, AUG_INDEX[name]]
        assert np.abs(col - centre).max() <= amount + 1e-6 and col.std() > amount / 3  # drawn per sample


def test_a_samples_draw_depends_on_seed_epoch_and_row_only():
    rows = np.array([5, 17, 3, 200])
    base = _draws(rows=rows)
    alone = np.concatenate([_draws(rows=[r]) for r in rows])  # another batch composition
    assert np.array_equal(base, alone)
    assert np.array_equal(base[[2, 0]], _draws(rows=[3, 5]))  # another order
    for other in (_draws(epoch=1, rows=rows), _draws(seed=1, rows=rows)):
        assert (np.abs(other - base).max(axis=1) > 0).all()  # every sample changes


def test_zero_amounts_draw_the_centre_and_bad_amounts_are_refused():
    plain = AugmentConfig(hflip=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                          random_area=[1.0, 1.0], random_aspect_ratio=[976 / 1280, 976 / 1280])
    d = draw_augment(plain, 3, 2, np.arange(4), [(976, 1280)] * 4)
    assert np.array_equal(d, np.tile(np.array([0, 0, 1, 1, 0, 1, 1, 1, 0], np.float32), (4, 1)))
    assert draw_augment(dataclasses.replace(plain, hflip=1.0), 0, 0, np.arange(3), [(9, 9)] * 3)[:, 4].all()
    with pytest.raises(ValueError, match="augment.hue"):
        draw_augment(dataclasses.replace(plain, hue=0.7), 0, 0, np.arange(1), [(9, 9)])
    with pytest.raises(ValueError, match="sizes"):
        draw_augment(plain, 0, 0, np.arange(2), [(9, 9)])


def test_the_crop_window_is_torchvisions_box_in_whole_pixels():
    """The relative window maps back to the integer box of torchvision's sampling (with its central fallback
    when 10 tries fail), which is the box both the PIL crop and DALI's ROI decoder take."""
    # the first try that fits is taken: here try 0 asks for more than the image (area 1, aspect 4/3 of a
    # square image), try 1 for half of it at aspect 1
    u = np.zeros((1, 27))
    u[0, 5:9] = (1.0, 1.0, 1 / 3, 0.5)  # (area, aspect) uniforms of tries 0 and 1: shares 1 and 0.5
    u[0, 25:27] = (0.5, 0.0)  # top, left
    win = crop_windows(np.array([[100.0, 100.0]]), (0.25, 1.0), (0.75, 4 / 3), u)
    assert win.tolist() == [[0.0, 15.0, 71.0, 71.0]]  # sqrt(5000) -> 71; top floor(0.5 * 30)
    for r, (w, h) in enumerate(SIZES):
        d = _draws(rows=[r])[0]
        top, left, ch, cw = crop_box(d, w, h)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
        assert np.allclose(d[:4], [left / w, top / h, cw / w, ch / h], atol=1e-6)
    # no aspect in [3, 4] fits a 100 x 100 image with the whole area: 10 failed tries, then the central crop
    # of the clamped aspect, as torchvision falls back
    wide = AugmentConfig(random_area=[1.0, 1.0], random_aspect_ratio=[3.0, 4.0])
    d = draw_augment(wide, 0, 0, np.arange(3), [(100, 100)] * 3)
    assert all(crop_box(x, 100, 100) == central_crop(100, 100, (3.0, 4.0)) == (33, 0, 33, 100) for x in d)



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photo-like images of the AI Hub shape, small: PNGs (lossless) and a JPEG, one with an EXIF turn."""
    from pillsnap_dali.benchmarks.loaders import photo_like
    folder = tmp_path_factory.mktemp("aug_photos")
    paths = []
    for i in range(6):
        img = Image.fromarray(photo_like(244, 320, np.random.default_rng(i)))
        path = folder / f"photo_{i}.{'jpg' if i == 5 else 'png'}"
        if i == 4:
            exif = Image.Exif()
            exif[0x0112] = 6  # stored sideways: upright it is 320 x 244
            img.save(path, exif=exif.tobytes())
        else:
            img.save(path, quality=95)
        paths.append(path)
    return paths


def _cfg(*sets):
    return load_config(stage="demo", sets=["preprocess.img_size=96", "train.batch_size=4", "loader.threads=1",
                                           "loader.workers=0", *sets])


def _by_row(loader, epoch: int, start: int = 0) -> dict:
    loader.set_epoch(epoch, start)
    return {r: img for b in loader for r, img in zip(b.rows.tolist(), b.images)}


def test_pil_and_dali_cpu_make_near_identical_training_batches(photos):
    """Same (seed, epoch, rows): the same crop window, flip and jitter on both backends, the same colour step.
    Bound: mean absolute difference per image <= 0.01 of the normalized range (about 0.6 grey levels; the
    two resize kernels differ slightly), on every image, with the default augmentation."""
    cfg = _cfg()
    out = {b: _by_row(build_loader(bench_manifest(photos), [0] * len(photos), cfg, train=True, device=CPU, backend=b,
                                   seed=11), 0) for b in BACKENDS}
    assert sorted(out["pil"]) == sorted(out["dali-cpu"]) == list(range(len(photos)))
    diffs = [float((out["pil"][r] - out["dali-cpu"][r]).abs().mean()) for r in range(len(photos))]
    assert max(diffs) <= 0.01, diffs  # measured 0.0017-0.0030
    # what the bound separates: the same row in another epoch (another draw) is far off
    other = _by_row(build_loader(bench_manifest(photos), [0] * len(photos), cfg, train=True, device=CPU,
                                 backend="pil", seed=11), 1)
    assert min(float((other[r] - out["dali-cpu"][r]).abs().mean()) for r in range(len(photos))) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_rows_differ_across_epochs_and_repeat_in_a_rebuilt_or_resumed_epoch(photos, backend):
    """Epochs 0 and 1 give each row other pixels; epoch 0 again from a new loader (new pipelines), and epoch 0
    resumed mid-way, give each of its rows exactly the pixels of the first run."""
    def loader():
        return build_loader(bench_manifest(photos), [0] * len(photos), _cfg(), train=True, device=CPU,
                            backend=backend, seed=5)
    first = loader()
    e0, e1 = _by_row(first, 0), _by_row(first, 1)
    assert all(float((e0[r] - e1[r]).abs().mean()) > 0.05 for r in e0)
    again = _by_row(loader(), 0)
    assert sorted(again) == sorted(e0) and all(torch.equal(again[r], e0[r]) for r in e0)
    resumed = loader()
    resumed.set_epoch(0)
    order = [r for b in resumed for r in b.rows.tolist()]
    tail = _by_row(resumed, 0, start=4)
    assert sorted(tail) == sorted(order[4:]) and all(torch.equal(tail[r], e0[r]) for r in tail)
