"""The dali-cpu and pil loaders behind one batch contract (real DALI CPU pipelines, real files on disk)."""
from __future__ import annotations

import csv
import gc
import re
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from pillsnap_dali.errors import InputError
from pillsnap_dali.config import load_config
from pillsnap_dali.imageio import open_rgb
from pillsnap_dali.loaders import build_loader, pil_eval_transform, resolve_backend
from pillsnap_dali.loaders.common import Batch
from pillsnap_dali.loaders.common import shard_order
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.skiplog import SkipLog

BACKENDS = ("dali-cpu", "pil")
CPU = torch.device("cpu")


def _manifest(paths) -> Manifest:
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], [f"K-{i % 3:06d}" for i in range(n)], ["single"] * n,
                    ["test"] * n, [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


def _write_split(folder: Path, n: int, size=(64, 80)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for i in range(n):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = (np.arange(w)[None] * 4 + i * 9) % 256
        a[..., 1] = np.arange(h)[:, None] * 3 % 256
        a[..., 2] = (i * 37) % 256
        path = folder / f"K-{i % 3:06d}_{i:04d}.png"
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths


def _cfg(*sets):
    return load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=8", "loader.threads=2",
                                           "loader.workers=0", *sets])


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return _write_split(tmp_path_factory.mktemp("split"), 20)


