"""``loader.cache``: the JPEG cache in the training's default path (real PNGs, real transcoding, real DALI CPU)."""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.commands import train
from pillsnap_dali.config import ConfigError, load_config, parse_set
from pillsnap_dali.data.cache import (InsufficientSpaceError, MANIFESTS, PrepareOptions, auto_cache_dir,
                                      cache_of, cache_path_for, choose_cache, describe_input, ensure_cache,
                                      prepare_cache)
from pillsnap_dali.data.manifest import read_manifest, write_manifest


def _cfg(**sets):
    return load_config("demo", overrides=parse_set([f"{k}={v}" for k, v in sets.items()]))


def _good_rows(manifests: Path, split: str, n: int | None = None):
    """The fixture's rows whose file decodes (its tree holds injected defects)."""
    m = read_manifest(manifests / f"manifest_{split}.csv")
    ok = []
    for i, p in enumerate(m.paths):
        try:
            with Image.open(p) as im:
                im.load()
            ok.append(i)
        except Exception:  # noqa: BLE001
            pass
    return m.subset(ok[:n] if n else ok)


def _copy_split(manifests: Path, dst: Path, n: int | None = None) -> Path:
    """A folder with clean train/val/test manifests (and the class map) of copies of the fixture's images
    (its tree is shared: never written to)."""
    (dst / "img").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        m = _good_rows(manifests, split, n)
        copies = []
        for i, p in enumerate(m.paths):
            copies.append(str(dst / "img" / f"{split}_{i}{Path(p).suffix}"))
            shutil.copy2(p, copies[-1])
        write_manifest(m.replace(paths=copies), dst / f"manifest_{split}.csv")
    (dst / "class_map.json").write_bytes((manifests / "class_map.json").read_bytes())
    return dst


