"""Hardening 3: no input hangs a run, a run dir belongs to one run, the checkpoint pair stays consistent.

Special files are real (``os.mkfifo``, a bound Unix socket, ``/dev/null``, a directory). A read that never
returns is simulated in a child process by ``_STALL`` below: it wraps the project's image readers so that, once
the run has trained its first step, every read waits on an event nobody sets. That is what a read on a hung
network mount looks like from Python (a call that does not come back; signals still reach the main thread). The
simulated crash between the two checkpoint writes is the only other stand-in: an exception raised where
``best.pt`` is opened for writing.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali import imageio, rundir
from pillsnap_dali.commands import train
from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import import_legacy
from pillsnap_dali.data.manifest import Manifest, read_manifest, write_manifest
from pillsnap_dali.data.verify import Verifier, VerifySettings
from pillsnap_dali.inference import PredictOptions, collect_images, predict_one
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.training import checkpoint as ckpt
from pillsnap_dali.training import evaluation
from pillsnap_dali.training.checkpoint import load_checkpoint

from oslimits import SignalAt

CPU = torch.device("cpu")
TINY = ["--model", "test_efficientnet", "--img-size", "32", "--batch-size", "16", "--lr", "0.003",
        "--set", "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1",
        "--set", "train.log_interval=1", "--set", "train.max_skipped=0.1"]


# ------------------------------------------------------------------------------------------ special files
@pytest.fixture
def specials(tmp_path):
    """{kind: path} of real non-regular files: a FIFO with no writer, a bound socket, a char device, a folder."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    folder = tmp_path / "folder.png"
    folder.mkdir()
    yield {"a FIFO": fifo, "a socket": sock_path, "a character device": Path("/dev/null"), "a directory": folder}
    sock.close()


@pytest.mark.timeout(60)
def test_every_image_reader_refuses_a_special_file_without_opening_it_blocking(specials):
    for kind, path in specials.items():
        why = f"not a regular file ({kind})"
        assert imageio.regular_file(path) == why
        assert imageio.check_header(str(path), 10 ** 6) == why
        assert imageio.check_full(str(path), 10 ** 6) == why
        assert imageio.read_encoded(str(path), 10 ** 6) == (None, why)
        assert imageio.read_encoded_upright(str(path), 10 ** 6) == (None, why, None)
        with pytest.raises(imageio.NotRegularFile, match=r"not a regular file \(" + kind):
            imageio.open_rgb(str(path))
        with pytest.raises(OSError, match="not a regular file"):
            imageio.upright_size(path)


def _png(path: Path, i: int) -> Path:
    a = np.full((40, 48, 3), (i * 40) % 256, np.uint8)
    a[:, : 8 + i] = 255
    Image.fromarray(a).save(path)
    return path


def _manifest(paths) -> Manifest:
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], [f"K-{i % 2:06d}" for i in range(n)], ["single"] * n,
                    ["train"] * n, [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,workers", [("pil", 1), ("pil", 0), ("dali-cpu", 0)])
@pytest.mark.parametrize("train_graph", [True, False])
def test_a_fifo_in_a_manifest_is_skipped_and_logged_on_every_backend(tmp_path, specials, backend, workers,
                                                                     train_graph):
    good = [_png(tmp_path / f"K-{i % 2:06d}_{i}.png", i) for i in range(6)]
    paths = [*good[:3], specials["a FIFO"], *good[3:], specials["a character device"]]
    cfg = load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=2", "loader.threads=1",
                                          f"loader.workers={workers}"])
    log = SkipLog(tmp_path / "skipped.csv")
    loader = build_loader(_manifest(paths), [i % 2 for i in range(len(paths))], cfg, train=train_graph,
                          device=CPU, backend=backend, skip_log=log)
    loader.set_epoch(0)
    try:
        rows = sorted(r for b in loader for r in b.rows.tolist())
    finally:
        loader.close()
    assert rows == [0, 1, 2, 4, 5, 6]
    reasons = {e["path"]: e["reason"] for e in csv.DictReader(open(tmp_path / "skipped.csv"))}
    assert set(reasons) == {str(specials["a FIFO"]), "/dev/null"}
    assert "not a regular file (a FIFO)" in reasons[str(specials["a FIFO"])]
    assert "not a regular file (a character device)" in reasons["/dev/null"]


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fifo_in_a_manifest_is_skipped_on_the_gpu_backend(tmp_path, specials):
    good = [_png(tmp_path / f"K-{i % 2:06d}_{i}.png", i) for i in range(4)]
    cfg = load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=4", "loader.threads=1"])
    log = SkipLog(None)
    loader = build_loader(_manifest([*good, specials["a FIFO"]]), [0, 1, 0, 1, 0], cfg, train=True,
                          device=torch.device("cuda"), backend="dali", skip_log=log)
    loader.set_epoch(0)
    rows = sorted(r for b in loader for r in b.rows.tolist())
    loader.close()
    assert rows == [0, 1, 2, 3] and "not a regular file (a FIFO)" in log.entries[0]["reason"]


