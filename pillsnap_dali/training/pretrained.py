"""Where a classifier's starting weights come from: random, timm's published ImageNet weights, or a local file.

``model.pretrained: imagenet`` (``--pretrained imagenet``) creates the timm model with its published weights
(``pretrained_cfg.hf_hub_id``, e.g. ``timm/tf_efficientnetv2_s.in21k_ft_in1k``): read from the Hugging Face
cache when they are there (no network), downloaded once into it otherwise, and never fetched when
``HF_HUB_OFFLINE=1``. ``model.pretrained_file`` hands timm a local copy of those weights instead
(timm's ``pretrained_cfg_overlay=dict(file=...)``: an air-gapped server). The classifier head is the
stage's (timm leaves the 1000-class ImageNet head out when the class count differs).

``model.pretrained: PATH`` stays the project's own loader (``engine._load_pretrained``: head rows by
K-code). Either way the checkpoint records where the weights came from (``weights_origin``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

from pillsnap_dali.training.checkpoint import CheckpointError, load_checkpoint, unwrap_state_dict

_logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes per model, preferred first
ORIGIN_ATTR = "pillsnap_weights_origin"  # set on the model by ``create_model``; read by ``weights_origin``


class PretrainedError(CheckpointError):
    """The pretrained weights asked for cannot be had (offline and not cached, no published weights)."""


def is_imagenet(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == IMAGENET


def hub_id(name: str) -> str:
    """The HF hub repo of timm model ``name``'s default (or tagged, ``name.tag``) published weights."""
    import timm

    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None or not pcfg.hf_hub_id:
        raise PretrainedError(f"timm model {name!r} has no published weights on the Hugging Face hub: train from "
                              "random weights (model.pretrained: null) or pass a local file (--pretrained PATH)")
    return pcfg.hf_hub_id


def _how_to(name: str, repo: str) -> str:
    return (f"pre-fetch them where there is network (python -c \"import timm; timm.create_model('{name}', "
            f"pretrained=True)\", then copy the Hugging Face cache, ~/.cache/huggingface), or pass the file "
            f"(--set model.pretrained_file=model.safetensors from huggingface.co/{repo})")


def fetch_imagenet(name: str) -> tuple[str, str]:
    """(local file of ``name``'s published weights, "hf-cache" | "downloaded"): the cache first, then the hub
    unless ``HF_HUB_OFFLINE`` is set; a ``PretrainedError`` (one line) when neither has them."""
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache

    repo = hub_id(name)
    for f in HUB_FILES:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return hit, "hf-cache"
    if is_offline_mode():
        raise PretrainedError(f"ImageNet weights of {name} ({repo}) are not in the Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set: {_how_to(name, repo)}")
    last = None
    for f in HUB_FILES:
        try:
            return hf_hub_download(repo, f, library_name="timm"), "downloaded"
        except Exception as e:  # network down, file absent: try the next, then say how to get them
            last = e
    raise PretrainedError(f"ImageNet weights of {name} ({repo}) could not be downloaded "
                          f"({type(last).__name__}) and are not cached: {_how_to(name, repo)}")


def create_model(cfg, num_classes: int):
    """The timm model of ``cfg.model``: random weights, or the published ImageNet ones when
    ``model.pretrained`` is ``imagenet`` (a local ``model.pretrained_file`` first, else the HF cache/hub).
    Where the weights came from is kept on the model for the checkpoint (``weights_origin``)."""
    import timm

    m = cfg.model
    if not is_imagenet(m.pretrained):
        return timm.create_model(m.name, num_classes=num_classes, pretrained=False, drop_rate=m.drop_rate)
    file = getattr(m, "pretrained_file", None)
    if file:
        if not Path(file).is_file():
            raise PretrainedError(f"model.pretrained_file {file} does not exist")
        path, how = str(Path(file).resolve()), "file"
    else:
        path, how = fetch_imagenet(m.name)
    try:
        model = timm.create_model(m.name, num_classes=num_classes, pretrained=True, drop_rate=m.drop_rate,
                                  pretrained_cfg_overlay=dict(file=path))
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # another architecture's or a damaged file
        raise PretrainedError(f"{path} cannot be loaded as the ImageNet weights of {m.name}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    _check_covers(model, path)
    origin = {"kind": IMAGENET, "source": how, "file": path, "hub_id": model.pretrained_cfg.get("hf_hub_id")}
    setattr(model, ORIGIN_ATTR, origin)
    _check_normalization(model, cfg)
    _logger.info("ImageNet weights of %s from %s (%s); classifier head of %d classes starts fresh", m.name, path,
                 how, num_classes)
    return model


def _file_keys(path: str) -> set:
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as fh:
            return set(fh.keys())
    return set(unwrap_state_dict(load_checkpoint(path)))


def _check_covers(model, path: str) -> None:
    """timm loads pretrained weights non-strictly (the head is dropped): make sure the file really held this
    architecture's backbone, not a few stray tensors."""
    head = model.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")
           and not any(k.startswith(h + ".") for h in heads)]
    missing = [k for k in own if k not in _file_keys(path)]
    if missing:
        raise PretrainedError(f"{path} cannot be loaded as the ImageNet weights of "
                              f"{model.pretrained_cfg.get('architecture')}: {len(missing)} of {len(own)} tensors "
                              f"missing (e.g. {missing[0]})")


def _check_normalization(model, cfg) -> None:
    """The published weights were trained on one mean/std: say so when the stage normalizes otherwise."""
    pc = model.pretrained_cfg
    want = [round(float(v), 3) for v in pc.get("mean", ())], [round(float(v), 3) for v in pc.get("std", ())]
    have = [round(float(v), 3) for v in cfg.preprocess.mean], [round(float(v), 3) for v in cfg.preprocess.std]
    if want[0] and want != have:
        _logger.warning("%s's ImageNet weights were trained with mean %s / std %s, this run normalizes with %s / "
                        "%s (set preprocess.mean / preprocess.std to match them)", cfg.model.name, want[0],
                        want[1], have[0], have[1])


def weights_origin(model, cfg) -> dict:
    """Where ``model``'s starting weights came from, as the checkpoint records it."""
    origin = getattr(model, ORIGIN_ATTR, None)
    if origin:
        return dict(origin)
    if cfg.model.pretrained:
        return {"kind": "file", "file": str(Path(cfg.model.pretrained).resolve()),
                "class_map": cfg.model.pretrained_class_map}
    return {"kind": "random"}
