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
    best_epoch: the epoch whose weights best.pt holds (None before the first complete epoch)

The pair ``last.pt`` / ``best.pt`` (``save_pair``): last.pt is written first, then best.pt as a byte copy of
it, each atomically. A stop between the two leaves a last.pt whose ``best_epoch`` is its own epoch and an older
best.pt: ``restore_best`` (on resume) sees it and copies last.pt over best.pt; at any other point both files
are whole and agree.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pillsnap_dali.atomic import atomic_open, pid_alive
from pillsnap_dali.config import Config, ConfigError, PreprocessConfig, config_from_dict, preprocess_from_dict
from pillsnap_dali.data.classmap import ClassMap
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


def best_epoch(history: list) -> int | None:
    """The epoch best.pt holds: the last history row marked best."""
    best = [h["epoch"] for h in history or [] if h.get("best")]
    return best[-1] if best else None


def copy_checkpoint(src: Path, dst: Path) -> None:
    """``src``'s bytes to ``dst``, atomically (temp file, fsync, rename)."""
    stop.saving.set()
    try:
        with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 * 2 ** 20)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the checkpoint ({e.strerror or e})", str(dst)) from None
    finally:
        stop.saving.clear()


def save_pair(folder: Path, state: dict, *, best: bool, extra: tuple = ()) -> None:
    """``last.pt`` (with ``best_epoch``), then the ``extra`` paths (``epoch_NNNN.pt``) and, when ``best``,
    ``best.pt`` as copies of it: an order a stop at any point leaves repairable (module docstring)."""
    folder = Path(folder)
    state = {**state, "best_epoch": best_epoch(state.get("history"))}
    save_checkpoint(folder / "last.pt", state)
    for path in extra:
        copy_checkpoint(folder / "last.pt", Path(path))
    if best:
        copy_checkpoint(folder / "last.pt", folder / "best.pt")


def _identity(path: Path) -> tuple | None:
    """(epoch, step, epoch_complete) of a checkpoint, memory-mapped (no weight is read); None if unloadable."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return st["epoch"], st["step"], st["epoch_complete"]
    except Exception:  # noqa: BLE001 - missing, partial or foreign: the caller decides
        return None


def restore_best(folder: Path) -> str | None:
    """Make ``best.pt`` agree with ``last.pt`` after a stop between the two writes; returns what was done
    (``"restored"``, a mismatch that cannot be repaired, or None when they agree or there is nothing to check)."""
    folder = Path(folder)
    last, best = folder / "last.pt", folder / "best.pt"
    try:
        st = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - no last.pt to check against (its own loading reports its faults)
        return None
    want = st.get("best_epoch", best_epoch(st.get("history")))
    if want is None:
        return None
    have = _identity(best) if best.exists() else None
    if want == st["epoch"] and st["epoch_complete"]:
        if have != (st["epoch"], st["step"], True):
            copy_checkpoint(last, best)
            _logger.warning("best.pt did not hold epoch %d, the best epoch last.pt records (a stop between the two "
                            "writes): restored from last.pt", want)
            return "restored"
        return None
    if have is None or have[0] != want:
        msg = (f"best.pt holds epoch {have[0] if have else 'none'} but the run's best epoch is {want}: its weights "
               "are lost; the next better epoch rewrites best.pt")
        _logger.warning(msg)
        return msg
    return None


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


def is_ours(ck) -> bool:
    """Whether a loaded object is one of our training checkpoints (else a plain state dict of weights)."""
    return isinstance(ck, dict) and ck.get("format") == FORMAT


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What a checkpoint of ours says about its model, each part checked like a config file."""
    model_name: str
    class_map: ClassMap
    preprocess: PreprocessConfig
    config: Config | None  # None: a checkpoint written without one (only resuming needs it)


# key -> the type it must have (a tuple: any of them); the weights themselves are checked by load_state_dict
_REQUIRED = {"model_name": str, "model": dict, "class_map": (dict, list), "preprocess": dict, "deploy": str}


def validate_checkpoint(ck: dict, path: str | Path) -> CheckedCheckpoint:
    """Check a training checkpoint of ours before anything is built from it: its keys, its class map, and its
    preprocessing and config against the config schema's keys, types and ranges (an ``img_size`` of 100000
    would allocate gigabytes, a ``std`` of 0 divides every pixel by zero). Raises ``CheckpointError`` naming
    ``path`` and the first fault."""
    missing = [k for k in _REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: not a complete pillsnap_dali checkpoint, it lacks {', '.join(missing)}")
    wrong = [f"{k} is {type(ck[k]).__name__}" for k, t in _REQUIRED.items() if not isinstance(ck[k], t)]
    if wrong:
        raise CheckpointError(f"{path}: damaged checkpoint: {', '.join(wrong)}")
    if ck["deploy"] not in ("model", "ema") or (ck["deploy"] == "ema" and not isinstance(ck.get("ema"), dict)):
        raise CheckpointError(f"{path}: damaged checkpoint: deploy is {ck['deploy']!r} (model, or ema with EMA "
                              "weights)")
    for key in ("model", "ema"):
        bad = [k for k, v in (ck.get(key) or {}).items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointError(f"{path}: damaged checkpoint: {key} weights {bad[:3]} are not tensors")
    class_map = checked_class_map(ck, path)
    if ck.get("config") is not None and not isinstance(ck["config"], dict):
        raise CheckpointError(f"{path}: damaged checkpoint: config is {type(ck['config']).__name__}")
    try:
        pre = preprocess_from_dict(ck["preprocess"], f"{path}")
        cfg = config_from_dict(ck["config"], f"{path}: its config") if ck.get("config") is not None else None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return CheckedCheckpoint(ck["model_name"], class_map, pre, cfg)


def checked_class_map(ck: dict, path: str | Path) -> ClassMap:
    """A checkpoint's class map, refused in one line naming ``path`` when it is missing, malformed or empty."""
    try:
        class_map = ClassMap.from_dict(ck["class_map"])
    except (PillsnapError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{path}: its class map is unusable: {e}") from None
    if not len(class_map):
        raise CheckpointError(f"{path}: its class map is empty")
    return class_map


def load_ours(path: str | Path, map_location="cpu") -> tuple[dict, CheckedCheckpoint | None]:
    """``load_checkpoint``, then ``validate_checkpoint`` when it is one of ours: (checkpoint, its checked parts or
    None for a plain state dict)."""
    ck = load_checkpoint(path, map_location=map_location)
    return ck, (validate_checkpoint(ck, path) if is_ours(ck) else None)


def checkpoint_stage(path: str | Path) -> str | None:
    """The config stage a checkpoint of ours was trained with (checked), None for a plain state dict."""
    _, checked = load_ours(path)
    return checked.config.stage if checked and checked.config else None


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
