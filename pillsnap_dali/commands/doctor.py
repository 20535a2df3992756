"""``python -m pillsnap_dali.doctor``: the first command on any machine. Can this install train on the GPU?

It gathers the facts once (``gather``: CPU cores, torch build and its kernels against each GPU's compute
capability, driver, DALI with its nvImageCodec / nvJPEG and CUDA build, a real ``mixed`` decode of a small
JPEG on the GPU, Ultralytics / timm against the floors, free disk for a JPEG cache), then judges them
(``judge``: pure functions of the facts, so a fake capability table tests them on a CPU). Each line has a
verdict and, where it is not ok, the exact fix. The last line says which backend training will use.

Exit status: 0 when this machine's path works (on a machine without a GPU: the ``dali-cpu`` backend);
1 when a GPU is there (or ``--require-gpu``) but the GPU path cannot work; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pillsnap_dali.commands.common import run_cli
from pillsnap_dali.errors import one_line
from pillsnap_dali.sysinfo import available_cores

FLOORS = {"torch": "2.7", "ultralytics": "8.4.138", "timm": "0.9.12", "nvidia-dali": "1.45"}
CU128_INDEX = "https://download.pytorch.org/whl/cu128"
BLACKWELL_DRIVER = 570   # CUDA 12.8, the first toolkit with sm_100 / sm_120 code
CUDA13_DRIVER = 580
CACHE_GB = {"Stage 3 (100k images)": 8, "Stage 4 (500k images)": 40}  # 640 px JPEG cache, ~80 KB per image
OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"


@dataclass
class Gpu:
    name: str
    capability: tuple[int, int]
    memory_gb: float = 0.0


@dataclass
class Facts:
    """Everything the verdicts look at. ``gather`` fills it on this machine; tests build it by hand."""
    cpu_cores: int = 1
    torch_version: str = ""
    torch_cuda: str | None = None            # torch.version.cuda (None: a CPU-only build)
    arch_list: list[str] = field(default_factory=list)  # torch.cuda.get_arch_list()
    gpus: list[Gpu] = field(default_factory=list)       # what the driver reports (NVML), else torch
    cuda_available: bool = False             # torch.cuda.is_available()
    driver: str | None = None
    dali_version: str | None = None
    dali_package: str | None = None          # nvidia-dali-cuda120 / -cuda130
    dali_cuda: int | None = None             # the CUDA major DALI was built with
    nvimgcodec: str | None = None
    nvjpeg: str | None = None
    mixed_decode: str | None = None          # "ok", an error line, or None (not tried)
    gpu_decoder: str | None = None           # nvImageCodec's CUDA backend alone: "ok", "none" or an error
    hw_jpeg: bool | None = None              # a hardware JPEG engine decoded (None: not probed)
    versions: dict = field(default_factory=dict)  # ultralytics, timm
    disk_path: str = "."
    free_gb: float = 0.0


@dataclass
class Line:
    what: str
    status: str
    detail: str
    fix: str = ""
    gpu_path: bool = False   # a FAIL here means the GPU path cannot work


# ------------------------------------------------------------------------------------------------ verdicts
def version_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


_ARCH = re.compile(r"^(sm|compute|lto)_(\d+)([a-z]?)$")


def parse_arch(arch: str) -> tuple[str, int, int, str] | None:
    """``(kind, major, minor, suffix)`` of an arch entry as torch prints it (``sm_90``, ``sm_90a``,
    ``sm_100f``, ``compute_120``, ``lto_90``); None for anything else. The last digit is the minor."""
    m = _ARCH.match(arch.strip().lower())
    if not m or len(m.group(2)) < 2:
        return None
    num = m.group(2)
    return m.group(1), int(num[:-1]), int(num[-1]), m.group(3)


def has_kernels(arch_list: list[str], cap: tuple[int, int]) -> bool:
    """Whether a torch built for ``arch_list`` runs on compute capability ``cap``: a cubin of the same major
    and a minor not above it (sm_80 code runs on 8.6), or PTX (compute_XY) at or below it to JIT.
    ``sm_90a``-style (arch-specific) cubins run on exactly that capability; ``sm_100f``-style (family) cubins
    on the same major at or above the minor, like plain ones. Unknown entries are ignored, never an error."""
    for arch in arch_list:
        parsed = parse_arch(arch)
        if parsed is None:
            continue
        kind, major, minor, suffix = parsed
        if kind == "sm" and major == cap[0] and (minor == cap[1] if suffix == "a" else minor <= cap[1]):
            return True
        if kind == "compute" and (major, minor) <= tuple(cap):
            return True
    return False


def dali_flavour(torch_cuda: str | None) -> str:
    """The DALI wheel that matches torch's CUDA major (``torch.version.cuda``): nvidia-dali-cuda130 for
    CUDA 13, else nvidia-dali-cuda120 (also for a CPU-only torch: the default install)."""
    major = version_tuple(torch_cuda)[:1]
    return "nvidia-dali-cuda130" if major and major[0] >= 13 else "nvidia-dali-cuda120"


def dali_install(f: "Facts") -> str:
    """The one documented way to get that flavour (pyproject's build backend reads PILLSNAP_DALI_CUDA)."""
    major = "13" if dali_flavour(f.torch_cuda).endswith("130") else "12"
    return f"PILLSNAP_DALI_CUDA={major} pip install -e . (README: Installing on a GPU workstation)"


def _sm(cap: tuple[int, int]) -> str:
    return f"sm_{cap[0]}{cap[1]}"


def judge_torch(f: Facts) -> list[Line]:
    floor = FLOORS["torch"]
    ok_version = version_tuple(f.torch_version) >= version_tuple(floor)
    lines = [Line("torch", OK if ok_version else FAIL, f"{f.torch_version} (CUDA {f.torch_cuda or 'none: CPU-only build'})",
                  "" if ok_version else f"pip install 'torch>={floor}' torchvision --index-url {CU128_INDEX}")]
    if f.gpus and not f.torch_cuda:
        lines.append(Line("torch CUDA", FAIL, "this torch is a CPU-only build but the machine has a GPU",
                          f"pip install 'torch>={floor}' torchvision --index-url {CU128_INDEX}", gpu_path=True))
    for i, g in enumerate(f.gpus):
        if not f.torch_cuda:
            break
        sm = _sm(g.capability)
        if has_kernels(f.arch_list, g.capability):
            lines.append(Line(f"kernels gpu{i}", OK, f"{g.name} ({sm}) is in this torch's {' '.join(f.arch_list)}"))
        else:
            need = "torch>=2.7 from the cu128 index" if g.capability[0] >= 10 else "a torch build that lists it"
            lines.append(Line(f"kernels gpu{i}", FAIL, f"this torch has no {sm} kernels ({' '.join(f.arch_list) or 'none'})",
                              f"install {need}: pip install 'torch>={floor}' torchvision --index-url {CU128_INDEX}",
                              gpu_path=True))
    return lines


def judge_driver(f: Facts) -> list[Line]:
    if not f.gpus:
        return [Line("driver", INFO, "no NVIDIA GPU / driver seen")]
    need, why = 525, "CUDA 12"
    if any(g.capability[0] >= 10 for g in f.gpus):
        need, why = BLACKWELL_DRIVER, "Blackwell (CUDA 12.8)"
    if version_tuple(f.torch_cuda)[:1] >= (13,) or (f.dali_cuda or 0) >= 13:
        need, why = max(need, CUDA13_DRIVER), "CUDA 13 builds"
    have = version_tuple(f.driver)[:1]
    if not have:
        return [Line("driver", WARN, "driver version unknown (NVML not readable)", "check nvidia-smi")]
    ok = have[0] >= need
    return [Line("driver", OK if ok else FAIL, f"{f.driver} (>= {need} needed for {why})",
                 "" if ok else f"update the NVIDIA driver to {need} or later", gpu_path=True)]


def _dali_fix(f: Facts, upgrade: bool = False) -> str:
    flavour = dali_flavour(f.torch_cuda)
    return (f"pip install {'-U ' * upgrade}'{flavour}>={FLOORS['nvidia-dali']}' (from a checkout: "
            f"{dali_install(f)})")


def judge_dali(f: Facts) -> list[Line]:
    if not f.dali_version:
        return [Line("DALI", FAIL if f.gpus else WARN, "not installed (training falls back to the pil backend)",
                     _dali_fix(f), gpu_path=True)]
    ok = version_tuple(f.dali_version) >= version_tuple(FLOORS["nvidia-dali"])
    codecs = f"nvImageCodec {f.nvimgcodec or '-'}, nvJPEG {f.nvjpeg or 'via nvImageCodec'}"
    lines = [Line("DALI", OK if ok else FAIL, f"{f.dali_version} ({f.dali_package}, CUDA {f.dali_cuda or '?'}; {codecs})",
                  "" if ok else _dali_fix(f, upgrade=True), gpu_path=True)]
    torch_major = version_tuple(f.torch_cuda)[:1]
    if torch_major and f.dali_cuda and torch_major[0] != f.dali_cuda:
        # both flavours write nvidia/dali: the one installed goes first
        lines.append(Line("DALI/torch CUDA", WARN, f"DALI is a CUDA {f.dali_cuda} build, torch a CUDA {torch_major[0]} one",
                          f"pip uninstall -y {f.dali_package} && {_dali_fix(f)}"))
    return lines


def judge_decode(f: Facts) -> list[Line]:
    """The mixed decode counts only when the GPU decoder itself ran: DALI's ``mixed`` falls back hardware ->
    CUDA -> hybrid -> CPU, so a correct image from it proves nothing about the GPU. ``gpu_decoder`` is
    nvImageCodec (the library DALI decodes through) restricted to its CUDA backend; ``hw_jpeg`` the same
    restricted to the hardware JPEG engine."""
    if f.mixed_decode is None:
        return [Line("mixed decode", INFO, "not tried (no CUDA device for torch, or no DALI)")]
    fix = f"install {dali_flavour(f.torch_cuda)}>={FLOORS['nvidia-dali']} and a driver >= {BLACKWELL_DRIVER}"
    if f.mixed_decode != OK:
        return [Line("mixed decode", FAIL, f"DALI cannot decode on this GPU: {f.mixed_decode}", fix, gpu_path=True)]
    if f.gpu_decoder != OK:
        return [Line("mixed decode", FAIL, "DALI 'mixed' gave the image, but nvImageCodec's CUDA decoder did not "
                     f"decode on this GPU ({f.gpu_decoder or 'not tried'}): mixed fell back to the CPU", fix,
                     gpu_path=True)]
    lines = [Line("mixed decode", OK, "a JPEG decoded on the GPU (DALI 'mixed', device output; nvImageCodec's "
                  "CUDA decoder alone decodes it)")]
    if f.hw_jpeg is None:
        lines.append(Line("JPEG engine", INFO, "hardware JPEG decoder not probed"))
    elif f.hw_jpeg:
        lines.append(Line("JPEG engine", INFO, "hardware JPEG decoder present (A100/H100-class): rows split "
                          "between it and the CUDA decoder by loader.hw_decoder_load"))
    else:
        lines.append(Line("JPEG engine", INFO, "no hardware JPEG decoder (e.g. RTX cards): the CUDA decoder does "
                          "every JPEG; gpu_check's 'dali >= 5x pil' holds for A100/H100-class GPUs only"))
    return lines


def judge_packages(f: Facts) -> list[Line]:
    lines = []
    for name in ("ultralytics", "timm"):
        have, floor = f.versions.get(name), FLOORS[name]
        ok = bool(have) and version_tuple(have) >= version_tuple(floor)
        lines.append(Line(name, OK if ok else FAIL, f"{have or 'not installed'} (floor {floor})",
                          "" if ok else f"pip install -U '{name}>={floor}'"))
    return lines


def judge_disk(f: Facts) -> list[Line]:
    need = min(CACHE_GB.values())
    fits = ", ".join(f"{k} ~{v} GB" for k, v in CACHE_GB.items())
    ok = f.free_gb >= need
    return [Line("disk", OK if ok else WARN, f"{f.free_gb:.0f} GB free at {f.disk_path} (JPEG cache: {fits})",
                 "" if ok else "give prepare --cache-dir a disk with more room")]


def judge(f: Facts) -> list[Line]:
    lines = [Line("cpu", INFO, f"{f.cpu_cores} cores for this process")]
    for rule in (judge_torch, judge_driver, judge_dali, judge_decode, judge_packages, judge_disk):
        lines += rule(f)
    return lines


def verdict(f: Facts, lines: list[Line], require_gpu: bool = False) -> tuple[int, str]:
    """(exit status, last line): which backend training uses here, or why the GPU path cannot work."""
    broken = [ln for ln in lines if ln.status == FAIL and ln.gpu_path]
    if f.gpus and not broken and f.cuda_available and f.mixed_decode == OK and f.gpu_decoder == OK:
        return 0, f"GPU path ready: loader.backend auto = dali on {f.gpus[0].name}"
    if f.gpus or require_gpu:
        why = broken[0].detail if broken else ("no GPU here" if not f.gpus else "torch sees no CUDA device")
        return 1, f"GPU path cannot work: {why}"
    backend = "dali-cpu" if f.dali_version else "pil"
    return 0, f"CPU machine: no GPU, training runs on the {backend} backend (loader.backend auto)"


# ------------------------------------------------------------------------------------------------- facts
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvml() -> tuple[str | None, list[Gpu]]:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None, []
    driver = pynvml.nvmlSystemGetDriverVersion()
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(h)
        gpus.append(Gpu(name.decode() if isinstance(name, bytes) else name,
                        tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
                        pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30))
    return (driver.decode() if isinstance(driver, bytes) else driver), gpus


def _torch_facts(f: Facts) -> None:
    f.torch_version, f.torch_cuda = torch.__version__, torch.version.cuda
    f.arch_list = list(torch.cuda.get_arch_list()) if f.torch_cuda else []
    f.cuda_available = torch.cuda.is_available()
    if f.cuda_available and not f.gpus:  # no NVML: torch's view
        f.gpus = [Gpu(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i),
                      torch.cuda.get_device_properties(i).total_memory / 2**30)
                  for i in range(torch.cuda.device_count())]


