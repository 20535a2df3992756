"""A run directory belongs to one run.

- **one live run**: a training takes ``<run_dir>/run.lock`` (pid, host, start time; created with ``O_EXCL``)
  before it moves or writes anything there, and releases it on every way out (``RunDir.close``, also from a
  forced stop's ``at_forced_exit``). A second training into the dir of a live run is refused with one line
  naming that process; a lock whose process is gone (same host) is taken over with a warning; a lock of another
  host cannot be checked and is refused, naming the file to remove.
- **only our folders**: an existing non-empty folder that is no run of ours (no lock file, no ``run.json``,
  not the files a run of this project leaves) is never written into, nor moved.
- **no half-made run**: ``RunDir.abandon`` removes the folder a run created before its first step and puts back
  the earlier run it had moved aside.

Under torchrun only rank 0 calls this module (the other ranks write into the dir rank 0 has prepared).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pillsnap_dali.atomic import pid_alive
from pillsnap_dali.errors import PillsnapError

_logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
MARKER = "run.json"   # written into every run dir this project makes: the dir is ours
_LEGACY_FILES = ("config.yaml", "class_map.json")       # a run dir made before MARKER existed has both,
_LEGACY_ANY = ("checkpoints", "train.log", "metrics.jsonl")  # and one of these


class RunDirError(PillsnapError, RuntimeError):
    """The run dir is another live run's, or a folder that is not a run of ours."""


def is_ours(folder: Path) -> bool:
    """Whether ``folder`` is a run dir of this project (its marker or lock, or an older run's files)."""
    if (folder / MARKER).is_file() or (folder / LOCK_NAME).is_file():
        return True
    return all((folder / f).is_file() for f in _LEGACY_FILES) and any((folder / f).exists() for f in _LEGACY_ANY)


def check_not_foreign(folder: Path) -> None:
    """Refuse a non-empty folder that is not a run of ours (nothing in it is written, moved or appended to)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunDirError(f"run dir {folder} exists and is not a folder; choose another --out/--name")
    entries = sorted(p.name for p in folder.iterdir())
    if entries and not is_ours(folder):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"run dir {folder} is a non-empty folder that is not a pillsnap_dali run ({shown}); "
                          "nothing was written: choose another --out/--name, or empty it")


def read_lock(path: Path) -> dict | None:
    """The lock's record ({pid, host, started}), or None when there is none; an unreadable one is {}."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _owner(rec: dict) -> str:
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}"


def _live(rec: dict) -> bool:
    """Whether the lock's process may still run: same host and alive, or another host (cannot be checked)."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = rec.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)


def acquire(folder: Path) -> Path:
    """Take ``folder/run.lock`` (the folder must exist); refused (``RunDirError``) while another live process
    holds it; a dead process's lock is taken over with a warning."""
    lock = folder / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            rec = read_lock(lock)
            if rec is None:
                continue  # released meanwhile
            if rec and _live(rec):
                where = "" if rec.get("host") == socket.gethostname() else " (another host: remove the lock if that run is gone)"
                raise RunDirError(f"run dir {folder} is in use by another training ({_owner(rec)}){where}; "
                                  f"its lock: {lock}. Wait for it, stop it, or choose another --name") from None
            _logger.warning("run dir %s: taking over the lock of a run that is gone (%s)", folder,
                            _owner(rec) if rec else "unreadable lock")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, fh)
        return lock
    raise RunDirError(f"run dir {folder}: could not take its lock {lock} (another run keeps taking it)")


def release(lock: Path) -> None:
    """Remove ``lock`` if it is this process's."""
    rec = read_lock(lock)
    if rec is not None and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@dataclass
class RunDir:
    """A run dir taken by this process: ``created`` (this run made the folder), ``aside`` (where an earlier
    run in it was moved), ``lock``, ``started`` (set by the caller once training begins)."""
    path: Path
    lock: Path | None
    created: bool
    aside: Path | None = None
    started: bool = False    # the training loop was entered (a failure after it keeps the dir)

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self.lock is not None:
            release(self.lock)
            self.lock = None

    def abandon(self) -> None:
        """The run stopped before its first step: the folder it created is removed and the earlier run it
        moved aside is put back; a folder it did not create only loses the lock."""
        lock, self.lock = self.lock, None
        if not self.created:
            if lock is not None:
                release(lock)
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self.aside is not None and not self.path.exists():
            shutil.move(str(self.aside), self.path)
            _logger.info("the earlier run moved to %s is back in %s", self.aside, self.path)


def _move_aside(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(folder.stat().st_mtime))
    old = folder.with_name(f"{folder.name}.{stamp}")
    n = 1
    while old.exists():
        old, n = folder.with_name(f"{folder.name}.{stamp}-{n}"), n + 1
    shutil.move(str(folder), old)
    return old


def take(folder: Path, continuing: bool) -> RunDir:
    """Make ``folder`` this run's: refused when it is another live run's or not a run of ours; an earlier run
    in it is moved aside unless ``continuing`` (a resume of its own last.pt). The marker and the lock are
    written; call ``close()`` (or ``abandon()``) on every way out."""
    folder = Path(folder)
    check_not_foreign(folder)
    aside = None
    if folder.is_dir() and not continuing and (folder / "checkpoints").exists():
        lock = acquire(folder)  # no live run in it, and none starts while it moves
        aside = _move_aside(folder)
        (aside / LOCK_NAME).unlink(missing_ok=True)
        _logger.info("an earlier run was in %s: moved to %s (use --resume %s to continue it)", folder, aside,
                     aside / "checkpoints" / "last.pt")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = acquire(folder)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    (folder / MARKER).write_text(json.dumps({"made_by": "pillsnap_dali.train"}) + "\n", encoding="utf-8")
    return RunDir(folder, lock, created, aside)
