"""``scripts/gpu_check.sh``: one short command that proves the GPU path, with a threshold per check.

The shell script installs (optionally from carried wheels) and calls ``python -m pillsnap_dali.gpu_check run``,
which runs each step as a subprocess with its own timeout (one hang cannot eat the lease), logs it under
``gpu_results/<stamp>/logs/``, then judges what the steps wrote (``judge``: pure functions of the files,
tested on a CPU with fake step results) and writes ``summary.json`` and a pass/fail table. Exit status 0 only
when every check passes.

Checks and thresholds (``THRESHOLDS``): the ``gpu`` tests pass; ``dali`` >= 5x ``pil`` images/s on JPEG on a
GPU with a hardware JPEG engine (A100/H100-class; without one, RTX-class: a provisional 2x); data_time <= 5 %
of the step at Stage 3 settings (976x1280 -> 384 px, EfficientNetV2-S, batch 64 where the GPU's memory holds
it, epochs after the first); combo p95 <= 200 ms; no row skipped on good data; NVML device memory flat across
epochs (peak growth after the first epoch <= 0.25 GB); ``dali`` (``mixed``, both decoder paths) and
``dali-cpu`` skip the same files of a set of broken JPEGs (truncated, CMYK, progressive, arithmetic-coded,
12-bit) and keep the good one; the DALI loader alone on a GPU that torch has filled stops with the clear
device-memory error and skips nothing.

``plan`` prints the steps, their timeouts and needs, and the budget (offline install included) without running
anything; the synthetic tree is built by its own step, and a step runs whenever the steps it needs succeeded.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pillsnap_dali.commands.common import run_cli

# The probes import the loaders, the benchmark and the manifest code (psutil, DALI, optree, Ultralytics...)
# inside the functions that use them: ``plan`` runs and this module imports on a box that holds only torch,
# torchvision, timm and numpy (before the offline install, or after one that failed).

THRESHOLDS = {"dali_over_pil_jpeg": 5.0,            # GPUs with a hardware JPEG engine (A100/H100/H200-class)
              "dali_over_pil_jpeg_cuda": 2.0,       # without one (RTX/L4-class: nvJPEG's CUDA decoder); provisional
              "data_share_max": 0.05, "combo_p95_ms_max": 200.0, "nvml_growth_gb_max": 0.25,
              "oom_leave_mb": 256}                  # device memory the OOM probe leaves free for DALI
PY = sys.executable
FIGURES_ENV = "PILLSNAP_GPU_FIGURES"   # where gpu tests that measure something write it (summary.json "figures")
RESUME_TOLERANCE = 0.02   # `dali` resume vs an uninterrupted run: relative L2 distance of the weights (bound)
QUICK_BUDGET_S = 300      # one H100 lease, offline install included
FULL_BUDGET_S = 600
INSTALL_TIMEOUT = {True: 70, False: 120}   # scripts/gpu_check.sh's offline install (quick, full)
# EfficientNetV2-S at 384 px and yolo11m at 640 px: device memory per training image (bf16 autocast, with
# the optimizer's state and DALI's buffers spread over the batch) and the fixed part, in GB. Estimates from the
# models' activation sizes, not measured here: the batch is chosen with half the free memory to spare.
GB_PER_IMAGE = {"classifier": 0.2, "detector": 0.35}
GB_FIXED = 2.0
MAX_BATCH = {"classifier": 64, "detector": 16}

# a 96x72 JPEG losslessly re-encoded with arithmetic coding (jpegtran -arithmetic): Pillow cannot write one
ARITHMETIC_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMU"
    "FRUVDA8XGBYUGBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU"
    "FBQUFBQUFBT/yQARCABIAGADASIAAhEBAxEB/8wACgAQEAUBEBEF/9oADAMBAAIRAxEAPwDRzLNlTXDCxTye5m5on3KOmEkWx165"
    "WfQqTw9o0nSlSgfYir0KoIwkGQ/lq4LGaM47oOqYRVWLvLVIYkN2SNPthtfusC6/nfj03yx/RZeotjmdfXauEAZe93m2h4jgu9Ka"
    "8U4BlZ8v6ia1N2G1qwp/WUPhRWSFW2vKSSoJAR4hG3D6FUziz4/Xkv29mYupGoNy+fNu+DwJAJ1w0q06tLzR6z9yN2J+DQMM3Wfw"
    "fh5JZteCwumg1odwJAVxLB+Cpb2zn+7lon+K0/P46LSgkigqCHPgPUO8AtMSUKCniAJejKS5VggindktQPWDgOMicxpcW4VOR0TS"
    "ayeu3b8eU9Einr3Hp9HIyuXatKZBo8iUD8qUTO65HtO5NJ7GEMlhn/fEPEtOmKVLVPJ1xa6qzmXJAplMrZG1pRIhHErL6y4lB7gC"
    "LGi+YoFdIdx2jhMn71v46Qu2LaA108xKOC5xxFQRS9m5AwnMhhwv7KEU+aoK/a5ctHsnkAi6QVix2o0PeGIFX55kBkS3Kjtnee2y"
    "T3FaGvLAjeWERKK217TCRv5oc/zOwhYT0FucmXdj4K7Qwlz4rYPEVLIT3l5zDoQtJqwWpZtEI1M6RlFBzb5K5OJ1m3iTG3KUPbM+"
    "zKzJlOxYKOyNHmnKrcMU48b3qj2a8Aq94qvulf8ApH9i11Q3OcLFuettv6OTalmjkZ2qr5CpfzPq/XQ9wzBdQh4/y0JC8sx3y/iB"
    "epkq1SQTliIjNQDKI/rw1tw6TDxdXBF/otl4Q4TbiJ7+8jBs4Qq64Q8t+sf93/3S1/mGrFUnSUMRYKmbTCBXJlBcnpIEopnE9kc2"
    "UsjAzjvGQPqVgOaK32LtcBaXbjEhCQviQI5eIwddBxjWVqn/AAb6idNQCwdXgb8qsRNPhNAtOE5HFZSmf/szbQXGF8UgzikYf95D"
    "zc0MFRUHO8Olr4Pyd1SOlmst50K3OpBi/nlmY9gmO49bEXFli3TIqya6s/WuEdy0nb+oQZaFlYJSPxlUdQVDxcnteW7MsKXcSMn3"
    "EjyPSKJA4Agm3dxlm+ACA/n7qyEO3+9iWYOO6VlR++HuhuPvI79ftefyVPwg94D/2Q==")


# ------------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: int                 # seconds in quick mode; the full mode doubles it
    needs: tuple[str, ...] = ()  # steps that must have succeeded first
    work: int = 0                # the work it does on one H100, estimated (s): timeout >= 1.5x work
    env: dict | None = None      # added to the environment


def gpu_free_gb() -> float | None:
    """Free memory of GPU 0 in GB, from NVML (no CUDA context in this parent process, which would hold memory
    through every step), else ``torch.cuda.mem_get_info``; None without a GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free / 2 ** 30
    except Exception:  # no NVML library or no device: torch's view
        pass
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(0)
    return free / 2 ** 30