@pytest.mark.timeout(60)
def test_predict_reports_a_special_file_per_image_and_never_opens_it(tmp_path, specials):
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png", 1)
    os.mkfifo(folder / "b.png")
    found = collect_images([str(folder), str(specials["a FIFO"])])
    assert [p.name for p in found] == ["a.png", "b.png", "fifo.png"]  # a FIFO given by name is a row, not "missing"
    for path in found[1:]:
        r = predict_one(str(path), None, None, PredictOptions(), 640)  # the reader fails before the model runs
        assert r["error"] == "unreadable image: not a regular file (a FIFO)" and r["pills"] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["none", "header", "full"])
def test_manifest_legacy_and_verification_quarantine_special_files_by_kind(tmp_path, specials, mode):
    good = [_png(tmp_path / f"K-{i % 2:06d}_{i}.png", i) for i in range(4)]
    rows = [*good, *specials.values()]
    legacy = tmp_path / "legacy_train.csv"
    with open(legacy, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "mapping_code", "image_type", "source"])
        w.writerows([str(p), f"K-{i % 2:06d}", "single", "legacy"] for i, p in enumerate(rows))
    out = tmp_path / "out"
    report = import_legacy([str(legacy)], load_config("demo"), out, verify=mode)
    assert read_manifest(out / "manifest_train.csv").paths == [str(p) for p in good]
    q = {r["path"]: r["reason"] for r in csv.DictReader(open(out / "quarantine.csv"))}
    assert q == {str(p): f"not a regular file ({kind})" for kind, p in specials.items()}
    assert report["accounting"] == {"rows_in": 8, "rows_out": 4, "quarantined": 4}
    if mode != "none":  # the verifier on its own says the same
        v = Verifier(VerifySettings(mode, 10 ** 6, workers=1, cache_path=tmp_path / "cache.json"))
        assert v.bad([str(p) for p in rows]) == {str(p): f"not a regular file ({k})" for k, p in specials.items()}


# ------------------------------------------------------------------------------------ a read that stalls
_STALL = r"""
import logging, os, signal, sys, threading
from pillsnap_dali import imageio
from pillsnap_dali.loaders import pil_loader
from pillsnap_dali.commands import train

go, marker = sys.argv[1], sys.argv[2]
never = threading.Event()

def stalling(read):
    def wrapped(*a, **k):
        if os.path.exists(go):  # the run has trained a step: from now on every read hangs
            if os.environ.get("STALL_UNINTERRUPTIBLE"):  # no Python handler can run in this thread any more
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            open(marker, "a").close()
            never.wait()
        return read(*a, **k)
    return wrapped

imageio._read_bytes = stalling(imageio._read_bytes)   # dali, dali-cpu
pil_loader.open_rgb = stalling(pil_loader.open_rgb)   # pil (its workers are forked from here)

class Go(logging.Handler):
    def emit(self, record):
        if " step 1/" in record.getMessage():
            open(go, "a").close()

logging.getLogger("pillsnap_dali.training.engine").addHandler(Go())
sys.exit(train.main(sys.argv[3:]))
"""


_CHILDREN: list = []


