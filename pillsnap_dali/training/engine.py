"""The classification training engine: train_one_epoch / evaluate / fit, backend-blind.

The loop never knows which loader produced a batch (design.md's batch contract). Host-device syncs
happen only at the log interval and once per evaluation.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from pillsnap_dali.training import checkpoint as ckpt
from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.config import Config
from pillsnap_dali.gpumon import GpuMonitor
from pillsnap_dali.threads import apply_torch_threads
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class

_logger = logging.getLogger(__name__)


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
    run_dir: Path | None            # None: write nothing (dry run)
    rank: int = 0
    world_size: int = 1
    dry_run: bool = False
    resume: Path | None = None
    resume_state: dict | None = None  # the resume checkpoint, when the CLI loaded it already (checked once)
    max_steps: int | None = None    # dry run: stop after this many training steps
    stop_signals: list = field(default_factory=lambda: [signal.SIGINT, signal.SIGTERM])

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def build_model(cfg: Config, num_classes: int, device: torch.device, class_map: ClassMap | None = None) -> nn.Module:
    import timm

    model = timm.create_model(cfg.model.name, num_classes=num_classes, pretrained=False,
                              drop_rate=cfg.model.drop_rate)
    if cfg.model.pretrained:
        _load_pretrained(model, cfg.model.pretrained, class_map, cfg.model.pretrained_class_map)
    model.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _head_names(model: nn.Module, own: dict) -> list[str]:
    """Keys of ``own`` (the model's state dict) in the classifier head (timm's ``default_cfg["classifier"]``)."""
    head = (getattr(model, "default_cfg", None) or {}).get("classifier")
    heads = head if isinstance(head, (list, tuple)) else [head] if head else []
    return [k for k in own if any(k.startswith(h + ".") for h in heads)]


def _load_pretrained(model: nn.Module, path: str, class_map: ClassMap | None = None,
                     pretrained_class_map: str | None = None) -> None:
    """Local weights only. The backbone is loaded by name and shape; the classifier head by K-code: each
    class of ``class_map`` that the weights' own class map (a pillsnap checkpoint's, or
    ``pretrained_class_map`` for a plain state dict) knows gets its head row, the others start fresh. A
    plain state dict without a class map leaves its head out: its rows' K-codes are unknown."""
    src_map = None
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        raw = ckpt.load_checkpoint(path)
        if isinstance(raw, dict) and raw.get("format") == ckpt.FORMAT and raw.get("class_map"):
            src_map = ClassMap.from_dict(raw["class_map"])
            raw = ckpt.deployed_weights(raw, without_key="model")  # the weights its best top-1 was measured on
        sd = ckpt.unwrap_state_dict(raw)
    if pretrained_class_map:
        src_map = ClassMap.load(pretrained_class_map)
    sd = ckpt.strip_prefixes(sd)
    own = model.state_dict()
    heads = set(_head_names(model, own))
    keep = {k: v for k, v in sd.items() if k in own and k not in heads and own[k].shape == v.shape}
    rows = _head_rows(sd, own, heads, src_map, class_map, path)
    keep.update(rows)
    dropped = sorted(set(sd) - set(keep))
    model.load_state_dict(keep, strict=False)
    _logger.info("loaded %d tensors from %s (%d left out: head without a class map, shape or name mismatch, "
                 "e.g. %s)", len(keep), path, len(dropped), dropped[:3])
    if not keep:
        raise ckpt.CheckpointError(f"{path}: no tensor matches model {type(model).__name__}")


def _head_rows(sd: dict, own: dict, heads: set, src_map: ClassMap | None, class_map: ClassMap | None,
               path: str) -> dict:
    """Head tensors with each shared K-code's row copied from ``sd`` (by code, never by position)."""
    if not heads or src_map is None or class_map is None:
        if heads and any(k in sd for k in heads):
            _logger.warning("%s: classifier head left out (no class map for its rows: pass "
                            "model.pretrained_class_map); it starts fresh", path)
        return {}
    shared = [c for c in class_map.codes if c in src_map.index]
    out = {}
    for k in heads:
        if k not in sd or sd[k].shape[0] != len(src_map) or sd[k].shape[1:] != own[k].shape[1:]:
            _logger.warning("%s: head tensor %s has %s rows for a class map of %d codes: head left out, it starts "
                            "fresh", path, k, tuple(sd[k].shape) if k in sd else "no", len(src_map))
            return {}
        t = own[k].clone()
        if shared:
            dst = torch.tensor([class_map.index[c] for c in shared])
            src = torch.tensor([src_map.index[c] for c in shared])
            t[dst] = sd[k][src].to(t.dtype)
        out[k] = t
    _logger.info("classifier head: %d of %d classes carried over by K-code from %s (%d new)", len(shared),
                 len(class_map), path, len(class_map) - len(shared))
    return out


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