def batch_for_memory(free_gb: float | None, model: str) -> int:
    """The largest power-of-two batch, up to MAX_BATCH, whose estimated footprint fits half the free memory
    (no figure: MAX_BATCH, what the plan prints on a machine without CUDA)."""
    cap = MAX_BATCH[model]
    if free_gb is None:
        return cap
    fits = int((free_gb * 0.5 - GB_FIXED) / GB_PER_IMAGE[model])
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


def tree_sets(out: Path, quick: bool) -> list[str]:
    """``--set`` arguments of the clean synthetic tree (users' 976x1280 photos, no injected defects) that the
    training, detection, OOM and latency steps share (built once, by the ``tree`` step)."""
    sets = [f"data.artifacts={out / 'artifacts'}", "data.synth.size=976x1280", "data.synth.combos=12",
            f"data.synth.images_per_class={48 if quick else 200}", "data.synth.defects=false"]
    return [x for s in sets for x in ("--set", s)]


def stage3_train_argv(out: Path, quick: bool, batch: int = 64) -> list[str]:
    """A short ``dali`` training at Stage 3 settings (976x1280 -> 384 px, EfficientNetV2-S, batch 64 where
    it fits): its metrics give the data_time share and the NVML memory per epoch."""
    return ["--stage", "demo", "--backend", "dali", "--epochs", "3" if quick else "6", "--out", str(out / "runs"),
            "--name", "s3like", "--img-size", "384", "--model", "tf_efficientnetv2_s", "--batch-size", str(batch),
            "--set", "train.target_accuracy=null", *tree_sets(out, quick)]


