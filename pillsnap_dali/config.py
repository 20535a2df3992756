"""Typed, strict configuration.

``configs/base.yaml`` holds every key with a comment; ``configs/stage*.yaml`` and ``demo.yaml`` hold only
what differs. Loading merges base <- stage overlay <- user file <- ``--set key=value`` pairs, then builds
frozen-by-convention dataclasses. Any key that the schema does not know is an error that names the closest
valid key, so a documented key can never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS

AUTO = "auto"
AutoInt = Union[int, str]  # an integer, or "auto": resolved when the config is loaded (``resolve_auto``)
# caps of "auto" on big machines: DALI threads past 32 add no decode throughput per GPU; each PIL worker is a
# process holding its own prefetched batches
AUTO_MAX_THREADS, AUTO_MAX_WORKERS = 32, 16

_logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
STAGES = ("demo", "1", "2", "3", "4")
CUSTOM = "custom"  # base.yaml alone: a user's own manifest whose stage cannot be told (no overlay applied)


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, bad type, bad value)."""


@dataclass
class SynthConfig:
    classes: int = 20
    images_per_class: int = 40
    combos: int = 12
    size: str = "976x1280"
    defects: bool = False
    seed: int = 0
    layout: str = "raw"


@dataclass
class DataConfig:
    root: Optional[str] = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    artifacts: str = "artifacts"
    verify: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ManifestConfig:
    images: int = 5000
    classes: int = 50
    sampling: str = "uniform"
    tiers: list = field(default_factory=lambda: [[400, 150], [400, 75], [200, 50]])
    val_fraction: float = 0.2
    include_combinations: bool = True
    min_images_per_class: int = 2
    seed: int = 42


@dataclass
class PreprocessConfig:
    img_size: int = 384
    resize_mode: str = "squash"
    crop_pct: float = 0.875
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class AugmentConfig:
    random_area: list = field(default_factory=lambda: [0.25, 1.0])
    random_aspect_ratio: list = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02


@dataclass
class LoaderConfig:
    backend: str = "auto"
    threads: AutoInt = AUTO
    workers: AutoInt = AUTO
    prefetch: int = 2
    drop_last: bool = False
    dtype: str = "float32"
    layout: str = "NCHW"
    hw_decoder_load: float = 0.65
    colour: str = "batch"
    readers: int = 4


@dataclass
class ModelConfig:
    name: str = "tf_efficientnetv2_s"
    pretrained: Optional[str] = None
    pretrained_class_map: Optional[str] = None
    drop_rate: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    class_weights: str = "none"
    weighted_sampler: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    amp: bool = True
    channels_last: bool = True
    target_accuracy: Optional[float] = None
    patience: int = 0
    log_interval: int = 20
    save_every: int = 0
    seed: int = 0
    torch_threads: AutoInt = AUTO  # torch's intra-op CPU threads; auto: pillsnap_dali.threads
    device: str = "auto"
    out: str = "runs"
    name: Optional[str] = None


@dataclass
class DetectConfig:
    model: str = "yolo11m.yaml"
    imgsz: int = 640
    epochs: int = 50
    batch_size: int = 16
    backend: str = "dali"
    include_singles: bool = False
    drop_incomplete: bool = False
    clip_tolerance: float = 0.02
    merge_iou: float = 0.9
    val_fraction: float = 0.2
    workers: int = 2
    flipud: float = 0.5


@dataclass
class PredictConfig:
    crop_padding: float = 0.1
    topk: int = 5
    conf: float = 0.25
    iou: float = 0.7


@dataclass
class PrepareConfig:
    quality: int = 95
    max_side: Optional[int] = 640
    subsampling: str = "444"
    workers: int = 2
    free_space_margin_gb: float = 20.0
    sample: int = 32


@dataclass
class Config:
    stage: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "stage": STAGES + (CUSTOM,),
    "data.verify": ("none", "header", "full"),
    "data.synth.layout": ("raw", "raw_underscore", "english"),
    "manifest.sampling": ("uniform", "tiered"),
    "preprocess.resize_mode": ("squash", "crop"),
    "loader.backend": ("auto", "dali", "dali-cpu", "pil"),
    "loader.dtype": ("float16", "float32"),
    "loader.layout": ("NCHW", "NHWC"),
    "loader.colour": ("batch", "graph"),
    "train.optimizer": ("adamw", "sgd"),
    "train.class_weights": ("none", "inv_freq", "effective_num"),
    "detect.backend": ("dali", "dali-cpu", "ultralytics"),
    "prepare.subsampling": ("444", "420"),
}


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (``train.lr``, ``data.synth.classes``...)."""
    keys = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            keys.extend(all_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component against the last components
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[hit[0]]] if hit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if origin is Union and set(get_args(typ)) == {int, str}:  # AutoInt
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        try:
            return _coerce(value, int, key)
        except ConfigError:
            raise ConfigError(f"config key '{key}' must be an integer or 'auto', got {value!r}") from None
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        typ = [a for a in get_args(typ) if a is not type(None)][0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if typ is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}{k}"
            raise ConfigError(f"unknown config key '{full}'{_suggest(full, all_keys(Config))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        t = hints[f.name]
        if is_dataclass(t):
            kwargs[f.name] = _build(t, data[f.name] or {}, key + ".")
        else:
            v = _coerce(data[f.name], t, key)
            if key in _CHOICES and v is not None and str(v) not in _CHOICES[key]:
                raise ConfigError(f"config key '{key}' must be one of {list(_CHOICES[key])}, got {v!r}")
            kwargs[f.name] = v
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        if v is None and isinstance(out.get(k), dict):
            continue  # a section with every key commented out is YAML null: it overrides nothing
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _is_text_key(key: str) -> bool:
    """True for a str / Optional[str] key of the schema (names, paths, choices)."""
    cls = Config
    parts = key.split(".")
    for part in parts[:-1]:
        cls = get_type_hints(cls)[part]
    t = get_type_hints(cls).get(parts[-1])
    return t is str or (get_origin(t) is Union and set(get_args(t)) == {str, type(None)})


def parse_set(pairs: list[str] | None) -> dict:
    """Turn ``["train.lr=0.01", "loader.backend=pil"]`` into a nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    valid = all_keys(Config)
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, valid)}")
        if _is_text_key(key) and raw.strip().lower() not in ("null", "none", "~", ""):
            value = raw  # a name or a path stays as typed (YAML would read --set train.name=010 as 8)
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        set_nested(out, key, value)
    return out