def amp_settings(cfg: Config, device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(enabled, dtype, use_scaler): bf16 where supported, else fp16 with a scaler; fp32 on CPU."""
    if not cfg.train.amp or device.type != "cuda":
        return False, None, False
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, False
    return True, torch.float16, True


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save last.pt, leave cleanly."""

    def __init__(self, signals):
        self.reason: str | None = None
        self._old = {}
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (tests): signals stay as they are
                pass

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        _logger.warning("%s received: finishing this step, then saving last.pt", self.reason)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class Progress:
    """A tqdm bar on a terminal; plain periodic log lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self.desc = desc

    def update(self, step: int, total: int, info: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in info.items()})
        else:
            _logger.info("%s step %d/%d %s", self.desc, step, total,
                         " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Owns the model, optimizer and loaders of one run; ``fit()`` runs it to the end or a stop."""

    def __init__(self, spec: RunSpec):
        from pillsnap_dali.loaders import SkipLog, build_loader

        self.spec, self.cfg, self.device = spec, spec.cfg, spec.device
        cfg, data = spec.cfg, spec.data
        torch.manual_seed(cfg.train.seed)
        self.num_classes = len(data.class_map)
        self.model = build_model(cfg, self.num_classes, self.device, spec.data.class_map)
        self.ddp = self._wrap_ddp(self.model)
        # every rank logs the files it skipped (rank 0: skipped.csv, rank r: skipped.rank<r>.csv): nothing is lost
        skip_name = "skipped.csv" if spec.is_main else f"skipped.rank{spec.rank}.csv"
        self.skip_log = SkipLog(spec.run_dir / skip_name if spec.run_dir and not spec.dry_run else None)
        if spec.is_main:
            self.skip_log.ensure_file()  # a run that skipped nothing says so with an empty skipped.csv
        common = dict(cfg=cfg, device=self.device, backend=cfg.loader.backend, rank=spec.rank,
                      world_size=spec.world_size, skip_log=self.skip_log, seed=cfg.train.seed)
        self.train_loader = build_loader(data.train, data.train_labels, train=True,
                                         sample_weights=sampler_weights(data.train_labels, cfg), **common)
        self.val_loader = build_loader(data.val, data.val_labels, train=False, **common)
        self.backend = self.train_loader.backend
        apply_torch_threads(cfg, self.backend)  # torch's CPU threads: the cores the loader leaves (threads.py)
        self.optimizer = build_optimizer(cfg, self.model)
        steps = max(1, len(self.train_loader)) * max(1, cfg.train.epochs)
        warm = int(cfg.train.warmup_epochs * len(self.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_factory(steps, warm))
        self.amp, self.amp_dtype, use_scaler = amp_settings(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        w = class_weights(data.train_labels, self.num_classes, cfg.train.class_weights)
        self.criterion = nn.CrossEntropyLoss(weight=None if w is None else w.to(self.device),
                                             label_smoothing=cfg.train.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss(reduction="sum")
        self.ema = None
        self.deploy = "model"  # which weights a checkpoint's user should take: "model" or "ema"
        self.bad_epochs = self.resume_position = 0
        self.interruptions = 0  # counted alike on every rank: pairs rank r's position file with the checkpoint
        if cfg.train.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.train.ema_decay)
        self.gpu = GpuMonitor(self.device.index or 0) if self.device.type == "cuda" else None
        self.start_epoch, self.global_step, self.best_top1, self.history = 0, 0, -1.0, []
        if spec.resume:
            self.restore(spec.resume, spec.resume_state)
            spec.resume_state = None  # its tensors are copied into the model and optimizer: not kept for the run

    def _wrap_ddp(self, model):
        if self.spec.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state(self, epoch: int, complete: bool) -> dict:
        cfg = self.cfg
        return {"format": ckpt.FORMAT, "model_name": cfg.model.name, "num_classes": self.num_classes,
                "model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "epoch_complete": complete,
                "step": self.global_step, "rng": ckpt.rng_state(), "config": cfg.to_dict(),
                "class_map": self.spec.data.class_map.to_dict(), "preprocess": cfg.to_dict()["preprocess"],
                "best_top1": self.best_top1, "history": self.history, "backend": self.backend,
                "deploy": self.deploy,
                # an interrupted epoch: the rows of this rank's shard already trained on (resume starts there)
                "epoch_position": 0 if complete else int(self.train_loader.position),
                "world_size": self.spec.world_size, "interruptions": self.interruptions,
                "skipped": [dict(e) for e in self.skip_log.entries]}

    def save(self, epoch: int, complete: bool, best: bool) -> None:
        if not (self.spec.run_dir and self.spec.is_main) or self.spec.dry_run:
            return
        d = self.spec.run_dir / "checkpoints"
        state = self.state(epoch, complete)
        ckpt.save_checkpoint(d / "last.pt", state)
        every = self.cfg.train.save_every
        if complete and every and (epoch + 1) % every == 0:
            ckpt.save_checkpoint(d / f"epoch_{epoch + 1:04d}.pt", state)
        if best:
            ckpt.save_checkpoint(d / "best.pt", state)

    def restore(self, path: Path, st: dict | None = None) -> None:
        """Resume from ``path``; ``st``: its state already loaded by ``checkpoint.load_training_state``."""
        if st is None:
            st = ckpt.load_training_state(path, self.spec.data.class_map)
        self.model.load_state_dict(st["model"])
        if self.ema is not None and st.get("ema"):
            self.ema.module.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        ckpt.set_rng_state(st["rng"])
        for e in st.get("skipped", []):  # files skipped before the stop stay skipped, wherever the run dir is
            if e["path"] not in self.skip_log:
                self.skip_log.add(int(e["row"]), e["path"], e["reason"], e["backend"], int(e["epoch"]))
        self.global_step, self.best_top1, self.history = st["step"], st["best_top1"], list(st["history"])
        # an epoch interrupted by a signal goes on from the row where it stopped (its first part is not trained
        # twice; checkpoints without the position rerun the epoch from its start)
        self.start_epoch = st["epoch"] + 1 if st["epoch_complete"] else st["epoch"]
        self.resume_position = 0 if st["epoch_complete"] else int(st.get("epoch_position", 0))
        self.deploy, self.interruptions = st.get("deploy", "model"), int(st.get("interruptions", 0))
        if self.resume_position and st.get("world_size", 1) != self.spec.world_size:
            _logger.warning("resumed on %d rank(s), interrupted on %s: the shards differ, so epoch %d starts over",
                            self.spec.world_size, st.get("world_size", 1), st["epoch"])
            self.resume_position = 0
        elif self.resume_position and self.spec.world_size > 1:
            self.resume_position = self._rank_position(path, st, self.resume_position)
        self.history = [h for h in self.history if h["epoch"] < self.start_epoch]
        self.bad_epochs = 0  # patience goes on counting from the epochs already run
        for h in self.history:
            self.bad_epochs = 0 if h.get("best") else self.bad_epochs + 1
        _logger.info("resumed from %s: next epoch %d (from row %d of its shard), step %d, best top-1 %.4f", path,
                     self.start_epoch, self.resume_position, self.global_step, self.best_top1)

    def _position_file(self, checkpoint_dir: Path) -> Path:
        return checkpoint_dir / f"epoch_position.rank{self.spec.rank}.json"

    def _save_rank_position(self, epoch: int) -> None:
        """Under DDP each rank's shard is read at its own pace (a skipped file is replaced by the next row), so
        every rank other than 0 (whose position is in the checkpoint) writes where it stopped, without a
        collective (ranks may stop a step apart)."""
        if self.spec.world_size <= 1 or self.spec.is_main or not self.spec.run_dir or self.spec.dry_run:
            return
        d = self.spec.run_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._position_file(d), json.dumps(
            {"epoch": epoch, "interruption": self.interruptions, "step": self.global_step,
             "position": int(self.train_loader.position)}))

    def _rank_position(self, path: Path, st: dict, fallback: int) -> int:
        """This rank's position in the interrupted epoch: its own file beside the checkpoint when it belongs to
        that checkpoint (same epoch and interruption count: ranks may have run different numbers of steps),
        else the checkpoint's (rank 0's)."""
        if self.spec.is_main:
            return fallback
        f = self._position_file(Path(path).parent)
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _logger.warning("rank %d: no %s; resuming at rank 0's position", self.spec.rank, f.name)
            return fallback
        if (rec.get("epoch"), rec.get("interruption")) != (st["epoch"], st.get("interruptions")):
            _logger.warning("rank %d: %s is from another interruption; resuming at rank 0's position",
                            self.spec.rank, f.name)
            return fallback
        return int(rec["position"])

    # ---- one epoch ---------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int, stop: StopFlag) -> dict:
        model, loader, dev = self.ddp, self.train_loader, self.device
        model.train()
        start, self.resume_position = self.resume_position, 0  # only the first epoch after a resume is partial
        loader.set_epoch(epoch, start=start)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        seen = torch.zeros((), device=dev, dtype=torch.int64)
        data_t = compute_t = 0.0
        n_steps, interval = len(loader), max(1, self.cfg.train.log_interval)
        bar = Progress(n_steps, f"epoch {epoch}", self.spec.is_main)
        ctx = self._join_ctx()
        steps = 0
        with ctx:
            t0 = time.perf_counter()
            for i, batch in enumerate(loader):
                t1 = time.perf_counter()
                data_t += t1 - t0
                loss, logits = self._step(batch)
                loss_sum += loss.detach().double() * batch.labels.numel()
                correct += (logits.detach().argmax(1) == batch.labels).sum()
                seen += batch.labels.numel()
                self.global_step += 1
                steps = i + 1
                if (i + 1) % interval == 0 and self.spec.is_main:
                    # the only host-device sync of the training loop: one per log interval
                    n = max(int(seen.item()), 1)
                    bar.update(i + 1, n_steps, {"loss": float(loss_sum.item()) / n, "acc": int(correct.item()) / n,
                                                "img/s": n / max(data_t + compute_t, 1e-9),
                                                "data": data_t / max(data_t + compute_t, 1e-9)})
                    if self.gpu is not None and self.gpu.available:
                        self.gpu.sample()
                stop_now = stop.reason or (self.spec.max_steps and self.global_step >= self.spec.max_steps)
                t0 = time.perf_counter()
                compute_t += t0 - t1  # the step and its logging: a log interval's sync waits for the GPU here
                if stop_now:
                    break
        bar.close()
        stats = self._reduce([loss_sum, correct.double(), seen.double()])
        n = max(stats[2], 1.0)
        wall = data_t + compute_t
        nan = float("nan")  # no training image (an epoch resumed after its last step): no train loss, not 0
        out = {"train_loss": stats[0] / n if stats[2] else nan, "train_acc": stats[1] / n if stats[2] else nan,
               "train_images": int(stats[2]),
               "data_time": data_t, "compute_time": compute_t, "data_share": data_t / max(wall, 1e-9),
               "images_per_s": stats[2] / max(wall, 1e-9) if self.spec.world_size == 1 else
               stats[2] / max(self._reduce_max(wall), 1e-9), "steps": steps,
               "lr": self.optimizer.param_groups[0]["lr"]}
        out["skipped_train"] = int(loader.epoch_stats().get("skipped", 0))
        if start:
            out["resumed_from_row"] = start  # the train figures cover the rest of the epoch only
        if self.gpu is not None:
            out.update(self.gpu.summary())
        return out

    def _step(self, batch):
        images = self._model_input(batch.images)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.ddp(images)
            loss = self.criterion(logits.float(), batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return loss, logits

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """channels_last on CUDA; float16 loader output is cast up where no autocast runs (CPU, amp off)."""
        if self.device.type == "cuda" and self.cfg.train.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if not self.amp and images.dtype != torch.float32:
            images = images.float()
        return images

    def _join_ctx(self):
        if self.spec.world_size <= 1:
            import contextlib
            return contextlib.nullcontext()
        from torch.distributed.algorithms.join import Join
        return Join([self.ddp])

    def _reduce(self, tensors: list[torch.Tensor]) -> list[float]:
        t = torch.stack([x.double() for x in tensors])
        if self.spec.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t.tolist()

    def _reduce_max(self, value: float) -> float:
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, epoch: int, max_steps: int | None = None) -> dict:
        model.eval()
        self.val_loader.set_epoch(epoch)
        acc = EvalAccumulator(self.num_classes, self.device)
        for i, batch in enumerate(self.val_loader):
            images = self._model_input(batch.images)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                logits = model(images).float()
            acc.update(logits, batch.labels, self.eval_criterion(logits, batch.labels))
            if max_steps and i + 1 >= max_steps:
                break
        acc.all_reduce()
        return acc.compute()

    # ---- the run -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, spec = self.cfg, self.spec
        stop = StopFlag(spec.stop_signals)
        reason, t_start = "epochs done", time.perf_counter()
        bad_epochs = self.bad_epochs
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs):
                t0 = time.perf_counter()
                tr = self.train_one_epoch(epoch, stop)
                if stop.reason:
                    self.interruptions += 1
                    self._save_rank_position(epoch)
                    self.save(epoch, complete=False, best=False)
                    reason = (f"interrupted by {stop.reason} (last.pt saved; --resume goes on with epoch {epoch} "
                              f"at row {self.train_loader.position})")
                    break
                row = self._evaluate_epoch(epoch, tr, time.perf_counter() - t0)
                score = row["selected_top1"]  # of the weights a checkpoint of this epoch deploys
                improved = score > self.best_top1
                if improved:
                    self.best_top1, bad_epochs = score, 0
                else:
                    bad_epochs += 1
                row["best"] = improved
                self.history.append(row)
                self.save(epoch, complete=True, best=improved)
                self._log_epoch(row)
                if spec.dry_run:
                    reason = "dry run"
                    break
                if cfg.train.target_accuracy is not None and score >= cfg.train.target_accuracy:
                    reason = f"target accuracy {cfg.train.target_accuracy:.2%} reached at epoch {epoch}"
                    break
                if cfg.train.patience and bad_epochs >= cfg.train.patience:
                    reason = f"early stop: no better val top-1 for {bad_epochs} epochs"
                    break
        finally:
            stop.restore()
            self.train_loader.close()
            self.val_loader.close()
        _logger.info("training finished: %s", reason)
        return {"reason": reason, "best_top1": self.best_top1, "history": self.history,
                "total_time": time.perf_counter() - t_start, "backend": self.backend,
                "interrupted": bool(stop.reason)}

    def _evaluate_epoch(self, epoch: int, tr: dict, train_time: float) -> dict:
        t0 = time.perf_counter()
        res = self.evaluate(self.model, epoch, max_steps=2 if self.spec.dry_run else None)
        row = {"epoch": epoch, **tr, "val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"],
               "val_macro_precision": res["macro_precision"], "val_macro_recall": res["macro_recall"],
               "val_macro_f1": res["macro_f1"], "val_images": res["count"],
               "skipped_val": int(self.val_loader.epoch_stats().get("skipped", 0))}
        if self.ema is not None:
            ema_res = self.evaluate(self.ema.module, epoch, max_steps=2 if self.spec.dry_run else None)
            row.update({"ema_val_top1": ema_res["top1"], "ema_val_top5": ema_res["top5"]})
        # the weights this epoch's checkpoint deploys (load_classifier follows "deploy"): the better of the two
        ema_better = self.ema is not None and row["ema_val_top1"] > row["val_top1"]
        self.deploy = "ema" if ema_better else "model"
        row["selected"], row["selected_top1"] = self.deploy, row["ema_val_top1"] if ema_better else row["val_top1"]
        row["epoch_time"] = train_time + (time.perf_counter() - t0)
        self._write_eval_details(epoch, res)
        return row

    def _write_eval_details(self, epoch: int, res: dict) -> None:
        d = self.spec.run_dir
        if not (d and self.spec.is_main):
            return
        cm = self.spec.data.class_map
        write_per_class(d / "per_class.csv", res, cm)
        (d / "confusions.json").write_text(json.dumps({"epoch": epoch, "pairs": top_confusions(res, cm, 20)},
                                                      ensure_ascii=False, indent=1), encoding="utf-8")

    def _log_epoch(self, row: dict) -> None:
        if not self.spec.is_main:
            return
        _logger.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f top-1 %.4f top-5 %.4f F1 %.4f | "
                     "%.1f img/s, data %.0f%%%s", row["epoch"], row["train_loss"], row["train_acc"], row["val_loss"],
                     row["val_top1"], row["val_top5"], row["val_macro_f1"], row["images_per_s"],
                     100 * row["data_share"], (f" | EMA top-1 {row['ema_val_top1']:.4f}"
                                                 + (" (deployed)" if row["selected"] == "ema" else "")
                                                 if "ema_val_top1" in row else "") + (" *best*" if row["best"] else ""))
        if self.spec.run_dir and not self.spec.dry_run:
            with open(self.spec.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