def plan(out: Path, quick: bool, free_gb: float | None = None) -> list[Step]:
    """The steps, each with its timeout (quick mode; the full mode doubles it), what it needs and its
    estimated work on one H100. The synthetic tree is built by its own step (the training step only
    trains); the batch sizes come from ``free_gb`` (``gpu_free_gb()``)."""
    m = [PY, "-m"]
    cls, det = batch_for_memory(free_gb, "classifier"), batch_for_memory(free_gb, "detector")
    train = stage3_train_argv(out, quick, cls)
    tests = m + ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / "gpu_tests.xml")]
    decode = m + ["pillsnap_dali.bench", "decode", "--formats", "jpeg,cache640", "--n", "32" if quick else "64",
                  "--reps", "2" if quick else "3", "--no-model", "--out", str(out / "bench_decode"),
                  "--workdir", str(out / "bench_images")]
    detect = m + ["pillsnap_dali.detect", "--stage", "demo", "--model", "yolo11m.yaml", "--epochs", "1", "--imgsz",
                  "640", "--batch-size", str(det), "--backend", "dali", "--set", f"train.out={out / 'runs'}",
                  *tree_sets(out, quick)]
    return [
        Step("doctor", m + ["pillsnap_dali.doctor", "--require-gpu", "--disk", str(out), "--json",
                            str(out / "doctor.json")], 15, (), 6),
        Step("tree", m + ["pillsnap_dali.gpu_check", "tree", str(out), *("--quick",) * quick], 30, (), 15),
        Step("gpu_tests", tests + (["-x"] if quick else []), 40, ("doctor",), 26,
             {FIGURES_ENV: str(out / "figures")}),
        Step("decode_bench", decode, 25, ("doctor",), 15),
        Step("train_dali", m + ["pillsnap_dali.train", *train], 40, ("doctor", "tree"), 25),
        Step("detect", detect, 30, ("doctor", "tree"), 18),
        Step("combo_latency", m + ["pillsnap_dali.gpu_check", "latency", str(out)], 15, ("train_dali", "detect"), 8),
        Step("broken_jpegs", m + ["pillsnap_dali.gpu_check", "broken-jpegs", str(out / "broken")], 10, ("doctor",), 5),
        Step("oom", m + ["pillsnap_dali.gpu_check", "oom", str(out / "oom"), *("--quick",) * quick], 15,
             ("doctor", "tree"), 10),
    ]


def budget(steps: list[Step], quick: bool) -> dict:
    """The planned worst case: every step's timeout plus the offline install's, against the lease."""
    scale = 1 if quick else 2
    steps_s = sum(s.timeout for s in steps) * scale
    install = INSTALL_TIMEOUT[quick]
    return {"install_s": install, "steps_s": steps_s, "total_s": install + steps_s,
            "limit_s": QUICK_BUDGET_S if quick else FULL_BUDGET_S,
            "work_s": sum(s.work for s in steps) * scale}