@pytest.fixture(autouse=True)
def _no_child_left():
    """A failed test does not leave its hung training behind."""
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stalled_run(tmp_path: Path, manifests: Path, name: str, backend: str, grace: float = 600, *extra,
                 uninterruptible: bool = False, at_once: bool = False):
    """A training subprocess (its own process group) whose reads hang after its first step (``at_once``: from
    its first read); returns it once a read hangs."""
    go, marker = tmp_path / f"{name}.go", tmp_path / f"{name}.stalled"
    if at_once:
        go.touch()
    argv = ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(tmp_path / "runs"), *TINY,
            "--epochs", "3", "--backend", backend, "--name", name, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PILLSNAP_STOP_GRACE_S": str(grace)}
    if uninterruptible:
        env["STALL_UNINTERRUPTIBLE"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", _STALL, str(go), str(marker), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    _CHILDREN.append(proc)
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    return proc


@pytest.mark.timeout(400)
def test_a_second_sigterm_ends_a_run_whose_reader_hangs_and_a_second_run_cannot_take_its_dir(
        manifests, tmp_path, capsys):
    proc = _stalled_run(tmp_path, manifests, "hung", "dali-cpu")
    run_dir = tmp_path / "runs" / "hung"
    # the dir of a live run is refused, naming the process; nothing of it is moved
    rc = train.main(["--manifest", str(manifests / "manifest_train.csv"), "--out", str(tmp_path / "runs"), *TINY,
                     "--epochs", "1", "--name", "hung"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert f"pid {proc.pid}" in errors[0] and "in use by another training" in errors[0]
    assert not list((tmp_path / "runs").glob("hung.*")) and json.loads((run_dir / "run.lock").read_text())["pid"] \
        == proc.pid
    proc.send_signal(signal.SIGTERM)  # asks for the end of the step, which waits on the hung read
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    assert proc.poll() is None  # a first signal never cuts a run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not last["epoch_complete"] and last["step"] >= 1
    assert not (run_dir / "run.lock").exists()  # released


@pytest.mark.timeout(400)
def test_a_single_sigint_ends_a_hung_run_through_the_watchdog(manifests, tmp_path):
    proc = _stalled_run(tmp_path, manifests, "watch", "dali-cpu", grace=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopping now, saving last.pt" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "runs" / "watch" / "checkpoints" / "last.pt")["step"] >= 1


@pytest.mark.timeout(400)
def test_a_read_no_signal_interrupts_ends_by_the_watchdog_with_the_lock_released(manifests, tmp_path):
    """The main thread itself reads (no reader threads) and its wait holds signals off, as a wait in C code
    that retries on EINTR does: no Python handler can ever run, yet the watchdog starts (the wakeup fd) and ends
    the process, its lock released."""
    proc = _stalled_run(tmp_path, manifests, "d", "dali-cpu", 1, "--set", "loader.readers=0", uninterruptible=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "did not end" in err and "exiting now" in err
    assert not (tmp_path / "runs" / "d" / rundir.LOCK_NAME).exists()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_pil_workers_leave_a_group_signal_to_the_run(manifests, tmp_path, signum):
    """Ctrl-C (SIGINT) or ``kill -TERM -PGID`` reach the workers too: they leave the stop to the run (no worker
    traceback, no 'worker killed'), and a worker hung in a read does not keep the run from ending."""
    proc = _stalled_run(tmp_path, manifests, "pil", "pil")
    os.killpg(proc.pid, signum)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err and "exited unexpectedly" not in err
    assert load_checkpoint(tmp_path / "runs" / "pil" / "checkpoints" / "last.pt")["step"] >= 1


@pytest.mark.timeout(400)
def test_a_run_stopped_while_its_first_batch_hangs_leaves_no_run_dir(manifests, tmp_path):
    proc = _stalled_run(tmp_path, manifests, "first", "dali-cpu", at_once=True)
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "before the first step: nothing trained" in out
    assert not (tmp_path / "runs" / "first").exists() and "Traceback" not in err


# ------------------------------------------------------------------------------------------ run dir owner
def _args(manifests, out, *extra):
    return ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(out), *TINY, *extra]


def test_a_folder_that_is_not_a_run_is_never_written_into(manifests, tmp_path, capsys):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "report.md").write_text("my notes")
    (mine / "config.yaml").write_text("mine: 1\n")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert train.main(_args(manifests, tmp_path / "runs", "--epochs", "1", "--name", "mine")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: run dir {mine} is a non-empty folder that is not a pillsnap_dali run")
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_a_stale_lock_is_taken_over_and_released(manifests, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / rundir.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "started": "earlier"}))
    assert train.main(_args(manifests, tmp_path / "runs", "--epochs", "1", "--name", "stale")) == 0
    assert f"taking over the lock of a run that is gone (pid {dead.pid}" in capsys.readouterr().err
    assert not (run_dir / rundir.LOCK_NAME).exists() and (run_dir / "checkpoints" / "last.pt").exists()




def _not_handled(signum, frame):
    raise AssertionError("the run left SIGTERM to the test's handler")


def test_a_run_stopped_before_its_first_step_leaves_the_earlier_run_as_it_was(manifests, tmp_path):
    runs = tmp_path / "runs"
    assert train.main(_args(manifests, runs, "--epochs", "1", "--name", "r")) == 0
    before = sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))
    last = (runs / "r" / "checkpoints" / "last.pt").read_bytes()
    hook = SignalAt("model test_efficientnet")  # logged once the trainer is built, before its first step
    logging.getLogger("pillsnap_dali.train").addHandler(hook)
    old = signal.signal(signal.SIGTERM, _not_handled)  # what the run installs replaces it
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main(_args(manifests, runs, "--epochs", "1", "--name", "r"))  # a new run there (no --resume)
    finally:
        signal.signal(signal.SIGTERM, old)
        logging.getLogger("pillsnap_dali.train").removeHandler(hook)
    assert hook.fired and stopped.value.code == 128 + signal.SIGTERM
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) == before  # nothing half-made, none aside
    assert (runs / "r" / "checkpoints" / "last.pt").read_bytes() == last


# ------------------------------------------------------------------------------------------ checkpoint pair
TARGET = 0.0001


class _Killed(BaseException):
    """The process dying at this point."""


