"""The classification training engine, shaped like the torchvision references.

``train_one_epoch`` and ``evaluate`` are functions whose arguments are what they use (the model, the loss,
the optimizer bundle, the loader, the device, the precision); ``Trainer`` builds a run's objects from a
``RunSpec`` and ``fit()`` runs its epochs and decides: when to save, which weights to deploy (``epoch_row``),
when to stop (``stop_reason``, the skip limit of ``badfiles``). What a run writes (metrics.jsonl, checkpoints,
evaluation details) is ``training.run_writer``'s; the checkpoint it resumes from is one ``resume.Resume``.
The model and every weight loading by K-code live in ``training.model``, the resume policy and the run's
state in ``training.resume``. The loop never knows which loader produced a batch (the batch contract in ``loaders/__init__.py``); host-device
syncs happen only at the log points and once per evaluation.

A dry run is one flag, ``RunSpec.dry_run``: ``DRY_RUN_STEPS`` training and validation steps of one epoch, and
nothing written (``RunSpec.out_dir`` is None).
"""
from __future__ import annotations

import contextlib
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
from pillsnap_dali.training.metrics import EvalAccumulator
from pillsnap_dali.training.model import build_model, one_sample_trains
from pillsnap_dali.training.run_writer import RunWriter, training_checkpoint
from pillsnap_dali.training.stop import StopFlag, StopNow
from pillsnap_dali.training.tb import TBWriter
from pillsnap_dali.training.resume import Resume, RunState, non_finite_tensors, planned_steps, rank_rng_state
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.badfiles import skip_limit_problem
from pillsnap_dali.seeds import TORCH, derive_seed

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
    resume: Resume | None = None    # the checkpoint to resume from (``resume.check_resume``): restored once
    stop_signals: list = field(default_factory=lambda: [signal.SIGINT, signal.SIGTERM])
    # what the checkpoint records of the run's inputs (evaluation.run_manifests: the manifests' absolute paths,
    # why there is no test split): export, evaluate and predict find the run's data there
    run_inputs: dict = field(default_factory=dict)

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
    ETA), the run's seed, the log cadence, where the epoch starts (a resumed one), a step limit (dry run) and
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


class EpochTally:
    """An epoch's loss, accuracy and image count without a host-device sync per step: each step's loss is
    copied into a per-epoch device buffer (one small copy), its correct predictions summed on the device, its
    images counted on the host. ``settle()`` (at the log points and the end: the sync) folds the new losses
    into the sum and raises ``TrainingError`` naming the first step whose loss is not finite."""

    def __init__(self, steps: int, device: torch.device, first_step: int, epoch: int):
        self.losses = torch.zeros(max(1, steps), device=device, dtype=torch.float32)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.counts: list[int] = []
        self.seen, self.loss_sum, self.settled = 0, 0.0, 0
        self.first_step, self.epoch = first_step, epoch

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k = len(self.counts)
        if k == len(self.losses):  # more steps than planned: room for as many again
            self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.losses[k] = loss.detach()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.counts.append(labels.numel())
        self.seen += labels.numel()

    def settle(self) -> tuple[float, int, int]:
        """(loss summed over images, correct, images) so far; a sync."""
        new = self.losses[self.settled:len(self.counts)].double().cpu()
        bad = torch.nonzero(~torch.isfinite(new)).flatten()
        if len(bad):
            at = self.first_step + self.settled + int(bad[0]) + 1  # the global step after the bad one
            raise TrainingError(f"the training loss became non-finite at step {at} (epoch {self.epoch}): the run "
                                "stopped without saving these weights (last.pt keeps the last good ones); lower "
                                "train.lr, or check the data")
        self.loss_sum += float((new * torch.tensor(self.counts[self.settled:], dtype=torch.float64)).sum())
        self.settled = len(self.counts)
        return self.loss_sum, int(self.correct.item()), self.seen


