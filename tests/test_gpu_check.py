"""gpu_check: its thresholds judged on fake step results (every check passes, then each fails on its own),
per-step timeouts that kill the whole step, the step plan within 5 / 10 minutes, the broken-JPEG probe on the
CPU backends, and the shell script's modes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pillsnap_dali.commands import gpu_check
from pillsnap_dali.commands.gpu_check import Step, judge, plan, run_steps, summarize

ROOT = Path(__file__).resolve().parents[1]


def fake_results(out: Path, **change) -> Path:
    """A results folder as a good H100 run leaves it; ``change`` spoils one figure."""
    c = {"ratio": 9.0, "shares": [0.30, 0.03, 0.02], "peaks": [20.0, 21.0, 21.1], "p95": 80.0, "skipped": 0,
         "broken": (["truncated", "twelve_bit"], ["truncated", "twelve_bit"]), "oom": True, "doctor": 0,
         "failures": 0, **change}
    (out / "runs" / "s3like").mkdir(parents=True)
    (out / "broken").mkdir()
    (out / "oom").mkdir()
    (out / "bench_decode").mkdir()
    (out / "doctor.json").write_text(json.dumps({"status": c["doctor"], "verdict": "GPU path ready", "facts": {}}))
    (out / "gpu_tests.xml").write_text(f'<testsuites><testsuite tests="12" failures="{c["failures"]}" errors="0" '
                                       f'skipped="1"/></testsuites>')
    inputs = {src: {"results": {"pil": {"images_per_s": 100.0}, "dali": {"images_per_s": 100.0 * r}}}
              for src, r in (("jpeg", c["ratio"]), ("cache640", 14.0))}
    (out / "bench_decode" / "results.json").write_text(json.dumps({"inputs": inputs}))
    rows = [{"epoch": i, "data_share": s, "gpu_mem_peak_gb": m} for i, (s, m) in enumerate(zip(c["shares"], c["peaks"]))]
    (out / "runs" / "s3like" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (out / "runs" / "s3like" / "skipped.csv").write_text("row,path,reason,backend,epoch\n"
                                                         + "3,/x.png,bad,dali,0\n" * c["skipped"])
    (out / "predict_latency.json").write_text(json.dumps({"p95_ms": c["p95"], "p50_ms": 40.0, "images": 40}))
    (out / "broken" / "result.json").write_text(json.dumps({"skipped": dict(zip(("dali", "dali-cpu"), c["broken"]))}))
    (out / "oom" / "result.json").write_text(json.dumps({"allocation_failure": c["oom"], "skipped_rows": 0}))
    return out


def test_every_check_passes_on_a_good_run(tmp_path):
    out = fake_results(tmp_path)
    summary, table = summarize(out, "quick", steps=[])
    assert summary["passed"] and all(c["passed"] for c in summary["checks"]) and len(summary["checks"]) == 9
    assert json.loads((out / "summary.json").read_text())["passed"] is True
    assert table.count("| PASS |") == 9 and "9.0x" in table and "cache640 14.0x" in table


@pytest.mark.parametrize("change, failing", [
    ({"ratio": 4.5}, "dali >= 5x pil (JPEG)"),
    ({"shares": [0.5, 0.08, 0.06]}, "data_time share (Stage 3)"),
    ({"peaks": [20.0, 21.0, 21.5]}, "NVML memory flat across epochs"),
    ({"p95": 230.0}, "combo p95 latency"),
    ({"skipped": 1}, "no row skipped on good data"),
    ({"broken": (["truncated"], ["truncated", "twelve_bit"])}, "broken JPEGs: dali = dali-cpu"),
    ({"oom": False}, "allocation failure skips nothing"),
    ({"doctor": 1}, "doctor: GPU path ready"),
    ({"failures": 1}, "gpu tests pass")])
def test_each_threshold_fails_alone(tmp_path, change, failing):
    checks = judge(fake_results(tmp_path, **change), steps=[])
    assert [c.name for c in checks if not c.passed] == [failing]


def test_a_missing_figure_names_its_step(tmp_path):
    out = fake_results(tmp_path)
    (out / "predict_latency.json").unlink()
    steps = [{"name": "combo_latency", "rc": None, "timed_out": True, "seconds": 20.0, "log": "logs/combo_latency.log"}]
    c = next(c for c in judge(out, steps) if c.name == "combo p95 latency")
    assert not c.passed and "combo_latency: timed out after 20.0 s" in c.detail


def test_a_step_over_its_timeout_is_killed_with_its_children(tmp_path):
    late = tmp_path / "late.txt"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(late)!r}).write_text('x')"
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    steps = [Step("hang", [sys.executable, "-c", hang], 1), Step("after", [sys.executable, "-c", "pass"], 5, ("hang",)),
             Step("free", [sys.executable, "-c", "print('hi')"], 5)]
    res = {s["name"]: s for s in run_steps(steps, tmp_path)}
    assert res["hang"]["timed_out"] and res["hang"]["seconds"] < 10
    assert res["after"]["not_run"] == "needs hang" and res["free"]["rc"] == 0
    assert (tmp_path / "logs" / "free.log").read_text().strip() == "hi"
    import time
    time.sleep(3.5)
    assert not late.exists()  # the step's own child died with it
    assert json.loads((tmp_path / "steps.json").read_text())[0]["timed_out"] is True


def test_the_plan_starts_with_doctor_and_fits_the_lease(tmp_path):
    for quick, limit in ((True, 300), (False, 600)):
        steps = plan(tmp_path, quick)
        assert steps[0].name == "doctor" and all(s.needs for s in steps[1:])
        assert sum(s.timeout for s in steps) * (1 if quick else 2) <= limit
    names = [s.name for s in plan(tmp_path, True)]
    assert names == ["doctor", "gpu_tests", "decode_bench", "train_dali", "detect", "combo_latency", "broken_jpegs",
                     "oom"]


def test_the_training_step_arguments_run(tmp_path):
    """The Stage 3 training step's flags and --set keys are valid (run as a dry run, small, on the CPU)."""
    from pillsnap_dali.commands import train

    argv = gpu_check.stage3_train_argv(tmp_path, True)
    small = {"976x1280": "96x128", "data.synth.images_per_class=100": "data.synth.images_per_class=3", "dali": "dali-cpu",
             "tf_efficientnetv2_s": "resnet18", "384": "32"}
    assert train.main([small.get(a, a).replace("976x1280", "96x128") for a in argv] + ["--dry-run"]) == 0
    assert (tmp_path / "artifacts" / "demo" / "detect_val.csv").is_file()  # what the latency step reads


