"""Where a classifier's starting weights come from: random, timm's published ImageNet weights, or a local file.

``model.pretrained: imagenet`` (``--pretrained imagenet``) creates the timm model with its published weights
(``pretrained_cfg.hf_hub_id``, e.g. ``timm/tf_efficientnetv2_s.in21k_ft_in1k``): read from the Hugging Face
cache when they are there (no network), downloaded once into it otherwise, and never fetched when
``HF_HUB_OFFLINE=1``. ``model.pretrained_file`` hands timm a local copy of those weights instead
(timm's ``pretrained_cfg_overlay=dict(file=...)``: an air-gapped server). The classifier head is the
stage's (timm leaves the 1000-class ImageNet head out when the class count differs).

``model.pretrained: PATH`` stays the project's own loader (``model.load_pretrained``: head rows by
K-code); ``none`` (or null) starts from random weights. Stages 1-4 default to ``imagenet``, the demo to
``none``. ``check_available`` is the training command's pre-check: it finds (or, online, downloads) the weights
before anything is built and stops with one line naming every fix when they cannot be had. Either way the
checkpoint and the run report record where the weights came from (``weights_origin``: the cache file with
the hub repo and revision, a local file with its sha256, or random), and ``random_start`` flags a pretrained
run whose first epoch looks like random weights.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from safetensors import safe_open

from pillsnap_dali.training.checkpoint import CheckpointError, load_checkpoint, unwrap_state_dict

_logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
NONE = "none"  # model.pretrained: none (or null): random weights, the explicit opt-out
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes per model, preferred first
ORIGIN_ATTR = "pillsnap_weights_origin"  # set on the model by ``create_model``; read by ``weights_origin``


class PretrainedError(CheckpointError):
    """The pretrained weights asked for cannot be had (offline and not cached, no published weights)."""


def is_imagenet(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == IMAGENET


def is_none(value) -> bool:
    """``model.pretrained`` asks for random weights: null, ``none`` or ``null`` (as typed on a command line)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in (NONE, "null", ""))


def hub_id(name: str) -> str:
    """The HF hub repo of timm model ``name``'s default (or tagged, ``name.tag``) published weights."""
    import timm

    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None or not pcfg.hf_hub_id:
        raise PretrainedError(f"timm model {name!r} has no published weights on the Hugging Face hub: train from "
                              "random weights (--pretrained none) or pass a local file (--pretrained PATH)")
    return pcfg.hf_hub_id


def _how_to(name: str, repo: str) -> str:
    return (f"pre-fetch them where there is network (python -c \"import timm; timm.create_model('{name}', "
            f"pretrained=True)\", then copy the Hugging Face cache, ~/.cache/huggingface), or pass the file "
            f"(--set model.pretrained_file=model.safetensors from huggingface.co/{repo}), or train from random "
            f"weights on purpose (--pretrained none)")


PROBE_SECONDS = 5.0  # one connection attempt to the hub before a download (the hub client retries for ~30 s)


