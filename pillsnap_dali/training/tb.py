"""TensorBoard event files of a run (``runs/<name>/tb/``), rank 0 only, off with ``train.tensorboard: false``.

Per log interval (x axis: the global step): ``train/loss``, ``train/acc`` (running means of the epoch so
far), ``train/lr``, and the users' old performance tags ``perf/data_time`` / ``perf/compute_time`` (seconds
per step over the interval), ``perf/data_share``, ``perf/throughput`` (images/s over the interval),
``perf/cuda_mem`` (GB allocated by torch, CUDA only), ``perf/gpu_util`` / ``perf/gpu_mem`` (NVML, when
present). Per epoch (x axis: the epoch): ``epoch/*`` with every number of the epoch's metrics row (losses,
val top-1/top-5, macro P/R/F1, EMA top-1, lr, data_time, compute_time, data_share, images/s, GPU means).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from pillsnap_dali.optional import require

_logger = logging.getLogger(__name__)

# metrics rows keys written per epoch under epoch/<key> (numbers only; row keys not listed are left out)
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "val_macro_precision",
              "val_macro_recall", "val_macro_f1", "ema_val_top1", "ema_val_top5", "selected_top1", "lr",
              "data_time", "compute_time", "data_share", "images_per_s", "epoch_time", "skipped_train",
              "skipped_val", "gpu_util_mean", "gpu_mem_peak_gb")


class TBWriter:
    """A ``SummaryWriter`` on ``log_dir`` (None: a no-op, for other ranks, dry runs and tensorboard off)."""

    def __init__(self, log_dir: Path | None):
        self.writer = None
        self._last = (0, 0.0, 0.0, 0)  # (epoch step, data_t, compute_t, images) at the previous log interval
        if log_dir is None:
            return
        require("tensorboard", "tensorboard", "TensorBoard logging (train.tensorboard)",
                "turn it off: --set train.tensorboard=false")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        _logger.info("TensorBoard: tensorboard --logdir %s", log_dir)

    @classmethod
    def for_run(cls, spec) -> "TBWriter":
        on = spec.cfg.train.tensorboard and spec.is_main and spec.run_dir is not None and not spec.dry_run
        return cls(spec.run_dir / "tb" if on else None)

    def step(self, global_step: int, epoch_step: int, images: int, loss: float, acc: float, data_t: float,
             compute_t: float, lr: float, gpu=None) -> None:
        """One log interval; ``images``, ``data_t`` and ``compute_t`` are the epoch's running totals."""
        if self.writer is None:
            return
        last = self._last if epoch_step > self._last[0] else (0, 0.0, 0.0, 0)  # a new epoch starts from zero
        steps, d, c, n = epoch_step - last[0], data_t - last[1], compute_t - last[2], images - last[3]
        self._last = (epoch_step, data_t, compute_t, images)
        w = self.writer.add_scalar
        w("train/loss", loss, global_step)
        w("train/acc", acc, global_step)
        w("train/lr", lr, global_step)
        w("perf/data_time", d / max(steps, 1), global_step)
        w("perf/compute_time", c / max(steps, 1), global_step)
        w("perf/data_share", d / max(d + c, 1e-9), global_step)
        w("perf/throughput", n / max(d + c, 1e-9), global_step)
        self._gpu(global_step, gpu)

    def _gpu(self, global_step: int, gpu) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.writer.add_scalar("perf/cuda_mem", torch.cuda.memory_allocated() / 2**30, global_step)
        if gpu is not None and gpu.samples:
            util, mem = gpu.samples[-1]
            self.writer.add_scalar("perf/gpu_util", util, global_step)
            self.writer.add_scalar("perf/gpu_mem", mem, global_step)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for k in EPOCH_KEYS:
            v = row.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
