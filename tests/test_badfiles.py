"""The bad-file policy (pillsnap_dali/badfiles.py) through the real ``pil`` loader: what an image can cause is
a logged skip, a bug in our code is a traceback (never a skipped row)."""
from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali import badfiles
from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.loaders import build_loader, pil_loader
from pillsnap_dali.skiplog import SkipLog

CPU = torch.device("cpu")


def _manifest(paths) -> Manifest:
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], [f"K-{i % 2:06d}" for i in range(n)], ["single"] * n,
                    ["test"] * n, [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


def _good(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"good{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _loader(paths, log: SkipLog, *, train: bool, workers: int = 1, max_pixels: int = 40_000_000):
    cfg = load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=4", f"loader.workers={workers}",
                                          f"data.max_pixels={max_pixels}"])
    return build_loader(_manifest(paths), [i % 2 for i in range(len(paths))], cfg, train=train, device=CPU,
                        backend="pil", skip_log=log)


def _logged(log_path: Path) -> dict:
    return {r["path"]: r["reason"] for r in csv.DictReader(open(log_path, encoding="utf-8"))}


@pytest.mark.parametrize("train, error", [(True, TypeError), (False, AttributeError)])
def test_a_bug_inside_the_worker_is_a_traceback_not_a_skipped_row(tmp_path, monkeypatch, train, error):
    """A coding error in the transform (run in the DataLoader's worker process) reaches the caller with its
    class; before the policy it became one skipped row per image, up to the skip limit."""
    def broken(*args, **kwargs):
        raise error("a bug in our transform")
    if train:
        monkeypatch.setattr(pil_loader.PilTrainTransform, "__call__", broken)
    else:
        monkeypatch.setattr(pil_loader, "pil_eval_transform", lambda pre: broken)
    log = SkipLog(tmp_path / "skipped.csv")
    loader = _loader(_good(tmp_path / "img", 4), log, train=train)
    with pytest.raises(error, match="a bug in our transform"):
        list(loader)
    assert len(log) == 0 and not (tmp_path / "skipped.csv").exists()


def test_each_bad_file_on_disk_is_skipped_logged_and_the_rest_yielded(tmp_path):
    good = _good(tmp_path / "img", 3)
    bad = {"missing.png": None, "empty.png": b"", "text.png": b"not an image at all",
           "truncated.png": (tmp_path / "img" / "good1.png").read_bytes()[:2000], "huge.png": "huge"}
    # the reasons of the one format policy (imageio.format_problem) for files that are no image at all
    expect = {"missing.png": "FileNotFoundError", "empty.png": "ValueError: empty file",
              "text.png": "ValueError: not an image", "truncated.png": "OSError",
              "huge.png": "ValueError: too many pixels"}
    paths = list(good)
    for name, data in bad.items():
        p = tmp_path / name
        if data == "huge":
            Image.new("RGB", (300, 300)).save(p)  # past data.max_pixels below
        elif data is not None:
            p.write_bytes(data)
        paths.append(p)
    log_path = tmp_path / "skipped.csv"
    loader = _loader(paths, SkipLog(log_path), train=True, max_pixels=200 * 200)
    rows = sorted(r for b in loader for r in b.rows.tolist())
    assert rows == [0, 1, 2]
    logged = _logged(log_path)
    for name, want in expect.items():
        assert logged[str(tmp_path / name)].startswith(want), (name, logged[str(tmp_path / name)])
    st = loader.epoch_stats()
    assert st["yielded"] + st["skipped"] == st["rows"] == len(paths)


@pytest.mark.parametrize("error", badfiles.IMAGE_ERRORS, ids=lambda e: e.__name__)
def test_every_error_class_an_image_can_cause_is_a_logged_skip(tmp_path, monkeypatch, error):
    """Each class of ``IMAGE_ERRORS`` raised by the decoder (a stand-in for the PIL plugin that raises it on
    one file: SyntaxError from a broken chunk, zlib.error from a PNG's compressed text, ...) is that row's skip,
    with the class in its reason; the other rows are yielded."""
    paths = _good(tmp_path / "img", 4)
    real_open = pil_loader.open_rgb

    def decoder(path, max_pixels):
        if path == str(paths[2]):
            raise error("broken data in this file")
        return real_open(path, max_pixels)
    monkeypatch.setattr(pil_loader, "open_rgb", decoder)
    log_path = tmp_path / "skipped.csv"
    loader = _loader(paths, SkipLog(log_path), train=False, workers=0)
    assert sorted(r for b in loader for r in b.rows.tolist()) == [0, 1, 3]
    assert _logged(log_path) == {str(paths[2]): f"{error.__name__}: broken data in this file"}


def test_the_policy_separates_image_errors_from_bugs():
    for err in (OSError("x"), Image.UnidentifiedImageError("x"), FileNotFoundError(2, "x"), ValueError("x"),
                SyntaxError("x"), EOFError(), struct.error("x"), zlib.error("x"), Image.DecompressionBombError("x")):
        assert badfiles.is_image_error(err), err
    for err in (TypeError("x"), AttributeError("x"), KeyError("x"), IndexError("x"), NameError("x"),
                ZeroDivisionError(), RuntimeError("x"), MemoryError()):
        assert not badfiles.is_image_error(err), err
    assert badfiles.image_error_reason(OSError("broken\n  data")) == "OSError: broken data"


def test_the_skip_limit_names_the_top_reasons(tmp_path):
    log = badfiles.skip_log_for(tmp_path, 0)
    assert (tmp_path / "skipped.csv").read_text().startswith("row,split,path,reason")  # a clean run says so
    for i in range(3):
        log.add(i, f"/d/{i}.png", "truncated png" if i else "empty file", "pil", 0, split="train")
    assert badfiles.skip_limit_problem(3, 60, "training", 0.05, log) is None  # 5 %: not more than the limit
    msg = badfiles.skip_limit_problem(3, 10, "training", 0.05, log)
    assert msg.startswith("3 of the 10 training rows (30%)") and "truncated png (2); empty file (1)" in msg
    assert str(tmp_path / "skipped.csv") in msg
    assert badfiles.skip_log_for(tmp_path, 1).path == tmp_path / "skipped.rank1.csv"
    assert badfiles.skip_log_for(None).path is None
