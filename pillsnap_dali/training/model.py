"""The classifier model and every way weights reach it, by K-code: ``build_model`` (training, ``--pretrained``),
``load_pretrained`` (backbone by name and shape, head rows by K-code) and ``load_classifier`` (predict, bench,
evaluation: a pillsnap checkpoint or the existing project's raw state dict)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file

from pillsnap_dali.config import Config, PreprocessConfig, memory_layout
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.training import pretrained
from pillsnap_dali.training.checkpoint import CheckpointError, checked_class_map, deployed_weights, is_ours, \
    load_checkpoint, unwrap_state_dict, validate_checkpoint

_logger = logging.getLogger(__name__)


def build_model(cfg: Config, num_classes: int, device: torch.device, class_map: ClassMap | None = None) -> nn.Module:
    model = pretrained.create_model(cfg, num_classes)  # random, or timm's ImageNet weights (pretrained: imagenet)
    src = cfg.model.pretrained
    if not pretrained.is_none(src) and not pretrained.is_imagenet(src):
        load_pretrained(model, src, class_map, cfg.model.pretrained_class_map)
        pretrained.set_origin(model, {"kind": "file", "file": str(Path(src).resolve()),
                                      "sha256": pretrained.sha256_of(src),
                                      "class_map": cfg.model.pretrained_class_map})
    model.to(device)
    if memory_layout(cfg.loader.layout, device.type) == "NHWC":  # the loaders' batches come in this layout
        model.to(memory_format=torch.channels_last)
    return model


def one_sample_trains(model: nn.Module, forward: Callable[[], object]) -> bool:
    """Whether a training step can take a batch of one sample: False when a BatchNorm layer of ``model`` would see
    a single value per channel (``Expected more than 1 value per channel when training``: a 1x1 feature map,
    below 64 px for EfficientNets and ResNets). ``forward()`` runs the model on that batch; it is run once in
    eval mode, without gradients, with hooks on the BatchNorm inputs (no running statistic and no random draw is
    touched). Such a batch, the last of an epoch whose rows leave one over or one that skipped files shrank, is
    left out of the step by the trainer (docs/reliability.md)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return True
    values: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, inp, _out: values.append(inp[0][0, 0].numel())) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return min(values, default=2) > 1


def _head_names(model: nn.Module, own: dict) -> list[str]:
    """Keys of ``own`` (the model's state dict) in the classifier head (timm's ``default_cfg["classifier"]``)."""
    head = (getattr(model, "default_cfg", None) or {}).get("classifier")
    heads = head if isinstance(head, (list, tuple)) else [head] if head else []
    return [k for k in own if any(k.startswith(h + ".") for h in heads)]


def load_pretrained(model: nn.Module, path: str, class_map: ClassMap | None = None,
                     pretrained_class_map: str | None = None) -> None:
    """Local weights only. The backbone is loaded by name and shape; the classifier head by K-code: each
    class of ``class_map`` that the weights' own class map (a pillsnap checkpoint's, or
    ``pretrained_class_map`` for a plain state dict) knows gets its head row, the others start fresh. A
    plain state dict without a class map leaves its head out: its rows' K-codes are unknown."""
    src_map = None
    if str(path).endswith(".safetensors"):
        sd = load_file(path)
    else:
        raw = load_checkpoint(path)
        if is_ours(raw) and raw.get("class_map"):  # only its weights and class map are used: those are checked
            src_map = checked_class_map(raw, path)
            raw = deployed_weights(raw) if raw.get("deploy") in ("model", "ema") else raw  # the weights its best top-1 was measured on
        sd = unwrap_state_dict(raw)
    if pretrained_class_map:
        src_map = ClassMap.load(pretrained_class_map)
    sd = strip_prefixes(sd)
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
        raise CheckpointError(f"{path}: no tensor matches model {type(model).__name__}")


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


def _head_classes(sd: dict, path) -> int:
    for k in ("classifier.weight", "fc.weight", "head.fc.weight", "head.weight"):
        if k in sd and torch.is_tensor(sd[k]) and sd[k].dim() >= 1:
            return int(sd[k].shape[0])
    raise CheckpointError(f"{path}: cannot find the classifier layer in the state dict to infer the number of "
                          "classes")


def load_classifier(path: str | Path, *, class_map_json: str | Path | None = None, model_name: str | None = None,
                    preprocess: PreprocessConfig | None = None, device="cpu") -> LoadedClassifier:
    """Load our checkpoint, or the existing project's raw timm state dict (+ a class map JSON).

    Ours carries its class map and preprocessing; a given ``class_map_json`` is then checked against it by
    K-code. A legacy state dict needs ``class_map_json``; its preprocessing defaults to the users' Stage 3
    model (384 px, squash) unless ``preprocess`` is given.
    """
    import timm

    ck = load_checkpoint(path)
    if is_ours(ck):  # its class map, preprocessing and config checked like a config file, before any build
        checked = validate_checkpoint(ck, path)
        cm = checked.class_map
        if class_map_json:
            cm.check_same(ClassMap.load(class_map_json), what="checkpoint", against="given class map")
        pre = checked.preprocess
        name, sd, source = checked.model_name, deployed_weights(ck), "pillsnap_dali"
    else:
        sd = unwrap_state_dict(ck)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} holds a {type(sd).__name__}, neither a pillsnap_dali checkpoint nor a "
                                  "state dict of weights")
        if not class_map_json:
            raise CheckpointError(f"{path} is a plain state dict: pass its class map as JSON (--class-map)")
        cm = ClassMap.load(class_map_json)
        pre = preprocess or PreprocessConfig()
        name, source = model_name or "tf_efficientnetv2_s", "legacy"
    sd = strip_prefixes(sd)
    n = _head_classes(sd, path)
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
