"""Typed, strict configuration.

``configs/base.yaml`` holds every key with a comment; ``configs/stage*.yaml`` and ``demo.yaml`` hold only
what differs (shipped in the package as ``pillsnap_dali/configs/``, read through ``importlib.resources``). Loading merges base <- stage overlay <- user file <- ``--set key=value`` pairs, then builds
frozen dataclasses (a changed setting is a new object: ``dataclasses.replace``). Every value is checked
against its type, its choices and its range in every layer it is set in, so a bad value in a ``--config``
file is reported even when a flag or ``--set`` replaces it. Any key that the schema does not know is an error that names the closest
valid key, so a documented key can never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from importlib import resources
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS
from pillsnap_dali.sysinfo import process_cores

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

AUTO = "auto"
AutoInt = Union[int, str]  # an integer, or "auto": resolved when the config is loaded (``resolve_auto``)
# caps of "auto" on big machines: DALI threads past 32 add no decode throughput per GPU; each PIL worker is a
# process holding its own prefetched batches
AUTO_MAX_THREADS, AUTO_MAX_WORKERS = 32, 16

_logger = logging.getLogger(__name__)



def _config_dir() -> Traversable:
    """The shipped ``base.yaml`` and stage overlays: the package's ``pillsnap_dali/configs/`` in an installed
    wheel (setup.py maps the checkout's top-level ``configs/`` there at build time), else the checkout's
    ``configs/`` (an editable install or a checkout on ``sys.path``: the package dir holds no copy)."""
    packaged = resources.files("pillsnap_dali") / "configs"
    if packaged.joinpath("base.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()
STAGES = ("demo", "1", "2", "3", "4")
CUSTOM = "custom"  # base.yaml alone: a user's own manifest whose stage cannot be told (no overlay applied)


class ConfigError(PillsnapError, ValueError):
    """A configuration problem the user must fix (unknown key, bad type, bad value)."""


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 20
    images_per_class: int = 40
    combos: int = 12
    size: str = "976x1280"
    defects: bool = False
    seed: int = 0
    layout: str = "raw"


@dataclass(frozen=True)
class DataConfig:
    root: Optional[str] = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    artifacts: str = "artifacts"
    verify: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ManifestConfig:
    images: int = 5000
    classes: int = 50
    sampling: str = "uniform"
    tiers: list = field(default_factory=lambda: [[400, 150], [400, 75], [200, 50]])
    val_fraction: float = 0.2
    include_combinations: bool = True
    min_images_per_class: int = 2
    seed: int = 42


@dataclass(frozen=True)
class PreprocessConfig:
    img_size: int = 384
    resize_mode: str = "squash"
    crop_pct: float = 0.875
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass(frozen=True)
class AugmentConfig:
    random_area: list = field(default_factory=lambda: [0.25, 1.0])
    random_aspect_ratio: list = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02


@dataclass(frozen=True)
class LoaderConfig:
    backend: str = "auto"
    threads: AutoInt = AUTO
    workers: AutoInt = AUTO
    prefetch: int = 2
    drop_last: bool = False
    dtype: str = "float32"
    layout: str = "auto"
    hw_decoder_load: float = 0.65
    readers: int = 4
    cache: str = "auto"  # auto | off | a folder: the 640 px JPEG cache of PNG inputs (data/cache.ensure_cache)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tf_efficientnetv2_s"
    pretrained: Optional[str] = None
    pretrained_class_map: Optional[str] = None
    pretrained_file: Optional[str] = None
    drop_rate: float = 0.2


@dataclass(frozen=True)
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
    target_accuracy: Optional[float] = None
    patience: int = 0
    log_interval: int = 20
    tensorboard: bool = True
    save_every: int = 0
    max_skipped: float = 0.05
    seed: int = 0
    torch_threads: AutoInt = AUTO  # torch's intra-op CPU threads; auto: pillsnap_dali.threads
    device: str = "auto"
    out: str = "runs"
    name: Optional[str] = None


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class PredictConfig:
    crop_padding: float = 0.1
    topk: int = 5
    conf: float = 0.25
    iou: float = 0.7


@dataclass(frozen=True)
class EvaluateConfig:
    after_training: bool = True
    target_top1: Optional[float] = None
    target_top5: Optional[float] = None
    target_class_precision: Optional[float] = None
    target_class_recall: Optional[float] = None
    worst_classes: int = 20


@dataclass(frozen=True)
class PrepareConfig:
    quality: int = 95
    max_side: Optional[int] = 640
    subsampling: str = "444"
    workers: int = 2
    free_space_margin_gb: float = 20.0
    sample: int = 32


@dataclass(frozen=True)
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
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

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
    "loader.layout": ("auto", "NCHW", "NHWC"),
    "train.optimizer": ("adamw", "sgd"),
    "train.class_weights": ("none", "inv_freq", "effective_num"),
    "detect.backend": ("dali", "dali-cpu", "ultralytics"),
    "prepare.subsampling": ("444", "420"),
}


DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # train.device and every CLI's --device
MAX_BATCH = 4096  # images per step per rank: past this a typo (16000 for 16) and no GPU's memory


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of numbers (finite ones only); ``hi=None`` is unbounded above."""
    lo: float
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


PROB, UNIT_OPEN, FRACTION = Range(0, 1), Range(0, 1, lo_open=True), Range(0, 1, lo_open=True, hi_open=True)
NONNEG, POS, ONE_UP = Range(0), Range(0, lo_open=True), Range(1)
# the allowed range of every numeric key (an "auto" or null value is not checked); list keys: each element
_RANGES = {
    "data.max_pixels": ONE_UP, "data.synth.classes": ONE_UP, "data.synth.images_per_class": ONE_UP,
    "data.synth.combos": NONNEG, "data.synth.seed": NONNEG,
    "manifest.images": ONE_UP, "manifest.classes": ONE_UP, "manifest.val_fraction": FRACTION,
    "manifest.min_images_per_class": Range(2), "manifest.seed": NONNEG,
    "preprocess.img_size": Range(8, 8192), "preprocess.crop_pct": UNIT_OPEN, "preprocess.mean": PROB,
    "preprocess.std": POS,
    "augment.random_area": UNIT_OPEN, "augment.random_aspect_ratio": POS, "augment.hflip": PROB,
    "augment.brightness": PROB, "augment.contrast": PROB, "augment.saturation": PROB, "augment.hue": Range(0, 0.5),
    "loader.threads": ONE_UP, "loader.workers": NONNEG, "loader.prefetch": ONE_UP, "loader.hw_decoder_load": PROB,
    "loader.readers": NONNEG,
    "model.drop_rate": Range(0, 1, hi_open=True),
    "train.epochs": ONE_UP, "train.batch_size": Range(1, MAX_BATCH), "train.lr": NONNEG,
    "train.weight_decay": NONNEG, "train.momentum": Range(0, 1, hi_open=True), "train.warmup_epochs": NONNEG,
    "train.label_smoothing": Range(0, 1, hi_open=True), "train.grad_clip": NONNEG,
    "train.ema_decay": Range(0, 1, hi_open=True), "train.target_accuracy": UNIT_OPEN, "train.patience": NONNEG,
    "train.log_interval": ONE_UP, "train.save_every": NONNEG, "train.seed": NONNEG,
    "train.max_skipped": PROB,
    "detect.imgsz": Range(32, 8192), "detect.epochs": NONNEG, "detect.batch_size": Range(1, MAX_BATCH),
    "detect.clip_tolerance": PROB, "detect.merge_iou": PROB, "detect.val_fraction": FRACTION,
    "detect.workers": NONNEG, "detect.flipud": PROB,
    "predict.crop_padding": NONNEG, "predict.topk": ONE_UP, "predict.conf": PROB, "predict.iou": PROB,
    "prepare.quality": Range(1, 100), "prepare.max_side": Range(16), "prepare.workers": ONE_UP,
    "prepare.free_space_margin_gb": NONNEG, "prepare.sample": ONE_UP,
}
_LENGTHS = {"augment.random_area": 2, "augment.random_aspect_ratio": 2, "preprocess.mean": 3, "preprocess.std": 3}
_ORDERED = ("augment.random_area", "augment.random_aspect_ratio")  # [min, max]


def _check_value(key: str, v: Any) -> None:
    """The range (and for a list, the length and each element's range) of one value."""
    if key == "loader.cache":
        _check_cache_value(v)
    if key == "train.device" and not DEVICE_RE.match(str(v)):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {v!r}")
    if v is None or v == AUTO or key not in _RANGES:
        return
    rng = _RANGES[key]
    if isinstance(v, list):
        if key in _LENGTHS and len(v) != _LENGTHS[key]:
            raise ConfigError(f"config key '{key}' must be a list of {_LENGTHS[key]} numbers, got {v!r}")
        bad = [x for x in v if not rng.holds(x)]
        if bad:
            raise ConfigError(f"each number of config key '{key}' must be {rng}, got {v!r}")
        if key in _ORDERED and v[0] > v[1]:
            raise ConfigError(f"config key '{key}' must be [min, max] with min <= max, got {v!r}")
    elif not rng.holds(v):
        raise ConfigError(f"config key '{key}' must be {rng}, got {v!r}")


def _check_cache_value(v: Any) -> None:
    """``loader.cache``: auto, off or a folder; a word that is neither (``on``, ``yes``, a typo) is refused, a
    folder is told by a path separator or a leading ``.``/``~``."""
    if v in ("auto", "off"):
        return
    text = str(v) if isinstance(v, str) else ""
    if not text or not ("/" in text or "\\" in text or text.startswith((".", "~"))):
        raise ConfigError(f"config key 'loader.cache' must be auto, off or a folder (a path such as ./jpeg640, "
                          f"~/jpeg640 or an absolute folder), got {v!r}")


def config_default(key: str) -> Any:
    """The schema's default of a dotted key (what base.yaml says; a stage overlay may differ)."""
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


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


# keys that are gone (merged into another, or removed), with what to do instead: the error says it
_GONE = {
    "train.channels_last": "the memory format is one setting now: loader.layout (auto = NHWC, i.e. channels_last, "
                           "on CUDA and NCHW on the CPU; or NHWC | NCHW)",
    "loader.colour": "training has one colour step (jitter + normalization on the batch, pipelines/colour.py); "
                     "the colour-in-the-DALI-graph variant is a benchmark arm only: python -m pillsnap_dali.bench "
                     "decode ... (arm dali-cpu:colour-graph); delete it from the config",
}


def memory_layout(layout: str, device_type: str) -> str:
    """``loader.layout`` for a training device type: ``auto`` is NHWC (channels_last) on CUDA, NCHW elsewhere.
    The loaders deliver batches in it and the model is put in it: no batch is copied a second time."""
    if layout == "auto":
        return "NHWC" if device_type == "cuda" else "NCHW"
    return layout


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    if key in _GONE:
        return ConfigError(f"config key '{key}' was removed: {_GONE[key]}")
    return ConfigError(f"unknown config key '{key}'{_suggest(key, valid)}")


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
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if typ is str:
        if key == "loader.cache" and value is False:  # YAML 1.1 reads an unquoted `cache: off` as false
            value = "off"
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
            raise _unknown_key(full, all_keys(Config))
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
            _check_value(key, v)
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last one silently: a
    pasted section would override an earlier setting without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                line = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {line})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where it is (line, column)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def _not_utf8(path: Path, raw: bytes) -> ConfigError:
    enc = "UTF-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "another encoding"
    return ConfigError(f"config file {path} is not UTF-8 (it is probably {enc}): save it as UTF-8")


