"""The classification training engine, shaped like the torchvision references.

``train_one_epoch`` and ``evaluate`` are functions whose arguments are what they use (the model, the loss,
the optimizer bundle, the loader, the device, the precision); ``Trainer`` builds a run's objects from a
``RunSpec`` and ``fit()`` runs its epochs, saves checkpoints and decides when to stop. The model and every
weight loading by K-code live in ``training.model``, the resume policy and the run's state in
``training.resume``. The loop never knows which loader produced a batch (design.md's batch contract); host-device
syncs happen only at the log points and once per evaluation.

A dry run is one flag, ``RunSpec.dry_run``: ``DRY_RUN_STEPS`` training and validation steps of one epoch, and
nothing written (``RunSpec.out_dir`` is None).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.loaders.runner import DeviceMemoryError, PipelineFailure
from pillsnap_dali.config import Config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.threads import apply_torch_threads
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.device import native_bf16
from pillsnap_dali.gpumon import GpuMonitor
from pillsnap_dali.training import checkpoint as ckpt
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class
from pillsnap_dali.training import pretrained
from pillsnap_dali.training.model import build_model
from pillsnap_dali.training.stop import StopFlag, StopNow
from pillsnap_dali.training.tb import TBWriter
from pillsnap_dali.training.resume import (RunState, non_finite_tensors, planned_steps, restore_tensors,
                                           resumed_state, rng_state, save_rank_position, step_seed)
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)

DRY_RUN_STEPS = 2         # a dry run: this many training and validation steps of one epoch, nothing written
PROGRESS_SECONDS = 10.0   # a progress line at least this often during a long epoch


class TrainingError(PillsnapError, RuntimeError):
    """The run cannot learn anything more (too many unreadable rows, a non-finite loss or weights): stopped
    with one line that says why; the last good checkpoint stays."""


@dataclass
class TrainData:
    class_map: ClassMap
    train: Manifest
    val: Manifest
    train_labels: list[int]
    val_labels: list[int]


@dataclass
class RunSpec:
    cfg: Config
    data: TrainData
    device: torch.device
    run_dir: Path | None            # the run's folder (a dry run writes nothing in it: see ``out_dir``)
    rank: int = 0
    world_size: int = 1
    dry_run: bool = False
    resume: Path | None = None
    resume_state: dict | None = None  # the resume checkpoint, loaded (and checked) once by the CLI
    stop_signals: list = field(default_factory=lambda: [signal.SIGINT, signal.SIGTERM])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path | None:
        """Where this run writes: its run dir, or None for a dry run."""
        return None if self.dry_run else self.run_dir

    @property
    def max_steps(self) -> int | None:
        """Training and validation steps per epoch: all of them, or ``DRY_RUN_STEPS`` in a dry run."""
        return DRY_RUN_STEPS if self.dry_run else None


def class_weights(labels: list[int], num_classes: int, mode: str, beta: float = 0.999) -> torch.Tensor | None:
    """Loss weights with mean 1 over the classes present: inverse frequency or effective number (Cui 2019)."""
    if mode == "none":
        return None
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).double()
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    if mode == "inv_freq":
        w[present] = 1.0 / counts[present]
    else:
        w[present] = (1 - beta) / (1 - beta ** counts[present])
    w[present] = w[present] / w[present].mean()
    return w.float()


def sampler_weights(labels: list[int], cfg: Config) -> list[float] | None:
    """``train.weighted_sampler``: each row drawn with probability 1 / (rows of its class): balanced classes."""
    if not cfg.train.weighted_sampler:
        return None
    counts = torch.bincount(torch.tensor(labels))
    return (1.0 / counts[torch.tensor(labels)].double()).tolist()


def lr_lambda_factory(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def amp_settings(cfg: Config, device: torch.device, bf16: bool | None = None) -> tuple[bool, torch.dtype | None, bool]:
    """(enabled, dtype, use_scaler): bf16 where the GPU has it natively, else fp16 with a GradScaler; fp32 on
    the CPU or with ``train.amp`` off. ``bf16``: the device's capability (default: ``device.native_bf16``)."""
    if not cfg.train.amp or device.type != "cuda":
        return False, None, False
    if native_bf16(device.index) if bf16 is None else bf16:
        return True, torch.bfloat16, False
    return True, torch.float16, True


