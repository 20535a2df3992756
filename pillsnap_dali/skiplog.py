"""The skip log: every manifest row that could not be used, one line per row, in ``<run_dir>/skipped.csv``.

Columns ``row, split, path, reason, backend, epoch``. A row is named by its split and its row id (the training
and validation loaders share one log and their row ids overlap), so a manifest listing one broken file three
times gets three lines, and ``yielded + skipped == rows`` holds for repeated paths too. Loaders exclude by
**path** in later epochs and in a resumed run (a file found broken once is not tried again under any row).
"""
from __future__ import annotations

import csv
import logging
import threading
from pathlib import Path

from pillsnap_dali.errors import InputError

_logger = logging.getLogger(__name__)

SKIP_COLUMNS = ["row", "split", "path", "reason", "backend", "epoch"]


def _int_or_none(value) -> int | None:
    text = str(value if value is not None else "").strip()
    return int(text) if text.lstrip("-").isdigit() else None


class SkipLog:
    """Skipped rows, appended to ``path`` as they are found (``path=None``: in memory only).

    An existing file is read back, so a resumed run does not retry files it already skipped (a file with other
    columns is refused: ``InputError``). ``.paths``: the
    skipped files (what loaders exclude); ``.keys``: the ``(split, row)`` pairs logged; ``.rows``: their row
    ids (of every split). Thread-safe.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.rows: set[int] = set()
        self.keys: set[tuple[str, int]] = set()
        self.paths: set[str] = set()
        self.entries: list[dict] = []
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists() and self.path.stat().st_size:
            self._read_back()

    def _read_back(self) -> None:
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            recs = list(reader)
        if fields != SKIP_COLUMNS:
            raise InputError(f"{self.path}: not a skip log (columns {','.join(fields) or 'none'}, expected "
                             f"{','.join(SKIP_COLUMNS)}); move it away or start a new run")
        for rec in recs:
            self._remember(rec)
        _logger.info("skip log %s: %d file(s) skipped earlier are excluded", self.path, len(self.paths))

    def _remember(self, rec: dict) -> None:
        self.entries.append(rec)
        self.paths.add(rec["path"])
        row = _int_or_none(rec.get("row"))
        if row is not None:
            self.rows.add(row)
            self.keys.add((rec.get("split") or "", row))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def paths_before(self, epoch: int) -> set:
        """Paths skipped in an epoch before ``epoch`` (entries without a number count as earlier)."""
        with self._lock:
            return {e["path"] for e in self.entries
                    if (n := _int_or_none(e.get("epoch"))) is None or n < epoch}

    def add(self, row: int, path: str, reason: str, backend: str, epoch: int, split: str = "") -> bool:
        """Record one skipped row (logged as a warning); False if this split's row was already in the log."""
        reason = " ".join(str(reason).split())[:300]
        rec = {"row": int(row), "split": split, "path": path, "reason": reason, "backend": backend,
               "epoch": int(epoch)}
        with self._lock:
            if (split, int(row)) in self.keys:
                return False
            self._remember(rec)
            if self.path is not None:
                self._append(rec)
        _logger.warning("skipped %s row %d (%s): %s [%s, epoch %d]", split or "a", row, path, reason, backend,
                        epoch)
        return True

    def ensure_file(self) -> None:
        """Write the header if the log has no file yet (a run that skipped nothing still has its skipped.csv)."""
        if self.path is not None:
            with self._lock:
                if not self.path.exists() or self.path.stat().st_size == 0:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.path, "w", newline="", encoding="utf-8") as fh:
                        csv.DictWriter(fh, fieldnames=SKIP_COLUMNS).writeheader()

    def _append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=SKIP_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(rec)
