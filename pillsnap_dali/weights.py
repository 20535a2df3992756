"""Detector weights that never run code: every ``.pt`` a user passes to ``detect --model`` or
``predict --detector`` is loaded with ``torch.load(weights_only=True)`` against an allow-list.

Ultralytics' own ``YOLO(path)`` unpickles arbitrary objects by default (a crafted ``.pt`` executes its
payload on load). Ultralytics has a restricted mode (``ULTRALYTICS_SAFE_LOAD``: ``weights_only=True`` with an
allow-list of its and torch's layer classes; model yamls are parsed without ``eval``); ``force_safe_load``
turns it on for the whole process, before and after Ultralytics is imported, so the trainer's internal loads
go through it too. Before Ultralytics sees a file, ``check_detector_weights`` scans the pickle's globals
(torch's ``get_unsafe_globals_in_checkpoint``, which reads the opcodes without running them) and refuses any
that is not a torch / Ultralytics layer or one of the few data types official checkpoints hold. A file that
needs more is refused with one line naming it (``WeightsError``, a ValueError: exit status 2 in the CLIs).
The classifier paths (``--classifier``, ``--pretrained``, ``--resume``) already load with
``weights_only=True`` and no extra globals (``training.checkpoint.load_checkpoint``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from PIL import Image

from pillsnap_dali.errors import PillsnapError

# the only module prefixes whose classes a detector checkpoint may name (layers; Ultralytics' restricted
# loader then accepts only nn.Module subclasses among them)
LAYER_MODULES = ("torch.nn.modules.", "ultralytics.nn.")
# non-layer globals of official Ultralytics checkpoints (legacy names included); each maps to a data class
# or to Ultralytics' restricted stand-in (its getattr only reads attributes of layer classes)
DATA_GLOBALS = frozenset({
    "ultralytics.utils.IterableSimpleNamespace", "ultralytics.yolo.utils.IterableSimpleNamespace",
    "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
    "builtins.getattr", "ultralytics.utils.loss.v10DetectLoss",
})
DATA_PREFIXES = ("ultralytics.utils.loss.", "ultralytics.utils.tal.", "numpy.dtypes.")
MODEL_SUFFIXES = (".yaml", ".yml")


class WeightsError(PillsnapError, ValueError):
    """A weights file that cannot be loaded without running code (or at all): one line, naming the path."""


def force_safe_load() -> None:
    """Ultralytics' restricted (``weights_only``) loading for this process, whether or not it is imported yet."""
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "true"
    for name in ("ultralytics.utils", "ultralytics.nn.tasks"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "SAFE_LOAD"):
            module.SAFE_LOAD = True


def safe_load_supported() -> bool:
    """Whether the installed Ultralytics + torch can load a checkpoint with ``weights_only=True``."""
    try:
        from ultralytics.nn import tasks
    except ImportError:
        return False
    loader = getattr(tasks, "_SafeLoad", None)
    return bool(loader and loader.SUPPORTED and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"))


def allowed_global(name: str) -> bool:
    """A global a detector checkpoint may name: a layer class or one of the known data types (by name only:
    nothing is imported here)."""
    return name in DATA_GLOBALS or name.startswith(LAYER_MODULES + DATA_PREFIXES)


def check_detector_weights(path: str | Path) -> Path:
    """The path of a local Ultralytics ``.pt`` whose pickle names only allowed globals; else WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights not found: {path} (nothing is downloaded: pass a local .pt "
                                f"or a model yaml such as yolo11m.yaml)")
    if path.suffix.lower() != ".pt":
        raise WeightsError(f"{path}: detector weights must be an Ultralytics .pt checkpoint (or a model yaml)")
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch zip archive (truncated, renamed, legacy format)
        raise WeightsError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {one_line(e)})") from None
    refused = sorted(g for g in needed if not allowed_global(g))
    if refused:
        raise WeightsError(f"{path}: refused: loading it would call {', '.join(refused[:3])}, which is not a "
                           f"torch or Ultralytics layer (a weights file must never run code)")
    return path


def ultralytics_offline() -> None:
    """Call before using Ultralytics: no update checks, hub sync, downloads or pip installs, and its restricted
    (``weights_only``) checkpoint loading.

    Importing Ultralytics also replaces ``PIL.Image.open`` process-wide with a wrapper that, on an image PIL
    cannot identify, tries to pip-install ``pi-heif`` and then fails with ModuleNotFoundError. Our loaders
    and verifiers rely on PIL's own ``UnidentifiedImageError`` for broken files, so the original is put back.
    """
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "true")
    force_safe_load()  # weights files and model yamls never run code
    try:
        from ultralytics.utils import patches
    except ImportError:
        return
    if getattr(Image, "open", None) is getattr(patches, "image_open", None) and hasattr(patches, "_image_open"):
        Image.open = patches._image_open


def load_yolo(spec: str | Path, task: str = "detect"):
    """An Ultralytics YOLO from a model yaml (built from scratch, parsed without ``eval``) or a LOCAL ``.pt``
    loaded with ``weights_only=True``; never downloaded. Every failure is one WeightsError line."""
    ultralytics_offline()  # offline + force_safe_load
    spec = str(spec)
    if spec.lower().endswith(".onnx"):  # an exported detector: a protobuf graph, no pickle, nothing to run
        if not Path(spec).is_file():
            raise FileNotFoundError(f"detector weights not found: {spec}")
    elif not spec.lower().endswith(MODEL_SUFFIXES):
        check_detector_weights(spec)
        if not safe_load_supported():
            raise WeightsError(f"{spec}: the installed Ultralytics/torch cannot load weights without running code: "
                               f"install ultralytics>=8.4.138 and torch>=2.6")
    from ultralytics import YOLO

    try:
        return YOLO(spec, task=task)
    except FileNotFoundError:
        raise
    except Exception as e:  # Ultralytics' restricted loader refused it, or the file is damaged
        raise WeightsError(f"{spec}: cannot be loaded safely ({type(e).__name__}: {one_line(e)})") from None


def one_line(e: BaseException) -> str:
    """The one line of an exception's text that says what went wrong (torch's weights_only refusal is a
    page of advice around its ``WeightsUnpickler error: Unsupported global: ...`` line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "WeightsUnpickler error" in ln or "unsupported global" in ln.lower()]
    line = (named or lines or [type(e).__name__])[0]
    return line.split(". Please use")[0]  # torch's "add_safe_globals" advice is the opposite of what we want
