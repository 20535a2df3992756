"""``python -m pillsnap_dali.bench epochs``: memory of the classification loader over many short epochs.

One training loader (``loaders.build_loader``, so it measures whatever the loader does: a pipeline rebuilt
per epoch or one that lives across epochs) over a small generated JPEG set; after each full epoch the RSS of
this process tree and, on a GPU, NVML device memory. Reports first / last / max and the least-squares slope
per epoch (a leak grows linearly; a pool that settles shows a flat slope after the first epochs).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from pillsnap_dali.benchmarks.loaders import _bench_config, bench_manifest, write_bench_images
from pillsnap_dali.gpumon import GpuMonitor
from pillsnap_dali.loaders import build_loader, resolve_backend

_logger = logging.getLogger(__name__)


def tree_rss_mb() -> float:
    """RSS of this process and its live children, MB."""
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def slope_per_epoch(values: list[float], skip: int = 1) -> float:
    """Least-squares slope of ``values`` against the epoch number, leaving out the first ``skip`` epochs
    (pools and caches fill there)."""
    ys = np.asarray(values[skip:], dtype=np.float64)
    if len(ys) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(ys)), ys, 1)[0])


def _summary(values: list[float]) -> dict:
    return {"first": values[0], "last": values[-1], "max": max(values), "slope_per_epoch": slope_per_epoch(values)}


def bench_epochs(workdir: str | Path, *, epochs: int = 30, images: int = 32, size: int = 64, batch: int = 16,
                 threads: int = 2, backend: str = "auto") -> dict:
    """Run ``epochs`` full training epochs of ``backend`` (auto: ``dali`` with CUDA, else ``dali-cpu``) over
    ``images`` generated 244x320 JPEGs at ``size`` px; RSS (MB) and NVML device memory (GB) after each."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = resolve_backend(("dali" if cuda else "dali-cpu") if backend == "auto" else backend, device)
    paths = [str(p) for p in write_bench_images(Path(workdir), images, fmt="jpeg", size=(244, 320))]
    loader = build_loader(bench_manifest(paths), [0] * len(paths), _bench_config(size, batch, threads),
                          train=True, device=device, backend=backend)
    gpu = GpuMonitor(0) if cuda else None
    rss, dev_gb, seconds = [], [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        seconds.append(time.perf_counter() - t0)
        rss.append(tree_rss_mb())
        if gpu is not None and gpu.available:
            dev_gb.append(gpu.sample()["gpu_mem_used_gb"])
        _logger.info("epoch %d/%d: RSS %.1f MB%s", epoch + 1, epochs, rss[-1],
                     f", device {dev_gb[-1]:.2f} GB" if dev_gb else "")
    loader.close()
    out = {"backend": backend, "epochs": epochs, "images": len(paths), "size": size, "batch": batch,
           "threads": threads, "rss_mb": rss, "rss": _summary(rss), "epoch_s_median": float(np.median(seconds))}
    if dev_gb:
        out.update(device_mem_gb=dev_gb, device_mem=_summary(dev_gb))
    return out
