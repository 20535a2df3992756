"""Facts about the machine this process runs on, read from the operating system (not from the configuration).

``available_cores``: the CPU cores this process may run on (its affinity mask: a container's or taskset's
share, not the machine's count). ``local_world_size``: the processes torchrun started on this machine
(``LOCAL_WORLD_SIZE``; 1 outside torchrun). ``process_cores``: this process's share of the cores, what
``auto`` thread counts are sized from. Per machine, never per job: under a multi-node torchrun each machine
divides its own cores among its own processes.
"""
from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Processes of this job on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def process_cores() -> int:
    """This process's share of the cores: ``available_cores() // local_world_size()``, at least one."""
    return max(1, available_cores() // local_world_size())
