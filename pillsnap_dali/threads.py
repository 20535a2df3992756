"""Torch's CPU threads, chosen with the loader in mind.

By default torch runs its intra-op work (the model on a CPU, the batch colour step) on as many threads as
there are cores, and its OpenMP threads spin while they wait. Beside DALI's worker threads (or the PIL
loader's worker processes) and any other busy process on a shared machine, those threads take cores from
the loader and from each other: on 2 shared cores the demo ran ~4x slower with torch's default than with one
torch thread. ``train.torch_threads: auto`` gives torch the cores the loader leaves, at least one:
``cores - loader.threads`` for ``dali`` / ``dali-cpu``, ``cores - loader.workers`` for ``pil`` (cores: this
process's share, ``available_cores() // LOCAL_WORLD_SIZE``); an integer sets it outright. ``--threads N``
of the train CLI sets the loader's threads (and so torch's under ``auto``).
"""
from __future__ import annotations

import logging
import os

import torch

from pillsnap_dali.config import AUTO, Config, ConfigError
from pillsnap_dali.sysinfo import available_cores

_logger = logging.getLogger(__name__)


def process_cores() -> int:
    """The cores this process may use, divided among the processes of this node under torchrun."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, available_cores() // local)


def loader_cpu_threads(cfg: Config, backend: str) -> int:
    """CPU threads (or worker processes) the loader keeps busy: DALI's threads, or the PIL workers."""
    ld = cfg.loader
    n = ld.workers if backend == "pil" else ld.threads
    return n if isinstance(n, int) else process_cores()  # "auto" not resolved yet: the loader takes all


def torch_threads(cfg: Config, backend: str, cores: int | None = None) -> int:
    """Torch's intra-op thread count for a run whose loader is ``backend`` (``train.torch_threads``)."""
    value = cfg.train.torch_threads
    if value != AUTO:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.torch_threads must be auto or an integer >= 1, got {value!r}")
        return value
    cores = process_cores() if cores is None else cores
    return max(1, cores - loader_cpu_threads(cfg, backend))


def apply_torch_threads(cfg: Config, backend: str) -> int:
    """Set torch's intra-op threads for this run (``torch_threads``); returns the count."""
    n = torch_threads(cfg, backend)
    if n != torch.get_num_threads():
        _logger.info("torch threads %d -> %d (train.torch_threads=%s, loader %s with %d CPU threads)",
                     torch.get_num_threads(), n, cfg.train.torch_threads, backend, loader_cpu_threads(cfg, backend))
    torch.set_num_threads(n)
    return n
