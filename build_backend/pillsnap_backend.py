"""The project's PEP 517 build backend: setuptools' own, plus one dependency chosen at build time, the DALI
wheel that matches the CUDA major of the target environment.

DALI ships one wheel per CUDA major (``nvidia-dali-cuda120``, ``nvidia-dali-cuda130``) and both write
``nvidia/dali``: they must never both be installed. The flavour is chosen, in order, from:

1. an explicit setting: ``--config-settings dali-cuda=13`` or the ``PILLSNAP_DALI_CUDA`` environment variable
   (``12`` or ``13``);
2. the DALI flavour already installed in the target environment (so a re-install never adds the other one);
3. the CUDA major of the torch installed there (its local version label ``+cu130``, else the CUDA runtime
   packages it requires, ``nvidia-*-cu13`` / ``cuda-toolkit==13.*``), read from its metadata, without
   importing torch;
4. CUDA 12 (``nvidia-dali-cuda120``, what a plain ``pip install -e .`` always installed).

pip's build isolation hides the target's site-packages from this process, so 2 and 3 are read by a
subprocess of the same interpreter with the isolation's ``PYTHONPATH`` / ``PYTHONNOUSERSITE`` removed.
The requirement is added to the wheel's (and the prepared metadata's) ``Requires-Dist``; nothing else
changes. This file is not part of the package (``backend-path`` in pyproject.toml).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from setuptools import build_meta as _st
from setuptools.build_meta import (build_sdist, get_requires_for_build_editable,  # noqa: F401 (re-exported)
                                   get_requires_for_build_sdist, get_requires_for_build_wheel)

ENV = "PILLSNAP_DALI_CUDA"
SETTING = "dali-cuda"
DALI_FLOOR = "1.45"
MAJORS = (12, 13)

# run in the target environment: the installed DALI flavours and torch's version and requirements
_PROBE = r"""
import json
from importlib import metadata as m
def get(name):
    try:
        return m.version(name), m.requires(name) or []
    except m.PackageNotFoundError:
        return None, []
dali = [d for d in ("nvidia-dali-cuda120", "nvidia-dali-cuda130") if get(d)[0]]
v, req = get("torch")
print(json.dumps({"dali": dali, "torch_version": v, "torch_requires": req}))
"""


class DaliChoiceError(ValueError):
    pass


def cuda_major_of_torch(version: str | None, requires: list[str]) -> int | None:
    """The CUDA major a torch build targets, from its metadata: ``2.9.0+cu130`` -> 13, ``+cu128`` -> 12,
    ``+cpu`` -> None; without a label (the PyPI wheel), the CUDA runtime it requires (``nvidia-cudnn-cu13``,
    ``nvidia-cuda-runtime-cu12``, ``cuda-toolkit[...]==13.0.3``)."""
    if not version:
        return None
    label = version.partition("+")[2]
    if label:
        m = re.fullmatch(r"cu(\d+?)(\d)", label)
        return int(m.group(1)) if m else None
    for req in requires:
        name = re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower()
        m = re.fullmatch(r"nvidia-[a-z0-9-]+-cu(\d+)", name)
        if m:
            return int(m.group(1))
        m = re.match(r"cuda-toolkit\b.*==\s*(\d+)\.", req.strip())
        if m:
            return int(m.group(1))
    return None


def choose_major(setting: str | None, installed_dali: list[str], torch_version: str | None,
                 torch_requires: list[str]) -> tuple[int, str]:
    """(CUDA major of the DALI wheel, why) in the order of the module docstring."""
    if setting not in (None, ""):
        if setting.strip() not in {str(m) for m in MAJORS}:
            raise DaliChoiceError(f"{ENV} / --config-settings {SETTING}= must be one of {MAJORS}, got {setting!r}")
        return int(setting), "explicit setting"
    if len(installed_dali) == 1:  # (two installed: check_target says which to remove)
        return int(installed_dali[0][-3:-1]), f"{installed_dali[0]} is installed"
    major = cuda_major_of_torch(torch_version, torch_requires)
    if major in MAJORS:
        return major, f"torch {torch_version} is a CUDA {major} build"
    return 12, "default"


def dali_requirement(major: int) -> str:
    return f"nvidia-dali-cuda{major}0>={DALI_FLOOR}"


def probe_target(python: str = sys.executable) -> dict:
    """What the target environment holds (``_PROBE`` in a subprocess free of the build isolation)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"dali": [], "torch_version": None, "torch_requires": []}