def _read_yaml(path: Path | Traversable) -> dict:
    """A YAML mapping from a file (a user's path, or a config shipped in the package)."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise _not_utf8(path, raw) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error_line(e)}") from None
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
            raise _unknown_key(key, valid)
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
    ``default_stage`` (e.g. guessed from a manifest's folder), base.yaml's. Each layer is checked on its own
    (keys, types, ranges; the message names the layer), then the merged result (the rules between keys)."""
    data = _read_yaml(CONFIG_DIR / "base.yaml")
    user = _read_yaml(Path(path)) if path else {}
    set_data = parse_set(sets)
    stage = stage or set_data.get("stage") or user.get("stage") or default_stage or data.get("stage") or "demo"
    stage = str(stage)
    if stage not in STAGES + (CUSTOM,):
        raise ConfigError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    layers = [(f"config file {CONFIG_DIR / 'base.yaml'}", data)]
    if stage != CUSTOM:
        overlay = CONFIG_DIR / ("demo.yaml" if stage == "demo" else f"stage{stage}.yaml")
        layers.append((f"config file {overlay}", _read_yaml(overlay)))
    layers += [(f"config file {path}", user), ("the command line's flags", overrides or {}), ("--set", set_data)]
    for where, layer in layers:
        _check_layer(layer, where)
        data = _merge(data, layer) if layer is not data else data
    cfg = resolve_auto(_build(Config, {**data, "stage": stage}))
    validate(cfg)
    return cfg