def _one_sample_trains(model: nn.Module, batch, precision: Precision, device: torch.device) -> bool:
    plain = _unwrap(model)  # no DDP collective for a probe

    def forward():
        with precision.autocast(device):
            plain(precision.model_input(batch.images))
    return one_sample_trains(plain, forward)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optim: Optim, loader, device: torch.device, epoch: int,
                    *, step: int, precision: Precision, control: EpochControl) -> dict:
    """One epoch (from ``control.start`` of its shard); ``step``: the global step before it. The torch RNG
    (dropout, drop-path) is seeded once at the epoch's start from (seed, epoch, rank) (``seeds.py``); an epoch
    resumed midway goes on with the RNG state restored from its checkpoint, so each step draws what it drew
    before. Raises ``TrainingError`` naming the first step whose loss is not finite."""
    model.train()
    if not control.start:
        torch.manual_seed(derive_seed(control.seed, epoch, control.rank, TORCH))
    loader.set_epoch(epoch, start=control.start)
    tally = EpochTally(len(loader), device, step, epoch)
    data_t = compute_t = 0.0
    bar, steps = Progress(epoch, control, len(loader)), 0
    with _join(model), contextlib.suppress(StopNow):  # a forced stop while waiting for data: a step boundary
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            t1 = time.perf_counter()
            data_t += t1 - t0
            if batch.labels.shape[0] == 1 and not _one_sample_trains(model, batch, precision, device):
                _logger.warning("epoch %d: a batch of one sample (row %s) is left out: BatchNorm cannot train on one "
                                "value per channel", epoch, batch.rows.tolist())
                t0 = time.perf_counter()
                continue
            loss, logits = train_step(model, criterion, optim, batch.images, batch.labels, device, precision,
                                      step + i + 1)
            tally.add(loss, logits, batch.labels)
            steps = i + 1
            if bar.due(steps):  # the only host-device syncs of the training loop
                loss_sum, correct, n = tally.settle()
                n = max(n, 1)
                bar.update(steps, {"loss": loss_sum / n, "acc": correct / n,
                            "img/s": n / max(data_t + compute_t, 1e-9), "data": data_t / max(data_t + compute_t, 1e-9)})
                if control.monitor is not None and control.monitor.available:
                    control.monitor.sample()
                if control.tb is not None:
                    control.tb.step(step + steps, steps, n, loss_sum / n, correct / n, data_t, compute_t,
                                    optim.optimizer.param_groups[0]["lr"], control.monitor)
            stop_now = (control.stop and control.stop.reason) or (control.max_steps and steps >= control.max_steps)
            t0 = time.perf_counter()
            compute_t += t0 - t1  # the step and its logging: a log point's sync waits for the GPU here
            if stop_now:
                break
    bar.close()
    return _epoch_figures(tally.settle(), data_t, compute_t, steps, optim, loader, device, control)


def _epoch_figures(totals: tuple, data_t, compute_t, steps, optim, loader, device, control) -> dict:
    loss_total, n_correct, n = all_reduce(list(totals), device)
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


def skipped_share(loader, device: torch.device) -> tuple[int, int]:
    """(unusable rows, rows) of the split's last epoch over all ranks: rows skipped in it or excluded as
    skipped before."""
    st = loader.epoch_stats()
    rows, bad = all_reduce([st.get("rows", 0), st.get("skipped", 0) + st.get("excluded", 0)], device)
    return int(bad), int(rows)


def epoch_row(epoch: int, tr: dict, res: dict, ema_res: dict | None, skipped_val: int) -> dict:
    """An epoch's metrics line, and the weights its checkpoint deploys (``selected``): the EMA's when they
    score better on validation than the model's (``load_classifier`` follows the checkpoint's ``deploy``)."""
    row = {"epoch": epoch, **tr, "val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"],
           "val_macro_precision": res["macro_precision"], "val_macro_recall": res["macro_recall"],
           "val_macro_f1": res["macro_f1"], "val_images": res["count"], "skipped_val": skipped_val}
    if ema_res is not None:
        row.update({"ema_val_top1": ema_res["top1"], "ema_val_top5": ema_res["top5"]})
    ema_better = ema_res is not None and row["ema_val_top1"] > row["val_top1"]
    row["selected"], row["selected_top1"] = ("ema", row["ema_val_top1"]) if ema_better else ("model", row["val_top1"])
    return row