@dataclass(frozen=True)
class Precision:
    """How a batch enters the model: the autocast dtype (the memory format is the loader's: ``loader.layout``)."""
    amp: bool = False
    dtype: torch.dtype | None = None

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.amp)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """float16 loader output is cast up where no autocast runs (CPU, amp off); no copy for the memory
        format: the loader delivers the batch in ``loader.layout`` already."""
        if not self.amp and images.dtype != torch.float32:
            images = images.float()
        return images


@dataclass
class Optim:
    """What a training step updates besides the weights."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None    # timm ModelEmaV3
    grad_clip: float = 0.0


@dataclass
class EpochControl:
    """How ``train_one_epoch`` runs, besides what it trains: the run's length (for ``epoch 8/24`` and the
    ETA), the step seed, the log cadence, where the epoch starts (a resumed one), a step limit (dry run) and
    the stop flag."""
    epochs: int
    seed: int
    rank: int = 0
    log_interval: int = 20
    start: int = 0
    max_steps: int | None = None
    stop: StopFlag | None = None
    show: bool = True               # this rank logs progress
    monitor: GpuMonitor | None = None
    tb: TBWriter | None = None       # TensorBoard events at each log point (rank 0, train.tensorboard)


def duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """``epoch 8/24 step 30/120`` with the figures and the ETA of the epoch and the run: a tqdm bar on a
    terminal, else a log line at every log interval and at least every ``PROGRESS_SECONDS``."""

    def __init__(self, epoch: int, control: EpochControl, total: int):
        self.desc, self.total, self.control = f"epoch {epoch}/{control.epochs}", total, control
        self.epochs_after = control.epochs - epoch - 1
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if control.show and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True)

    def due(self, step: int) -> bool:
        return self.control.show and (step % max(1, self.control.log_interval) == 0
                                      or time.perf_counter() - self.last >= PROGRESS_SECONDS)

    def update(self, step: int, info: dict) -> None:
        now = self.last = time.perf_counter()
        per_step = (now - self.t0) / max(1, step)
        eta = max(0, self.total - step) * per_step
        info = {**info, "ETA": f"{duration(eta)} (run {duration(eta + self.epochs_after * self.total * per_step)})"}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()})
        else:
            _logger.info("%s step %d/%d %s", self.desc, step, self.total,
                         " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def all_reduce(values: list, device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over the ranks; the values themselves without torch.distributed."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _join(model: nn.Module):
    if not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return Join([model])


def train_step(model: nn.Module, criterion: nn.Module, optim: Optim, images: torch.Tensor, labels: torch.Tensor,
               device: torch.device, precision: Precision, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; ``step`` is the global step after it (the EMA's warmup counts it)."""
    with precision.autocast(device):
        logits = model(precision.model_input(images))
        loss = criterion(logits.float(), labels)
    optim.optimizer.zero_grad(set_to_none=True)
    optim.scaler.scale(loss).backward()
    if optim.grad_clip > 0:
        optim.scaler.unscale_(optim.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.scheduler.step()
    if optim.ema is not None:
        optim.ema.update(_unwrap(model), step=step)
    return loss, logits


def _raise_if_nan_loss(first_bad: torch.Tensor, epoch: int) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(f"the training loss became non-finite at step {step} (epoch {epoch}): the run stopped "
                            "without saving these weights (last.pt keeps the last good ones); lower train.lr, or "
                            "check the data")


def train_one_epoch(model: nn.Module, criterion: nn.Module, optim: Optim, loader, device: torch.device, epoch: int,
                    *, step: int, precision: Precision, control: EpochControl) -> dict:
    """One epoch (from ``control.start`` of its shard); ``step``: the global step before it. Each step's torch
    RNG (dropout) is seeded from (seed, epoch, step), so a resumed step draws what it drew before. Raises
    ``TrainingError`` naming the first step whose loss is not finite."""
    model.train()
    loader.set_epoch(epoch, start=control.start)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct, seen = (torch.zeros((), device=device, dtype=torch.int64) for _ in range(2))
    dev_step, first_bad = (torch.full((), v, device=device, dtype=torch.int64) for v in (step, -1))
    data_t = compute_t = 0.0
    bar, steps = Progress(epoch, control, len(loader)), 0
    with _join(model), contextlib.suppress(StopNow):  # a forced stop while waiting for data: a step boundary
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            t1 = time.perf_counter()
            data_t += t1 - t0
            torch.manual_seed(step_seed(control.seed, epoch, step + i, control.rank))
            loss, logits = train_step(model, criterion, optim, batch.images, batch.labels, device, precision,
                                      step + i + 1)
            dev_step += 1
            first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad < 0), dev_step, first_bad)
            loss_sum += loss.detach().double() * batch.labels.numel()
            correct += (logits.detach().argmax(1) == batch.labels).sum()
            seen += batch.labels.numel()
            steps = i + 1
            if bar.due(steps):  # the only host-device syncs of the training loop
                _raise_if_nan_loss(first_bad, epoch)
                n = max(int(seen.item()), 1)
                bar.update(steps, {"loss": float(loss_sum.item()) / n, "acc": int(correct.item()) / n,
                            "img/s": n / max(data_t + compute_t, 1e-9), "data": data_t / max(data_t + compute_t, 1e-9)})
                if control.monitor is not None and control.monitor.available:
                    control.monitor.sample()
                if control.tb is not None:
                    control.tb.step(step + steps, steps, n, float(loss_sum.item()) / n, int(correct.item()) / n,
                                    data_t, compute_t, optim.optimizer.param_groups[0]["lr"], control.monitor)
            stop_now = (control.stop and control.stop.reason) or (control.max_steps and steps >= control.max_steps)
            t0 = time.perf_counter()
            compute_t += t0 - t1  # the step and its logging: a log point's sync waits for the GPU here
            if stop_now:
                break
    bar.close()
    _raise_if_nan_loss(first_bad, epoch)
    return _epoch_figures(loss_sum, correct, seen, data_t, compute_t, steps, optim, loader, device, control)