def _epoch_rows(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [r for b in loader for r in b.rows.tolist()]


def test_resolve_backend_auto_and_impossible_choices():
    assert resolve_backend("auto", CPU) == "dali-cpu"
    assert resolve_backend("pil", CPU) == "pil"
    with pytest.raises(ValueError, match="dali-cpu"):
        resolve_backend("dali", CPU)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("opencv", CPU)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract(split, backend):
    labels = [i % 3 for i in range(len(split))]
    loader = build_loader(_manifest(split), labels, _cfg(), train=True, device=CPU, backend=backend)
    assert loader.backend == backend and len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and [len(b.rows) for b in batches] == [8, 8, 4]
    for b in batches:
        assert isinstance(b, Batch) and b.images.dtype == torch.float32 and b.images.shape[1:] == (3, 32, 32)
        assert b.labels.dtype == torch.int64 and b.rows.dtype == torch.int64
        assert b.labels.tolist() == [labels[r] for r in b.rows.tolist()]
        assert -3 < float(b.images.min()) and float(b.images.max()) < 3 and float(b.images.std()) > 0.1
    stats = loader.epoch_stats()
    assert stats == {"rows": 20, "excluded": 0, "yielded": 20, "skipped": 0, "dropped": 0}


def test_float16_channels_last(split):
    cfg = _cfg("loader.dtype=float16", "loader.layout=NHWC")
    for backend in BACKENDS:
        b = next(iter(build_loader(_manifest(split), [0] * 20, cfg, train=False, device=CPU, backend=backend)))
        assert b.images.dtype == torch.float16 and b.images.shape == (8, 3, 32, 32)
        assert b.images.is_contiguous(memory_format=torch.channels_last)


def test_shuffle_is_seeded_differs_per_epoch_and_is_shared_by_backends(split):
    make = lambda backend, seed: build_loader(_manifest(split), [0] * 20, _cfg(), train=True,  # noqa: E731
                                              device=CPU, backend=backend, seed=seed)
    dali = make("dali-cpu", 3)
    e0, e1 = _epoch_rows(dali, 0), _epoch_rows(dali, 1)
    assert sorted(e0) == list(range(20)) and e0 != e1 and e0 != list(range(20))
    assert _epoch_rows(make("dali-cpu", 3), 0) == e0  # a restarted run reads the same order
    assert _epoch_rows(make("pil", 3), 1) == e1
    assert _epoch_rows(make("dali-cpu", 4), 0) != e0
    # the augmentation is reproducible too (pipeline seed from seed, epoch, rank)
    first = lambda loader: (loader.set_epoch(2), next(iter(loader)).images)[1]  # noqa: E731
    for backend in BACKENDS:
        assert torch.equal(first(make(backend, 3)), first(make(backend, 3)))


@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_get_disjoint_shards_covering_the_split(split, train):
    rows = []
    for rank, backend in ((0, "dali-cpu"), (1, "pil")):
        loader = build_loader(_manifest(split), [0] * 20, _cfg(), train=train, device=CPU, backend=backend,
                              rank=rank, world_size=2)
        assert len(loader) == 2  # 10 rows each, batch 8
        rows.append(_epoch_rows(loader, 1))
    assert set(rows[0]).isdisjoint(rows[1]) and sorted(rows[0] + rows[1]) == list(range(20))
    if not train:
        assert rows[0] == list(range(0, 20, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last_follows_the_config_in_training_only(split, backend):
    cfg = _cfg("loader.drop_last=true")
    train = build_loader(_manifest(split), [0] * 20, cfg, train=True, device=CPU, backend=backend)
    assert len(train) == 2 and len(_epoch_rows(train, 0)) == 16
    assert train.epoch_stats()["dropped"] == 4
    val = build_loader(_manifest(split), [0] * 20, cfg, train=False, device=CPU, backend=backend)
    assert len(val) == 3 and _epoch_rows(val, 0) == list(range(20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_never_stop_an_epoch(tmp_path, split, backend, odd_images):
    """Every file of the odd-image corpus (tests/corpus.py, plus shared/testdata/real_images when present;
    valid, odd and broken) mixed into a synthetic split: each row is yielded exactly once or written to
    skipped.csv, and skipped files are not retried."""
    real = [p for p in odd_images if p.suffix.lower() != ".txt"]
    assert len(real) > 60
    paths = [p for pair in zip(split, real) for p in pair] + real[len(split):]
    n = len(paths)
    cfg = _cfg("train.batch_size=16", "loader.workers=2", "data.max_pixels=4000000")
    log = SkipLog(tmp_path / "skipped.csv")
    loader = build_loader(_manifest(paths), [0] * n, cfg, train=True, device=CPU, backend=backend, skip_log=log)
    rows = _epoch_rows(loader, 0)
    stats = loader.epoch_stats()
    assert len(rows) == len(set(rows)) == stats["yielded"]
    assert 0 < stats["skipped"] == len(log.rows) and set(rows).isdisjoint(log.rows)
    assert len(rows) + len(log.rows) + stats["dropped"] == n
    assert all(i in rows for i in range(0, 2 * len(split), 2))  # every synthetic image came through
    with open(log.path, newline="", encoding="utf-8") as fh:
        recs = list(csv.DictReader(fh))
    assert len(recs) == stats["skipped"] and all(r["reason"] and r["backend"] == backend for r in recs)
    assert any(r["path"].endswith("huge.bmp") and "too many pixels" in r["reason"] for r in recs)  # from the header
    # a second epoch (and a new loader reading the log back, as a resumed run does) retries none of them
    again = build_loader(_manifest(paths), [0] * n, cfg, train=True, device=CPU, backend=backend,
                         skip_log=SkipLog(log.path))
    rows2 = _epoch_rows(again, 1)
    st2 = again.epoch_stats()
    assert st2["excluded"] == len(recs) and set(rows2).isdisjoint(log.rows) and len(rows2) == len(set(rows2))
    assert st2["yielded"] + st2["skipped"] + st2["excluded"] + st2["dropped"] == n


def test_read_ahead_changes_nothing_but_timing(tmp_path, split, odd_images):
    """loader.readers > 0 reads the next batch in threads: the same batches in the same order and the same
    skips (with pipeline failures and recoveries on the real broken files) as reading in place."""
    real = [p for p in odd_images if p.suffix.lower() != ".txt"][:120]
    paths = [p for pair in zip(split, real) for p in pair] + real[len(split):]
    n = len(paths)
    runs = {}
    for readers in (0, 3):
        cfg = _cfg("train.batch_size=8", f"loader.readers={readers}", "data.max_pixels=4000000")
        log = SkipLog(None)
        loader = build_loader(_manifest(paths), [0] * n, cfg, train=True, device=CPU, backend="dali-cpu",
                              skip_log=log)
        loader.set_epoch(0)
        batches = [b.rows.tolist() for b in loader]
        runs[readers] = (batches, sorted((e["row"], e["reason"]) for e in log.entries), loader.epoch_stats())
    assert runs[0] == runs[3]
    batches, skips, stats = runs[3]
    assert skips and stats["yielded"] + stats["skipped"] == n
    assert all(len(b) == 8 for b in batches[:-1])  # skipped files are replaced from the following rows


def test_eval_parity_dali_cpu_vs_pil(tmp_path):
    """Bound: on 976x1280 photo-like PNGs the normalized evaluation tensors of dali-cpu and pil differ by
    at most 0.02 in mean absolute value (about 1.2 grey levels of 255), for both resize modes."""
    from pillsnap_dali.benchmarks.loaders import photo_like
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"photo_{i}.png")
        Image.fromarray(photo_like(976, 1280, np.random.default_rng(i))).save(paths[-1], compress_level=1)
    for mode in ("squash", "crop"):
        cfg = _cfg("preprocess.img_size=128", f"preprocess.resize_mode={mode}")
        loader = build_loader(_manifest(paths), [0, 0], cfg, train=False, device=CPU, backend="dali-cpu")
        dali = next(iter(loader)).images
        pil = torch.stack([pil_eval_transform(cfg.preprocess)(open_rgb(str(p))) for p in paths])
        diff = (dali - pil).abs().mean(dim=(1, 2, 3))
        assert dali.shape == pil.shape == (2, 3, 128, 128)
        assert float(diff.max()) <= 0.02, (mode, diff)


def test_host_memory_does_not_grow_over_epochs(split):
    loader = build_loader(_manifest(split * 2), [0] * 40, _cfg(), train=True, device=CPU, backend="dali-cpu")
    proc, rss = psutil.Process(), []
    for epoch in range(6):
        _epoch_rows(loader, epoch)
        gc.collect()
        rss.append(proc.memory_info().rss)
    growth = (rss[-1] - rss[1]) / 2 ** 20
    assert growth < 24, f"RSS grew {growth:.1f} MiB from epoch 1 to 5: {[r // 2 ** 20 for r in rss]}"


def test_open_rgb_converts_every_mode_and_applies_exif(tmp_path):
    cases = {
        "grey16.png": Image.fromarray(np.full((6, 4), 65535, np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (4, 6), (0, 255, 255, 0)),
        "palette.png": Image.new("P", (4, 6)),
        "la.png": Image.new("LA", (4, 6), (128, 255)),
        "rgba.png": Image.new("RGBA", (4, 6), (10, 20, 30, 0)),
    }
    cases["palette.png"].info["transparency"] = 0
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = open_rgb(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (4, 6), name
    assert open_rgb(str(tmp_path / "grey16.png")).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(str(tmp_path / "rgba.png")).getpixel((0, 0)) == (10, 20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.new("RGB", (4, 6)).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(str(tmp_path / "rotated.jpg")).size == (6, 4)
    with pytest.raises(ValueError, match="max_pixels"):
        open_rgb(str(tmp_path / "rotated.jpg"), max_pixels=10)


def test_skip_log_is_shared_by_path_and_read_back(tmp_path):
    log = SkipLog(tmp_path / "run" / "skipped.csv")
    assert log.add(3, "/a.png", "bad\nfile", "pil", 0) and not log.add(3, "/a.png", "again", "pil", 1)
    back = SkipLog(log.path)
    assert back.rows == {3} and "/a.png" in back and back.entries[0]["reason"] == "bad file"
    assert SkipLog(None).add(1, "/b.png", "x", "dali-cpu", 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sampler_balances_classes(split, backend):
    """train.weighted_sampler: rows drawn with replacement, 1/class-size each: a 2-row class is seen as
    often as an 18-row class; the draw is seeded per epoch and every draw is accounted."""
    labels = [0 if i < 2 else 1 for i in range(len(split))]
    counts = np.bincount(labels)
    weights = [1.0 / counts[c] for c in labels]
    loader = build_loader(_manifest(split), labels, _cfg(), train=True, device=CPU, backend=backend,
                          sample_weights=weights)
    seen = []
    for epoch in range(6):
        rows = _epoch_rows(loader, epoch)
        stats = loader.epoch_stats()
        assert len(rows) == stats["yielded"] == stats["rows"] == len(split)
        seen += [labels[r] for r in rows]
    share_small = seen.count(0) / len(seen)
    assert 0.3 < share_small < 0.7  # unweighted it would be 0.1
    assert _epoch_rows(loader, 2) == _epoch_rows(loader, 2) != _epoch_rows(loader, 3)


def test_shard_order_is_seeded_disjoint_and_covering():
    a0 = shard_order(11, shard_id=0, num_shards=2, seed=5, epoch=0)
    a1 = shard_order(11, shard_id=1, num_shards=2, seed=5, epoch=0)
    assert sorted(np.concatenate([a0, a1]).tolist()) == list(range(11)) and len(a0) == 6 and len(a1) == 5
    assert np.array_equal(a0, shard_order(11, shard_id=0, num_shards=2, seed=5, epoch=0))
    assert not np.array_equal(a0, shard_order(11, shard_id=0, num_shards=2, seed=5, epoch=1))
    assert shard_order(5, shuffle=False, shard_id=1, num_shards=2).tolist() == [1, 3]
    with pytest.raises(ValueError):
        shard_order(5, shard_id=2, num_shards=2)


def test_pil_backend_works_where_dali_is_not_installed(tmp_path, split):
    """``pil`` is the fallback without DALI: importing the loaders and running an epoch must not need it."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"  # any 'import nvidia.dali...' now fails
        "import torch\n"
        "from pillsnap_dali.config import load_config\n"
        "from pillsnap_dali.loaders import build_loader, resolve_backend\n"
        "from pillsnap_dali.data.manifest import Manifest\n"
        "paths = sys.argv[1:]\n"
        "m = Manifest(None, paths, ['K-000001'] * len(paths), ['single'] * len(paths), ['t'] * len(paths),\n"
        "             ['c'] * len(paths), [[] for _ in paths], [''] * len(paths))\n"
        "cfg = load_config('demo', sets=['preprocess.img_size=32', 'train.batch_size=8', 'loader.workers=0'])\n"
        "backend = resolve_backend('auto', torch.device('cpu'))\n"
        "rows = [r for b in build_loader(m, [0] * len(paths), cfg, train=True, device=torch.device('cpu'),\n"
        "                                backend=backend) for r in b.rows.tolist()]\n"
        "print(backend, len(rows))\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, split)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["pil", str(len(split))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_stopped_early_goes_on_from_its_position(split, tmp_path, backend):
    """The rows of a stopped epoch and of its continuation from ``position`` are the epoch's rows, each once
    (a broken file among the first batches included: skipped, not counted twice, not retried). With the
    weighted sampler too: the resumed epoch draws what the interrupted one drew."""
    paths = list(split)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths.insert(3, bad)
    m, cfg = _manifest(paths), _cfg()
    for weights in (None, [3.0 if i in (3, 5) else 1.0 for i in range(len(paths))]):
        log_path = tmp_path / f"skipped_{weights is None}.csv"
        make = lambda log: build_loader(m, [0] * len(paths), cfg, train=True, device=CPU,  # noqa: E731
                                        backend=backend, skip_log=log, sample_weights=weights)
        whole = make(SkipLog(None))
        whole.set_epoch(2)
        every = [r for b in whole for r in b.rows.tolist()]
        first = make(SkipLog(log_path))
        first.set_epoch(2)
        it, head = iter(first), []
        for _ in range(2):
            head += next(it).rows.tolist()
        it.close()
        assert weights is None or first.skip_log.paths  # the broken file was drawn before the stop
        again = make(SkipLog(log_path))  # a restarted process reads the log back
        again.set_epoch(2, start=first.position)
        tail = [r for b in again for r in b.rows.tolist()]
        assert head + tail == every, weights is None
        if weights is None:
            assert len(set(every)) == len(every) == len(paths) - 1 and len(again) == -(-len(tail) // 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_log_names_the_manifest_files_row_after_rows_were_dropped(split, tmp_path, backend):
    from pillsnap_dali.data.manifest import read_manifest, split_missing, write_manifest

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [tmp_path / "gone.png", *list(split)[:5], bad]  # row 0 missing on disk, row 6 corrupt
    write_manifest(_manifest(paths), tmp_path / "m.csv")
    kept, missing = split_missing(read_manifest(tmp_path / "m.csv"))
    assert [p for p, _ in missing] == [str(tmp_path / "gone.png")] and len(kept) == 6
    log = SkipLog(None)
    loader = build_loader(kept, [0] * len(kept), _cfg(), train=False, device=CPU, backend=backend, skip_log=log)
    assert sum(len(b.rows) for b in loader) == 5
    assert [(e["row"], e["path"]) for e in log.entries] == [(6, str(bad))]  # the file's row 6, not index 5


def test_two_transient_failures_far_apart_lose_no_good_file(split, monkeypatch):
    """A read that returns garbage once (a storage hiccup) kills the pipeline; its batch is probed, found
    good and retried. Two such failures in one epoch, with good batches between, must not give a batch up."""
    import pillsnap_dali.loaders.dali_loader as dl

    paths = list(split) * 2  # 40 rows
    flaky = {str(paths[3]): 1, str(paths[30]): 1}
    real = dl.read_encoded

    def hiccup(path, max_pixels):
        if flaky.get(str(path)):
            flaky[str(path)] -= 1
            return np.frombuffer(b"\x89PNG\r\n\x1a\n garbage", dtype=np.uint8).copy(), None
        return real(path, max_pixels)
    monkeypatch.setattr(dl, "read_encoded", hiccup)
    log = SkipLog(None)
    loader = build_loader(_manifest(paths), [0] * 40, _cfg("train.batch_size=4", "loader.readers=0"), train=False,
                          device=CPU, backend="dali-cpu", skip_log=log)
    rows = [r for b in loader for r in b.rows.tolist()]
    assert sorted(rows) == list(range(40)) and len(log) == 0 and not any(flaky.values())


def test_weighted_draws_of_one_row_advance_the_position_by_each_draw(split):
    paths = list(split)[:12]
    weights = [50.0] + [1.0] * 11
    for backend in BACKENDS:
        loader = build_loader(_manifest(paths), [0] * 12, _cfg("train.batch_size=4"), train=True, device=CPU,
                              backend=backend, sample_weights=weights)
        it = iter(loader)
        first = next(it).rows.tolist()
        it.close()
        plan_head = loader.plan().order[:4].tolist()
        assert sorted(first) == sorted(plan_head) and first.count(0) >= 2  # row 0 drawn several times
        assert loader.position == 4, (backend, loader.position)


def test_every_path_turns_exif_and_xmp_oriented_files_as_the_dali_decoder_does(odd_images):
    """JPEG/PNG/WebP EXIF orientation, a WebP EXIF chunk with the JPEG-style prefix (DALI ignores it) and an
    XMP-only orientation (DALI ignores it): the pil path, prediction and the detection geometry agree."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline

    from pillsnap_dali.imageio import upright_size

    files = [p for p in odd_images if "orientation" in p.name or p.name.startswith("exif")]
    assert len(files) >= 20 and any(upright_size(str(f)) == (64, 40) for f in files)  # some sides swapped
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        pipe.set_outputs(fn.decoders.image(fn.external_source(name="x", dtype=types.UINT8), device="cpu",
                                           output_type=types.RGB))
    pipe.build()
    for f in files:
        pipe.feed_input("x", [np.fromfile(f, dtype=np.uint8)])
        dali = np.array(pipe.run()[0].as_tensor())[0].astype(np.float32)
        pil = np.asarray(open_rgb(str(f)), dtype=np.float32)
        assert pil.shape == dali.shape and np.abs(pil - dali).mean() < 1.0, f.name
        assert upright_size(str(f)) == (dali.shape[1], dali.shape[0]), f.name


def test_png_exif_after_the_image_data_is_found_from_the_header(tmp_path):
    import io
    import struct

    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline
    from PIL import Image

    from pillsnap_dali.imageio import upright_size
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (20, 40), (1, 2, 3)).save(buf, "PNG", exif=exif.tobytes())
    data, chunks, pos = buf.getvalue(), [], 8
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        chunks.append(data[pos:pos + 12 + n])
        pos += 12 + n
    late = [c for c in chunks if c[4:8] != b"eXIf"]
    path = tmp_path / "late.png"  # eXIf moved after IDAT, just before IEND
    path.write_bytes(data[:8] + b"".join(late[:-1]) + b"".join(c for c in chunks if c[4:8] == b"eXIf") + late[-1])
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        pipe.set_outputs(fn.decoders.image(fn.external_source(name="x", dtype=types.UINT8), device="cpu",
                                           output_type=types.RGB))
    pipe.build()
    pipe.feed_input("x", [np.fromfile(path, dtype=np.uint8)])
    h, w = np.array(pipe.run()[0].as_tensor())[0].shape[:2]
    assert (h, w) == (20, 40) and upright_size(str(path)) == (w, h) == open_rgb(str(path)).size


def test_a_skip_log_of_another_format_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "skipped.csv"
    f.write_text("image_path,reason\n/x/a.png,DALI: bad\n", encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{f}: not a skip log")):
        SkipLog(f)
    assert f.read_text(encoding="utf-8").startswith("image_path,reason")  # left as it was
    log = SkipLog(tmp_path / "new.csv")
    log.add(3, "/x/a.png", "DALI: bad", "dali", 0, split="train")
    assert "/x/a.png" in SkipLog(tmp_path / "new.csv")  # our own format is read back