def test_broken_jpegs_probe_on_the_cpu_backends(tmp_path):
    res = gpu_check.probe_broken(tmp_path / "broken", ["dali-cpu", "pil"])
    assert res["files"] == ["arithmetic", "cmyk", "good", "progressive", "truncated", "twelve_bit"]
    assert res["skipped"]["dali-cpu"] == res["skipped"]["pil"]
    assert "truncated" in res["skipped"]["dali-cpu"] and "good" not in res["skipped"]["dali-cpu"]
    from PIL import Image
    with Image.open(tmp_path / "broken" / "arithmetic.jpg") as im:
        assert im.size == (96, 72)
    assert (tmp_path / "broken" / "arithmetic.jpg").read_bytes().find(b"\xff\xc9") > 0  # SOF9: arithmetic coding


def test_shell_script_documents_its_modes():
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--quick", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for mode in ("--quick", "--wheels DIR", "--no-index --find-links", "summary.json", "5 min", "10 min"):
        assert mode in res.stdout
    assert subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--nope"], capture_output=True).returncode == 2


@pytest.mark.gpu
def test_mixed_and_cpu_decoders_skip_the_same_broken_jpegs(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = gpu_check.probe_broken(tmp_path / "broken", ["dali", "dali-cpu"])
    assert res["skipped"]["dali"] == res["skipped"]["dali-cpu"] and "good" not in res["skipped"]["dali"]