def preprocess_from_dict(data: Any, where: str) -> PreprocessConfig:
    """A preprocess section stored elsewhere than a config file (a checkpoint, an export's JSON), checked as a
    config file's is: its keys, their types and ranges (a missing key has the schema's default, as in a
    file); an error names ``where``."""
    try:
        return _build(PreprocessConfig, data, "preprocess.")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: Any, where: str) -> Config:
    """A whole resolved config stored elsewhere than a config file (a checkpoint's ``config``): the same keys,
    types, ranges and rules between keys as ``load_config``; an error names ``where``."""
    try:
        cfg = _build(Config, data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _check_layer(layer: dict, where: str) -> None:
    """One layer's sections, keys, types and ranges, before a later layer can hide them."""
    try:
        _build(Config, layer)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_auto(cfg: Config) -> Config:
    """``loader.threads`` / ``loader.workers`` = "auto": this process's share of the cores (all of them, or
    cores / LOCAL_WORLD_SIZE under torchrun; at most 32 threads / 16 workers), so DALI's CPU stages (PNG
    decoding, even on the GPU path) and the PIL workers scale with the machine instead of a fixed 2."""
    ld = cfg.loader
    if AUTO not in (ld.threads, ld.workers):
        return cfg
    share = process_cores()  # the OS's facts: sysinfo.py
    loader = dataclasses.replace(ld, threads=min(share, AUTO_MAX_THREADS) if ld.threads == AUTO else ld.threads,
                                 workers=min(share, AUTO_MAX_WORKERS) if ld.workers == AUTO else ld.workers)
    return dataclasses.replace(cfg, loader=loader)


def validate(cfg: Config) -> None:
    """The rules between keys (each key's own range is checked when it is read: ``_check_value``)."""
    if cfg.train.class_weights != "none" and cfg.train.weighted_sampler:
        raise ConfigError("use train.class_weights or train.weighted_sampler, not both")
    if cfg.model.pretrained_file and str(cfg.model.pretrained).strip().lower() != "imagenet":
        raise ConfigError(f"model.pretrained_file is the local copy of the ImageNet weights: it needs "
                          f"model.pretrained: imagenet (got {cfg.model.pretrained!r}; a weights file of your own "
                          "goes in model.pretrained / --pretrained PATH)")
    tiers = cfg.manifest.tiers
    if not tiers or not all(isinstance(t, list) and len(t) == 2 and all(ONE_UP.holds(x) and isinstance(x, int)
                                                                         for x in t) for t in tiers):
        raise ConfigError(f"config key 'manifest.tiers' must be a list of [classes, images per class] pairs of "
                          f"integers >= 1, got {tiers!r}")


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False, allow_unicode=True)
