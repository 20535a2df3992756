"""The build backend that picks the DALI wheel for the target's CUDA major (build_backend/pillsnap_backend.py):
its choice on fake torch metadata, the refusal to install next to the other flavour, and the metadata and
wheel it builds here (real setuptools, real pip)."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))
import pillsnap_backend as backend  # noqa: E402

CU13_REQUIRES = ['filelock', 'cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"',
                 'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"', 'optree>=0.13.0; extra == "optree"']
CU12_REQUIRES = ['filelock', 'nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"',
                 'nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux"']


@pytest.mark.parametrize("version, requires, major", [
    ("2.9.0+cu130", [], 13), ("2.8.0+cu128", [], 12), ("2.7.1+cu126", CU13_REQUIRES, 12), ("2.8.0+cpu", [], None),
    ("2.11.0", CU13_REQUIRES, 13), ("2.8.0", CU12_REQUIRES, 12), ("2.11.0", ["filelock"], None), (None, [], None),
    ("2.11.0", ['cuda-toolkit[cublas]==13.1.0'], 13)])
def test_cuda_major_of_torch_from_its_metadata(version, requires, major):
    assert backend.cuda_major_of_torch(version, requires) == major


def test_the_choice_order():
    choose = backend.choose_major
    assert choose("13", ["nvidia-dali-cuda120"], "2.8.0+cu128", []) == (13, "explicit setting")
    assert choose(None, ["nvidia-dali-cuda130"], "2.8.0+cu128", [])[0] == 13      # installed flavour kept
    assert choose(None, [], "2.11.0", CU13_REQUIRES) == (13, "torch 2.11.0 is a CUDA 13 build")
    assert choose(None, [], "2.8.0+cpu", []) == (12, "default") == choose(None, [], None, [])
    assert choose(None, [], "2.9.0+cu140", []) == (12, "default")  # a major DALI has no wheel for
    with pytest.raises(backend.DaliChoiceError, match="must be one of"):
        choose("cuda13", [], None, [])
    assert backend.dali_requirement(13) == "nvidia-dali-cuda130>=1.45"


def test_an_install_next_to_the_other_flavour_is_refused():
    with pytest.raises(backend.DaliChoiceError, match=r"pip uninstall -y nvidia-dali-cuda120 first"):
        backend.check_target(13, ["nvidia-dali-cuda120"])
    backend.check_target(13, ["nvidia-dali-cuda130"])
    backend.check_target(12, [])


def test_the_probe_reads_this_environment_through_a_clean_subprocess(monkeypatch):
    """Even with a PYTHONPATH that hides nothing useful (pip's isolation sets one), the probe sees what this
    interpreter's site-packages hold."""
    from importlib import metadata
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-isolation")
    got = backend.probe_target()
    assert got["torch_version"] == metadata.version("torch")
    assert got["dali"] == [d for d in ("nvidia-dali-cuda120", "nvidia-dali-cuda130") if _installed(d)]


def _installed(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_add_requirement_goes_into_the_header_once():
    meta = "Metadata-Version: 2.4\nName: x\nRequires-Dist: numpy\nRequires-Dist: pytest; extra == \"dev\"\n\n# readme\n"
    out = backend.add_requirement(meta, "nvidia-dali-cuda130>=1.45")
    head = out.split("\n\n")[0].splitlines()
    assert head.index("Requires-Dist: nvidia-dali-cuda130>=1.45") == head.index("Requires-Dist: numpy") + 1
    assert out.endswith("\n\n# readme\n") and backend.add_requirement(out, "nvidia-dali-cuda130>=1.45") == out


@pytest.mark.parametrize("setting, flavour", [("13", "nvidia-dali-cuda130"), ("12", "nvidia-dali-cuda120")])
def test_prepared_metadata_names_the_chosen_flavour(tmp_path, monkeypatch, setting, flavour):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(backend.ENV, setting)
    name = backend.prepare_metadata_for_build_wheel(str(tmp_path))
    deps = [ln for ln in (tmp_path / name / "METADATA").read_text().splitlines() if ln.startswith("Requires-Dist:")]
    assert [d for d in deps if "nvidia-dali" in d] == [f"Requires-Dist: {flavour}>=1.45"]
    assert "Requires-Dist: torch>=2.7" in deps
    monkeypatch.delenv(backend.ENV)
    other = tmp_path / "cs"
    other.mkdir()
    name = backend.prepare_metadata_for_build_wheel(str(other), {backend.SETTING: setting})  # --config-settings
    assert f"Requires-Dist: {flavour}>=1.45" in (other / name / "METADATA").read_text()


def test_pip_builds_a_cuda13_wheel_with_a_valid_record(tmp_path):
    """``PILLSNAP_DALI_CUDA=13 pip wheel .``: the wheel needs nvidia-dali-cuda130 and its RECORD matches."""
    env = {**os.environ, backend.ENV: "13"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("pillsnap_dali-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name)
        record = z.read(meta_name.rsplit("/", 1)[0] + "/RECORD").decode()
        assert not any(n.startswith("build_backend/") or n == "pillsnap_backend.py" for n in z.namelist())
    head = meta.split(b"\n\n")[0]  # the header (the README follows)
    assert b"Requires-Dist: nvidia-dali-cuda130>=1.45" in head and b"nvidia-dali-cuda120" not in head
    digest = base64.urlsafe_b64encode(hashlib.sha256(meta).digest()).rstrip(b"=").decode()
    assert f"{meta_name},sha256={digest},{len(meta)}" in record.splitlines()


def _item(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


FAKE_REPORT = {"install": [
    _item("pillsnap_dali", "0.1.0", "nvidia-dali-cuda130>=1.45", "torch>=2.7", "timm>=0.9", "ultralytics>=8.4",
          'pytest>=7.4; extra == "dev"', 'onnx>=1.15; extra == "deploy"'),
    _item("nvidia-dali-cuda130", "2.4.0", "optree", "numpy", "nvidia-nvimgcodec-cu13[all]<0.10,>=0.9"),
    _item("nvidia-nvimgcodec-cu13", "0.9.0.20", 'nvidia-nvjpeg; extra == "all"', 'nvidia-nvtiff-cu13; extra == "tiff"'),
    _item("torch", "2.14.1", "filelock", 'nvidia-cudnn-cu13==9.24; platform_system == "Linux"'),
    _item("timm", "1.0.31", "torch", "huggingface-hub"),
    _item("ultralytics", "8.4.190", "torch>=1.8", "polars>=0.20", "matplotlib>=3.3", "filelock"),
    _item("matplotlib", "3.11.2", "numpy>=1.23", "pyparsing>=3"),
    _item("pytest", "9.2.0", 'colorama>=0.4; sys_platform == "win32"', 'tomli>=1; python_version < "3.11"'),
    *(_item(n, "1.0") for n in ("filelock", "nvidia-cudnn-cu13", "huggingface-hub", "polars", "pyparsing", "optree",
                                "numpy", "nvidia-nvjpeg", "nvidia-nvtiff-cu13", "onnx", "colorama", "tomli"))]}


def test_the_wheel_set_walks_the_graph_without_entering_the_box():
    """What torch, timm and numpy need alone (filelock, cuDNN, huggingface-hub) is on the box; what another
    package also needs (filelock for Ultralytics) is kept; extras and markers as the target evaluates them."""
    from pillsnap_dali.commands.wheelhouse import needed
    keep = needed(FAKE_REPORT, "pillsnap_dali", "3.12")
    assert set(keep) == {"pillsnap-dali", "nvidia-dali-cuda130", "optree", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg",
                         "ultralytics", "polars", "matplotlib", "pyparsing", "filelock", "pytest"}
    assert keep["nvidia-dali-cuda130"] == "2.4.0"
    assert "tomli" in needed(FAKE_REPORT, "pillsnap_dali", "3.10")  # python_version < "3.11"
    report = {"install": [i for i in FAKE_REPORT["install"] if i["metadata"]["name"] != "ultralytics"]}
    assert "filelock" not in needed(report, "pillsnap_dali", "3.12")


def test_the_target_platform_takes_older_manylinux_tags():
    from pillsnap_dali.commands.wheelhouse import platforms, target_flags
    tags = platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags and platforms("linux_x86_64") == ["linux_x86_64"]
    flags = target_flags("3.12", "manylinux_2_28_x86_64")
    assert flags[:3] == ["--only-binary=:all:", "--python-version", "3.12"] and flags.count("--platform") == len(tags)
