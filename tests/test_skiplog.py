"""skipped.csv: one line per skipped manifest row, named by split and row id, and the accounting contract
(yielded + skipped + excluded + dropped == rows) for duplicate, missing, unreadable and directory paths, on
both DALI CPU and PIL, with real files on disk."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SKIP_COLUMNS, SkipLog

CPU = torch.device("cpu")
BACKENDS = ("dali-cpu", "pil")


def _manifest(paths) -> Manifest:
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], ["K-000001"] * n, ["single"] * n, ["test"] * n,
                    [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


def _cfg():
    return load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=4", "loader.threads=2",
                                           "loader.workers=0"])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("skiplog")
    good = []
    for i in range(6):
        good.append(d / f"good_{i}.png")
        Image.fromarray(np.full((40, 32, 3), i * 30, np.uint8)).save(good[-1])
    broken = d / "broken.png"
    data = good[0].read_bytes()
    broken.write_bytes(data[:8] + b"\0" * 40)  # a PNG signature and nothing PIL or DALI can decode
    (d / "a_folder.png").mkdir()
    return {"good": good, "broken": broken, "missing": d / "gone.png", "folder": d / "a_folder.png"}


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_line_per_row_for_repeated_missing_unreadable_and_directory_paths(files, tmp_path, backend):
    g, bad = files["good"], [files["broken"]] * 3 + [files["missing"], files["folder"]]
    paths = [g[0], bad[0], g[1], bad[1], g[2], bad[2], g[3], bad[3], g[4], bad[4], g[5]]
    log = SkipLog(tmp_path / "skipped.csv")
    for train in (True, False):
        loader = build_loader(_manifest(paths), [0] * len(paths), _cfg(), train=train, device=CPU,
                              backend=backend, skip_log=log if train else SkipLog(tmp_path / "val.csv"))
        loader.set_epoch(0)
        rows = [r for b in loader for r in b.rows.tolist()]
        st = loader.epoch_stats()
        assert sorted(rows) == [0, 2, 4, 6, 8, 10] and st["skipped"] == 5 and st["excluded"] == 0
        assert st["yielded"] + st["skipped"] + st["excluded"] + st["dropped"] == st["rows"] == len(paths)
    recs = _read(log.path)
    assert list(recs[0]) == SKIP_COLUMNS
    assert sorted((int(r["row"]), r["split"]) for r in recs) == [(i, "train") for i in (1, 3, 5, 7, 9)]
    assert sum(r["path"] == str(files["broken"]) for r in recs) == 3  # the repeated file: one line per row
    # a resumed run (the log read back) leaves every row of those files out, counted as excluded
    again = build_loader(_manifest(paths), [0] * len(paths), _cfg(), train=True, device=CPU, backend=backend,
                         skip_log=SkipLog(log.path))
    again.set_epoch(1)
    assert sorted(r for b in again for r in b.rows.tolist()) == [0, 2, 4, 6, 8, 10]
    assert again.epoch_stats()["excluded"] == 5 and len(SkipLog(log.path)) == 5


def test_train_and_val_rows_with_the_same_id_are_two_lines(files, tmp_path):
    log = SkipLog(tmp_path / "skipped.csv")
    g = files["good"]
    for train, paths in ((True, [g[0], files["broken"]]), (False, [g[1], files["missing"]])):
        loader = build_loader(_manifest(paths), [0, 0], _cfg(), train=train, device=CPU, backend="dali-cpu",
                              skip_log=log)
        assert [r for b in loader for r in b.rows.tolist()] == [0]
    recs = _read(log.path)
    assert [(r["row"], r["split"], r["path"]) for r in recs] == [("1", "train", str(files["broken"])),
                                                                 ("1", "val", str(files["missing"]))]
    back = SkipLog(log.path)
    assert back.keys == {("train", 1), ("val", 1)} and len(back) == 2
    assert not back.add(1, str(files["broken"]), "again", "dali-cpu", 1, split="train")  # a row is logged once
    assert back.add(1, str(files["broken"]), "again", "dali-cpu", 1, split="test")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skips_of_earlier_epochs_count_toward_max_skipped(files, tmp_path, backend):
    """train.max_skipped is a share of the split's rows that cannot be used: a row skipped in epoch 0 (excluded
    from then on) still counts in epoch 1, beside the rows that broke since."""
    import shutil
    from pillsnap_dali.training.engine import skipped_share
    good = []
    for i, src in enumerate(files["good"] + files["good"][:5]):
        good.append(tmp_path / f"copy_{i}.png")
        shutil.copyfile(src, good[-1])
    paths = good[:5] + [files["missing"]] + good[5:]  # 12 rows, one unusable from the start
    log = SkipLog(tmp_path / "skipped.csv")
    loader = build_loader(_manifest(paths), [0] * len(paths), _cfg(), train=True, device=CPU, backend=backend,
                          skip_log=log)
    loader.set_epoch(0)
    assert sum(len(b.rows) for b in loader) == 11
    bad, rows = skipped_share(loader, CPU)
    assert (bad / rows, bad, rows) == (pytest.approx(1 / 12), 1, 12)
    good[0].unlink()  # a file lost between the epochs
    good[7].unlink()
    loader.set_epoch(1)
    assert sum(len(b.rows) for b in loader) == 9
    st = loader.epoch_stats()
    assert (st["excluded"], st["skipped"]) == (1, 2)
    bad, rows = skipped_share(loader, CPU)
    assert (bad / rows, bad, rows) == (pytest.approx(3 / 12), 3, 12)