def stop_reason(cfg: Config, run: RunState, epoch: int, score: float, dry_run: bool) -> str | None:
    """Why the run ends after this epoch (a dry run, the target accuracy, patience), or None."""
    if dry_run:
        return "dry run"
    if cfg.train.target_accuracy is not None and score >= cfg.train.target_accuracy:
        return f"target accuracy {cfg.train.target_accuracy:.2%} reached at epoch {epoch}"
    bad = run.bad_epochs()
    if cfg.train.patience and bad >= cfg.train.patience:
        return f"early stop: no better val top-1 for {bad} epochs"
    return None


def ended_before(cfg: Config, run: RunState, dry_run: bool) -> str | None:
    """A resumed run whose last complete epoch already met a stop rule (target accuracy, patience; killed at
    its final save): the reason, so that no epoch is trained after it; None otherwise."""
    h = run.history
    if dry_run or not h or run.position or h[-1]["epoch"] != run.epoch - 1:
        return None
    reason = stop_reason(cfg, run, h[-1]["epoch"], h[-1]["selected_top1"], dry_run)
    if reason:
        _logger.info("the run had already stopped (%s): nothing more to train", reason)
    return reason


def build_optim(cfg: Config, model: nn.Module, steps_per_epoch: int, device: torch.device) -> Optim:
    """The optimizer bundle: optimizer, warmup + cosine schedule over the run's planned steps, grad scaler,
    EMA (``train.ema``) and the clip norm."""
    optimizer = build_optimizer(cfg, model)
    schedule = lr_lambda_factory(steps_per_epoch * max(1, cfg.train.epochs),
                                 int(cfg.train.warmup_epochs * steps_per_epoch))
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    return Optim(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
                 torch.amp.GradScaler("cuda", enabled=amp_settings(cfg, device)[2]), ema, cfg.train.grad_clip)


def build_criterion(cfg: Config, labels: list[int], num_classes: int, device: torch.device) -> nn.Module:
    w = class_weights(labels, num_classes, cfg.train.class_weights)
    return nn.CrossEntropyLoss(weight=None if w is None else w.to(device), label_smoothing=cfg.train.label_smoothing)


def build_loaders(spec: RunSpec, skip_log) -> tuple:
    """(train, val) loaders of this rank, sharing the run's skip log."""
    cfg, data = spec.cfg, spec.data
    common = dict(cfg=cfg, device=spec.device, backend=cfg.loader.backend, rank=spec.rank,
                  world_size=spec.world_size, skip_log=skip_log, seed=cfg.train.seed)
    return (build_loader(data.train, data.train_labels, train=True,
                         sample_weights=sampler_weights(data.train_labels, cfg), **common),
            build_loader(data.val, data.val_labels, train=False, **common))


