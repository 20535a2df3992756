"""Write-once files: a temp file in the same folder, flushed and fsynced, then renamed over the target,
so a crash or a full disk never leaves half a file where a reader (a reused manifest, a resumed run) looks."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


def temp_path(path: Path) -> Path:
    """``.<name>.tmp<pid>`` beside ``path`` (``prepare`` cleans these up after an interrupted run)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **open_kw) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only once the block completes; the temp file
    is removed if it raises. Text modes default to UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    if "b" not in mode:
        open_kw.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a write or fsync (full disk): name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (the writer of a temp file or a lock): a file of a dead one is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
