"""The one base class of the faults a user can fix.

Every error the code raises for bad input (a config, a manifest, a class map, a checkpoint, an image tree, a
command line) derives from :class:`PillsnapError`, keeping its older base (``ValueError``, ``RuntimeError``)
so that ``except ValueError`` still catches it. The CLIs (``pillsnap_dali.cli.run_main``) turn exactly these,
and operating-system errors, into one ``error: ...`` line on stderr with exit status 2; any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations


class PillsnapError(Exception):
    """An expected fault the user can fix; its message names what and where (one line)."""


class UsageError(PillsnapError, ValueError):
    """A command line that cannot work as given (a missing input file, a data root one level too deep, a
    device that is not there)."""


class InputError(PillsnapError, ValueError):
    """A file the user gave that cannot be used as it is (a class map, a YOLO dataset, a folder without
    images); the message names the file."""
