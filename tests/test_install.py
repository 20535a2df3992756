"""A built wheel holds the configs and runs outside the checkout.

The wheel is built offline from a copy of the package's sources (``pip wheel --no-deps --no-build-isolation``,
setuptools as installed), never in the checkout (no ``build/`` left there). The slower test installs it into a
fresh venv (``--system-site-packages`` for the heavy dependencies, ``--no-deps``) and runs the package from an
unrelated directory with no ``PYTHONPATH``: it must import the venv's copy and read the shipped configs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pillsnap_dali", "pipelines", "configs", "build_backend", "pyproject.toml", "setup.py", "README.md")


def _copy_sources(dest: Path) -> Path:
    """The files a build reads, copied (a build writes build/ and *.egg-info beside them)."""
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_sources(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("pillsnap_dali-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _packages(root: Path) -> set[str]:
    return {str(p.parent.relative_to(root)) for top in ("pillsnap_dali", "pipelines")
            for p in (root / top).rglob("__init__.py") if "__pycache__" not in p.parts}


def test_the_wheel_holds_every_config_and_every_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        configs = sorted((REPO / "configs").glob("*.yaml"))
        assert len(configs) >= 6  # base, demo, stage1..4
        for yml in configs:
            inside = f"pillsnap_dali/configs/{yml.name}"
            assert inside in names, f"{yml.name} is not in the wheel"
            assert z.read(inside) == yml.read_bytes()
        # every package of the checkout ships (a new subpackage is found, not listed by hand)
        missing = {pkg for pkg in _packages(REPO) if f"{pkg}/__init__.py" not in names}
        assert not missing, f"packages missing from the wheel: {sorted(missing)}"
        assert not any(n.startswith(("tests/", "configs/")) for n in names)  # configs only inside the package


def _clean_env() -> dict:
    """The environment without ``PYTHONPATH`` (it would put the checkout before the installed copy)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _venv_with(wheel: Path | str, where: Path, *flags: str) -> Path:
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    # the venv sees the system's pip and dependencies; the wheel goes into the venv itself
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q",
                        *flags, str(wheel)], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return py


@pytest.mark.slow
def test_an_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    py = _venv_with(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env()
    probe = ("import pillsnap_dali; from pillsnap_dali.config import CONFIG_DIR, load_config; "
             "cfg = load_config(stage='demo'); s3 = load_config(stage='3'); "
             "print(pillsnap_dali.__file__); print(CONFIG_DIR); print(cfg.model.name, s3.manifest.classes)")
    r = subprocess.run([str(py), "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    module, config_dir, values = r.stdout.strip().splitlines()[-3:]
    site = str(tmp_path / "venv")
    assert module.startswith(site), f"imported {module}, not the installed wheel"
    assert config_dir.startswith(site) and config_dir.endswith(os.path.join("pillsnap_dali", "configs"))
    assert values == "resnet18 1000"  # demo.yaml's model and stage3.yaml's classes: the overlays were read
    r = subprocess.run([str(py), "-m", "pillsnap_dali.doctor"], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpu" in r.stdout and "torch" in r.stdout
    assert not list(elsewhere.iterdir())  # nothing written where it ran


@pytest.mark.slow
def test_an_editable_install_reads_the_checkouts_configs(tmp_path):
    """``pip install -e .``: the package dir holds no copy, so the top-level configs/ of the checkout is read."""
    checkout = _copy_sources(tmp_path / "checkout")
    py = _venv_with(checkout, tmp_path, "--no-build-isolation", "-e")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import pillsnap_dali; from pillsnap_dali.config import CONFIG_DIR, load_config; "
             "print(pillsnap_dali.__file__); print(CONFIG_DIR); print(load_config(stage='4').manifest.classes)")
    r = subprocess.run([str(py), "-c", probe], cwd=elsewhere, env=_clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    module, config_dir, classes = r.stdout.strip().splitlines()[-3:]
    assert module == str(checkout / "pillsnap_dali" / "__init__.py")
    assert config_dir == str(checkout / "configs") and classes == "4523"
