"""Stopping a run on SIGINT/SIGTERM, even when the loader is stuck in a read.

The first signal asks the loop to finish its step, save ``last.pt`` and leave (``StopFlag.reason``). A read that
never returns (a hung network mount, a stalled disk) would keep that request waiting for ever, so the request
has two escalations:

- a **second signal**, or the **watchdog** ``grace`` seconds after the first (``PILLSNAP_STOP_GRACE_S``, default
  ``DEFAULT_GRACE_S``) re-sending it: if the main thread is waiting for a batch (the training or validation loop
  is inside its loader), ``StopNow`` is raised there. That is a step boundary, so ``last.pt`` is saved as for a
  normal stop. Mid-step the request waits for the step, which ends on its own.
- ``grace`` seconds later, if the loop still has not ended (the main thread blocked in C code where no Python
  handler runs), the watchdog runs the ``at_forced_exit`` callbacks (the run dir's lock) and ends the process
  with ``128 + signal`` (130 SIGINT, 143 SIGTERM). A checkpoint being written is waited for (``saving``).

The watchdog stands down when the loop ends (``restore``). Reader threads or loader workers still stuck in a
read then are the command's to leave behind (``commands/train.py``), not the interpreter's to wait for.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

_logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
GRACE_ENV = "PILLSNAP_STOP_GRACE_S"
_LOOPS = ("train_one_epoch", "evaluate")   # the engine's loops over a loader
_DATA_CODE = (os.sep + "loaders" + os.sep, os.sep.join(("torch", "utils", "data", "")))
_NEVER_CUT = ("skiplog.py", "atomic.py", "checkpoint.py")
_forced_exit_hooks: list[Callable[[], None]] = []
saving = threading.Event()  # set while a checkpoint is being written (training.checkpoint.save_checkpoint)


class StopNow(BaseException):
    """A forced stop, raised in the main thread while it waits for a batch (a BaseException: no ``except
    Exception`` of a loader swallows it)."""


def at_forced_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` before the watchdog ends the process (``os._exit`` skips ``finally`` and ``atexit``);
    returns a function that unregisters it."""
    _forced_exit_hooks.append(callback)
    return lambda: callback in _forced_exit_hooks and _forced_exit_hooks.remove(callback)


def grace_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def waiting_for_data(frame) -> bool:
    """Whether ``frame`` (the main thread's, as a signal handler gets it) is inside a loader called by one of
    the engine's loops, i.e. between two steps."""
    callee = None
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(_NEVER_CUT):  # a skip log line or an atomic write in progress
            return False
        if code.co_name in _LOOPS and code.co_filename.endswith(os.path.join("training", "engine.py")):
            return callee is not None and any(d in callee.f_code.co_filename for d in _DATA_CODE)
        callee, frame = frame, frame.f_back
    return False


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save last.pt, leave cleanly (escalations: module docstring)."""

    def __init__(self, signals, grace: float | None = None):
        self.reason: str | None = None
        self.signum: int | None = None
        self.grace = grace_seconds() if grace is None else grace
        self._old = {}
        self._done = threading.Event()
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (tests): signals stay as they are
                pass

    def _handle(self, signum, frame):
        if self.reason is None:
            self.reason, self.signum = signal.Signals(signum).name, int(signum)
            _logger.warning("%s received: finishing this step, then saving last.pt (a second signal, or %.0f s "
                            "without an end, stops at once)", self.reason, self.grace)
            threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()
            return
        if waiting_for_data(frame):
            _logger.warning("%s again while waiting for data: stopping now, saving last.pt",
                            signal.Signals(signum).name)
            raise StopNow(self.reason)
        _logger.warning("%s again: stopping after this step", signal.Signals(signum).name)

    def _watchdog(self) -> None:
        if self._done.wait(self.grace):  # the loop ended (``restore``): nothing to force
            return
        os.kill(os.getpid(), self.signum)  # the stop is forced where the main thread waits for data
        if self._done.wait(self.grace):
            return
        while saving.is_set():  # a checkpoint being written is never cut
            self._done.wait(0.5)
        _logger.error("the run did not end %.0f s after %s (a read that never returns?): exiting now",
                      2 * self.grace, self.reason)
        for hook in list(_forced_exit_hooks):
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - the exit must happen
                _logger.warning("cleanup before exit failed: %s", e)
        os._exit(128 + int(self.signum))

    def restore(self):
        """The handlers before; the watchdog stands down (the loop has ended)."""
        self._done.set()
        for s, h in self._old.items():
            signal.signal(s, h)