def _dali_facts(f: Facts) -> None:
    try:
        import nvidia.dali as dali
        from nvidia.dali import backend
    except ImportError:
        return
    f.dali_version = dali.__version__
    f.dali_package = next((d for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
                           if _version(d)), "nvidia-dali")
    built = getattr(backend, "__cuda_version__", 0) or 0
    f.dali_cuda = int(built) // 1000 or None
    codec = backend.GetNvimgcodecVersion() if hasattr(backend, "GetNvimgcodecVersion") else -1
    f.nvimgcodec = f"{codec // 1000}.{codec % 1000 // 100}.{codec % 100}" if codec > 0 else None
    # recent DALI decodes through nvImageCodec and loads nvJPEG from its wheel (asking DALI prints a warning)
    f.nvjpeg = next((v for v in map(_version, ("nvidia-nvjpeg-cu12", "nvidia-nvjpeg-cu13", "nvidia-nvjpeg")) if v), None)


def _probe_jpeg(size=(256, 192)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pixels_ok(out, size=(256, 192)) -> str:
    out = np.asarray(out)
    ok = out.shape == (size[1], size[0], 3) and abs(int(out[..., 0].mean()) - 200) < 8
    return OK if ok else f"wrong pixels {out.shape}"


def mixed_decode_works(device_id: int = 0) -> str:
    """"ok" when DALI's ``mixed`` decoder decodes a JPEG on CUDA device ``device_id`` into device memory with
    the right pixels, else the error's first line. (This alone does not prove the GPU decoded it:
    ``nvimgcodec_decodes`` does.)"""
    from nvidia.dali import fn, pipeline_def

    data = np.frombuffer(_probe_jpeg(), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True), device="mixed")

    try:
        p = pipe()
        p.build()
        out = p.run()[0]
        if type(out).__name__ != "TensorListGPU":
            return f"the mixed decoder's output is a {type(out).__name__}, not device memory"
        return _pixels_ok(out.as_cpu().at(0))
    except Exception as e:
        return one_line(e)