def plan_text(steps: list[Step], quick: bool, free_gb: float | None) -> str:
    b = budget(steps, quick)
    scale = 1 if quick else 2
    mem = f"{free_gb:.1f} GB free on cuda:0" if free_gb is not None else "no CUDA device: default batches"
    rows = [f"{'mode':<14} {'quick' if quick else 'full'} ({mem}; classifier batch "
            f"{batch_for_memory(free_gb, 'classifier')}, detector batch {batch_for_memory(free_gb, 'detector')})",
            f"{'install':<14} timeout {b['install_s']:>4} s  (scripts/gpu_check.sh --wheels DIR, no index)"]
    for s in steps:
        rows.append(f"{s.name:<14} timeout {s.timeout * scale:>4} s  work ~{s.work * scale:>3} s  needs "
                    f"{', '.join(s.needs) or '-'}: {' '.join(s.argv[2:5])} ...")
    rows.append(f"{'budget':<14} {b['total_s']} s planned (install {b['install_s']} + steps {b['steps_s']}) <= "
                f"{b['limit_s']} s; estimated work {b['work_s']} s")
    return "\n".join(rows)


def run_step(step: Step, out: Path, scale: float) -> dict:
    """One step in its own process group under its timeout (killed with everything it started when it runs
    over); its output goes to ``logs/<name>.log``."""
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout, t0 = int(step.timeout * scale), time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(step.argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(step.env or {})})
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    return {"name": step.name, "rc": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1),
            "timeout": timeout, "log": str(log.relative_to(out))}


def run_steps(steps: list[Step], out: Path, scale: float = 1.0) -> list[dict]:
    """Run ``steps`` in order; a step whose prerequisites failed is not run (and says which)."""
    done: dict[str, dict] = {}
    for step in steps:
        missing = [n for n in step.needs if done.get(n, {}).get("rc") != 0]
        done[step.name] = ({"name": step.name, "rc": None, "timed_out": False, "seconds": 0.0,
                            "not_run": f"needs {', '.join(missing)}"} if missing else run_step(step, out, scale))
        print(f"== {step.name}: {step_text(done[step.name])}", flush=True)
    (out / "steps.json").write_text(json.dumps(list(done.values()), indent=1))
    return list(done.values())


def step_text(s: dict | None) -> str:
    if s is None:
        return "not run"
    if s.get("not_run"):
        return f"not run ({s['not_run']})"
    if s["timed_out"]:
        return f"timed out after {s['seconds']} s (see {s['log']})"
    return f"exit {s['rc']} after {s['seconds']} s" + (f" (see {s['log']})" if s["rc"] else "")


