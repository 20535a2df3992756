"""The one base class of the faults a user can fix.

Every error the code raises for bad input (a config, a manifest, a class map, a checkpoint, an image tree, a
command line) derives from :class:`PillsnapError`, keeping its older base (``ValueError``, ``RuntimeError``)
so that ``except ValueError`` still catches it. The CLIs (``pillsnap_dali.commands.common.run_main``) turn exactly these,
and operating-system errors, into one ``error: ...`` line on stderr with exit status 2; any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno


class PillsnapError(Exception):
    """An expected fault the user can fix; its message names what and where (one line)."""


class UsageError(PillsnapError, ValueError):
    """A command line that cannot work as given (a missing input file, a data root one level too deep, a
    device that is not there)."""


class InputError(PillsnapError, ValueError):
    """A file the user gave that cannot be used as it is (a class map, a YOLO dataset, a folder without
    images); the message names the file."""


def os_error_line(e: OSError, where=None) -> str:
    """One line for an operating-system error (read-only or full disk, no permission, no such file): the path(s)
    it concerns (else ``where``) and the system's words, without the errno noise; a full disk says so."""
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None] or ([str(where)] if where else [])
    what = e.strerror or str(e) or type(e).__name__
    full = " (disk full?)" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return (f"{' -> '.join(paths)}: {what}" if paths else what) + full


def one_line(e: BaseException) -> str:
    """The one line of an exception's text that says what went wrong (torch's weights_only refusal is a
    page of advice around its ``WeightsUnpickler error: Unsupported global: ...`` line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "WeightsUnpickler error" in ln or "unsupported global" in ln.lower()]
    line = (named or lines or [type(e).__name__])[0]
    return line.split(". Please use")[0]  # torch's "add_safe_globals" advice is the opposite of what we want