def nvimgcodec_decodes(kind: str, device_id: int = 0) -> str:
    """Decode the probe JPEG with nvImageCodec restricted to one backend (``GPU_ONLY``: the CUDA decoder,
    ``HW_GPU_ONLY``: the hardware JPEG engine): "ok" (device image, right pixels), "none" (that backend
    cannot decode it here: for HW_GPU_ONLY, no engine) or the error's first line. No fallback can answer
    for it: the other backends are not allowed."""
    try:
        import nvidia.nvimgcodec as nvimgcodec
        backend = nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind))
        img = nvimgcodec.Decoder(device_id=device_id, backends=[backend]).decode(_probe_jpeg())
        if img is None:
            return "none"
        if img.buffer_kind != nvimgcodec.ImageBufferKind.STRIDED_DEVICE:
            return f"decoded into {img.buffer_kind}, not device memory"
        return _pixels_ok(img.cpu())
    except Exception as e:
        return one_line(e)


def gather(disk_path: str | Path = ".") -> Facts:
    f = Facts(cpu_cores=available_cores(), disk_path=str(Path(disk_path).resolve()))
    f.driver, f.gpus = _nvml()
    _torch_facts(f)
    _dali_facts(f)
    if f.cuda_available and f.dali_version:
        f.mixed_decode = mixed_decode_works(0)
        f.gpu_decoder = nvimgcodec_decodes("GPU_ONLY", 0)
        hw = nvimgcodec_decodes("HW_GPU_ONLY", 0)
        f.hw_jpeg = True if hw == OK else False if hw == "none" else None
    f.versions = {n: _version(n) for n in ("ultralytics", "timm")}
    f.free_gb = shutil.disk_usage(f.disk_path).free / 2**30
    return f


# --------------------------------------------------------------------------------------------------- CLI
def format_lines(lines: list[Line], last: str) -> str:
    out = []
    for ln in lines:
        out.append(f"[{ln.status:^4}] {ln.what:<16} {ln.detail}")
        if ln.fix:
            out.append(f"{'':7}{'':<16} fix: {ln.fix}")
    out.append(f"=> {last}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--disk", default=".", help="where the JPEG cache would go (free space is checked there; "
                                               "default: %(default)s)")
    p.add_argument("--require-gpu", action="store_true", help="exit 1 when there is no working GPU path "
                                                              "(default: off)")
    p.add_argument("--json", metavar="PATH", help="also write the facts and verdicts as JSON (default: not written)")
    return p


def _main(args: argparse.Namespace) -> int:
    facts = gather(args.disk)
    lines = judge(facts)
    status, last = verdict(facts, lines, args.require_gpu)
    print(format_lines(lines, last))
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": asdict(facts), "lines": [asdict(ln) for ln in lines],
                                               "verdict": last, "status": status}, indent=1))
    return status


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv, level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