# ----------------------------------------------------------------------------------------- probe: broken JPEGs
def broken_jpegs(folder: Path) -> dict[str, Path]:
    """A good JPEG and the broken or unusual ones decoders disagree on: truncated, CMYK (Adobe APP14),
    progressive, arithmetic-coded, and 12-bit (an 8-bit stream whose frame header declares 12-bit precision
    in an extended-sequential SOF1: what a decoder without 12-bit support meets first)."""
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (96, 72), (200, 120, 40))
    ImageDraw.Draw(im).ellipse([10, 10, 80, 60], fill=(30, 160, 220))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    good = buf.getvalue()
    sof = good.index(b"\xff\xc0")
    files = {"good": good, "truncated": good[: len(good) // 2],
             "twelve_bit": good[:sof] + b"\xff\xc1" + good[sof + 2:sof + 4] + b"\x0c" + good[sof + 5:],
             "arithmetic": ARITHMETIC_JPEG}
    for name, kw in (("cmyk", {"mode": "CMYK"}), ("progressive", {"progressive": True})):
        b = io.BytesIO()
        (im.convert(kw.pop("mode")) if "mode" in kw else im).save(b, format="JPEG", quality=90, **kw)
        files[name] = b.getvalue()
    out = {}
    for name, data in files.items():
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(data)
    return out


def skipped_by(paths: dict[str, Path], backend: str) -> list[str]:
    """The names of ``paths`` the ``backend`` loader (evaluation graph, one epoch) skips. On ``dali`` a file
    that fails on one decoder path (hardware JPEG engine or CUDA) is retried on the other before it is
    skipped (the runner's probe), so the two backends can agree."""
    from pillsnap_dali.benchmarks.loaders import bench_manifest
    from pillsnap_dali.config import load_config
    from pillsnap_dali.loaders import build_loader
    from pillsnap_dali.skiplog import SkipLog

    names = list(paths)
    cfg = load_config("demo", sets=["train.batch_size=2", "preprocess.img_size=64", "loader.threads=2"])
    log = SkipLog(None)
    device = torch.device("cuda", 0) if backend == "dali" else torch.device("cpu")
    loader = build_loader(bench_manifest([str(paths[n]) for n in names]), [0] * len(names), cfg, train=False,
                          device=device, backend=backend, skip_log=log)
    for _ in loader:
        pass
    loader.close()
    return sorted(n for n in names if str(paths[n]) in log.paths)


def probe_broken(folder: Path, backends: list[str]) -> dict:
    paths = broken_jpegs(folder)
    result = {"files": sorted(paths), "skipped": {b: skipped_by(paths, b) for b in backends}}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------ probes: OOM and latency
def csv_rows(path: Path) -> int:
    """Data rows of a CSV with a header (0 when the file does not exist)."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as fh:
        return max(sum(1 for _ in csv.reader(fh)) - 1, 0)


def weights_distance(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts' floating tensors: ||a - b|| / ||a|| over all of them."""
    num = den = 0.0
    for k, t in a.items():
        if torch.is_tensor(t) and t.is_floating_point():
            num += float((t.double() - b[k].double()).pow(2).sum())
            den += float(t.double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def record_figure(name: str, value: dict) -> None:
    """Write a measured figure where gpu_check collects them (``PILLSNAP_GPU_FIGURES``; nothing when unset)."""
    folder = os.environ.get(FIGURES_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(value, indent=1))


def build_tree(out: Path, sets: list[str], workers: int) -> Path:
    """The synthetic tree of ``sets`` (``tree_sets`` without the flags) rendered by ``workers`` processes,
    and its manifests (``artifacts/demo/manifest_*.csv``, ``detect_*.csv``): what the training, detection and
    OOM steps then find made and reuse. Returns the manifests' folder."""
    from pillsnap_dali.config import load_config
    from pillsnap_dali.data.build import ensure_manifests
    from pillsnap_dali.data.synth.tree import ensure_demo_data

    cfg = load_config("demo", sets=sets)
    ensure_demo_data(cfg, workers=workers)
    return Path(ensure_manifests(cfg))


def fill_bytes(free: int, leave_mb: int) -> int:
    """How much to take from ``free`` device bytes so that ``leave_mb`` MiB stay free (0 if less is free)."""
    return max(int(free) - leave_mb * 2 ** 20, 0)


def fill_gpu(device: int = 0, leave_mb: int = THRESHOLDS["oom_leave_mb"]) -> torch.Tensor:
    """Hold all but ``leave_mb`` MiB of the device's free memory in one torch tensor (what another process
    or a big model does to DALI)."""
    free, _ = torch.cuda.mem_get_info(device)
    return torch.empty(fill_bytes(free, leave_mb), dtype=torch.uint8, device=torch.device("cuda", device))


def probe_oom(folder: Path, quick: bool, backend: str = "dali", fill=fill_gpu) -> dict:
    """The DALI loader alone (the ``tree`` step's training split, Stage 3 settings, batch 256) on a device
    that torch has filled (``fill``): it must stop with the runner's device-memory error, and must not have
    put a single row in ``skipped.csv``."""
    from pillsnap_dali.config import load_config
    from pillsnap_dali.data.manifest import read_manifest
    from pillsnap_dali.loaders import build_loader
    from pillsnap_dali.loaders.runner import DeviceMemoryError
    from pillsnap_dali.skiplog import SkipLog

    folder.mkdir(parents=True, exist_ok=True)
    art = folder.parent / "artifacts"
    cfg = load_config("demo", sets=[f"data.artifacts={art}", "train.batch_size=256", "preprocess.img_size=384"])
    m = read_manifest(art / "demo" / "manifest_train.csv")
    log = SkipLog(folder / "skipped.csv")
    device = torch.device("cuda", 0) if backend == "dali" else torch.device("cpu")
    hog = fill() if fill is not None else None
    result = {"device_memory_error": False, "error": None, "batches": 0}
    try:
        loader = build_loader(m, [0] * len(m.paths), cfg, train=True, device=device, backend=backend, skip_log=log)
        for _ in loader:
            result["batches"] += 1
    except DeviceMemoryError as e:
        result.update(device_memory_error=True, error=str(e)[:2000])
    except Exception as e:  # anything else is the finding: recorded, judged FAIL
        result["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    del hog
    result["skipped_rows"] = len(log)
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def combo_latency(out: Path, images: int = 40) -> int:
    """p50/p95 per combination image (file to top-k of every pill) with the run's classifier and detector."""
    from pillsnap_dali.commands.bench import main as bench_main
    from pillsnap_dali.data.manifest import read_manifest

    m = read_manifest(out / "artifacts" / "demo" / "detect_val.csv")
    paths = [p for p in m.paths if not p.endswith("_index.png")][:images]
    return bench_main(["predict", *paths, "--classifier", str(out / "runs" / "s3like" / "checkpoints" / "last.pt"),
                       "--detector", str(out / "runs" / "detect_demo" / "weights" / "last.pt"), "--mode", "combo",
                       "--conf", "0", "--max-det", "4", "--json", str(out / "predict_latency.json")])


# ------------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    name: str
    passed: bool
    value: str
    threshold: str
    detail: str = ""


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _epochs(out: Path) -> list[dict]:
    path = out / "runs" / "s3like" / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return [r for r in rows if "data_share" in r]


def check_doctor(out: Path) -> Check:
    d = _json(out / "doctor.json")
    if d is None:
        return Check("doctor: GPU path ready", False, "-", "status 0")
    return Check("doctor: GPU path ready", d["status"] == 0, d["verdict"], "status 0")


def check_gpu_tests(out: Path) -> Check:
    path, name = out / "gpu_tests.xml", "gpu tests pass"
    if not path.is_file():
        return Check(name, False, "-", "all pass, > 0 run")
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, fails, errs, skips = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    ran = n - skips
    return Check(name, fails + errs == 0 and ran > 0, f"{ran - fails - errs}/{ran} passed, {skips} skipped",
                 "all pass, > 0 run")


def hardware_jpeg(out: Path) -> bool | None:
    """Whether doctor found a hardware JPEG engine on this GPU (None: doctor gave no answer)."""
    return ((_json(out / "doctor.json") or {}).get("facts") or {}).get("hw_jpeg")


def check_decode(out: Path) -> Check:
    """``dali`` over ``pil`` on JPEG: 5x holds for GPUs with a hardware JPEG engine (A100/H100-class); on one
    without (RTX 5080-class) nvJPEG's CUDA decoder does the work and the bar is the provisional 2x."""
    hw = hardware_jpeg(out) is not False
    want = THRESHOLDS["dali_over_pil_jpeg" if hw else "dali_over_pil_jpeg_cuda"]
    name = f"dali >= {want:g}x pil (JPEG, {'hardware JPEG engine' if hw else 'no JPEG engine: CUDA decoder'})"
    r = _json(out / "bench_decode" / "results.json")
    try:
        ratios = {src: v["results"]["dali"]["images_per_s"] / v["results"]["pil"]["images_per_s"]
                  for src, v in r["inputs"].items()}
    except (TypeError, KeyError, ZeroDivisionError):
        return Check(name, False, "-", f">= {want:g}x")
    extra = ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
    return Check(name, ratios.get("jpeg", 0) >= want, f"{ratios.get('jpeg', 0):.1f}x", f">= {want:g}x", extra)


def check_data_share(out: Path) -> Check:
    name, want = "data_time share (Stage 3)", THRESHOLDS["data_share_max"]
    eps = _epochs(out)
    if not eps:
        return Check(name, False, "-", f"<= {want:.0%}")
    warm = sorted(e["data_share"] for e in (eps[1:] or eps))  # the first epoch pays for the pipelines' start
    share = warm[len(warm) // 2]
    return Check(name, share <= want, f"{share:.1%}", f"<= {want:.0%}",
                 "per epoch: " + " ".join(f"{e['data_share']:.1%}" for e in eps))


def check_nvml_flat(out: Path) -> Check:
    name, want = "NVML memory flat across epochs", THRESHOLDS["nvml_growth_gb_max"]
    peaks = [e["gpu_mem_peak_gb"] for e in _epochs(out) if "gpu_mem_peak_gb" in e]
    if len(peaks) < 3:
        return Check(name, False, f"{len(peaks)} epoch figures" if peaks else "-", f"growth <= {want} GB over >= 3 epochs")
    growth = max(peaks[1:]) - peaks[1]
    return Check(name, growth <= want, f"+{growth:.2f} GB", f"<= {want} GB after epoch 1",
                 "peaks: " + " ".join(f"{p:.2f}" for p in peaks))


def check_no_skips(out: Path) -> Check:
    name = "no row skipped on good data"
    runs = {"train": out / "runs" / "s3like" / "skipped.csv", "detect": out / "runs" / "detect_demo" / "skipped.csv"}
    if not _epochs(out):
        return Check(name, False, "-", "0 rows")
    counts = {k: csv_rows(p) for k, p in runs.items()}
    broken = _json(out / "broken" / "result.json") or {"skipped": {}}
    good = [b for b, names in broken["skipped"].items() if "good" in names]
    total = sum(counts.values()) + len(good)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items()) + (f"; good JPEG skipped by {good}" if good else "")
    return Check(name, total == 0, f"{total} rows", "0 rows", detail)


def check_combo_p95(out: Path) -> Check:
    name, want = "combo p95 latency", THRESHOLDS["combo_p95_ms_max"]
    r = _json(out / "predict_latency.json")
    if not r:
        return Check(name, False, "-", f"<= {want:g} ms")
    return Check(name, r["p95_ms"] <= want, f"{r['p95_ms']:.1f} ms", f"<= {want:g} ms",
                 f"p50 {r['p50_ms']:.1f} ms, {r['images']} images")


def check_broken(out: Path) -> Check:
    name = "broken JPEGs: dali = dali-cpu"
    r = _json(out / "broken" / "result.json")
    if not r or not {"dali", "dali-cpu"} <= set(r["skipped"]):
        return Check(name, False, "-", "same skipped files")
    a, b = r["skipped"]["dali"], r["skipped"]["dali-cpu"]
    return Check(name, a == b and "good" not in a, f"dali {a} / dali-cpu {b}", "same files, good kept")


def check_oom(out: Path) -> Check:
    name = "DALI out of memory skips nothing"
    r = _json(out / "oom" / "result.json")
    if not r:
        return Check(name, False, "-", "device-memory error, 0 rows")
    hit = "device-memory error" if r["device_memory_error"] else f"no device-memory error ({r.get('error')})"
    return Check(name, r["device_memory_error"] and r["skipped_rows"] == 0, f"{hit}, {r['skipped_rows']} rows",
                 "device-memory error, 0 rows skipped")


CHECKS = [(check_doctor, "doctor"), (check_gpu_tests, "gpu_tests"), (check_decode, "decode_bench"),
          (check_data_share, "train_dali"), (check_nvml_flat, "train_dali"), (check_no_skips, "train_dali"),
          (check_combo_p95, "combo_latency"), (check_broken, "broken_jpegs"), (check_oom, "oom")]


def judge(out: Path, steps: list[dict] | None = None) -> list[Check]:
    """Every check on what the steps left in ``out``; a check without its figures says why its step gave none."""
    steps = {s["name"]: s for s in (steps if steps is not None else (_json(out / "steps.json") or []))}
    checks = []
    for fn, step in CHECKS:
        c = fn(out)
        if c.value == "-":
            c.detail = f"{step}: {step_text(steps.get(step))}"
        checks.append(c)
    return checks


def summarize(out: Path, mode: str, steps: list[dict] | None = None) -> tuple[dict, str]:
    """(summary.json content, the pass/fail table); the summary is written to ``out/summary.json``."""
    checks = judge(out, steps)
    summary = {"mode": mode, "passed": all(c.passed for c in checks), "thresholds": THRESHOLDS,
               "checks": [asdict(c) for c in checks], "steps": steps if steps is not None else _json(out / "steps.json"),
               "machine": (_json(out / "doctor.json") or {}).get("facts"), "install": _json(out / "install.json"),
               "figures": {p.stem: _json(p) for p in sorted((out / "figures").glob("*.json"))}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = ["| check | result | value | threshold | detail |", "|---|---|---|---|---|"]
    rows += [f"| {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.value} | {c.threshold} | {c.detail} |" for c in checks]
    rows.append(f"\n{'PASS' if summary['passed'] else 'FAIL'}: {sum(c.passed for c in checks)}/{len(checks)} checks "
                f"({mode} mode), {out / 'summary.json'}")
    return summary, "\n".join(rows)


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every step, then the summary (what scripts/gpu_check.sh calls)")
    r.add_argument("--quick", action="store_true", help="few repeats and epochs: <= 5 min on one H100, offline "
                                                        "install included")
    r.add_argument("--out", default=None, help="default gpu_results/<stamp>")
    s = sub.add_parser("summary", help="judge the results already in a folder")
    s.add_argument("out")
    s.add_argument("--mode", default="quick")
    b = sub.add_parser("broken-jpegs", help="which broken JPEGs each backend skips")
    b.add_argument("out")
    b.add_argument("--backends", default="dali,dali-cpu")
    o = sub.add_parser("oom", help="a training that runs out of GPU memory must skip nothing")
    o.add_argument("out")
    o.add_argument("--quick", action="store_true")
    lat = sub.add_parser("latency", help="combo latency with the run's classifier and detector")
    lat.add_argument("out")
    t = sub.add_parser("tree", help="the synthetic tree and its manifests, rendered on every core")
    t.add_argument("out")
    t.add_argument("--quick", action="store_true")
    pl = sub.add_parser("plan", help="print the steps, their timeouts and the budget; run nothing")
    pl.add_argument("--quick", action="store_true")
    pl.add_argument("--out", default="gpu_results/<stamp>")
    return p


def _main(a: argparse.Namespace) -> int:
    if a.cmd == "broken-jpegs":
        print(json.dumps(probe_broken(Path(a.out), a.backends.split(",")), indent=1))
        return 0
    if a.cmd == "oom":
        res = probe_oom(Path(a.out), a.quick)
        print(json.dumps({k: v for k, v in res.items() if k != "tail"}))
        return 0
    if a.cmd == "latency":
        return combo_latency(Path(a.out))
    if a.cmd == "tree":
        from pillsnap_dali.config import available_cores
        print(build_tree(Path(a.out), tree_sets(Path(a.out), a.quick)[1::2], available_cores()))
        return 0
    if a.cmd == "plan":
        free = gpu_free_gb()
        print(plan_text(plan(Path(a.out), a.quick, free), a.quick, free))
        return 0
    out = Path(a.out or f"gpu_results/{time.strftime('%Y%m%d-%H%M%S')}")
    mode = ("quick" if a.quick else "full") if a.cmd == "run" else a.mode
    steps = None
    if a.cmd == "run":
        out.mkdir(parents=True, exist_ok=True)
        free = gpu_free_gb()
        steps_plan = plan(out, a.quick, free)
        print(plan_text(steps_plan, a.quick, free), flush=True)
        steps = run_steps(steps_plan, out, 1.0 if a.quick else 2.0)
    summary, table = summarize(out, mode, steps)
    print(table)
    return 0 if summary["passed"] else 1


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
