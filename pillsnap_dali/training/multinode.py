"""What the ranks of a torchrun job exchange through ``torch.distributed``, so that the machines of a multi-node
run share no folder but the data.

* ``check_same_inputs``: every rank reads the same manifests (the files hold absolute image paths; a second
  machine needs them, and the images, at the same absolute paths). A rank whose copy is missing or differs
  stops every rank with one error naming the machine and the file, instead of training on other rows.
* ``merge_skip_logs``: rank ``r`` logs the files it skipped in its own ``skipped.rank<r>.csv`` on its own
  machine; at the end of the run rank 0 receives every rank's rows and appends those it lacks to its
  ``skipped.csv``, so the run dir on rank 0's machine holds the whole run's skip log (and its report counts
  it) whether or not the other machines can write there.
* ``agree_inputs``: every rank checks its inputs (manifests, a ``--resume`` checkpoint, the model name); one
  that fails tells the others, which stop with one line naming that rank, instead of a connection error
  later at their first collective.
* ``set_aside_stale_log``: a new run on a machine whose run dir rank 0 did not prepare (not shared) moves
  the rank's skip log of an earlier run aside, so its rows are neither excluded again nor merged.

Global rank (``dist.get_rank()``) decides who builds, writes and gathers; the local rank (``LOCAL_RANK``)
only picks this machine's GPU (``train.init_distributed``). Every function here is a collective where it
says so: every rank calls it, in the same order. Outside torchrun they do nothing.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import socket
import time
from pathlib import Path

import torch.distributed as dist

from pillsnap_dali.data.manifest import ManifestError
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.skiplog import SKIP_COLUMNS, SkipLog

_logger = logging.getLogger(__name__)

MULTINODE_DOC = "docs/multinode.md"


def is_distributed() -> bool:
    """True in a torchrun job of more than one process (the process group initialized)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes; None when there is no such file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return h.hexdigest()


def check_same_inputs(paths: list[Path]) -> None:
    """Collective: every rank has the same bytes at each of ``paths`` as rank 0 (a file absent on rank 0 must
    be absent everywhere). Raises ``ManifestError`` on every rank alike, naming the first rank that differs."""
    if not is_distributed():
        return
    mine = (socket.gethostname(), [(str(p), file_digest(Path(p))) for p in paths])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    host0, ref = everyone[0]
    for rank, (host, files) in enumerate(everyone[1:], start=1):
        for (path, d), (_, d0) in zip(files, ref):
            if d != d0:
                who, first = f"rank {rank} (on {host})", f"rank 0 (on {host0})"
                what = (f"{who} has no {path}, which {first} reads" if d is None else
                        f"{who} has a {path}, which {first} has not" if d0 is None else
                        f"{who} reads another {path} than {first}")
                raise ManifestError(f"{what}: every machine needs the same manifests and images at the same "
                                    f"absolute paths (copy {Path(path).parent} there, or mount it); see "
                                    f"{MULTINODE_DOC}")


class RankInputError(PillsnapError):
    """Another rank could not start (its own error line is in its own log)."""


def agree_inputs(error: PillsnapError | None) -> None:
    """Collective: every rank passes the expected error its input checks raised (None: none). A rank that
    failed re-raises its own error; the others raise ``RankInputError`` naming the first rank that failed."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), None if error is None else str(error)))
    if error is not None:
        raise error
    failed = [(rank, host, msg) for rank, (host, msg) in enumerate(everyone) if msg is not None]
    if failed:
        rank, host, msg = failed[0]
        raise RankInputError(f"rank {rank} (on {host}) could not start: {msg}")


def merge_skip_logs(skip_log: SkipLog) -> int:
    """Collective: rank 0 appends every other rank's skipped rows that its ``skipped.csv`` lacks (by split and
    row id) to it; returns the rows it added (0 on the other ranks, and when the log has no file: a dry run)."""
    if not is_distributed():
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object([dict(e) for e in skip_log.entries], gathered, dst=0)
    if rank != 0 or skip_log.path is None:
        return 0
    seen = set(skip_log.keys)
    added = []
    for entries in gathered[1:]:
        for e in entries:
            key = (e.get("split") or "", int(str(e["row"])))
            if key not in seen:
                seen.add(key)
                added.append({c: e.get(c, "") for c in SKIP_COLUMNS})
    skip_log.ensure_file()
    with open(skip_log.path, "a", newline="", encoding="utf-8") as fh:
        csv.DictWriter(fh, fieldnames=SKIP_COLUMNS).writerows(added)
    _logger.info("skip logs merged: %d row(s) of %d other rank(s) added to %s", len(added), world - 1,
                 skip_log.path)
    return len(added)


def set_aside_stale_log(run_dir: Path, rank: int) -> Path | None:
    """A new (not continued) run, rank ``rank`` > 0: its ``skipped.rank<r>.csv`` left in ``run_dir`` by an
    earlier run (rank 0 moves an earlier run aside only on its own machine) is renamed; returns the new name."""
    log = Path(run_dir) / f"skipped.rank{rank}.csv"
    if rank == 0 or not log.exists():
        return None
    old = log.with_name(f"{log.name}.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
    log.rename(old)
    _logger.warning("a skip log of an earlier run was in %s: moved to %s", log, old)
    return old