def _unreachable() -> str | None:
    """Why the hub's host cannot be reached (one TCP connection, ``PROBE_SECONDS``), or None. Behind a proxy
    (``HTTPS_PROXY``/``ALL_PROXY``) the probe is left to the hub client itself."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_SECONDS).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or type(e).__name__}"
    return None


def fetch_imagenet(name: str) -> tuple[str, str]:
    """(local file of ``name``'s published weights, "hf-cache" | "downloaded"): the cache first, then the hub
    unless ``HF_HUB_OFFLINE`` is set; a ``PretrainedError`` (one line) when neither has them."""
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo = hub_id(name)
    for f in HUB_FILES:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return hit, "hf-cache"
    if is_offline_mode():
        raise PretrainedError(f"ImageNet weights of {name} ({repo}) are not in the Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set: {_how_to(name, repo)}")
    down = _unreachable()
    if down:
        raise PretrainedError(f"ImageNet weights of {name} ({repo}) are not in the Hugging Face cache and the hub "
                              f"cannot be reached ({down}): {_how_to(name, repo)}")
    last = None
    for f in HUB_FILES:
        try:
            return hf_hub_download(repo, f, library_name="timm"), "downloaded"
        except EntryNotFoundError as e:  # this file is not published: try the next
            last = e
        except Exception as e:  # network down midway, no access: say how to get them
            last = e
            break
    raise PretrainedError(f"ImageNet weights of {name} ({repo}) could not be downloaded "
                          f"({type(last).__name__}) and are not cached: {_how_to(name, repo)}")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _revision(path: str) -> str | None:
    """The commit of a hub cache file (``.../snapshots/<revision>/model.safetensors``)."""
    p = Path(path)
    return p.parent.name if p.parent.parent.name == "snapshots" else None


def resolve_imagenet(cfg) -> dict:
    """Where the ImageNet weights of ``cfg.model.name`` are, as ``weights_origin`` records them:
    ``model.pretrained_file`` (with its sha256), else the Hugging Face cache (repo id and revision), else a
    download into it (online only). A ``PretrainedError`` (one line naming every fix) when none has them."""
    m = cfg.model
    file = getattr(m, "pretrained_file", None)
    if file:
        if not Path(file).is_file():
            raise PretrainedError(f"model.pretrained_file {file} does not exist (pass the hub's model.safetensors "
                                  f"of {m.name}, or train from random weights on purpose: --pretrained none)")
        path = str(Path(file).resolve())
        import timm

        pcfg = timm.models.get_pretrained_cfg(m.name) if ":" not in m.name else None
        return {"kind": IMAGENET, "source": "file", "file": path,
                "hub_id": pcfg.hf_hub_id if pcfg is not None else None, "sha256": sha256_of(path)}
    path, how = fetch_imagenet(m.name)
    return {"kind": IMAGENET, "source": how, "file": path, "hub_id": hub_id(m.name), "revision": _revision(path)}


def check_available(cfg) -> dict | None:
    """The training command's pre-check, before any manifest is scanned or run dir made: the origin of the
    starting weights ``model.pretrained`` asks for (None: random or a local PATH, checked elsewhere), or a
    ``PretrainedError`` when the ImageNet weights cannot be had."""
    if not is_imagenet(cfg.model.pretrained):
        return None
    origin = resolve_imagenet(cfg)
    _logger.info("ImageNet weights of %s: %s (%s)", cfg.model.name, origin["file"], origin["source"])
    return origin


def create_model(cfg, num_classes: int):
    """The timm model of ``cfg.model``: random weights, or the published ImageNet ones when
    ``model.pretrained`` is ``imagenet`` (a local ``model.pretrained_file`` first, else the HF cache/hub).
    Where the weights came from is kept on the model for the checkpoint (``weights_origin``)."""
    import timm

    m = cfg.model
    if not is_imagenet(m.pretrained):
        return timm.create_model(m.name, num_classes=num_classes, pretrained=False, drop_rate=m.drop_rate)
    origin = resolve_imagenet(cfg)
    path = origin["file"]
    try:
        model = timm.create_model(m.name, num_classes=num_classes, pretrained=True, drop_rate=m.drop_rate,
                                  pretrained_cfg_overlay=dict(file=path))
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # another architecture's or a damaged file
        raise PretrainedError(f"{path} cannot be loaded as the ImageNet weights of {m.name}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    _check_covers(model, path)
    origin["hub_id"] = origin.get("hub_id") or model.pretrained_cfg.get("hf_hub_id")
    setattr(model, ORIGIN_ATTR, origin)
    _check_normalization(model, cfg)
    _logger.info("ImageNet weights of %s from %s (%s); classifier head of %d classes starts fresh", m.name, path,
                 origin["source"], num_classes)
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
    if not is_none(cfg.model.pretrained):
        return {"kind": "file", "file": str(Path(cfg.model.pretrained).resolve()),
                "class_map": cfg.model.pretrained_class_map}
    return {"kind": "random"}


def set_origin(model, origin: dict) -> None:
    """Keep ``origin`` on ``model`` for its checkpoints (a local file's, or a resumed run's first start)."""
    setattr(model, ORIGIN_ATTR, dict(origin))


def describe(origin: dict | None) -> str:
    """One line for the log and the report: where the starting weights came from."""
    o = origin or {"kind": "random"}
    if o.get("kind") == IMAGENET:
        if o.get("source") == "file":
            return f"ImageNet ({o.get('hub_id') or 'timm'}) from the local file {o['file']} (sha256 {o.get('sha256')})"
        how = "Hugging Face cache" if o.get("source") == "hf-cache" else "downloaded into the Hugging Face cache"
        return f"ImageNet, {o.get('hub_id')} revision {o.get('revision') or '?'} ({how}: {o['file']})"
    if o.get("kind") == "file":
        sha = f" (sha256 {o['sha256']})" if o.get("sha256") else ""
        return f"the local weights file {o['file']}{sha}"
    return "none: random initialization (model.pretrained: none)"


RANDOM_LOSS_BAND = 0.10   # a first-epoch train loss within 10 % of ln(classes) looks like random weights
CHANCE_FACTOR = 2.0       # a first-epoch val top-1 under twice chance (1/classes) looks like random weights


def random_start(first_epoch: dict | None, num_classes: int, origin: dict | None) -> str | None:
    """A warning when a run that started from pretrained weights (ImageNet or a file) has a first epoch that
    looks like random weights: train loss within 10 % of ln(classes), or val top-1 under twice chance (the
    users' Stage 3 run: loss at ln(1000), val top-1 1.25 % after epoch 1, their pretrained load had failed
    silently). None when nothing looks wrong, or the run started from random weights on purpose."""
    if not first_epoch or num_classes < 2 or (origin or {}).get("kind") in (None, "random"):
        return None
    chance, ln = 1.0 / num_classes, math.log(num_classes)
    loss, top1 = first_epoch.get("train_loss"), first_epoch.get("val_top1")
    why = []
    if loss is not None and abs(loss - ln) <= RANDOM_LOSS_BAND * ln:
        why.append(f"train loss {loss:.3f} is within {RANDOM_LOSS_BAND:.0%} of ln({num_classes}) = {ln:.3f}")
    if top1 is not None and top1 < CHANCE_FACTOR * chance:
        why.append(f"val top-1 {top1:.4f} is under twice chance (2/{num_classes} = {2 * chance:.4f})")
    if not why:
        return None
    return (f"the first epoch (epoch {first_epoch.get('epoch', 0)}) looks like random weights although the run "
            f"started from {(origin or {}).get('kind')} weights ({'; '.join(why)}): check that the pretrained weights loaded "
            "(the weights line of this report, the log's 'ImageNet weights of' line)")
