"""Write-once files (pillsnap_dali.atomic): the old content survives a failed write, no temp is left."""
import pytest

from pillsnap_dali.atomic import atomic_open, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    with atomic_open(target, "wb") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"


def test_every_atomic_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    """The data reaches the disk before the name does: os.fsync on the temp file's descriptor, then
    os.replace (a crash after the rename must not find an empty file). The real calls run; the order is noted."""
    import os
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "m.csv"
    atomic_write_text(target, "row\n0\n")
    tmp = str(tmp_path / f".m.csv.tmp{os.getpid()}")
    assert calls == [("fsync", tmp), ("replace", tmp)] and target.read_text() == "row\n0\n"
    calls.clear()
    with atomic_open(target, "wb") as fh:
        fh.write(b"new")
    assert calls == [("fsync", tmp), ("replace", tmp)]
