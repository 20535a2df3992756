"""Torch's CPU threads, chosen with the loader and the machine's current load in mind.

By default torch runs its intra-op work (the model on a CPU, the batch colour step) on as many threads as
there are cores, and its OpenMP threads spin while they wait. Beside DALI's worker threads (or the PIL
loader's worker processes) and any other busy process on a shared machine, those threads take cores from
the loader and from each other: on 2 shared cores the demo ran ~4x slower with torch's default than with one
torch thread. On a machine that runs nothing else, though, torch's default is the fastest (the demo's loader
waits for the model most of the step): one thread there made the README demo 1.8x slower.

``train.torch_threads: auto`` therefore looks at the machine when the run starts (:func:`others_busy_cores`:
the CPU time the other processes used over a short sample, this process and its children left out):

* idle (other processes busy on less than ``IDLE_CORES`` of a core): all of this process's cores, torch's
  own default, full speed;
* otherwise: the cores the others leave, ``floor(cores - busy + SLACK)``, and at most the cores the loader
  leaves (``cores - loader.threads`` for ``dali`` / ``dali-cpu``, ``- loader.workers`` for ``pil``) when it
  leaves some; at least one (on 2 cores beside one busy process: 1);
* the load unknown, or under torchrun with several processes on the node (the sibling ranks are busy by
  design): the loader rule alone, ``cores - loader``, at least one.

Cores: this process's share, ``available_cores() // LOCAL_WORLD_SIZE``. An integer sets the count outright.
``--threads N`` of the train CLI sets the loader's threads (and so torch's under ``auto`` on a busy machine).
"""
from __future__ import annotations

import logging
import math
import os
import time

import psutil
import torch

from pillsnap_dali.config import AUTO, Config, ConfigError
from pillsnap_dali.sysinfo import available_cores

_logger = logging.getLogger(__name__)

IDLE_CORES = 0.25      # other processes below this share of one core: the machine counts as idle
SLACK = 0.25           # a core busy at most 75 % still counts as free on a busy machine
SAMPLE_SECONDS = 0.3   # how long the machine's load is sampled when a run starts


def process_cores() -> int:
    """The cores this process may use, divided among the processes of this node under torchrun."""
    return max(1, available_cores() // _local_world())


def _local_world() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def loader_cpu_threads(cfg: Config, backend: str) -> int:
    """CPU threads (or worker processes) the loader keeps busy: DALI's threads, or the PIL workers."""
    ld = cfg.loader
    n = ld.workers if backend == "pil" else ld.threads
    return n if isinstance(n, int) else process_cores()  # "auto" not resolved yet: the loader takes all


def _busy_seconds(cpus: list[int]) -> float:
    """Busy CPU seconds of the given CPUs since boot: all but idle and I/O wait (guest time is in user)."""
    percpu = psutil.cpu_times(percpu=True)
    return sum(sum(percpu[c]) - percpu[c].idle - getattr(percpu[c], "iowait", 0.0)
               - getattr(percpu[c], "guest", 0.0) - getattr(percpu[c], "guest_nice", 0.0) for c in cpus)


def _own_seconds(me: psutil.Process) -> float:
    """CPU seconds of this process (all its threads) and its live children."""
    t = me.cpu_times()
    own = t.user + t.system
    for child in me.children(recursive=True):
        try:
            ct = child.cpu_times()
            own += ct.user + ct.system
        except psutil.Error:  # a child that ended during the sample
            pass
    return own


def others_busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores kept busy by other processes over a ``seconds`` sample: the busy time of the CPUs this process may
    run on, minus this process's own (and its children's), per second of the sample. ``nan`` where the
    machine's CPU times cannot be read."""
    try:
        me = psutil.Process()
        ncpu = len(psutil.cpu_times(percpu=True))
        mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(ncpu)
        cpus = [c for c in sorted(mask) if c < ncpu]
        b0, own0, w0 = _busy_seconds(cpus), _own_seconds(me), time.perf_counter()
        time.sleep(seconds)
        b1, own1, w1 = _busy_seconds(cpus), _own_seconds(me), time.perf_counter()
    except (OSError, psutil.Error, IndexError) as e:
        _logger.info("machine load not readable (%s): torch threads chosen as on a busy machine", e)
        return math.nan
    return max(0.0, ((b1 - b0) - (own1 - own0)) / max(w1 - w0, 1e-6))


def auto_threads(cores: int, loader_threads: int, others_busy: float, local_world: int = 1) -> int:
    """The ``auto`` decision, from figures (no measuring): ``cores`` this process may use, the loader's CPU
    threads, the cores other processes keep busy (``nan``: unknown, treated as busy), the processes of this
    node (torchrun's LOCAL_WORLD_SIZE)."""
    if local_world > 1 or math.isnan(others_busy):
        return max(1, cores - loader_threads)
    if others_busy < IDLE_CORES:  # idle machine: torch's own default, every core
        return max(1, cores)
    free = min(cores, math.floor(cores - others_busy + SLACK))
    # the loader's threads keep their cores when they leave some (a loader on every core cannot be given its own)
    return max(1, min(free, cores - loader_threads) if loader_threads < cores else free)


def torch_threads(cfg: Config, backend: str, cores: int | None = None, others_busy: float | None = None) -> int:
    """Torch's intra-op thread count for a run whose loader is ``backend`` (``train.torch_threads``);
    ``others_busy`` (cores busy with other processes) is sampled now when not given."""
    value = cfg.train.torch_threads
    if value != AUTO:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.torch_threads must be auto or an integer >= 1, got {value!r}")
        return value
    cores = process_cores() if cores is None else cores
    local = _local_world()
    if others_busy is None:
        others_busy = others_busy_cores() if local == 1 else math.nan
    n = auto_threads(cores, loader_cpu_threads(cfg, backend), others_busy, local)
    _logger.info("torch threads auto: %d (%d cores, other processes busy on %.2f cores, loader %s with %d CPU "
                 "threads%s)", n, cores, others_busy, backend, loader_cpu_threads(cfg, backend),
                 f", {local} processes on this node" if local > 1 else "")
    return n


def apply_torch_threads(cfg: Config, backend: str) -> int:
    """Set torch's intra-op threads for this run (``torch_threads``); returns the count."""
    n = torch_threads(cfg, backend)
    if n != torch.get_num_threads():
        _logger.info("torch threads %d -> %d (train.torch_threads=%s, loader %s with %d CPU threads)",
                     torch.get_num_threads(), n, cfg.train.torch_threads, backend, loader_cpu_threads(cfg, backend))
    torch.set_num_threads(n)
    return n
