"""``scripts/gpu_check.sh``: one short command that proves the GPU path, with a threshold per check.

The shell script installs (optionally from carried wheels) and calls ``python -m pillsnap_dali.gpu_check run``,
which runs each step as a subprocess with its own timeout (one hang cannot eat the lease), logs it under
``gpu_results/<stamp>/logs/``, then judges what the steps wrote (``judge``: pure functions of the files,
tested on a CPU with fake step results) and writes ``summary.json`` and a pass/fail table. Exit status 0 only
when every check passes.

Checks and thresholds (``THRESHOLDS``): the ``gpu`` tests pass; ``dali`` >= 5x ``pil`` images/s on JPEG;
data_time <= 5 % of the step at Stage 3 settings (976x1280 -> 384 px, EfficientNetV2-S, batch 64, epochs after
the first); combo p95 <= 200 ms; no row skipped on good data; NVML device memory flat across epochs (peak
growth after the first epoch <= 0.25 GB); ``dali`` (``mixed``) and ``dali-cpu`` skip the same files of a set
of broken JPEGs (truncated, CMYK, progressive, arithmetic-coded, 12-bit) and keep the good one; a run under
``torch.cuda.set_per_process_memory_fraction`` that hits an allocation failure skips nothing.
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

from pillsnap_dali.bench.loaders import bench_manifest
from pillsnap_dali.config import load_config
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.commands.bench import main as bench_main
from pillsnap_dali.commands.common import run_cli
from pillsnap_dali.data.manifest import read_manifest

THRESHOLDS = {"dali_over_pil_jpeg": 5.0, "data_share_max": 0.05, "combo_p95_ms_max": 200.0,
              "nvml_growth_gb_max": 0.25, "oom_memory_fraction": 0.02}
PY = sys.executable

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


def tree_sets(out: Path, quick: bool) -> list[str]:
    """``--set`` arguments of the clean synthetic tree (users' 976x1280 photos, no injected defects) that the
    training, detection and latency steps share."""
    sets = [f"data.artifacts={out / 'artifacts'}", "data.synth.size=976x1280", "data.synth.combos=12",
            f"data.synth.images_per_class={100 if quick else 200}", "data.synth.defects=false"]
    return [x for s in sets for x in ("--set", s)]


def stage3_train_argv(out: Path, quick: bool) -> list[str]:
    """A short ``dali`` training at Stage 3 settings (976x1280 -> 384 px, EfficientNetV2-S, batch 64): its
    metrics give the data_time share and the NVML memory per epoch."""
    return ["--stage", "demo", "--backend", "dali", "--epochs", "3" if quick else "6", "--out", str(out / "runs"),
            "--name", "s3like", "--img-size", "384", "--model", "tf_efficientnetv2_s", "--batch-size", "64",
            "--set", "train.target_accuracy=null", *tree_sets(out, quick)]


def plan(out: Path, quick: bool) -> list[Step]:
    """The steps; in quick mode the timeouts add up to 300 s (5 min), in full mode to 600 s."""
    m = [PY, "-m"]
    train = stage3_train_argv(out, quick)
    tests = m + ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / "gpu_tests.xml")]
    decode = m + ["pillsnap_dali.bench", "decode", "--formats", "jpeg,cache640", "--n", "32" if quick else "64",
                  "--reps", "2" if quick else "3", "--no-model", "--out", str(out / "bench_decode"),
                  "--workdir", str(out / "bench_images")]
    detect = m + ["pillsnap_dali.detect", "--stage", "demo", "--model", "yolo11m.yaml", "--epochs", "1", "--imgsz",
                  "640", "--backend", "dali", "--set", f"train.out={out / 'runs'}", *tree_sets(out, quick)]
    return [
        Step("doctor", m + ["pillsnap_dali.doctor", "--require-gpu", "--disk", str(out), "--json",
                            str(out / "doctor.json")], 20),
        Step("gpu_tests", tests + (["-x"] if quick else []), 90, ("doctor",)),
        Step("decode_bench", decode, 40, ("doctor",)),
        Step("train_dali", m + ["pillsnap_dali.train", *train], 60, ("doctor",)),
        Step("detect", detect, 35, ("train_dali",)),
        Step("combo_latency", m + ["pillsnap_dali.gpu_check", "latency", str(out)], 20, ("train_dali", "detect")),
        Step("broken_jpegs", m + ["pillsnap_dali.gpu_check", "broken-jpegs", str(out / "broken")], 15, ("doctor",)),
        Step("oom", m + ["pillsnap_dali.gpu_check", "oom", str(out / "oom"), *("--quick",) * quick], 20,
             ("train_dali",)),
    ]


def run_step(step: Step, out: Path, scale: float) -> dict:
    """One step in its own process group under its timeout (killed with everything it started when it runs
    over); its output goes to ``logs/<name>.log``."""
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout, t0 = int(step.timeout * scale), time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(step.argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
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
    """The names of ``paths`` the ``backend`` loader (evaluation graph, one epoch) skips."""
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
OOM_WORDS = ("out of memory", "OutOfMemoryError", "Can't allocate", "cudaErrorMemoryAllocation",
             "CUDA_ERROR_OUT_OF_MEMORY", "out of GPU memory", "allocation fail", "failed to allocate")


def csv_rows(path: Path) -> int:
    """Data rows of a CSV with a header (0 when the file does not exist)."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as fh:
        return max(sum(1 for _ in csv.reader(fh)) - 1, 0)


def probe_oom(folder: Path, quick: bool) -> dict:
    """The Stage 3 training, batch 256, in a process whose torch may use ``oom_memory_fraction`` of the GPU:
    it must hit an allocation failure, and must not have put a single row in ``skipped.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["--stage", "demo", "--backend", "dali", "--epochs", "1", "--out", str(folder / "runs"), "--name", "oom",
            "--img-size", "384", "--model", "tf_efficientnetv2_s", "--batch-size", "256",
            "--set", "train.target_accuracy=null", *tree_sets(folder.parent, quick)]
    code = (f"import sys, torch; torch.cuda.set_per_process_memory_fraction({THRESHOLDS['oom_memory_fraction']}, 0); "
            "from pillsnap_dali.commands import train; sys.exit(train.main(sys.argv[1:]))")
    proc = subprocess.run([PY, "-c", code, *argv], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    result = {"rc": proc.returncode, "allocation_failure": proc.returncode != 0 and any(w in text for w in OOM_WORDS),
              "skipped_rows": csv_rows(folder / "runs" / "oom" / "skipped.csv"), "tail": text[-2000:]}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def combo_latency(out: Path, images: int = 40) -> int:
    """p50/p95 per combination image (file to top-k of every pill) with the run's classifier and detector."""
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


def check_decode(out: Path) -> Check:
    name, want = "dali >= 5x pil (JPEG)", THRESHOLDS["dali_over_pil_jpeg"]
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
    name = "allocation failure skips nothing"
    r = _json(out / "oom" / "result.json")
    if not r:
        return Check(name, False, "-", "OOM hit, 0 rows")
    hit = "hit" if r["allocation_failure"] else "not hit"
    return Check(name, r["allocation_failure"] and r["skipped_rows"] == 0, f"OOM {hit}, {r['skipped_rows']} rows",
                 "OOM hit, 0 rows skipped")


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
               "machine": (_json(out / "doctor.json") or {}).get("facts")}
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
    r.add_argument("--quick", action="store_true", help="few repeats and epochs: <= 5 min on one H100")
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
    out = Path(a.out or f"gpu_results/{time.strftime('%Y%m%d-%H%M%S')}")
    mode = ("quick" if a.quick else "full") if a.cmd == "run" else a.mode
    steps = None
    if a.cmd == "run":
        out.mkdir(parents=True, exist_ok=True)
        steps = run_steps(plan(out, a.quick), out, 1.0 if a.quick else 2.0)
    summary, table = summarize(out, mode, steps)
    print(table)
    return 0 if summary["passed"] else 1


def main(argv=None) -> int:
    return run_cli(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
