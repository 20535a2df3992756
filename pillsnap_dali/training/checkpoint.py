"""Checkpoints: written atomically, loaded without unpickling arbitrary objects, class map checked by K-code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
can read it::

    format: "pillsnap_dali/1"      model_name, num_classes
    model: state_dict               ema: state_dict | None
    optimizer, scheduler, scaler: state_dicts | None
    epoch (last completed, 0-based), step, epoch_complete (False after an interrupt mid-epoch),
    epoch_position (interrupted: the rows of the epoch's shard already trained on; resume starts there)
    rng: {"torch": ByteTensor, "numpy": {...}, "python": [...]}
    config: the resolved config dict   class_map: ClassMap.to_dict()   preprocess: preprocess section
    best_top1, history: list of per-epoch metric dicts
    deploy: "model" | "ema": the weights best_top1 was measured on (the better of the two each epoch);
            ``training.model.load_classifier`` loads those
    steps_per_epoch: the schedule's epoch length, fixed at the run's start; interruptions, elapsed (seconds of
    the run's earlier sessions), sessions: see ``training.resume.RunState``
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from pillsnap_dali.atomic import atomic_open, pid_alive
from pillsnap_dali.config import PreprocessConfig
from pillsnap_dali.errors import one_line
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.training import stop

_logger = logging.getLogger(__name__)
FORMAT = "pillsnap_dali/1"


class CheckpointError(PillsnapError, ValueError):
    pass


class _WriteErrors:
    """A file whose write errors are kept: torch.save turns them into an anonymous RuntimeError."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.fh.flush()


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves half a file, and
    the file there before stays whole. A full or read-only disk raises ``OSError`` naming ``path``."""
    stop.saving.set()  # a forced stop's watchdog waits for this write
    try:
        with atomic_open(path, "wb") as fh:
            out = _WriteErrors(fh)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
    except OSError as e:
        raise OSError(e.errno, f"cannot write the checkpoint ({e.strerror or e})", str(path)) from None
    finally:
        stop.saving.clear()


def remove_orphan_temps(folder: str | Path) -> list[Path]:
    """Temp files of ``save_checkpoint`` (``.<name>.tmp<pid>``) whose writer is gone (killed mid-write):
    removed at the next start of the run, so kills do not pile up checkpoint-sized files."""
    removed = []
    for p in Path(folder).glob(".*.tmp*"):
        m = re.fullmatch(r"\..+\.tmp(\d+)", p.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        _logger.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), folder)
    return removed



def deployed_weights(ck: dict) -> dict:
    """The state dict a training checkpoint stands for: its EMA weights when ``deploy`` says so (the better
    of model and EMA when it was saved), else the model's."""
    return ck["ema"] if ck["deploy"] == "ema" else ck["model"]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True`` (no arbitrary unpickling); a file that needs more is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # pickle.UnpicklingError and friends: say what and why, never unpickle blindly
        raise CheckpointError(f"{path} cannot be loaded safely (weights_only=True): {one_line(e)}") from None


def preprocess_dict(p: PreprocessConfig) -> dict:
    return asdict(p)


def unwrap_state_dict(obj):
    """The weights inside a plain checkpoint: ``model_state_dict`` / ``state_dict`` / ``model`` (nested as
    other projects save them), or the object itself."""
    sd = obj
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd
