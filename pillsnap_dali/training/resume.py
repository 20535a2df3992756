"""Resuming a run, in one place: which checkpoint (``resume_path``), whether it fits this run
(``check_resume``, which hands back the one ``Resume`` that owns the loaded checkpoint until its tensors are
restored), the run's position and bookkeeping (``RunState``), and the RNG and per-rank state that make a
resumed run go on exactly where it stopped.

A run's schedule is fixed at its start (``RunState.steps_per_epoch``, from the split's row count, never from a
loader whose skip log has since removed files) and stored in every checkpoint, so warmup and cosine decay
are the same whether or not the run was interrupted.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.config import Config, ConfigError
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.training.checkpoint import CheckpointError, is_ours, load_checkpoint, validate_checkpoint

_logger = logging.getLogger(__name__)

LAST = "__last__"  # ``--resume`` without a path: the run's own checkpoints/last.pt
# settings a resumed run must share with its checkpoint (the weights, the classes, what one step and one
# epoch are); the others are the checkpoint's from then on (the optimizer and schedule states are restored)
RESUME_MUST_MATCH = ("model.name", "preprocess.img_size", "preprocess.resize_mode", "preprocess.crop_pct",
                     "preprocess.mean", "preprocess.std", "train.batch_size", "train.optimizer")
# restored with the optimizer state: the command line's values do not apply
RESUME_TAKEN_FROM_CHECKPOINT = ("train.lr", "train.weight_decay", "train.momentum")
# rebuilt from the config: the new values apply from the resumed step on
RESUME_APPLIED = ("train.warmup_epochs", "train.epochs", "train.ema_decay")


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (its fields are checkpoint keys) and restored on resume."""
    epoch: int = 0                 # the epoch training starts with (after a resume: the next one, or the
    position: int = 0              # interrupted one from this position of its shard)
    step: int = 0                  # optimizer steps taken
    steps_per_epoch: int = 0       # the schedule's epoch length, fixed at the run's start
    best_top1: float = -1.0
    history: list = field(default_factory=list)
    deploy: str = "model"          # which weights a checkpoint's user should take: "model" or "ema"
    interruptions: int = 0         # counted alike on every rank: pairs rank r's position file with the checkpoint
    elapsed: float = 0.0           # seconds of the run's earlier sessions (a checkpoint: up to its save)
    sessions: int = 0              # the run's earlier sessions (a checkpoint: including the one that saved it)

    def bad_epochs(self) -> int:
        """Epochs since the last better val top-1 (patience goes on counting across a resume)."""
        bad = 0
        for h in self.history:
            bad = 0 if h.get("best") else bad + 1
        return bad

    def record(self, row: dict) -> bool:
        """An evaluated epoch into the history; True when its deployed weights are the best so far."""
        improved = row["selected_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["selected_top1"])
        row["best"] = improved
        self.history.append(row)
        return improved

    def to_checkpoint(self, epoch: int, complete: bool, position: int, session_seconds: float) -> dict:
        """The checkpoint's run keys; ``session_seconds``: this session's time so far (added to ``elapsed``)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("epoch", "position", "step")}
        return {**d, "epoch": epoch, "epoch_complete": complete, "epoch_position": 0 if complete else int(position),
                "step": self.step, "elapsed": self.elapsed + session_seconds, "sessions": self.sessions + 1}

    @classmethod
    def from_checkpoint(cls, st: dict) -> "RunState":
        known = {f.name for f in fields(cls)} - {"epoch", "position"}
        s = cls(**{k: st[k] for k in known})
        s.epoch = st["epoch"] + 1 if st["epoch_complete"] else st["epoch"]
        s.position = 0 if st["epoch_complete"] else int(st["epoch_position"])
        s.history = [h for h in s.history if h["epoch"] < s.epoch]
        return s


def planned_steps(rows: int, batch_size: int, drop_last: bool, world_size: int) -> int:
    """Steps per epoch of the split as given (every rank plans the longest shard's count)."""
    shard = math.ceil(rows / max(1, world_size))
    return max(1, shard // batch_size if drop_last else -(-shard // batch_size))


def resume_path(arg: str, run_dir: Path) -> Path:
    """The checkpoint ``--resume [PATH]`` names; missing: an error that says where an earlier run of this run
    dir was moved aside to, when one was."""
    path = run_dir / "checkpoints" / "last.pt" if arg == LAST else Path(arg)
    if path.exists():
        return path
    msg = f"--resume: {path} does not exist"
    if arg == LAST:
        aside = sorted((p for p in run_dir.parent.glob(f"{run_dir.name}.*") if (p / "checkpoints/last.pt").exists()),
                       key=lambda p: p.stat().st_mtime)
        if aside:
            msg += (f"; the earlier run of {run_dir} was moved to {aside[-1]} when a new run started there: "
                    f"--resume {aside[-1] / 'checkpoints' / 'last.pt'}")
    raise ConfigError(msg)


# what a resume reads besides what ``validate_checkpoint`` checks (the run's state: RunState's fields too)
_RESUME_KEYS = ("config", "ema", "optimizer", "scheduler", "scaler", "rng", "epoch", "epoch_complete", "epoch_position",
                "step", "world_size", "skipped")


def _run_state_keys() -> list[str]:
    return sorted({f.name for f in fields(RunState)} - {"epoch", "position"})


def load_training_state(path: str | Path, class_map: ClassMap) -> dict:
    """A training checkpoint to resume from, on the CPU (RNG states must be CPU tensors; the weights and
    optimizer states are copied to their device by ``load_state_dict``); refused when it is not one of ours,
    its class map differs from ``class_map`` by K-code or position, or its weights are not finite."""
    st = load_checkpoint(path, map_location="cpu")
    if not is_ours(st):
        raise CheckpointError(f"{path} is not a pillsnap_dali training checkpoint; use --pretrained for plain "
                              "weights")
    checked = validate_checkpoint(st, path)
    missing = [k for k in dict.fromkeys((*_RESUME_KEYS, *_run_state_keys())) if k not in st]
    if missing:
        raise CheckpointError(f"{path}: cannot be resumed, it lacks {', '.join(missing)} (not a complete training "
                              "checkpoint; --pretrained starts a new run from its weights)")
    checked.class_map.check_same(class_map)
    for key in ("model", "ema"):
        bad = non_finite_tensors(st[key] or {})
        if bad:
            raise CheckpointError(f"{path}: its {key} weights are not finite ({', '.join(bad[:3])}); resume from an "
                                  "earlier checkpoint (checkpoints/epoch_*.pt, best.pt) or start a new run")
    return st


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors holding a nan or inf (one host sync for all of them)."""
    names = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(state_dict[k]).all() for k in names]).cpu()
    return [k for k, good in zip(names, ok.tolist()) if not good]


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_resume(path: Path, cfg: Config, class_map: ClassMap) -> "Resume":
    """The checkpoint to resume from, loaded once and handed to the trainer as a ``Resume``. Refused when its
    class map, model, preprocessing, batch size or optimizer differs, naming what differs; settings the
    checkpoint's optimizer overrides are warned about."""
    st = load_training_state(path, class_map)
    old, new = st["config"], cfg.to_dict()
    diff = [f"{k} {_get(old, k)!r} -> {_get(new, k)!r}" for k in RESUME_MUST_MATCH if _get(old, k) != _get(new, k)]
    if diff:
        raise ConfigError(f"--resume {path}: the checkpoint was trained with other settings ({'; '.join(diff)}); "
                          "resume with the same ones, or start a new run (--pretrained to start from its weights)")
    for k in RESUME_TAKEN_FROM_CHECKPOINT:
        if _get(old, k) != _get(new, k):
            _logger.warning("--resume: %s %r is ignored, the checkpoint's optimizer goes on with %r",
                            k, _get(new, k), _get(old, k))
    for k in RESUME_APPLIED:
        if _get(old, k) != _get(new, k) and (k != "train.ema_decay" or cfg.train.ema):
            _logger.info("--resume: %s is now %r (was %r): the schedule / EMA follow it from here", k,
                         _get(new, k), _get(old, k))
    return Resume(path, st)


class Resume:
    """The checkpoint a run resumes from, and its one owner: ``run_state`` reads where the run stands (with
    this rank's position and RNG in an interrupted epoch), ``restore`` copies its tensors into the run's
    objects once and lets the loaded checkpoint go (it is not kept through the training)."""

    def __init__(self, path: Path, state: dict):
        self.path = Path(path)
        self._state: dict | None = state
        self.weights_origin: dict | None = state.get("weights_origin")  # the first session's starting weights
        self.history: list = list(state.get("history") or [])  # its epoch rows (metrics.jsonl is checked against)
        self._run: RunState | None = None
        self._rank_rng: dict | None = None

    def _checkpoint(self) -> dict:
        if self._state is None:
            raise RuntimeError(f"the resume checkpoint {self.path} was restored already")
        return self._state

    def run_state(self, *, rank: int, world_size: int) -> RunState:
        """The run state the resumed run starts from, with this rank's position in an interrupted epoch."""
        st = self._checkpoint()
        s = RunState.from_checkpoint(st)
        if s.position and st["world_size"] != world_size:
            _logger.warning("resumed on %d rank(s), interrupted on %s: the shards differ, so epoch %d starts over",
                            world_size, st["world_size"], s.epoch)
            s.position = 0
        elif s.position and world_size > 1 and rank > 0:
            rec = rank_record(self.path, rank, st)
            if rec is not None:
                s.position, self._rank_rng = int(rec["position"]), rec.get("rng")
        self._run = s
        return s

    def restore(self, *, model, ema, optimizer, scheduler, scaler, skip_log, device) -> None:
        """Weights, optimizer bundle and RNG states (this rank's own in an interrupted DDP epoch) into the
        run's objects; the files skipped before stay skipped. Then the loaded checkpoint is released."""
        st, self._state = self._checkpoint(), None
        restore_tensors(st, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        if self._rank_rng:
            set_rank_rng(self._rank_rng, device)
        for e in st["skipped"]:  # files skipped before the stop stay skipped, wherever the run dir is
            if e["path"] not in skip_log:
                skip_log.add(int(e["row"]), e["path"], e["reason"], e["backend"], int(e["epoch"]))
        r = self._run or RunState.from_checkpoint(st)
        _logger.info("resumed from %s: next epoch %d (from row %d of its shard), step %d, best top-1 %.4f",
                     self.path, r.epoch, r.position, r.step, r.best_top1)


def restore_tensors(st: dict, *, model, ema, optimizer, scheduler, scaler) -> None:
    """The checkpoint's weights and optimizer, schedule, scaler and RNG states into the run's objects."""
    model.load_state_dict(st["model"])
    if ema is not None and st["ema"]:
        ema.module.load_state_dict(st["ema"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    scaler.load_state_dict(st["scaler"])
    set_rng_state(st["rng"])


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ---- DDP: each rank's position in an interrupted epoch -------------------------------------------------
def position_file(checkpoint_dir: Path, rank: int) -> Path:
    return Path(checkpoint_dir) / f"epoch_position.rank{rank}.json"


def save_rank_position(checkpoint_dir: Path, rank: int, *, epoch: int, interruption: int, step: int,
                       position: int, rng: dict | None = None) -> None:
    """Under DDP each rank's shard is read at its own pace (a skipped file is replaced by the next row), so
    every rank other than 0 (whose position and RNG are in the checkpoint) writes where it stopped and its
    torch RNG state (``rank_rng_state``), without a collective (ranks may stop a step apart)."""
    if rank == 0:
        return
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    rec = {"epoch": epoch, "interruption": interruption, "step": step, "position": int(position)}
    atomic_write_text(position_file(checkpoint_dir, rank), json.dumps({**rec, "rng": rng} if rng else rec))


def rank_record(checkpoint: Path, rank: int, st: dict) -> dict | None:
    """This rank's record of the interrupted epoch (position, RNG) beside the checkpoint when it belongs to
    that checkpoint (same epoch and interruption count: ranks may have run different numbers of steps);
    None (rank 0's position and RNG apply) otherwise."""
    f = position_file(Path(checkpoint).parent, rank)
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        _logger.warning("rank %d: no %s; resuming at rank 0's position", rank, f.name)
        return None
    if (rec.get("epoch"), rec.get("interruption")) != (st["epoch"], st["interruptions"]):
        _logger.warning("rank %d: %s is from another interruption; resuming at rank 0's position", rank, f.name)
        return None
    return rec


def rank_position(checkpoint: Path, rank: int, st: dict, fallback: int) -> int:
    """This rank's position in the interrupted epoch (``rank_record``), else ``fallback`` (rank 0's)."""
    rec = None if rank == 0 else rank_record(checkpoint, rank, st)
    return fallback if rec is None else int(rec["position"])


def rank_rng_state(device: torch.device) -> dict:
    """This process's torch RNG states (CPU, and its CUDA device's), as text for its position file."""
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if device.type == "cuda":
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return out


def set_rank_rng(rng: dict, device: torch.device) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(tensor(rng["torch"]))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(tensor(rng["cuda"]), device)
