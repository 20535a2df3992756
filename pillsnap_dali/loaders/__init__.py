"""Input loaders behind one batch contract: ``dali`` (GPU), ``dali-cpu`` and ``pil``.

Every loader yields ``Batch(images, labels, rows)`` on the training device, has ``len()`` = steps per
epoch for its rank, ``set_epoch(e)``, ``epoch_stats()`` (``rows``, ``yielded``, ``skipped``, ``excluded``,
``dropped`` of the last epoch; ``yielded + skipped + excluded + dropped == rows`` after a full epoch),
``.backend`` and ``close()``. Files that cannot be used are skipped and written to the skip log
(``pillsnap_dali.skiplog.SkipLog``, one line per row); they are
excluded from later epochs. The training loop never knows which backend produced a batch.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import torch

from pillsnap_dali.config import Config, ConfigError, memory_layout
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.loaders.common import LoaderSpec
from pillsnap_dali.loaders.pil_loader import PilLoader, pil_eval_transform
from pillsnap_dali.skiplog import SkipLog

if TYPE_CHECKING:
    from pillsnap_dali.loaders.dali_loader import DaliLoader

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "dali-cpu", "pil")

# what the library uses from here (the other names live in their own modules: loaders.common, imageio...)
__all__ = ["BACKENDS", "Loader", "build_loader", "pil_eval_transform", "resolve_backend"]


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> ``dali`` on a CUDA device, ``dali-cpu`` without CUDA, ``pil`` without DALI (logged).

    An explicit choice that cannot run here (``dali`` without CUDA, a DALI backend without DALI) is an error.
    """
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"loader backend must be one of {list(BACKENDS)}, got {name!r}")
    has_dali, cuda = dali_available(), device.type == "cuda" and torch.cuda.is_available()
    if name == "auto":
        chosen = ("dali" if cuda else "dali-cpu") if has_dali else "pil"
        _logger.info("loader backend auto -> %s (DALI %s, training device %s)", chosen,
                     "installed" if has_dali else "not installed", device)
        return chosen
    if name.startswith("dali") and not has_dali:
        raise ConfigError(f"loader backend {name!r} needs NVIDIA DALI (pip install nvidia-dali-cuda120); "
                         "use loader.backend=pil")
    if name == "dali" and not cuda:
        raise ConfigError(f"loader backend 'dali' decodes on the GPU but the training device is {device}; "
                         "use loader.backend=dali-cpu or auto")
    return name


def build_loader(manifest: Manifest, labels: Sequence[int], cfg: Config, *, train: bool, device: torch.device,
                 backend: str = "auto", rank: int = 0, world_size: int = 1, skip_log: SkipLog | None = None,
                 seed: int = 0, sample_weights: Sequence[float] | None = None) -> "Loader":
    """A loader over ``manifest`` (``labels[i]`` is the class id of row ``i``) for this rank.

    ``train=True``: training graph, seeded per-epoch shuffle, ``cfg.loader.drop_last``. ``train=False``:
    evaluation graph (``preprocess.resize_mode``), manifest order, never drops. Batch size is
    ``cfg.train.batch_size``. ``seed`` is the shuffle/augmentation seed (pass ``cfg.train.seed``).
    ``sample_weights`` (training only): draw each epoch's rows with replacement, proportionally to these.
    """
    if len(labels) != len(manifest):
        raise ValueError(f"{len(labels)} labels for a manifest of {len(manifest)} rows")
    device = torch.device(device)
    name = resolve_backend(backend, device)
    spec = LoaderSpec.from_config(cfg, train=train, seed=seed, rank=rank, world_size=world_size)
    # one memory format for batches and model (loader.layout, ``auto`` resolved for the training device)
    spec = dataclasses.replace(spec, loader=dataclasses.replace(
        spec.loader, layout=memory_layout(spec.loader.layout, device.type)))
    if sample_weights is not None:
        spec = dataclasses.replace(spec, sample_weights=np.asarray(sample_weights, dtype=np.float64))
    table = torch.as_tensor(list(labels), dtype=torch.int64).to(device)
    skip_log = skip_log if skip_log is not None else SkipLog(None)
    file_rows = manifest.file_rows or None  # skipped.csv names the file's rows
    if name == "pil":
        return PilLoader(manifest.paths, table, spec, skip_log, file_rows)
    from pillsnap_dali.loaders.dali_loader import DaliLoader
    return DaliLoader(manifest.paths, table, spec, skip_log, name, file_rows)


Loader = Union[PilLoader, "DaliLoader"]
