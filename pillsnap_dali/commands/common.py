"""The one command-line convention of the seven CLIs (train, manifest, synth, prepare, detect, predict, bench).

* Shared flags, the same name and meaning everywhere they apply: ``--stage --config --set --data-root --out
  --name --device --resume`` (:func:`add_shared_flags`).
* One flag-to-config mapping (:func:`config_from_args`): a CLI names the config key of each of its flags; the
  flags go over ``base.yaml <- stage overlay <- --config``, ``--set KEY=VALUE`` over the flags.
* One logging setup (:func:`setup_logging`) and one error policy (:func:`run_main`): a
  :class:`~pillsnap_dali.errors.PillsnapError` or an operating-system error becomes one ``error: ...`` line on
  stderr and exit status 2; anything else is a bug and keeps its traceback.
* Input checks before anything is moved or written: :func:`existing_file`, :func:`check_data_root` (a root one
  level too deep inside the AI Hub tree names the right one), :func:`check_device`.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

from pillsnap_dali.config import DEVICE_RE, STAGES, Config, config_default, load_config, set_nested
from pillsnap_dali.data.scan import COMBO_RE, KCODE_RE, SOURCE_RE, find_sources
from pillsnap_dali.errors import PillsnapError, UsageError, os_error_line

EXIT_ERROR = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_logger = logging.getLogger(__name__)

# the shared flags: (argparse keyword arguments, help); a CLI may reword a help (its --out is its output)
SHARED_FLAGS = {
    "stage": dict(choices=list(STAGES), help="stage whose overlay configs/stage<N>.yaml (or demo.yaml) is merged "
                                             "over base.yaml; one of %(choices)s (default: the config's stage, demo)"),
    "config": dict(metavar="YAML", help="a YAML config file merged over base + stage (default: none)"),
    "set": dict(action="append", default=[], metavar="KEY=VALUE",
                help="set any config key, repeatable; applied after every other flag (default: none)"),
    "data-root": dict(metavar="DIR", help="the AI Hub tree, raw Korean or English layout (config data.root; "
                                          "default: none, --stage demo generates its synthetic tree)"),
    "out": dict(metavar="DIR", help="runs folder (config train.out; default: runs)"),
    "name": dict(help="run name, the folder under --out (config train.name; default: the stage, e.g. stage3)"),
    "device": dict(help="auto | cpu | cuda | cuda:N (config train.device; default: auto, cuda when available)"),
    "resume": dict(nargs="?", const="__last__", metavar="CHECKPOINT",
                   help="continue a run from CHECKPOINT (default when given alone: the run's checkpoints/last.pt)"),
}
# the config key of each shared flag that has one (--out and --data-root of some CLIs mean their own folder)
SHARED_KEYS = {"data_root": "data.root", "out": "train.out", "name": "train.name", "device": "train.device"}


def add_shared_flags(p: argparse.ArgumentParser, names: Iterable[str], helps: dict | None = None,
                     required: Iterable[str] = ()) -> None:
    """Add the shared flags ``names`` (``"stage"``, ``"data-root"``...) to ``p``, with their standard help unless
    ``helps`` rewords one (say what the flag means in that CLI, and its default)."""
    helps, required = helps or {}, set(required)
    for name in names:
        kw = dict(SHARED_FLAGS[name])
        kw["help"] = helps.get(name, kw["help"])
        if name in required:
            kw["required"] = True
        p.add_argument(f"--{name}", **kw)


def key_help(text: str, key: str) -> str:
    """A flag's help that names its config key and the key's default from the schema (base.yaml)."""
    return f"{text} (config {key}; default: the stage config's, {config_default(key)!r} in base.yaml)"


def config_overrides(args: argparse.Namespace, keys: dict) -> dict:
    """The nested override dict of the flags given: ``keys`` maps a flag's dest to one config key or a tuple of
    keys (``--threads`` sets loader.threads and loader.workers); a flag left at None sets nothing."""
    out: dict = {}
    for dest, key in keys.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        for k in (key,) if isinstance(key, str) else key:
            set_nested(out, k, value)
    return out


def config_from_args(args: argparse.Namespace, keys: dict, default_stage: str | None = None) -> Config:
    """The config of a command line: base.yaml <- stage overlay <- ``--config`` <- the flags named in ``keys``
    <- ``--set``. A CLI with ``--data-root`` (``keys`` maps ``data_root``) gets the data root checked
    (:func:`check_data_root`), one with ``--device`` the device (:func:`check_device`)."""
    cfg = load_config(stage=getattr(args, "stage", None), path=getattr(args, "config", None),
                      overrides=config_overrides(args, keys), sets=getattr(args, "set", None),
                      default_stage=default_stage)
    if "data_root" in keys and cfg.data.root:
        check_data_root(cfg.data.root)
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    return cfg


# ---------------------------------------------------------------------------------------------- input checks
def existing_file(path: str | Path | None, flag: str) -> Path | None:
    """``path`` as a Path; a UsageError naming ``flag`` when it does not exist or is a folder."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder, not a file")
    return p


