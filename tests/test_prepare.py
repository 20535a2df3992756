"""The PNG -> JPEG cache (issue 7): round trip with broken files, resume, refusal on free space, dry run."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillsnap_dali.commands.prepare import main as prepare_main
from pillsnap_dali.data import cache as P
from pillsnap_dali.data.classmap import ClassMap, ClassMapMismatch
from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import Manifest, class_map_for, read_manifest, write_manifest

from corpus import header_verdicts, picture
from oslimits import READ_ONLY, error_lines, run_cli
CODES = ["K-000114", "K-000250", "K-000573"]
W, H = 244, 320          # the real 976x1280 shape, a quarter of the side
BOX = [24, 32, 80, 96]


def _photo(rng: np.random.Generator, w: int = W, h: int = H) -> Image.Image:
    """A smooth background with a bright disc and some noise: compresses like a photo, not like noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, rng.integers(0, 255))], -1)
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(w, h) / 4) ** 2
    base[disc] = rng.integers(150, 255, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def _odd_sample(odd_images: list, n: int) -> list[Path]:
    """A spread of the odd-image corpus (whichever of them decode is decided at run time)."""
    files = [p for p in odd_images if p.suffix in (".png", ".jpg", ".bmp", ".webp")]
    return files[:: max(1, len(files) // n)][:n]


@pytest.fixture()
def tree(tmp_path: Path, odd_images) -> dict:
    """A source manifest (ours, with a class map and a combination row with a box) over a small tree."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    paths, codes, types, boxes = [], [], [], []
    for i in range(6):
        p = src / f"{CODES[i % 3]}_0_2_0_2_70_000_200_{i}.png"
        _photo(rng).save(p)
        paths.append(str(p)), codes.append(CODES[i % 3]), types.append("single"), boxes.append([])
    combo = src / "K-000114-000250" / "K-000114-000250_0_2_0_2_70_000_200.png"
    combo.parent.mkdir()
    _photo(rng).save(combo)
    paths.append(str(combo)), codes.append(CODES[0]), types.append("combination")
    boxes.append([{"bbox": BOX, "code": CODES[0]}, {"bbox": [1, 2, 3], "code": CODES[1]}])
    truncated, empty = src / "truncated.png", src / "empty.png"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:3000])
    empty.write_bytes(b"")
    extra = [str(truncated), str(empty)] + [str(p) for p in _odd_sample(odd_images, 10)]
    paths += extra
    codes += [CODES[2]] * len(extra)
    types += ["single"] * len(extra)
    boxes += [[] for _ in extra]
    n = len(paths)
    m = Manifest(None, paths, codes, types, ["test"] * n, [Path(p).stem for p in paths], boxes, [""] * n)
    manifest = tmp_path / "manifests" / "manifest_train.csv"
    write_manifest(m, manifest)
    ClassMap(codes=CODES).save(manifest.parent / "class_map.json")
    return {"manifest": manifest, "cache": tmp_path / "cache", "truncated": str(truncated), "empty": str(empty),
            "combo": str(combo), "n": n}


def _opts(**kw) -> P.PrepareOptions:
    base = dict(quality=90, max_side=160, workers=1, margin_gb=0.0, sample=8)
    base.update(kw)
    return P.PrepareOptions(**base)


def _skipped(cache: Path, manifest: Path) -> dict[str, str]:
    with open(P.skipped_csv(cache, manifest), newline="", encoding="utf-8") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def test_round_trip_with_broken_files(tree):
    report = P.prepare_cache(tree["manifest"], tree["cache"], _opts(workers=2))
    assert report.rows_in == tree["n"] == report.cached + report.skipped and report.remaining == 0
    skipped = _skipped(tree["cache"], tree["manifest"])
    assert len(skipped) == report.skipped
    assert "truncated" in skipped[tree["truncated"]] and "empty" in skipped[tree["empty"]]
    out = read_manifest(report.manifest_out)
    assert len(out) == report.cached >= 7 and not set(out.orig_paths) & set(skipped)
    for path, orig, (w, h) in zip(out.paths, out.orig_paths, out.sizes):
        assert Path(path) == P.cache_path_for(orig, tree["cache"])
        with Image.open(path) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
            assert not im.info.get("progressive")
        assert max(w, h) <= 160
    i = out.orig_paths.index(tree["combo"])
    assert out.sizes[i] == (122, 160)
    assert out.boxes[i][0] == {"bbox": [12.0, 16.0, 40.0, 48.0], "code": CODES[0]}   # scaled by 0.5
    assert out.boxes[i][1]["bbox"] == [1, 2, 3]                                      # malformed: kept as is
    assert class_map_for(report.manifest_out).codes == CODES
    assert report.cache_bytes < report.source_bytes and report.transcoded == report.cached


def test_resume_after_interruption(tree):
    first = P.prepare_cache(tree["manifest"], tree["cache"], _opts(limit=4))
    assert first.remaining > 0 and first.stopped and first.cached + first.skipped == 4
    assert len(read_manifest(first.manifest_out)) == first.cached
    done = read_manifest(first.manifest_out).paths
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    os.remove(done[0])                                    # a lost output is redone
    stale = Path(done[1] + ".999.tmp")                    # an interrupted write leaves only a temp file
    stale.write_bytes(b"partial")
    second = P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    assert second.remaining == 0 and second.stopped is None and second.tmp_removed == 1 and not stale.exists()
    assert second.rows_in == second.cached + second.skipped
    assert second.reused == first.cached - 1
    assert second.transcoded == second.cached - second.reused
    assert all(os.stat(p).st_mtime_ns == mtimes[p] for p in done[1:])   # not rewritten
    assert Path(done[0]).exists()


def test_refuses_when_margin_would_be_crossed(tree):
    free_gb = shutil.disk_usage(tree["manifest"].parent).free / 1e9
    with pytest.raises(P.InsufficientSpaceError, match=r"GB free.*margin of"):
        P.prepare_cache(tree["manifest"], tree["cache"], _opts(margin_gb=free_gb + 1000))
    assert not tree["cache"].exists()


def test_dry_run_writes_nothing(tree):
    report = P.prepare_cache(tree["manifest"], tree["cache"], _opts(dry_run=True))
    assert report.dry_run and report.estimate_bytes > 0 and report.free_bytes > 0 and report.cached == 0
    assert not tree["cache"].exists()


def test_other_encoding_in_same_cache_is_refused(tree):
    P.prepare_cache(tree["manifest"], tree["cache"], _opts(limit=1))
    with pytest.raises(P.PrepareError, match="max_side"):
        P.prepare_cache(tree["manifest"], tree["cache"], _opts(max_side=100))


def test_max_side_keeps_aspect(tmp_path):
    assert P.fit_size(976, 1280, 640) == (488, 640)
    assert P.fit_size(1280, 976, 640) == (640, 488)
    assert P.fit_size(300, 200, 640) == (300, 200)          # never upscales
    assert P.fit_size(976, 1280, None) == (976, 1280)
    src = tmp_path / "wide.png"
    _photo(np.random.default_rng(1), 300, 120).save(src)
    o = P._transcode(str(src), str(tmp_path / "c" / "wide.jpg"), P._Encode(95, 100, "420", 10**7))
    assert o.ok and o.src_wh == (300, 120) and o.out_wh == (100, 40)
    with Image.open(o.dst) as im:
        assert im.size == (100, 40)


def test_cli_and_config(tree, capsys):
    cfg = load_config(sets=["prepare.quality=80", "prepare.max_side=null"])
    opts = P.PrepareOptions.from_config(cfg, workers=3, limit=None)
    assert (opts.quality, opts.max_side, opts.workers) == (80, None, 3)
    args = ["--manifest", str(tree["manifest"]), "--cache-dir", str(tree["cache"]), "--workers", "1",
            "--sample", "4", "--max-side", "96"]
    assert prepare_main(args + ["--margin-gb", "1e9"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert prepare_main(args + ["--margin-gb", "0", "--dry-run"]) == 0 and not tree["cache"].exists()
    assert prepare_main(args + ["--margin-gb", "0", "--set", "prepare.quality=70"]) == 0
    out = capsys.readouterr().out
    assert f"rows in       {tree['n']}" in out and "ratio" in out
    assert max(read_manifest(tree["cache"] / "manifest_train.csv").sizes[0]) == 96


def _dali_decode(paths: list[str], device: str):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None if device == "cpu" else 0)
    def pipe():
        jpegs, _ = fn.readers.file(files=list(paths))  # a list, as DALI takes it (Manifest columns are not lists)
        return fn.decoders.image(jpegs, device="cpu" if device == "cpu" else "mixed")

    p = pipe()
    p.build()
    (images,) = p.run()
    return [np.array(images.as_cpu()[i]) for i in range(len(paths))]


def test_dali_cpu_decodes_the_cache(tree):
    report = P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    out = read_manifest(report.manifest_out)
    arrays = _dali_decode(out.paths, "cpu")
    assert [a.shape for a in arrays] == [(h, w, 3) for w, h in out.sizes]


@pytest.mark.gpu
def test_gpu_decodes_the_cache(tree):
    from nvidia.dali.backend import GetCUDADeviceCount
    if GetCUDADeviceCount() < 1:
        pytest.skip("needs CUDA")
    report = P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    out = read_manifest(report.manifest_out)
    arrays = _dali_decode(out.paths, "gpu")           # nvJPEG ("mixed"): the point of the cache
    assert [a.shape for a in arrays] == [(h, w, 3) for w, h in out.sizes]


def test_open_rgb_gives_the_stored_pixels_upright_in_8_bit_rgb(odd_corpus):
    """imageio.open_rgb (prepare's reader, and the pil backend's): an odd but valid file gives the pixels it
    holds, turned by the EXIF orientation the DALI decoder honours, as 8-bit RGB; a broken one raises."""
    pic = np.asarray(picture())
    grey = np.repeat(np.asarray(picture().convert("L"))[..., None], 3, -1)

    def rgb(name: str) -> np.ndarray:
        im = P.open_rgb(str(odd_corpus[name]), 10**7)
        assert im.mode == "RGB", name
        return np.asarray(im)
    for name in ("rgb.png", "rgba.png", "orientation_1.png", "png_named.jpg", "orientation_6_exif_prefix.webp"):
        assert np.array_equal(rgb(name), pic), name          # alpha dropped; a prefixed WebP EXIF ignored
    assert np.array_equal(rgb("sixteen_bit.png"), grey) and np.array_equal(rgb("grey_alpha.png"), grey)
    with Image.open(odd_corpus["palette_transparency.png"]) as im:
        assert np.array_equal(rgb("palette_transparency.png"), np.asarray(im.convert("RGB")))
    assert np.array_equal(rgb("orientation_2.png"), pic[:, ::-1]) and np.array_equal(rgb("orientation_3.png"),
                                                                                      pic[::-1, ::-1])
    for name in ("orientation_6.png", "orientation_6_late_exif.png", "orientation_6.webp"):
        assert np.array_equal(rgb(name), np.rot90(pic, -1)), name   # 6: turned 90 degrees clockwise
    assert np.array_equal(rgb("orientation_8.png"), np.rot90(pic, 1))
    assert np.abs(rgb("orientation_xmp_only.jpg").astype(int) - pic).mean() < 3      # XMP alone: not turned
    assert np.abs(rgb("cmyk.jpg").astype(int) - pic).mean() < 8
    broken = [n for n, v in header_verdicts().items() if v and not v.startswith("unsupported")]
    broken += ["png_bad_pixel_data.png", "jpeg_cut_in_scan.jpg", "jpeg_cut_before_eoi.jpg"]
    for name in broken:
        if name != "png_cut_before_iend.png":              # only IEND missing: every pixel is there
            with pytest.raises((ValueError, OSError)):
                P.open_rgb(str(odd_corpus[name]), 10**7)


def test_legacy_manifest_keeps_the_source_class_ids(tmp_path):
    """No class_map.json beside a legacy manifest: ids are the SOURCE's sorted codes, even when every row of
    one class fails (the cached manifest alone would otherwise renumber the classes)."""
    good = tmp_path / "a.png"
    _photo(np.random.default_rng(2), 64, 80).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = tmp_path / "legacy.csv"
    manifest.write_text("image_path,mapping_code,image_type,source\n"
                        f"{good},K-000300,single,x\n{bad},K-000200,single,x\n", encoding="utf-8")
    report = P.prepare_cache(manifest, tmp_path / "cache", _opts())
    assert (report.cached, report.skipped) == (1, 1)
    assert class_map_for(report.manifest_out).codes == ["K-000200", "K-000300"]


def test_legacy_train_then_val_share_one_cache_and_keep_both_skip_lists(tmp_path):
    """The README's workflow: prepare train.csv, then val.csv, into one --cache-dir (legacy manifests, no
    class_map.json). The val split lacks a class; its skips do not overwrite train's."""
    rng = np.random.default_rng(5)
    files = {}
    for name in ("a", "b", "c", "d"):
        files[name] = tmp_path / f"{name}.png"
        _photo(rng, 64, 80).save(files[name])
    for name in ("bad_train", "bad_val"):
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    head = "image_path,mapping_code,image_type,source\n"
    train, val, stray = tmp_path / "train.csv", tmp_path / "val.csv", tmp_path / "stray.csv"
    train.write_text(head + f"{files['a']},K-000300,single,x\n{files['b']},K-000200,single,x\n"
                     f"{files['bad_train']},K-000200,single,x\n", encoding="utf-8")
    val.write_text(head + f"{files['c']},K-000300,single,x\n{files['bad_val']},K-000300,single,x\n",
                   encoding="utf-8")
    stray.write_text(head + f"{files['d']},K-000999,single,x\n", encoding="utf-8")
    cache = tmp_path / "cache"
    t = P.prepare_cache(train, cache, _opts())
    v = P.prepare_cache(val, cache, _opts())
    assert (t.cached, t.skipped, v.cached, v.skipped) == (2, 1, 1, 1)
    assert list(_skipped(cache, train)) == [str(files["bad_train"])]
    assert list(_skipped(cache, val)) == [str(files["bad_val"])]
    assert class_map_for(v.manifest_out).codes == ["K-000200", "K-000300"]  # train's ids, not val's alone
    before = sorted(p for p in cache.rglob("*.jpg"))
    with pytest.raises(ClassMapMismatch, match="K-000999"):
        P.prepare_cache(stray, cache, _opts())
    assert sorted(p for p in cache.rglob("*.jpg")) == before  # refused before any transcoding


def test_a_source_replaced_after_caching_is_transcoded_again(tree):
    first = P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    out = read_manifest(first.manifest_out)
    src = out.orig_paths[0]
    _photo(np.random.default_rng(9), 100, 60).save(src)  # the same path, another picture (a fixed file)
    os.utime(src, ns=(1, 1))
    second = P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    assert (second.transcoded, second.reused) == (1, first.cached - 1)
    again = read_manifest(second.manifest_out)
    with Image.open(again.paths[again.orig_paths.index(src)]) as im:
        assert im.size == (100, 60)


def test_busy_cache_dir_is_refused(tree):
    tree["cache"].mkdir()
    (tree["cache"] / P.LOCK_FILE).write_text(str(os.getppid()))     # a live process holds it
    with pytest.raises(P.PrepareError, match="another prepare run"):
        P.prepare_cache(tree["manifest"], tree["cache"], _opts())
    (tree["cache"] / P.LOCK_FILE).write_text("999999999")          # a dead one: stale, taken over
    assert P.prepare_cache(tree["manifest"], tree["cache"], _opts()).remaining == 0
    assert not (tree["cache"] / P.LOCK_FILE).exists()


def test_a_full_disk_or_an_unwritable_dir_is_one_line_naming_the_path(tree, tmp_path):
    """A cache file that cannot be written stops the run (it says nothing about the source: skipping every row
    would lose them all) with one line naming it; nothing half-written is left; a rerun with room resumes."""
    args = ["--manifest", tree["manifest"], "--cache-dir", tree["cache"], "--workers", "1", "--margin-gb", "0",
            "--max-side", "160"]
    run = run_cli("pillsnap_dali.prepare", args, file_limit=2500)   # every file over 2.5 kB: "disk full"
    (line,) = error_lines(run)
    assert run.returncode == 2 and f"cannot write the cache file {tree['cache']}/" in line, run.stderr[-2000:]
    assert "File too large" in line and "rerun to resume" in line
    assert not list(tree["cache"].rglob("*.tmp")) and not (tree["cache"] / "manifest_train.csv").exists()
    assert not P.skipped_csv(tree["cache"], tree["manifest"]).exists()       # no row was written off as bad
    again = P.prepare_cache(tree["manifest"], tree["cache"], _opts(quality=95))
    assert again.cached + again.skipped == tree["n"] and again.skipped == len(_skipped(tree["cache"],
                                                                                        tree["manifest"]))
    run = run_cli("pillsnap_dali.prepare", [*args[:2], "--cache-dir", READ_ONLY / "cache", "--margin-gb", "0"])
    (line,) = error_lines(run)
    assert run.returncode == 2 and line == (f"error: cannot write the cache dir {READ_ONLY / 'cache'} (in /sys): "
                                            "Operation not permitted"), line
    run = run_cli("pillsnap_dali.prepare", ["--manifest", tmp_path / "nowhere.csv", "--cache-dir", tree["cache"]])
    assert run.returncode == 2 and error_lines(run) == [f"error: --manifest {tmp_path / 'nowhere.csv'} does not exist"]