def _big_pngs(tmp: Path, m, size=(700, 520)):
    """``m`` with its rows pointing at new PNGs larger than the cache's 640 px long side."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(m)):
        p = tmp / f"big_{i}.png"
        Image.fromarray(np.full((size[1], size[0], 3), 40 + i, np.uint8)).save(p)
        paths.append(str(p))
    return m.replace(paths=paths)


def test_loader_cache_key_takes_auto_off_or_a_folder_and_refuses_other_words(tmp_path):
    assert load_config("demo").loader.cache == "auto"
    assert _cfg(**{"loader.cache": "off"}).loader.cache == "off"
    folder = str(tmp_path / "jpeg640")  # an absolute folder
    assert _cfg(**{"loader.cache": folder}).loader.cache == folder
    for bad in ("on", "yes", "jpeg"):
        with pytest.raises(ConfigError, match="loader.cache"):
            _cfg(**{"loader.cache": bad})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("loader:\n  cache: off\n")  # YAML 1.1 reads an unquoted off as false
    assert load_config("demo", path=cfg_file).loader.cache == "off"


def test_auto_caches_png_for_dali_always_for_dali_cpu_when_it_shrinks_and_never_for_pil(manifests, tmp_path):
    small = _good_rows(manifests, "train", 4)  # 122x160 PNGs
    big = _big_pngs(tmp_path / "big", small)
    cfg = _cfg(**{"data.artifacts": str(tmp_path / "art"), "train.epochs": 5})
    assert choose_cache(cfg, "dali", small).cache_dir == tmp_path / "art" / "jpeg640"
    assert choose_cache(cfg, "dali-cpu", small).cache_dir is None  # same size: little to gain on the CPU
    assert choose_cache(cfg, "dali-cpu", big).cache_dir == tmp_path / "art" / "jpeg640"
    assert choose_cache(cfg, "pil", big).cache_dir is None
    one_epoch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    assert choose_cache(one_epoch, "dali-cpu", big).cache_dir is None
    jpegs = big.replace(paths=[p.replace(".png", ".jpg") for p in big.paths])
    assert choose_cache(cfg, "dali", jpegs).cache_dir is None
    off = _cfg(**{"loader.cache": "off"})
    assert choose_cache(off, "dali", big).cache_dir is None
    named = _cfg(**{"loader.cache": str(tmp_path / "mine")})
    assert choose_cache(named, "pil", small).cache_dir == tmp_path / "mine"
    q90 = _cfg(**{"data.artifacts": str(tmp_path / "art"), "prepare.quality": 90, "prepare.subsampling": "420"})
    assert auto_cache_dir(q90).name == "jpeg640_q90_420"  # a cache never mixes encodings


def test_ensure_cache_builds_reuses_and_redoes_a_replaced_source(manifests, tmp_path):
    src = _copy_split(manifests, tmp_path / "stage3")
    cfg = _cfg(**{"prepare.free_space_margin_gb": 0, "prepare.workers": 1})
    cache = tmp_path / "jpeg640"
    out = ensure_cache([src / "manifest_train.csv", src / "manifest_val.csv"], cache, cfg)
    assert [p.name for p in out] == ["manifest_train.csv", "manifest_val.csv"]
    assert out[0].parent.parent == cache / MANIFESTS and out[0].parent.name.startswith("stage3-")
    assert (out[0].parent / "class_map.json").read_text() == (src / "class_map.json").read_text()
    m, cached = read_manifest(src / "manifest_train.csv"), read_manifest(out[0])
    assert len(cached) == len(m) and cached.paths[0] == str(cache_path_for(m.paths[0], cache))
    assert cache_of(out[0]) == cache and "JPEG cache" in describe_input(out[0])
    assert "no JPEG cache" in describe_input(src / "manifest_train.csv")
    stamps = {p: os.stat(p).st_mtime_ns for p in cached.paths}
    # a source replaced since: its JPEG is made again; every other one is reused as it is
    victim = m.paths[0]
    with Image.open(victim) as im:
        w, h = im.size
        im.convert("RGB").rotate(90, expand=True).save(victim)
    ensure_cache([src / "manifest_train.csv", src / "manifest_val.csv"], cache, cfg)
    after = {p: os.stat(p).st_mtime_ns for p in cached.paths}
    changed = [p for p in cached.paths if after[p] != stamps[p]]
    assert changed == [str(cache_path_for(victim, cache))]
    with Image.open(changed[0]) as im:
        assert im.size == (h, w)  # the rotated source


def test_stages_with_overlapping_rows_share_the_jpegs_and_keep_their_class_maps(manifests, tmp_path):
    a = _copy_split(manifests, tmp_path / "stage3")
    b = tmp_path / "stage4"
    b.mkdir()
    m = read_manifest(a / "manifest_train.csv")
    write_manifest(m.subset(range(len(m) // 2)), b / "manifest_train.csv")  # half the rows of stage 3
    cfg = _cfg(**{"prepare.free_space_margin_gb": 0, "prepare.workers": 1})
    cache = tmp_path / "jpeg640"
    ensure_cache([a / "manifest_train.csv"], cache, cfg)
    jpegs = {p: os.stat(p).st_mtime_ns for p in cache.glob("[0-9a-f][0-9a-f]/*.jpg")}
    out = ensure_cache([b / "manifest_train.csv"], cache, cfg)[0]
    assert {p: os.stat(p).st_mtime_ns for p in cache.glob("[0-9a-f][0-9a-f]/*.jpg")} == jpegs  # transcoded once
    assert out.parent != cache_of(out) and out.parent.name.startswith("stage4-")
    assert len(read_manifest(out)) == len(m) // 2


def test_ensure_cache_resumes_an_interrupted_build(manifests, tmp_path):
    src = _copy_split(manifests, tmp_path / "s")
    cache = tmp_path / "jpeg640"
    cfg = _cfg(**{"prepare.free_space_margin_gb": 0, "prepare.workers": 1})
    # an interrupted build: a few JPEGs done and a temp file left behind
    prepare_cache(src / "manifest_train.csv", cache, dataclasses.replace(PrepareOptions.from_config(cfg), limit=3))
    done = {p: os.stat(p).st_mtime_ns for p in cache.glob("[0-9a-f][0-9a-f]/*.jpg")}
    assert len(done) == 3
    (next(iter(done))).with_suffix(".jpg.123.tmp").write_bytes(b"partial")
    out = ensure_cache([src / "manifest_train.csv"], cache, cfg)[0]
    assert len(read_manifest(out)) == len(read_manifest(src / "manifest_train.csv"))
    assert all(os.stat(p).st_mtime_ns == t for p, t in done.items())  # the three are reused, not redone
    assert not list(cache.glob("[0-9a-f][0-9a-f]/*.tmp"))


def test_not_enough_space_is_refused_up_front_with_the_figure_and_nothing_written(manifests, tmp_path):
    src = _copy_split(manifests, tmp_path / "s")
    cache = tmp_path / "jpeg640"
    cfg = _cfg(**{"prepare.free_space_margin_gb": 1e9})
    with pytest.raises(InsufficientSpaceError, match=r"needs about [0-9.]+ GB.*loader.cache=off"):
        ensure_cache([src / "manifest_train.csv", src / "manifest_val.csv"], cache, cfg)
    assert not cache.exists()


TINY = ["--pretrained", "none", "--model", "test_efficientnet", "--img-size", "32", "--batch-size", "16", "--epochs", "2",
        "--set", "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1",
        "--set", "prepare.free_space_margin_gb=0", "--set", "prepare.workers=1", "--backend", "dali-cpu"]


def test_train_builds_the_cache_first_trains_on_it_and_reports_it(manifests, tmp_path, capsys):
    src = _copy_split(manifests, tmp_path / "stage3")
    cache = tmp_path / "cache"
    argv = ["--manifest", str(src / "manifest_train.csv"), "--out", str(tmp_path / "runs"), "--name", "c",
            "--set", f"loader.cache={cache}", *TINY]
    assert train.main(argv) == 0
    run = tmp_path / "runs" / "c"
    report = (run / "report.md").read_text()
    assert f"- input: JPEG cache {cache}" in report
    cached = next((cache / MANIFESTS).iterdir())
    assert f"on `{cached / 'manifest_test.csv'}`" in report  # cached beside the training one, and scored
    assert {p.name for p in cached.glob("manifest_*.csv") if "skipped" not in p.name} == {"manifest_train.csv", "manifest_val.csv",
                                                                "manifest_test.csv"}
    assert "JPEG cache manifest_train.csv" in capsys.readouterr().err  # the one-line progress off a terminal
    # the same run with the cache off names the PNGs
    assert train.main([*argv[:-len(TINY)], *TINY, "--name", "p", "--set", "loader.cache=off"]) == 0
    assert "no JPEG cache" in (tmp_path / "runs" / "p" / "report.md").read_text()


def test_auto_on_dali_cpu_caches_large_pngs_in_the_artifacts(manifests, tmp_path):
    m = _good_rows(manifests, "train", 16)
    src = tmp_path / "stage3"
    src.mkdir()
    big = _big_pngs(tmp_path / "png", m)
    write_manifest(big, src / "manifest_train.csv")
    write_manifest(big.subset(range(4)), src / "manifest_val.csv")
    (src / "class_map.json").write_bytes((manifests / "class_map.json").read_bytes())
    art = tmp_path / "art"
    assert train.main(["--manifest", str(src / "manifest_train.csv"), "--out", str(tmp_path / "runs"), "--name",
                       "a", "--set", f"data.artifacts={art}", *TINY]) == 0
    assert f"- input: JPEG cache {art / 'jpeg640'}" in (tmp_path / "runs" / "a" / "report.md").read_text()
    with Image.open(next((art / "jpeg640").glob("[0-9a-f][0-9a-f]/*.jpg"))) as im:
        assert max(im.size) == 640


def test_a_full_disk_stops_train_with_one_line_and_exit_2(manifests, tmp_path, capsys):
    src = _copy_split(manifests, tmp_path / "stage3")
    argv = ["--manifest", str(src / "manifest_train.csv"), "--out", str(tmp_path / "runs"), "--name", "f",
            "--set", f"loader.cache={tmp_path / 'cache'}", *TINY, "--set", "prepare.free_space_margin_gb=1e9"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: refusing to build the cache") and "GB" in err[-1]
    assert not (tmp_path / "runs" / "f").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_the_gpu_backend_trains_on_the_cache_decoded_by_nvjpeg(manifests, tmp_path):
    """The users' default path: PNG inputs, backend dali, loader.cache auto -> the cache in the artifacts."""
    src = _copy_split(manifests, tmp_path / "stage3")
    art = tmp_path / "art"
    argv = ["--manifest", str(src / "manifest_train.csv"), "--out", str(tmp_path / "runs"), "--name", "g",
            "--set", f"data.artifacts={art}", *TINY[:-2], "--backend", "dali", "--device", "cuda"]
    assert train.main(argv) == 0
    assert f"- input: JPEG cache {art / 'jpeg640'}" in (tmp_path / "runs" / "g" / "report.md").read_text()


