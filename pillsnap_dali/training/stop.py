"""Stopping a run on SIGINT/SIGTERM, even when the loader is stuck in a read.

The first signal asks the loop to finish its step, save ``last.pt`` and leave (``StopFlag.reason``). A read that
never returns (a hung network mount, a stalled disk) would keep that request waiting for ever, so the request
has two escalations:

- a **second signal**, or the **watchdog** ``grace`` seconds after the first (``PILLSNAP_STOP_GRACE_S``, default
  ``DEFAULT_GRACE_S``) re-sending it: if the main thread is waiting for a batch (the training or validation loop
  is inside its loader), ``StopNow`` is raised there. That is a step boundary, so ``last.pt`` is saved as for a
  normal stop. Mid-step the request waits for the step, which ends on its own.
- ``grace`` seconds later, if the main thread is still inside a loader (blocked in C code where no Python
  handler runs), the watchdog runs the ``at_forced_exit`` callbacks (the run dir's lock) and ends the process
  with ``128 + signal`` (130 SIGINT, 143 SIGTERM). A main thread in a step, or a checkpoint being written
  (``saving``), is never cut: the watchdog waits for it.

The watchdog starts from the first signal even when the main thread is stuck in C code where no Python handler
runs (a wait that retries on EINTR): the signal's number reaches a monitor thread through
``signal.set_wakeup_fd``. What no process can escape is a read the kernel holds in uninterruptible sleep (a hard
NFS mount's ``D`` state) *in the main thread*: the signal waits for the read; only SIGKILL ends it. The loaders
keep reads off the main thread by default (``loader.readers`` threads for DALI, worker processes for ``pil``).

The watchdog stands down when the loop ends (``restore``). Reader threads or loader workers still stuck in a
read then are the command's to leave behind (``commands/train.py``), not the interpreter's to wait for.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
from typing import Callable

_logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 10.0
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
    """SIGINT/SIGTERM: finish the current step, save last.pt, leave cleanly (escalations: module docstring).

    The watchdog starts from the first signal even when the main thread is stuck in C code and no Python
    handler can run: the signal's number reaches a monitor thread through ``signal.set_wakeup_fd``."""

    def __init__(self, signals, grace: float | None = None):
        self.reason: str | None = None
        self.signum: int | None = None
        self.grace = grace_seconds() if grace is None else grace
        self._old = {}
        self._done = threading.Event()
        self._started = threading.Lock()
        self._watching = False
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (tests): signals stay as they are
                pass
        self._wakeup = self._watch_wakeups() if self._old else None

    def _watch_wakeups(self):
        r, w = os.pipe()
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._monitor, args=(r,), name="stop-monitor", daemon=True).start()
        return old, r, w

    def _monitor(self, r: int) -> None:
        try:
            while not self._done.is_set():
                if select.select([r], [], [], 0.5)[0]:
                    for signum in os.read(r, 64):
                        if signum in self._old:
                            self._start_watchdog(signum)
        finally:
            os.close(r)

    def _start_watchdog(self, signum: int) -> None:
        with self._started:
            if self._watching:
                return
            self._watching = True
        threading.Thread(target=self._watchdog, args=(signum,), name="stop-watchdog", daemon=True).start()

    def _handle(self, signum, frame):
        if self.reason is None:
            self.reason, self.signum = signal.Signals(signum).name, int(signum)
            _logger.warning("%s received: finishing this step, then saving last.pt (a second signal, or %.0f s "
                            "without an end, stops at once)", self.reason, self.grace)
            self._start_watchdog(signum)
            return
        if waiting_for_data(frame):
            _logger.warning("%s again while waiting for data: stopping now, saving last.pt",
                            signal.Signals(signum).name)
            raise StopNow(self.reason)
        _logger.warning("%s again: stopping after this step", signal.Signals(signum).name)

    def _watchdog(self, signum: int) -> None:
        if self._done.wait(self.grace):  # the loop ended (``restore``): nothing to force
            return
        os.kill(os.getpid(), signum)  # the stop is forced where the main thread waits for data
        if self._done.wait(self.grace):
            return
        main = threading.main_thread().ident
        # only a main thread still stuck in a loader is cut: a long step, or a checkpoint being written, ends
        while saving.is_set() or not waiting_for_data(sys._current_frames().get(main)):
            if self._done.wait(0.5):
                return
        _logger.error("the run did not end %.0f s after %s (a read that never returns?): exiting now",
                      2 * self.grace, signal.Signals(signum).name)
        for hook in list(_forced_exit_hooks):
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - the exit must happen
                _logger.warning("cleanup before exit failed: %s", e)
        os._exit(128 + int(signum))

    def restore(self):
        """The handlers before; the watchdog stands down (the loop has ended)."""
        self._done.set()
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._wakeup is not None:
            old, _, w = self._wakeup
            signal.set_wakeup_fd(old)
            self._wakeup = None
            os.close(w)  # the monitor leaves within 0.5 s and closes its end
