"""Operating-system faults made real for a CLI run in a subprocess, without mocks.

- ``run_cli(module, args, file_limit=N)``: every file the process writes is limited to N bytes
  (``RLIMIT_FSIZE``; SIGXFSZ ignored), so the first bigger write fails with EFBIG, as a full disk
  fails with ENOSPC: the same code paths, deterministic, on any file system.
- ``READ_ONLY``: a folder no one may create anything in, root included (sysfs refuses mkdir).
- ``SignalAt(text, signum)``: a log handler that sends this process ``signum`` when a log line contains
  ``text``: the real signal path (the handler in the main thread) at a chosen step, without a subprocess.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READ_ONLY = Path("/sys/pillsnap_dali_test_output")


def run_cli(module: str, args: list, file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)


def error_lines(run: subprocess.CompletedProcess) -> list:
    """The ``error:`` lines of a run's stderr (a traceback would show as ``Traceback`` lines instead)."""
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


class SignalAt(logging.Handler):
    """Sends this process ``signum`` when a log line contains ``text`` (once; ``fired`` says it did)."""

    def __init__(self, text: str, signum: int = signal.SIGTERM):
        super().__init__()
        self.text, self.signum, self.fired = text, signum, False

    def emit(self, record):
        if not self.fired and self.text in record.getMessage():
            self.fired = True
            os.kill(os.getpid(), self.signum)