# folder names of the AI Hub release between the tree's root and its sources (1.Training, 원천데이터,
# 단일경구약제 5000종) and of the English layout's data/train/images/single/...; below them the sources (TS_n_단일)
# and the K-code folders (scan's patterns)
_LEVEL_RE = re.compile(r"^(\d+\.(training|validation)|원천데이터|라벨링데이터|(단일경구약제|경구약제조합)[ _]5000종"
                       r"|train|val|images|labels|single|combination)$", re.I)


def _is_level(name: str) -> bool:
    name = unicodedata.normalize("NFC", name)
    code = name.removesuffix("_json")
    return bool(_LEVEL_RE.match(name) or SOURCE_RE.match(name) or KCODE_RE.match(code) or COMBO_RE.match(code))


def suggested_root(root: str | Path) -> Path | None:
    """The tree's real root when ``root`` is a folder inside an AI Hub tree (``.../01.데이터/1.Training``,
    ``.../원천데이터``, ``data/train`` of the English layout) that does not hold both parts (training and
    validation) with both images and labels; None when ``root`` is fine."""
    here = Path(root).resolve()
    up = here
    while _is_level(up.name) and up.parent != up:
        up = up.parent
    if up == here:
        return None
    found = {(s.part, s.role) for s in find_sources(here)}
    complete = found >= {("train", "S"), ("train", "L"), ("val", "S"), ("val", "L")}
    return None if complete else up


def check_data_root(root: str | Path) -> Path:
    """A data root that exists, is a folder, and is not one level too deep inside the AI Hub tree."""
    p = Path(root)
    if not p.is_dir():
        raise UsageError(f"--data-root {p} is not a directory" + ("" if p.exists() else ": it does not exist"))
    better = suggested_root(p)
    if better is not None:
        raise UsageError(f"--data-root {p} is a folder inside the AI Hub tree ('{p.resolve().name}' holds only a "
                         f"part of it): pass --data-root {better}")
    return p


def check_device(spec: str) -> str:
    """``--device`` as given when it names a device this machine has: auto, cpu, cuda, cuda:N (N < the GPU
    count)."""
    import torch  # heavy: only the CLIs that take --device need it

    if not DEVICE_RE.match(spec):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        if index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s)"
                             + ("" if count else " (CUDA is not available here)"))
    return spec


# ---------------------------------------------------------------------------------------------- logging, errors
def setup_logging(level: int = logging.INFO, rank: int | None = None, log_file: str | Path | None = None,
                  verbose: bool = False) -> None:
    """The CLIs' one logging setup: records to stderr (DEBUG with ``verbose``), ``[rankN]`` in each line under
    torchrun (``rank`` given), and a copy in ``log_file`` when given. Called again it replaces the handlers."""
    fmt = LOG_FORMAT if rank is None else LOG_FORMAT.replace("%(levelname)s", f"[rank{rank}] %(levelname)s")
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=fmt, stream=sys.stderr, force=True)
    logging.captureWarnings(True)  # library warnings (PIL's EXIF notes...) go through the log, not bare stderr
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(fh)


def error_line(e: BaseException) -> str:
    """The line a user sees for an expected error: its message (an OS error: the path, then what happened)."""
    if isinstance(e, OSError) and (e.filename is not None or e.errno is not None):
        return os_error_line(e)
    return str(e).strip() or type(e).__name__


def run_cli(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None], argv=None,
            level: int = logging.INFO) -> int:
    """A CLI's ``main``: parse ``argv``, the one logging setup (DEBUG with ``-v/--verbose`` where the CLI has it),
    then ``body(args)`` under :func:`run_main`."""
    args = parser.parse_args(argv)
    setup_logging(level=level, verbose=bool(getattr(args, "verbose", False)))
    return run_main(lambda: body(args))


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a CLI's body: its exit status; an expected error (:class:`PillsnapError`, or an ``OSError`` such as
    a missing file, a full disk or a permission) is one ``error: ...`` line on stderr and status 2 (its
    traceback is logged at DEBUG); Ctrl-C before a command's own handler takes over (while it checks its
    inputs, builds manifests or a cache) is one ``interrupted`` line and status 130, as a shell reports it; any
    other exception is a bug and propagates with its traceback."""
    try:
        return int(fn() or 0)
    except (PillsnapError, OSError) as e:
        _logger.debug("failure", exc_info=True)
        print(f"error: {error_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _logger.debug("interrupted", exc_info=True)
        print("interrupted (Ctrl-C): nothing kept from this command's unfinished step", file=sys.stderr)
        return EXIT_SIGINT