def check_target(major: int, installed_dali: list[str]) -> None:
    """An install into an environment that holds the other flavour (or both) stops here with the fix:
    both wheels write ``nvidia/dali``."""
    others = [d for d in installed_dali if d != f"nvidia-dali-cuda{major}0"]
    if others:
        raise DaliChoiceError(f"{' and '.join(others)} is installed and this install needs nvidia-dali-cuda{major}0 "
                              f"(both write nvidia/dali): pip uninstall -y {' '.join(others)} first")


def _requirement(config_settings, installing: bool = False) -> str:
    """The DALI requirement; ``installing`` (an editable install into this environment) also refuses a
    target that holds the other flavour. A plain wheel build may be for another machine: not checked."""
    setting = (config_settings or {}).get(SETTING) or os.environ.get(ENV)
    if isinstance(setting, list):
        setting = setting[-1]
    target = probe_target()
    major, why = choose_major(setting, target["dali"], target["torch_version"], target["torch_requires"])
    if installing:
        check_target(major, target["dali"])
    print(f"pillsnap_dali: DALI for CUDA {major} ({why}): {dali_requirement(major)}", file=sys.stderr)
    return dali_requirement(major)


def add_requirement(metadata: str, requirement: str) -> str:
    """METADATA text with ``Requires-Dist: requirement`` after the last Requires-Dist of the main set (before
    the header ends)."""
    head, sep, body = metadata.partition("\n\n")
    lines = head.splitlines()
    line = f"Requires-Dist: {requirement}"
    if line in lines:
        return metadata
    at = max((i for i, ln in enumerate(lines) if ln.startswith("Requires-Dist:") and "extra ==" not in ln),
             default=len(lines) - 1)
    lines.insert(at + 1, line)
    return "\n".join(lines) + (sep + body if sep else "\n")


def _patch_metadata_dir(metadata_directory: str, dist_info: str, requirement: str) -> str:
    path = Path(metadata_directory) / dist_info / "METADATA"
    path.write_text(add_requirement(path.read_text(encoding="utf-8"), requirement), encoding="utf-8")
    return dist_info


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def patch_wheel(wheel: Path, requirement: str) -> None:
    """Add the requirement to a built wheel's METADATA and fix its RECORD line."""
    with zipfile.ZipFile(wheel) as zin:
        items = [(info, zin.read(info.filename)) for info in zin.infolist()]
    meta = next(i.filename for i, _ in items if i.filename.endswith(".dist-info/METADATA"))
    record = meta.rsplit("/", 1)[0] + "/RECORD"
    new_meta = add_requirement(dict((i.filename, d) for i, d in items)[meta].decode("utf-8"), requirement).encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in items:
            if info.filename == meta:
                data = new_meta
            elif info.filename == record:
                rows = [f"{meta},{_record_hash(new_meta)},{len(new_meta)}" if r.startswith(meta + ",") else r
                        for r in data.decode("utf-8").splitlines()]
                data = ("\n".join(rows) + "\n").encode()
            zout.writestr(info, data)
    tmp.replace(wheel)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    name = _st.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    return _patch_metadata_dir(metadata_directory, name, _requirement(config_settings))


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    name = _st.prepare_metadata_for_build_editable(metadata_directory, config_settings)
    return _patch_metadata_dir(metadata_directory, name, _requirement(config_settings, installing=True))


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _st.build_wheel(wheel_directory, config_settings, metadata_directory)
    patch_wheel(Path(wheel_directory) / name, _requirement(config_settings))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _st.build_editable(wheel_directory, config_settings, metadata_directory)
    patch_wheel(Path(wheel_directory) / name, _requirement(config_settings, installing=True))
    return name