def _kill_at_best(monkeypatch):
    real = ckpt.atomic_open

    def opening(path, *a, **k):  # the kill hits the best.pt write of the save that reached the target
        if Path(path).name == "best.pt" and load_checkpoint(Path(path).with_name("last.pt"))["history"][-1][
                "selected_top1"] >= TARGET:
            raise _Killed("killed while writing best.pt")
        return real(path, *a, **k)
    monkeypatch.setattr(ckpt, "atomic_open", opening)


def test_a_kill_between_last_and_best_at_the_target_is_repaired_and_trains_no_extra_epoch(manifests, tmp_path,
                                                                                          monkeypatch, capsys):
    runs = tmp_path / "runs"
    args = _args(manifests, runs, "--name", "t", "--target-accuracy", str(TARGET), "--set",
                 "train.patience=0")
    with monkeypatch.context() as m:
        _kill_at_best(m)
        with pytest.raises(_Killed):
            train.main([*args, "--epochs", "5", "--lr", "0.003"])
    d = runs / "t" / "checkpoints"
    last = load_checkpoint(d / "last.pt")
    reached = [h["epoch"] for h in last["history"] if h["selected_top1"] >= TARGET]
    assert last["epoch_complete"] and reached == [last["epoch"]]  # killed at the final save
    if (d / "best.pt").exists():  # older than the best epoch last.pt names (an earlier best)
        assert load_checkpoint(d / "best.pt")["epoch"] < last["epoch"]
    capsys.readouterr()
    assert train.main([*args, "--epochs", "5", "--resume"]) == 0
    out = capsys.readouterr().out
    hist = [json.loads(x) for x in (runs / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [h["epoch"] for h in last["history"]]  # no extra epoch
    assert "target accuracy" in out
    best = load_checkpoint(d / "best.pt")
    assert (best["epoch"], best["step"]) == (last["epoch"], last["step"])
    assert _weights_equal(best["model"], last["model"])
    report = (runs / "t" / "report.md").read_text()
    assert f"Best epoch: **{last['epoch']}**" in report


def _weights_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_restore_best_replaces_an_older_best_pt_after_a_kill_between_the_writes(tmp_path):
    """The pair as save_pair leaves it when killed between its two writes: last.pt of epoch 1 (best) and the
    best.pt of epoch 0."""
    d = tmp_path / "checkpoints"
    hist = [{"epoch": 0, "best": True}, {"epoch": 1, "best": True}]
    ckpt.save_pair(d, {"epoch": 0, "step": 3, "epoch_complete": True, "history": hist[:1], "w": torch.zeros(2)},
                   best=True)
    ckpt.save_checkpoint(d / "last.pt", {"epoch": 1, "step": 6, "epoch_complete": True, "history": hist,
                                          "best_epoch": 1, "w": torch.ones(2)})
    assert ckpt.restore_best(d) == "restored"
    best = load_checkpoint(d / "best.pt")
    assert best["epoch"] == 1 and torch.equal(best["w"], torch.ones(2))
    assert ckpt.restore_best(d) is None  # consistent now: nothing to do


def _manifests_with_bad_test_split(manifests: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in manifests.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    # a test manifest that reads well when the run starts (its rows are recorded in the checkpoint) but whose
    # images are gone by the time training ends: the evaluation cannot run, and says so
    m = read_manifest(folder / "manifest_test.csv")
    write_manifest(m.replace(paths=[str(folder / "gone" / Path(q).name) for q in m.paths]), folder / "manifest_test.csv")
    return folder


def test_a_test_split_that_cannot_be_evaluated_is_in_the_report_and_the_summary(manifests, tmp_path, capsys):
    data = _manifests_with_bad_test_split(manifests, tmp_path / "data")
    rc = train.main(_args(data, tmp_path / "runs", "--epochs", "1", "--name", "e"))
    assert rc == 0
    out = capsys.readouterr().out
    assert f"test split: not evaluated ({data / 'manifest_test.csv'}: " in out
    report = (tmp_path / "runs" / "e" / "report.md").read_text()
    assert "## Test split" in report and f"Not evaluated: {data / 'manifest_test.csv'}: " in report


def test_after_training_lets_an_unexpected_error_through(tmp_path, monkeypatch, manifests):
    best = tmp_path / "checkpoints" / "best.pt"
    best.parent.mkdir()
    best.write_bytes(b"x")

    def broken(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        evaluation.after_training(tmp_path, str(manifests / "manifest_train.csv"), load_config("demo"), CPU)
    assert evaluation.after_training(tmp_path, str(tmp_path / "manifest_train.csv"), load_config("demo"), CPU) \
        == {"not_evaluated": evaluation.test_split(tmp_path / "manifest_train.csv")[1]}
    assert "no test manifest (manifest_test.csv) beside" in evaluation.test_split(tmp_path / "manifest_train.csv")[1]