def test_a_legacy_val_manifest_with_a_class_train_lacks_is_cached_beside_not_refused(manifests, tmp_path):
    src = _copy_split(manifests, tmp_path / "ours")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    train = read_manifest(src / "manifest_train.csv")
    dropped = train.codes[0]
    for split in ("train", "val"):
        m = read_manifest(src / f"manifest_{split}.csv")
        with open(legacy / f"manifest_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_path", "mapping_code", "image_type", "source"])
            w.writerows([p, c, "single", "s"] for p, c in zip(m.paths, m.codes) if split == "val" or c != dropped)
    cfg = _cfg(**{"prepare.free_space_margin_gb": 0, "prepare.workers": 1})
    out = ensure_cache([legacy / "manifest_train.csv", legacy / "manifest_val.csv"], tmp_path / "c", cfg)
    assert dropped in read_manifest(out[1]).codes  # kept: train reports it as a class it does not know
    assert out[1].parent == out[0].parent / "manifest_val"
    assert len(read_manifest(out[1])) == len(read_manifest(legacy / "manifest_val.csv"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_under_torchrun_rank_0_builds_the_cache_and_both_ranks_train_on_it(manifests, tmp_path):
    src = _copy_split(manifests, tmp_path / "stage3")
    cache = tmp_path / "cache"
    args = ["--manifest", str(src / "manifest_train.csv"), "--out", str(tmp_path / "runs"), "--name", "ddp",
            "--set", f"loader.cache={cache}", *TINY, "--epochs", "1", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           "-m", "pillsnap_dali.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("JPEG cache manifest_train.csv:") == 1  # rank 0 reports the build once
    assert f"- input: JPEG cache {cache}" in (tmp_path / "runs" / "ddp" / "report.md").read_text()
    n = len(read_manifest(src / "manifest_train.csv"))
    assert len(list(cache.glob("[0-9a-f][0-9a-f]/*.jpg"))) >= n and not list(cache.glob("**/*.tmp"))
