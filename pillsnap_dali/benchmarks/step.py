"""Model-only throughput on synthetic input: the ceiling a real run's data_time share is judged against."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from pillsnap_dali.config import Config, memory_layout
from pillsnap_dali.training.engine import amp_settings, build_optimizer
from pillsnap_dali.training.model import build_model
from pillsnap_dali.loaders import resolve_backend
from pillsnap_dali.threads import others_busy_cores, process_cores, torch_threads

_logger = logging.getLogger(__name__)
PROGRESS_SECONDS = 10.0   # a progress line at least this often (a 384 px model on a CPU takes minutes)


class Ticker:
    """Logs ``label: done/total steps`` when ``PROGRESS_SECONDS`` have passed since the last line."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.last = time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        if time.perf_counter() - self.last >= PROGRESS_SECONDS:
            self.last = time.perf_counter()
            _logger.info("%s: %d/%d steps", self.label, self.done, self.total)


def bench_step(cfg: Config, *, device: torch.device, batch: int, steps: int = 10, warmup: int = 3,
               reps: int = 3, num_classes: int = 1000) -> dict:
    """Training steps (forward, backward, optimizer) on a batch that never leaves the device.

    Returns images/s: median, min and max over ``reps`` timed runs of ``steps`` steps after ``warmup``.
    """
    torch.manual_seed(0)
    # speed only: random weights (a stage's default ImageNet weights would be fetched and change nothing here)
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None)), num_classes,
                        device).train()
    opt = build_optimizer(cfg, model)
    amp, dtype, use_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    s = cfg.preprocess.img_size
    x = torch.randn(batch, 3, s, s, device=device)
    if memory_layout(cfg.loader.layout, device.type) == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss()

    def one():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # timing boundary only, not inside the measured loop

    ticker = Ticker(f"bench step {cfg.model.name} @{s} px, batch {batch}", warmup + reps * steps)
    for _ in range(warmup):
        one()
        ticker.tick()
    sync()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
            ticker.tick()
        sync()
        rates.append(batch * steps / (time.perf_counter() - t0))
    out = {"model": cfg.model.name, "img_size": s, "batch": batch, "device": str(device), "amp": str(dtype),
           "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "reps": reps,
           "steps": steps}
    _logger.info("model-only %s @%d px, batch %d on %s: %.1f img/s (median of %d)", cfg.model.name, s, batch,
                 device, out["images_per_s"], reps)
    return out


_DETACHED_LOOP = ("import subprocess, sys\n"
                  "p = subprocess.Popen([sys.executable, '-c', 'while True: pass'], start_new_session=True,\n"
                  "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                  "print(p.pid)")


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` competing processes, each a Python busy loop on one core, for the duration of the block. They are
    started detached (through a parent that exits at once), so they are no children of this process: the
    ``auto`` thread rule leaves this process's children out of the load it samples, and another user's job
    on the machine is no child of a training run either. Yields their pids."""
    pids = []
    try:
        for _ in range(n):
            out = subprocess.run([sys.executable, "-c", _DETACHED_LOOP], capture_output=True, text=True, check=True,
                                 timeout=60)
            pids.append(int(out.stdout.strip()))
        yield pids
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def bench_step_threads(cfg: Config, *, settings: list[str], busy: list[int], **kw) -> list[dict]:
    """``bench_step`` under each torch thread setting (``torch``: torch's default, one per core; ``auto``:
    ``pillsnap_dali.threads``' choice for the config's loader and the machine's load, sampled beside the busy
    processes as a run starting then would; or a number), idle and beside each count of busy processes; one
    result per (busy, setting), the settings interleaved per busy level. Each result records the load it was
    taken under: ``others_busy`` (cores other processes kept busy, sampled before the setting's run) and
    ``loadavg`` (the 1-minute load average before and after it)."""

    default = torch.get_num_threads()
    backend = resolve_backend(cfg.loader.backend, kw["device"])
    out = []
    for n_busy in busy:
        with busy_processes(n_busy):
            for setting in settings:
                load0, others = os.getloadavg()[0], others_busy_cores()
                n = process_cores() if setting == "torch" else torch_threads(
                    dataclasses.replace(cfg, train=dataclasses.replace(
                        cfg.train, torch_threads=setting if setting == "auto" else int(setting))), backend,
                    others_busy=others)
                torch.set_num_threads(n)
                res = bench_step(cfg, **kw)
                out.append({**res, "torch_threads": n, "setting": setting, "busy": n_busy,
                            "others_busy": round(others, 2), "loadavg": [load0, os.getloadavg()[0]]})
                _logger.info("busy %d, torch threads %s (%d): %.1f img/s; others busy on %.2f cores, load average "
                             "%.2f -> %.2f", n_busy, setting, n, res["images_per_s"], others, load0,
                             os.getloadavg()[0])
    torch.set_num_threads(default)
    return out
