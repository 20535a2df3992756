"""``python -m pillsnap_dali.wheelhouse --cuda 13 --python 3.12 --out DIR``: every wheel the GPU path needs
beyond what a GPU box already holds (torch, torchvision, timm, numpy and their CUDA runtime), for one Python
version and CUDA major, so that ``scripts/gpu_check.sh --wheels DIR`` installs with no package index.

Run it where a package index is reachable. It builds the project's own wheel with the DALI flavour of that
CUDA major (``PILLSNAP_DALI_CUDA``, build_backend/pillsnap_backend.py), resolves ``pillsnap_dali[dev]`` for the
target (``pip install --dry-run --report`` with ``--python-version``/``--platform``: metadata only), walks
the dependency graph from the project without entering the box's packages (``BOX``), and downloads what it
reached (``pip download --no-deps --only-binary=:all:``): DALI with nvImageCodec / nvJPEG / optree / nvtx...,
Ultralytics with polars and the matplotlib stack, psutil, pytest. ``DIR/wheelhouse.json`` lists them with
their sizes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pillsnap_dali.commands.common import run_cli
from pillsnap_dali.errors import PillsnapError

BOX = ("torch", "torchvision", "timm", "numpy")   # what the lent GPU box already holds
PLATFORM = "manylinux_2_28_x86_64"
EXTRAS = ("dev",)
ROOT = Path(__file__).resolve().parents[2]

_logger = logging.getLogger(__name__)


class WheelhouseError(PillsnapError):
    pass


def marker_env(python: str, extra: str = "") -> dict:
    return {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python + ".0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": extra}


def requirements_of(requires: list[str], extras: tuple, python: str) -> list[Requirement]:
    """The requirements that apply on the target (markers evaluated for Linux x86_64, ``python``, ``extras``)."""
    out = []
    for text in requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate(marker_env(python, e)) for e in ("", *extras)):
            out.append(req)
    return out


def needed(report: dict, root: str, python: str, box=BOX) -> dict[str, str]:
    """{name: version} of what ``root`` (with EXTRAS) needs in pip's resolution ``report``, not entering the
    box's packages: what they need alone is on the box already; what another package also needs is kept."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    skip = {canonicalize_name(b) for b in box}
    keep: dict[str, str] = {}
    todo = [(canonicalize_name(root), EXTRAS)]
    while todo:
        name, extras = todo.pop()
        if name in skip or name in keep or name not in items:
            continue
        meta = items[name]["metadata"]
        keep[name] = meta["version"]
        for req in requirements_of(meta.get("requires_dist", []), extras, python):
            todo.append((canonicalize_name(req.name), tuple(req.extras)))
    return keep


def _pip(args: list[str], env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    _logger.info("%s", " ".join(cmd))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise WheelhouseError(f"{' '.join(cmd[2:5])} ... failed: {res.stderr.strip().splitlines()[-1:] or res.returncode}")


def own_wheel(out: Path, cuda: int) -> Path:
    if not (ROOT / "pyproject.toml").is_file():
        raise WheelhouseError(f"the project's wheel is built from a checkout: no pyproject.toml at {ROOT}")
    for old in out.glob("pillsnap_dali-*.whl"):
        old.unlink()
    _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
         env={**os.environ, "PILLSNAP_DALI_CUDA": str(cuda)})
    return next(out.glob("pillsnap_dali-*.whl"))


def platforms(platform: str) -> list[str]:
    """``manylinux_2_28_x86_64`` and every older manylinux tag a glibc 2.28 box also runs (pip takes the
    ``--platform`` values literally)."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
    tags = [f"manylinux_{major}_{v}_{arch}" for v in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for v, name in legacy.items() if major == 2 and v <= minor]


def target_flags(python: str, platform: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python]
    for tag in platforms(platform):
        flags += ["--platform", tag]
    return flags


def build(out: Path, cuda: int, python: str, platform: str = PLATFORM) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    wheel = own_wheel(out, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _pip(["install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), "--target",
              str(Path(tmp) / "t"), *target_flags(python, platform), f"pillsnap_dali[{','.join(EXTRAS)}] @ {wheel.as_uri()}"])
        keep = needed(json.loads(report.read_text()), "pillsnap_dali", python)
    keep.pop("pillsnap-dali", None)
    _pip(["download", "--no-deps", "-q", "-d", str(out), *target_flags(python, platform),
          *(f"{n}=={v}" for n, v in sorted(keep.items()))])
    wheels = sorted(p for p in out.glob("*.whl"))
    summary = {"cuda": cuda, "python": python, "platform": platform, "box": list(BOX), "packages": keep,
               "wheels": {p.name: p.stat().st_size for p in wheels},
               "total_mb": round(sum(p.stat().st_size for p in wheels) / 2 ** 20, 1),
               "seconds": round(time.monotonic() - t0, 1)}
    (out / "wheelhouse.json").write_text(json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.wheelhouse", description=__doc__.split("\n\n")[0])
    p.add_argument("--cuda", type=int, choices=(12, 13), required=True, help="CUDA major of the box's torch")
    p.add_argument("--python", required=True, help="the box's Python version, e.g. 3.12")
    p.add_argument("--out", required=True, help="folder for the wheels (e.g. wheels/, git-ignored)")
    p.add_argument("--platform", default=PLATFORM, help="wheel platform tag (default: %(default)s)")
    return p


def _main(a: argparse.Namespace) -> int:
    s = build(Path(a.out), a.cuda, a.python, a.platform)
    print(f"{len(s['wheels'])} wheels, {s['total_mb']} MB in {a.out} (CUDA {s['cuda']}, Python {s['python']}; "
          f"the box brings {', '.join(BOX)}) in {s['seconds']} s")
    return 0


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
