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
            ``load_classifier`` loads those
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pillsnap_dali.atomic import atomic_open
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.config import PreprocessConfig
from pillsnap_dali.weights import one_line
from pillsnap_dali.errors import PillsnapError

_logger = logging.getLogger(__name__)
FORMAT = "pillsnap_dali/1"


class CheckpointError(PillsnapError, ValueError):
    pass


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def unwrap_state_dict(obj):
    """The weights inside a plain checkpoint: ``model_state_dict`` / ``state_dict`` / ``model`` (nested as
    other projects save them), or the object itself."""
    sd = obj
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def deployed_weights(ck: dict, without_key: str = "ema") -> dict:
    """The state dict a training checkpoint stands for: its EMA weights when ``deploy`` says so (the better
    of model and EMA when it was saved), else the model's. A checkpoint from before ``deploy`` existed takes
    ``without_key``'s ("ema": the EMA when there is one)."""
    use_ema = ck.get("ema") and ck.get("deploy", without_key) == "ema"
    return ck["ema"] if use_ema else ck["model"]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True`` (no arbitrary unpickling); a file that needs more is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # pickle.UnpicklingError and friends: say what and why, never unpickle blindly
        raise CheckpointError(f"{path} cannot be loaded safely (weights_only=True): {one_line(e)}") from None


def load_training_state(path: str | Path, class_map) -> dict:
    """A training checkpoint to resume from, on the CPU (RNG states must be CPU tensors; the weights and
    optimizer states are copied to their device by ``load_state_dict``); refused when it is not one of ours
    or its class map differs from ``class_map`` by K-code."""
    st = load_checkpoint(path, map_location="cpu")
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pillsnap_dali training checkpoint; use --pretrained for plain "
                              "weights")
    ClassMap.from_dict(st["class_map"]).check_same(class_map)
    return st


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


def strip_prefixes(state_dict: dict) -> dict:
    """Remove ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) key prefixes."""
    out = {}
    for k, v in state_dict.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p):]
            k = k.replace("._orig_mod.", ".")
        out[k] = v
    return out


@dataclass
class LoadedClassifier:
    model: torch.nn.Module
    class_map: ClassMap
    preprocess: PreprocessConfig
    model_name: str
    source: str  # "pillsnap_dali" or "legacy"


def _head_classes(sd: dict) -> int:
    for k in ("classifier.weight", "fc.weight", "head.fc.weight", "head.weight"):
        if k in sd:
            return int(sd[k].shape[0])
    raise CheckpointError("cannot find the classifier layer in the state dict to infer the number of classes")


def load_classifier(path: str | Path, *, class_map_json: str | Path | None = None, model_name: str | None = None,
                    preprocess: PreprocessConfig | None = None, device="cpu") -> LoadedClassifier:
    """Load our checkpoint, or the existing project's raw timm state dict (+ a class map JSON).

    Ours carries its class map and preprocessing; a given ``class_map_json`` is then checked against it by
    K-code. A legacy state dict needs ``class_map_json``; its preprocessing defaults to the users' Stage 3
    model (384 px, squash) unless ``preprocess`` is given.
    """
    import timm

    ck = load_checkpoint(path)
    if isinstance(ck, dict) and ck.get("format") == FORMAT:
        cm = ClassMap.from_dict(ck["class_map"])
        if class_map_json:
            cm.check_same(ClassMap.load(class_map_json), what="checkpoint", against="given class map")
        pre = PreprocessConfig(**ck["preprocess"])
        name, sd, source = ck["model_name"], deployed_weights(ck), "pillsnap_dali"
    else:
        sd = unwrap_state_dict(ck)
        if not class_map_json:
            raise CheckpointError(f"{path} is a plain state dict: pass its class map as JSON (--class-map)")
        cm = ClassMap.load(class_map_json)
        pre = preprocess or PreprocessConfig()
        name, source = model_name or "tf_efficientnetv2_s", "legacy"
    sd = strip_prefixes(sd)
    n = _head_classes(sd)
    if n != len(cm):
        raise CheckpointError(f"{path}: the model has {n} outputs but the class map has {len(cm)} K-codes")
    model = timm.create_model(name, num_classes=n, pretrained=False)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensor shapes of another architecture
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not fit timm model {name!r}" + (" (pass its --model-name)" if source ==
                              "legacy" else "") + f": {first[1].strip() if len(first) > 1 else first[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit timm model {name!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    _logger.info("loaded %s classifier %s (%d classes, %d px, %s) from %s", source, name, n, pre.img_size,
                 pre.resize_mode, path)
    return LoadedClassifier(model, cm, pre, name, source)


def preprocess_dict(p: PreprocessConfig) -> dict:
    return asdict(p)