class Trainer:
    """One run's objects, built from a ``RunSpec``; ``fit()`` runs its epochs to the end or a stop. What the
    run decides is here; what it writes is its ``RunWriter``'s; what it resumes from, its ``Resume``'s."""

    def __init__(self, spec: RunSpec):
        self.spec, self.cfg, self.device = spec, spec.cfg, spec.device
        cfg, data = spec.cfg, spec.data
        self.writer = RunWriter(spec.out_dir, spec.rank)
        self.skip_log = self.writer.skip_log()  # every rank logs the files it skipped: nothing is lost
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, len(data.class_map), self.device, data.class_map)
        self.ddp = self.model if spec.world_size <= 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_loader, self.val_loader = build_loaders(spec, self.skip_log)
        self.backend = self.train_loader.backend
        apply_torch_threads(cfg, self.backend)  # torch's CPU threads: the cores the loader leaves (threads.py)
        self.run = spec.resume.run_state(rank=spec.rank, world_size=spec.world_size) if spec.resume else RunState()
        if not self.run.steps_per_epoch:  # fixed once per run from the split as given, stored in its checkpoints
            self.run.steps_per_epoch = planned_steps(len(data.train), cfg.train.batch_size,
                                                     cfg.loader.drop_last, spec.world_size)
        self.optim = build_optim(cfg, self.model, self.run.steps_per_epoch, self.device)
        self.precision = Precision(*amp_settings(cfg, self.device)[:2])
        self.criterion = build_criterion(cfg, data.train_labels, len(data.class_map), self.device)
        self.gpu = GpuMonitor(self.device.index or 0) if self.device.type == "cuda" else None
        self.tb = TBWriter.for_run(spec)  # runs/<name>/tb/ on rank 0 (train.tensorboard)
        if spec.resume:  # last: the RNG states it restores are the ones the first resumed step draws from
            o = self.optim
            spec.resume.restore(model=self.model, ema=o.ema, optimizer=o.optimizer, scheduler=o.scheduler,
                                scaler=o.scaler, skip_log=self.skip_log, device=self.device)
        self.t_session = time.perf_counter()

    def fit(self) -> dict:
        """Train, evaluate, checkpoint each epoch until the epochs are done, a stop rule fires or a signal
        comes (then last.pt and the reason; ``--resume`` goes on from there)."""
        cfg, run, stop = self.cfg, self.run, StopFlag(self.spec.stop_signals)
        ended = ended_before(cfg, run, self.spec.dry_run)  # met its target at a save a kill cut short
        reason = ended or "epochs done"
        try:
            for epoch in range(run.epoch, run.epoch if ended else cfg.train.epochs):
                tr = self.train_epoch(epoch, stop)
                if stop.reason:
                    reason = self.interrupted(epoch, stop.reason)
                    break
                try:
                    row = self.evaluate_epoch(epoch, tr)
                except StopNow:  # forced while validation waited for data: trained, not evaluated
                    reason = self.interrupted(epoch, stop.reason, evaluated=False)
                    break
                best = run.record(row)
                self.save(epoch, complete=True, best=best)
                self.writer.epoch_row(row, cfg.train.epochs)
                self.tb.epoch(row)
                if why := stop_reason(cfg, run, epoch, row["selected_top1"], self.spec.dry_run):
                    reason = why
                    break
        finally:
            stop.restore()
            self.close()
        _logger.info("training finished: %s", reason)
        return self.summary(reason, stop)

    def train_epoch(self, epoch: int, stop: StopFlag) -> dict:
        cfg, spec = self.cfg, self.spec
        start, self.run.position = self.run.position, 0  # only the first epoch after a resume is partial
        self.t_epoch = time.perf_counter()
        control = EpochControl(epochs=cfg.train.epochs, seed=cfg.train.seed, rank=spec.rank,
                               log_interval=cfg.train.log_interval, start=start, max_steps=spec.max_steps,
                               stop=stop, show=spec.is_main, monitor=self.gpu, tb=self.tb)
        try:
            tr = train_one_epoch(self.ddp, self.criterion, self.optim, self.train_loader, self.device, epoch,
                                 step=self.run.step, precision=self.precision, control=control)
        except (DeviceMemoryError, PipelineFailure):  # not the data's fault: last.pt, then the clear error
            self.save_interrupted(epoch)
            raise
        self.run.step += tr["steps"]
        if not stop.reason:
            self.check_skipped(self.train_loader, "training")
        return tr

    def evaluate_epoch(self, epoch: int, tr: dict) -> dict:
        """Validation of the model (and its EMA): the epoch's row, with the weights it deploys."""
        kw = dict(precision=self.precision, max_steps=self.spec.max_steps)
        num_classes = len(self.spec.data.class_map)
        res = evaluate(self.model, self.val_loader, self.device, epoch, num_classes, **kw)
        self.check_skipped(self.val_loader, "validation")
        ema = self.optim.ema
        ema_res = evaluate(ema.module, self.val_loader, self.device, epoch, num_classes, **kw) if ema else None
        row = epoch_row(epoch, tr, res, ema_res, int(self.val_loader.epoch_stats().get("skipped", 0)))
        self.run.deploy = row["selected"]
        row["epoch_time"] = time.perf_counter() - self.t_epoch
        self.writer.eval_details(epoch, res, self.spec.data.class_map)
        return row

    def check_skipped(self, loader, split: str) -> None:
        """The skip limit (``badfiles.skip_limit_problem``) on the split's last epoch, over all ranks."""
        if problem := skip_limit_problem(*skipped_share(loader, self.device), split, self.cfg.train.max_skipped,
                                         self.skip_log):
            raise TrainingError(problem)

    def save(self, epoch: int, complete: bool, best: bool) -> None:
        """last.pt (and best.pt, epoch_NNNN.pt); never weights that are not finite (the last good ones stay)."""
        bad = non_finite_tensors(self.model.state_dict())
        if bad:
            raise TrainingError(f"the weights became non-finite in epoch {epoch} (by step {self.run.step}: "
                                f"{', '.join(bad[:3])}); not saved, last.pt keeps the last good ones; lower train.lr")
        if self.writer.writes_checkpoints:
            self.writer.checkpoints(self.checkpoint(epoch, complete), epoch, complete=complete, best=best,
                                    save_every=self.cfg.train.save_every)

    def checkpoint(self, epoch: int, complete: bool) -> dict:
        o, run = self.optim, self.run
        return training_checkpoint(
            cfg=self.cfg, class_map=self.spec.data.class_map, model=self.model, ema=o.ema, optimizer=o.optimizer,
            scheduler=o.scheduler, scaler=o.scaler, backend=self.backend, world_size=self.spec.world_size,
            skipped=self.skip_log.entries, run_inputs=self.spec.run_inputs, run=run.to_checkpoint(epoch, complete, self.train_loader.position,
                                                                 time.perf_counter() - self.t_session))

    def save_interrupted(self, epoch: int) -> None:
        self.run.interruptions += 1
        if self.spec.world_size > 1:
            self.writer.rank_position(epoch=epoch, interruption=self.run.interruptions, step=self.run.step,
                                      position=self.train_loader.position, rng=rank_rng_state(self.device))
        self.save(epoch, complete=False, best=False)

    def interrupted(self, epoch: int, signal_name: str, evaluated: bool = True) -> str:
        """last.pt of the interrupted epoch (not in a dry run); the reason the run ended (``evaluated=False``:
        the epoch was trained and its validation cut short)."""
        self.save_interrupted(epoch)
        if self.spec.dry_run:
            return f"interrupted by {signal_name} (dry run: nothing saved)"
        if not evaluated:
            return f"interrupted by {signal_name} (last.pt saved; --resume evaluates epoch {epoch})"
        return (f"interrupted by {signal_name} (last.pt saved; --resume goes on with epoch {epoch} at row "
                f"{self.train_loader.position})")

    def close(self) -> None:
        self.tb.close()
        self.train_loader.close()
        self.val_loader.close()

    def summary(self, reason: str, stop: StopFlag) -> dict:
        session = time.perf_counter() - self.t_session
        return {"reason": reason, "best_top1": self.run.best_top1, "history": self.run.history,
                "total_time": self.run.elapsed + session, "session_time": session,
                "sessions": self.run.sessions + 1, "backend": self.backend, "interrupted": stop.reason,
                "signal": stop.signum, "best_checkpoint": self.writer.best_checkpoint()}