def _epoch_figures(loss_sum, correct, seen, data_t, compute_t, steps, optim, loader, device, control) -> dict:
    loss_total, n_correct, n = all_reduce([loss_sum.item(), correct.item(), seen.item()], device)
    wall = data_t + compute_t
    nan = float("nan")  # no training image (an epoch resumed after its last step): no train loss, not 0
    out = {"train_loss": loss_total / n if n else nan, "train_acc": n_correct / n if n else nan,
           "train_images": int(n), "data_time": data_t, "compute_time": compute_t,
           "data_share": data_t / max(wall, 1e-9), "images_per_s": n / max(all_reduce([wall], device, "max")[0], 1e-9),
           "steps": steps, "lr": optim.optimizer.param_groups[0]["lr"]}
    out["skipped_train"] = int(loader.epoch_stats().get("skipped", 0))
    if control.start:
        out["resumed_from_row"] = control.start  # the train figures cover the rest of the epoch only
    if control.monitor is not None:
        out.update(control.monitor.summary())
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, epoch: int, num_classes: int, *,
             precision: Precision, max_steps: int | None = None) -> dict:
    """Loss (summed cross-entropy), top-1/top-5, macro P/R/F1 and the confusion matrix over ``loader``'s split
    (every rank's shard, reduced)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loader.set_epoch(epoch)
    acc = EvalAccumulator(num_classes, device)
    for i, batch in enumerate(loader):
        with precision.autocast(device):
            logits = model(precision.model_input(batch.images)).float()
        acc.update(logits, batch.labels, criterion(logits, batch.labels))
        if max_steps and i + 1 >= max_steps:
            break
    acc.all_reduce()
    return acc.compute()


def skipped_share(loader, device: torch.device) -> tuple[float, int, int]:
    """(share, unusable rows, rows) of the split's last epoch over all ranks: rows skipped in it or excluded as
    skipped before."""
    st = loader.epoch_stats()
    rows, bad = all_reduce([st.get("rows", 0), st.get("skipped", 0) + st.get("excluded", 0)], device)
    return (bad / rows if rows else 0.0), int(bad), int(rows)


def top_reasons(entries: list[dict], n: int = 3) -> str:
    counts = collections.Counter(str(e.get("reason", ""))[:80] for e in entries)
    return "; ".join(f"{r} ({c})" for r, c in counts.most_common(n))


class Trainer:
    """Builds one run (model, loaders, optimizer bundle, run state) from a ``RunSpec``; ``fit()`` runs it to
    the end or a stop."""

    def __init__(self, spec: RunSpec):
        self.spec, self.cfg, self.device = spec, spec.cfg, spec.device
        cfg, data = spec.cfg, spec.data
        torch.manual_seed(cfg.train.seed)
        self.num_classes = len(data.class_map)
        self.model = build_model(cfg, self.num_classes, self.device, data.class_map)
        self.ddp = self.model if spec.world_size <= 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # every rank logs the files it skipped (rank 0: skipped.csv, rank r: skipped.rank<r>.csv): nothing is lost
        out = spec.out_dir
        self.skip_log = SkipLog(out / ("skipped.csv" if spec.is_main else f"skipped.rank{spec.rank}.csv")
                                if out else None)
        if spec.is_main:
            self.skip_log.ensure_file()  # a run that skipped nothing says so with an empty skipped.csv
        common = dict(cfg=cfg, device=self.device, backend=cfg.loader.backend, rank=spec.rank,
                      world_size=spec.world_size, skip_log=self.skip_log, seed=cfg.train.seed)
        self.train_loader = build_loader(data.train, data.train_labels, train=True,
                                         sample_weights=sampler_weights(data.train_labels, cfg), **common)
        self.val_loader = build_loader(data.val, data.val_labels, train=False, **common)
        self.backend = self.train_loader.backend
        apply_torch_threads(cfg, self.backend)  # torch's CPU threads: the cores the loader leaves (threads.py)
        self.run = (resumed_state(spec.resume, spec.resume_state, rank=spec.rank, world_size=spec.world_size)
                    if spec.resume else RunState())
        if not self.run.steps_per_epoch:  # fixed once per run from the split as given, stored in its checkpoints
            self.run.steps_per_epoch = planned_steps(len(data.train), cfg.train.batch_size,
                                                     cfg.loader.drop_last, spec.world_size)
        self.optim = self._build_optim()
        amp, dtype, _ = amp_settings(cfg, self.device)
        self.precision = Precision(amp, dtype)
        w = class_weights(data.train_labels, self.num_classes, cfg.train.class_weights)
        self.criterion = nn.CrossEntropyLoss(weight=None if w is None else w.to(self.device),
                                             label_smoothing=cfg.train.label_smoothing)
        self.gpu = GpuMonitor(self.device.index or 0) if self.device.type == "cuda" else None
        self.tb = TBWriter.for_run(spec)  # runs/<name>/tb/ on rank 0 (train.tensorboard)
        if spec.resume:
            self._restore(spec.resume_state)
            spec.resume_state = None  # its tensors are copied into the model and optimizer: not kept for the run
        self.t_session = time.perf_counter()

    def _build_optim(self) -> Optim:
        cfg, per_epoch = self.cfg, self.run.steps_per_epoch
        optimizer = build_optimizer(cfg, self.model)
        schedule = lr_lambda_factory(per_epoch * max(1, cfg.train.epochs), int(cfg.train.warmup_epochs * per_epoch))
        ema = None
        if cfg.train.ema:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay)
        return Optim(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
                     torch.amp.GradScaler("cuda", enabled=amp_settings(cfg, self.device)[2]), ema,
                     cfg.train.grad_clip)

    def _restore(self, st: dict) -> None:
        o = self.optim
        restore_tensors(st, model=self.model, ema=o.ema, optimizer=o.optimizer, scheduler=o.scheduler,
                        scaler=o.scaler)
        for e in st["skipped"]:  # files skipped before the stop stay skipped, wherever the run dir is
            if e["path"] not in self.skip_log:
                self.skip_log.add(int(e["row"]), e["path"], e["reason"], e["backend"], int(e["epoch"]))
        r = self.run
        _logger.info("resumed from %s: next epoch %d (from row %d of its shard), step %d, best top-1 %.4f",
                     self.spec.resume, r.epoch, r.position, r.step, r.best_top1)

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, epoch: int, complete: bool) -> dict:
        cfg, o = self.cfg, self.optim
        run = self.run.to_checkpoint(epoch, complete, self.train_loader.position)
        run.update(elapsed=self.run.elapsed + time.perf_counter() - self.t_session, sessions=self.run.sessions + 1)
        return {"format": ckpt.FORMAT, "model_name": cfg.model.name, "num_classes": self.num_classes,
                "model": self.model.state_dict(), "ema": o.ema.module.state_dict() if o.ema else None,
                "optimizer": o.optimizer.state_dict(), "scheduler": o.scheduler.state_dict(),
                "scaler": o.scaler.state_dict(), "rng": rng_state(), "config": cfg.to_dict(),
                "class_map": self.spec.data.class_map.to_dict(), "preprocess": ckpt.preprocess_dict(cfg.preprocess),
                "backend": self.backend, "world_size": self.spec.world_size,
                "skipped": [dict(e) for e in self.skip_log.entries],
                "weights_origin": pretrained.weights_origin(self.model, cfg), **run}

    def save(self, epoch: int, complete: bool, best: bool) -> None:
        """last.pt (and best.pt, epoch_NNNN.pt); never weights that are not finite (the last good ones stay)."""
        bad = non_finite_tensors(self.model.state_dict())
        if bad:
            raise TrainingError(f"the weights became non-finite in epoch {epoch} (by step {self.run.step}: "
                                f"{', '.join(bad[:3])}); not saved, last.pt keeps the last good ones; lower train.lr")
        if not (self.spec.out_dir and self.spec.is_main):
            return
        d = self.spec.out_dir / "checkpoints"
        every = self.cfg.train.save_every
        extra = (d / f"epoch_{epoch + 1:04d}.pt",) if complete and every and (epoch + 1) % every == 0 else ()
        ckpt.save_pair(d, self.checkpoint(epoch, complete), best=best, extra=extra)  # last.pt first: ckpt docs

    def _save_interrupted(self, epoch: int) -> None:
        self.run.interruptions += 1
        out = self.spec.out_dir
        if out and self.spec.world_size > 1:
            save_rank_position(out / "checkpoints", self.spec.rank, epoch=epoch, interruption=self.run.interruptions,
                               step=self.run.step, position=self.train_loader.position)
        self.save(epoch, complete=False, best=False)

    # ---- the run -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, spec, run = self.cfg, self.spec, self.run
        stop = StopFlag(spec.stop_signals)
        reason = "epochs done"
        ended = self._ended_before()  # stopped by its target at a save a kill cut short: no extra epoch
        try:
            for epoch in range(run.epoch, cfg.train.epochs if ended is None else run.epoch):
                try:
                    tr = self._train_epoch(epoch, stop)
                except (DeviceMemoryError, PipelineFailure):  # not the data's fault: last.pt, then the clear error
                    self._save_interrupted(epoch)
                    raise
                if stop.reason:
                    self._save_interrupted(epoch)
                    reason = (f"interrupted by {stop.reason} (dry run: nothing saved)" if spec.dry_run else
                              f"interrupted by {stop.reason} (last.pt saved; --resume goes on with epoch {epoch} "
                              f"at row {self.train_loader.position})")
                    break
                try:
                    row = self._evaluate_epoch(epoch, tr)
                except StopNow:  # forced while validation waited for data: the epoch is trained, not evaluated
                    self._save_interrupted(epoch)
                    reason = f"interrupted by {stop.reason} (last.pt saved; --resume evaluates epoch {epoch})"
                    break
                improved = row["selected_top1"] > run.best_top1  # of the weights this epoch's checkpoint deploys
                run.best_top1 = max(run.best_top1, row["selected_top1"])
                row["best"] = improved
                run.history.append(row)
                self.save(epoch, complete=True, best=improved)
                self._log_epoch(row)
                self.tb.epoch(row)
                reason = self._stop_reason(epoch, row["selected_top1"])
                if reason:
                    break
            reason = ended or reason or "epochs done"
        finally:
            stop.restore()
            self.tb.close()
            self.train_loader.close()
            self.val_loader.close()
        _logger.info("training finished: %s", reason)
        return self._summary(reason, stop)

    def _ended_before(self) -> str | None:
        """A resumed run whose last complete epoch already met a stop condition (target accuracy, patience):
        the reason, so that no epoch is trained after it; None otherwise."""
        h = self.run.history
        if self.spec.dry_run or not h or self.run.position or h[-1]["epoch"] != self.run.epoch - 1:
            return None
        reason = self._stop_reason(h[-1]["epoch"], h[-1]["selected_top1"])
        if reason:
            _logger.info("the run had already stopped (%s): nothing more to train", reason)
        return reason

    def _stop_reason(self, epoch: int, score: float) -> str | None:
        cfg = self.cfg
        if self.spec.dry_run:
            return "dry run"
        if cfg.train.target_accuracy is not None and score >= cfg.train.target_accuracy:
            return f"target accuracy {cfg.train.target_accuracy:.2%} reached at epoch {epoch}"
        bad = self.run.bad_epochs()
        if cfg.train.patience and bad >= cfg.train.patience:
            return f"early stop: no better val top-1 for {bad} epochs"
        return None

    def _summary(self, reason: str, stop: StopFlag) -> dict:
        session = time.perf_counter() - self.t_session
        out = self.spec.out_dir
        best = out / "checkpoints" / "best.pt" if out else None
        return {"reason": reason, "best_top1": self.run.best_top1, "history": self.run.history,
                "total_time": self.run.elapsed + session, "session_time": session,
                "sessions": self.run.sessions + 1, "backend": self.backend, "interrupted": stop.reason,
                "signal": stop.signum, "best_checkpoint": str(best) if best and best.exists() else None}

    def _train_epoch(self, epoch: int, stop: StopFlag) -> dict:
        cfg, spec = self.cfg, self.spec
        start, self.run.position = self.run.position, 0  # only the first epoch after a resume is partial
        self._t_epoch = time.perf_counter()
        control = EpochControl(epochs=cfg.train.epochs, seed=cfg.train.seed, rank=spec.rank,
                               log_interval=cfg.train.log_interval, start=start, max_steps=spec.max_steps,
                               stop=stop, show=spec.is_main, monitor=self.gpu, tb=self.tb)
        tr = train_one_epoch(self.ddp, self.criterion, self.optim, self.train_loader, self.device, epoch,
                             step=self.run.step, precision=self.precision, control=control)
        self.run.step += tr["steps"]
        if not stop.reason:
            self._check_skipped(self.train_loader, "training")
        return tr

    def _check_skipped(self, loader, split: str) -> None:
        """Stop when more than ``train.max_skipped`` of a split's rows could not be read: such a run learns
        from too little of its data (an unmounted disk, a wrong data root) to be worth its time."""
        share, bad, rows = skipped_share(loader, self.device)
        limit = self.cfg.train.max_skipped
        if share > limit:
            raise TrainingError(f"{bad} of the {rows} {split} rows ({share:.0%}) could not be read, more than "
                                f"train.max_skipped={limit:.0%}; top reasons: {top_reasons(self.skip_log.entries)} "
                                f"(every file in {self.skip_log.path or 'the skip log'})")

    def _evaluate_epoch(self, epoch: int, tr: dict) -> dict:
        spec = self.spec
        kw = dict(precision=self.precision, max_steps=spec.max_steps)
        res = evaluate(self.model, self.val_loader, self.device, epoch, self.num_classes, **kw)
        self._check_skipped(self.val_loader, "validation")
        row = {"epoch": epoch, **tr, "val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"],
               "val_macro_precision": res["macro_precision"], "val_macro_recall": res["macro_recall"],
               "val_macro_f1": res["macro_f1"], "val_images": res["count"],
               "skipped_val": int(self.val_loader.epoch_stats().get("skipped", 0))}
        if self.optim.ema is not None:
            ema_res = evaluate(self.optim.ema.module, self.val_loader, self.device, epoch, self.num_classes, **kw)
            row.update({"ema_val_top1": ema_res["top1"], "ema_val_top5": ema_res["top5"]})
        # the weights this epoch's checkpoint deploys (load_classifier follows "deploy"): the better of the two
        ema_better = self.optim.ema is not None and row["ema_val_top1"] > row["val_top1"]
        self.run.deploy = "ema" if ema_better else "model"
        row["selected"], row["selected_top1"] = self.run.deploy, row["ema_val_top1"] if ema_better else row["val_top1"]
        row["epoch_time"] = time.perf_counter() - self._t_epoch
        self._write_eval_details(epoch, res)
        return row

    def _write_eval_details(self, epoch: int, res: dict) -> None:
        d = self.spec.out_dir
        if not (d and self.spec.is_main):
            return
        cm = self.spec.data.class_map
        write_per_class(d / "per_class.csv", res, cm)
        (d / "confusions.json").write_text(json.dumps({"epoch": epoch, "pairs": top_confusions(res, cm, 20)},
                                                      ensure_ascii=False, indent=1), encoding="utf-8")

    def _log_epoch(self, row: dict) -> None:
        if not self.spec.is_main:
            return
        _logger.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f top-1 %.4f top-5 %.4f F1 %.4f | "
                     "%.1f img/s, data %.0f%%%s", row["epoch"], self.cfg.train.epochs, row["train_loss"],
                     row["train_acc"], row["val_loss"], row["val_top1"], row["val_top5"], row["val_macro_f1"],
                     row["images_per_s"], 100 * row["data_share"],
                     (f" | EMA top-1 {row['ema_val_top1']:.4f}" + (" (deployed)" if row["selected"] == "ema" else "")
                      if "ema_val_top1" in row else "") + (" *best*" if row["best"] else ""))
        if self.spec.out_dir:
            with open(self.spec.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