def stage_name(stage: str) -> str:
    """The folder name of a stage, for its manifests and its default run dir: ``stage3``, ``demo``, ``custom``."""
    return f"stage{stage}" if str(stage).isdigit() else str(stage)


def set_nested(d: dict, key: str, value: Any) -> None:
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_config(stage: str | None = None, path: str | Path | None = None, overrides: dict | None = None,
                sets: list[str] | None = None, default_stage: str | None = None) -> Config:
    """Resolve a configuration: base.yaml <- stage overlay <- file at ``path`` <- overrides <- ``--set``.

    The stage (which overlay) is the first given of: ``stage``, ``--set stage=N``, the file's ``stage:``,
    ``default_stage`` (e.g. guessed from a manifest's folder), base.yaml's."""
    data = _read_yaml(CONFIG_DIR / "base.yaml")
    user = _read_yaml(Path(path)) if path else {}
    set_data = parse_set(sets)
    stage = stage or set_data.get("stage") or user.get("stage") or default_stage or data.get("stage") or "demo"
    stage = str(stage)
    if stage not in STAGES + (CUSTOM,):
        raise ConfigError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    if stage != CUSTOM:
        overlay = CONFIG_DIR / ("demo.yaml" if stage == "demo" else f"stage{stage}.yaml")
        data = _merge(data, _read_yaml(overlay))
    data = _merge(data, user)
    data = _merge(data, overrides or {})
    data = _merge(data, set_data)
    data["stage"] = stage
    cfg = resolve_auto(_build(Config, data))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a resolved dict (e.g. the copy stored in a checkpoint or run dir)."""
    cfg = resolve_auto(_build(Config, data))
    validate(cfg)
    return cfg


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_auto(cfg: Config) -> Config:
    """``loader.threads`` / ``loader.workers`` = "auto": this process's share of the cores (all of them, or
    cores / LOCAL_WORLD_SIZE under torchrun; at most 32 threads / 16 workers), so DALI's CPU stages (PNG
    decoding, even on the GPU path) and the PIL workers scale with the machine instead of a fixed 2."""
    ld = cfg.loader
    if AUTO not in (ld.threads, ld.workers):
        return cfg
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, available_cores() // local)
    loader = dataclasses.replace(ld, threads=min(share, AUTO_MAX_THREADS) if ld.threads == AUTO else ld.threads,
                                 workers=min(share, AUTO_MAX_WORKERS) if ld.workers == AUTO else ld.workers)
    return dataclasses.replace(cfg, loader=loader)


def validate(cfg: Config) -> None:
    p = cfg.preprocess
    if p.img_size < 8:
        raise ConfigError(f"preprocess.img_size must be >= 8, got {p.img_size}")
    if len(p.mean) != 3 or len(p.std) != 3 or any(s <= 0 for s in p.std):
        raise ConfigError("preprocess.mean and preprocess.std must be 3 numbers each (std > 0)")
    if not 0 < p.crop_pct <= 1:
        raise ConfigError(f"preprocess.crop_pct must be in (0, 1], got {p.crop_pct}")
    if not 0 < cfg.manifest.val_fraction < 1:
        raise ConfigError(f"manifest.val_fraction must be in (0, 1), got {cfg.manifest.val_fraction}")
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0:
        raise ConfigError("train.batch_size must be >= 1 and train.epochs >= 0")
    if cfg.train.class_weights != "none" and cfg.train.weighted_sampler:
        raise ConfigError("use train.class_weights or train.weighted_sampler, not both")
    if cfg.train.target_accuracy is not None and not 0 < cfg.train.target_accuracy <= 1:
        raise ConfigError(f"train.target_accuracy must be in (0, 1], got {cfg.train.target_accuracy}")
    if len(cfg.augment.random_area) != 2 or len(cfg.augment.random_aspect_ratio) != 2:
        raise ConfigError("augment.random_area and augment.random_aspect_ratio must be [min, max]")
    ld = cfg.loader
    if ld.threads < 1 or ld.workers < 0 or ld.prefetch < 1 or ld.readers < 0:
        raise ConfigError(f"loader.threads and loader.prefetch must be >= 1, loader.workers and loader.readers "
                          f">= 0 (got threads={ld.threads}, prefetch={ld.prefetch}, workers={ld.workers}, "
                          f"readers={ld.readers})")


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False, allow_unicode=True)
