"""gpu_check: its thresholds judged on fake step results (every check passes, then each fails on its own),
per-step timeouts that kill the whole step, the step plan within 5 / 10 minutes, the broken-JPEG probe on the
CPU backends, and the shell script's modes."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pillsnap_dali.commands import gpu_check
from pillsnap_dali.commands.gpu_check import Step, judge, plan, run_steps, summarize

from oslimits import SignalAt

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
    (out / "oom" / "result.json").write_text(json.dumps({"device_memory_error": c["oom"], "skipped_rows": 0,
                                                         "error": None if c["oom"] else "ran through"}))
    return out


def test_every_check_passes_on_a_good_run(tmp_path):
    out = fake_results(tmp_path)
    summary, table = summarize(out, "quick", steps=[])
    assert summary["passed"] and all(c["passed"] for c in summary["checks"]) and len(summary["checks"]) == 9
    assert json.loads((out / "summary.json").read_text())["passed"] is True
    assert table.count("| PASS |") == 9 and "9.0x" in table and "cache640 14.0x" in table


@pytest.mark.parametrize("change, failing", [
    ({"ratio": 4.5}, "dali >= 5x pil (JPEG, hardware JPEG engine)"),
    ({"shares": [0.5, 0.08, 0.06]}, "data_time share (Stage 3)"),
    ({"peaks": [20.0, 21.0, 21.5]}, "NVML memory flat across epochs"),
    ({"p95": 230.0}, "combo p95 latency"),
    ({"skipped": 1}, "no row skipped on good data"),
    ({"broken": (["truncated"], ["truncated", "twelve_bit"])}, "broken JPEGs: dali = dali-cpu"),
    ({"oom": False}, "DALI out of memory skips nothing"),
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
    """Install + every step's timeout <= 5 min (quick) / 10 min (full); each timeout covers its estimated H100
    work with >= 1.5x margin; only doctor and the tree step need nothing."""
    for quick, limit in ((True, 300), (False, 600)):
        steps = plan(tmp_path, quick)
        assert steps[0].name == "doctor" and [s.name for s in steps if not s.needs] == ["doctor", "tree"]
        assert sum(s.timeout for s in steps) * (1 if quick else 2) + gpu_check.INSTALL_TIMEOUT[quick] <= limit
        b = gpu_check.budget(steps, quick)
        assert b["total_s"] <= b["limit_s"] == limit and b["install_s"] == gpu_check.INSTALL_TIMEOUT[quick]
        assert all(s.timeout >= 1.5 * s.work > 0 for s in steps)
    names = [s.name for s in plan(tmp_path, True)]
    assert names == ["doctor", "tree", "gpu_tests", "decode_bench", "train_dali", "detect", "combo_latency",
                     "broken_jpegs", "oom"]
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()  # the install timeout the script really uses
    assert (f"install_timeout={gpu_check.INSTALL_TIMEOUT[False]}; [ -n \"$quick\" ] && "
            f"install_timeout={gpu_check.INSTALL_TIMEOUT[True]}") in script


def test_the_tree_is_built_in_its_own_step(tmp_path):
    """The tree step renders the tree the training step names (the same --set values) on every core and
    writes its manifests; the training then reuses both (no generation in its timed step)."""
    steps = {s.name: s for s in plan(tmp_path, True)}
    assert steps["tree"].argv[2:] == ["pillsnap_dali.gpu_check", "tree", str(tmp_path), "--quick"]
    train_sets = [a for a in steps["train_dali"].argv if a.startswith("data.")]
    assert train_sets == gpu_check.tree_sets(tmp_path, True)[1::2]
    assert "tree" in steps["train_dali"].needs and "tree" in steps["detect"].needs and "tree" in steps["oom"].needs
    assert "train_dali" not in steps["oom"].needs and "train_dali" not in steps["detect"].needs


@pytest.mark.parametrize("free_gb, cls, det", [(None, 64, 16), (75.0, 64, 16), (15.0, 16, 8), (7.0, 4, 4),
                                               (3.0, 1, 1)])
def test_batch_sizes_come_from_the_gpus_free_memory(tmp_path, free_gb, cls, det):
    """An H100 (75 GB free) gets Stage 3's batch 64; an RTX 5080 (16 GB, ~15 free) one that fits with room."""
    assert gpu_check.batch_for_memory(free_gb, "classifier") == cls
    assert gpu_check.batch_for_memory(free_gb, "detector") == det
    steps = {s.name: s for s in plan(tmp_path, True, free_gb)}
    argv = steps["train_dali"].argv
    assert argv[argv.index("--batch-size") + 1] == str(cls)
    assert steps["detect"].argv[steps["detect"].argv.index("--batch-size") + 1] == str(det)


def test_a_timeout_skips_only_the_steps_that_need_it(tmp_path):
    """The real plan's needs, with each step's work replaced: the tree step hangs; the steps that do not need
    the tree still run."""
    steps = plan(tmp_path, True)
    for s in steps:
        s.argv = [sys.executable, "-c", "import time; time.sleep(30)" if s.name == "tree" else "pass"]
        s.timeout = 1 if s.name == "tree" else 10
    res = {s["name"]: s for s in run_steps(steps, tmp_path)}
    assert res["tree"]["timed_out"]
    ran = sorted(n for n, r in res.items() if r.get("rc") == 0)
    assert ran == ["broken_jpegs", "decode_bench", "doctor", "gpu_tests"]
    assert res["train_dali"]["not_run"] == "needs tree" and res["combo_latency"]["not_run"] == "needs train_dali, detect"


def test_gpu_check_imports_and_plans_on_a_box_without_the_gpu_stack():
    """What the lent box holds before the offline install (torch, torchvision, timm, numpy): psutil, DALI,
    optree, Ultralytics, polars, matplotlib and OpenCV made unimportable, gpu_check still imports and plans."""
    blocked = ("psutil", "nvidia.dali", "optree", "ultralytics", "polars", "matplotlib", "cv2", "pynvml")
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "from pillsnap_dali.commands import gpu_check\n"
            "sys.exit(gpu_check.main(['plan', '--quick']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "budget         290 s planned (install 70 + steps 220) <= 300 s" in res.stdout
    assert "tree " in res.stdout and "oom " in res.stdout


def test_the_decode_threshold_names_its_gpu_class(tmp_path):
    out = fake_results(tmp_path, ratio=3.0)
    facts = {"status": 0, "verdict": "GPU path ready", "facts": {"hw_jpeg": False}}
    (out / "doctor.json").write_text(json.dumps(facts))
    c = gpu_check.check_decode(out)
    assert c.passed and c.name == "dali >= 2x pil (JPEG, no JPEG engine: CUDA decoder)"
    facts["facts"]["hw_jpeg"] = True
    (out / "doctor.json").write_text(json.dumps(facts))
    assert not gpu_check.check_decode(out).passed  # 3x is not enough where the engine is


def test_weights_distance_and_figures(tmp_path, monkeypatch):
    a = {"w": torch.ones(4), "n": torch.tensor(3)}
    assert gpu_check.weights_distance(a, {"w": torch.ones(4), "n": torch.tensor(5)}) == 0.0
    assert gpu_check.weights_distance(a, {"w": torch.tensor([1.0, 1.0, 1.0, 3.0]), "n": torch.tensor(3)}) == 1.0
    monkeypatch.setenv(gpu_check.FIGURES_ENV, str(tmp_path / "fig"))
    gpu_check.record_figure("resume_dali", {"relative_l2": 0.001})
    out = fake_results(tmp_path / "run")
    (out / "figures").mkdir()
    (out / "figures" / "resume_dali.json").write_text((tmp_path / "fig" / "resume_dali.json").read_text())
    assert summarize(out, "quick", steps=[])[0]["figures"] == {"resume_dali": {"relative_l2": 0.001}}
    assert {s.name: s for s in plan(out, True)}["gpu_tests"].env == {gpu_check.FIGURES_ENV: str(out / "figures")}


def test_the_oom_probe_leaves_what_it_says(monkeypatch):
    assert gpu_check.fill_bytes(10 * 2 ** 30, 256) == 10 * 2 ** 30 - 256 * 2 ** 20
    assert gpu_check.fill_bytes(100 * 2 ** 20, 256) == 0


def test_the_training_step_arguments_run(tmp_path):
    """What the tree step does (small, on the CPU): the tree and its manifests; the Stage 3 training step's
    flags and --set keys are valid (a dry run) and it finds both made (nothing regenerated in its timed step)."""
    from pillsnap_dali.commands import train

    argv = gpu_check.stage3_train_argv(tmp_path, True)
    small = {"976x1280": "96x128", "data.synth.images_per_class=48": "data.synth.images_per_class=3", "dali": "dali-cpu",
             "tf_efficientnetv2_s": "resnet18", "384": "32"}
    sets = [small.get(a, a).replace("976x1280", "96x128") for a in gpu_check.tree_sets(tmp_path, True)[1::2]]
    assert gpu_check.build_tree(tmp_path, sets, 2) == tmp_path / "artifacts" / "demo"
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
    assert (tmp_path / "artifacts" / "demo" / "detect_val.csv").is_file()  # what the latency step reads
    assert train.main([small.get(a, a).replace("976x1280", "96x128") for a in argv] + ["--dry-run"]) == 0
    assert {p: p.stat().st_mtime_ns for p in made} == made  # tree and manifests reused as they were
    # the OOM probe's code path on that tree: the loader alone, nothing filled on a CPU, so no device error
    res = gpu_check.probe_oom(tmp_path / "oom", True, backend="dali-cpu", fill=None)
    assert res["batches"] >= 1 and res["device_memory_error"] is False and res["skipped_rows"] == 0
    c = gpu_check.check_oom(tmp_path)
    assert not c.passed and c.value.startswith("no device-memory error")


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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # before the fixture builds a tree
def test_dali_resume_ends_within_the_stated_weight_tolerance(manifests, tmp_path):
    """README's guarantee on `dali` (CUDA): rows and draws exact, weights within RESUME_TOLERANCE of an
    uninterrupted run (cuDNN's algorithms and the decoder path of a row are not fixed). Measured, recorded in
    summary.json's figures."""
    from pillsnap_dali.commands import train
    from pillsnap_dali.training.checkpoint import load_checkpoint
    common = ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(tmp_path), "--model",
              "test_efficientnet", "--img-size", "64", "--batch-size", "8", "--epochs", "2", "--backend", "dali",
              "--set", "train.warmup_epochs=0", "--set", "train.log_interval=1", "--set", "train.max_skipped=0.1"]
    assert train.main([*common, "--name", "whole"]) == 0
    stop, log = SignalAt("epoch 0/2 step 3/"), logging.getLogger("pillsnap_dali")
    log.addHandler(stop)
    try:
        assert train.main([*common, "--name", "cut"]) == 128 + signal.SIGTERM and stop.fired
    finally:
        log.removeHandler(stop)
    assert train.main([*common, "--name", "cut", "--resume"]) == 0
    whole = load_checkpoint(tmp_path / "whole/checkpoints/last.pt")
    resumed = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert resumed["step"] == whole["step"]
    rel = gpu_check.weights_distance(whole["model"], resumed["model"])
    gpu_check.record_figure("resume_dali", {"relative_l2": rel, "tolerance": gpu_check.RESUME_TOLERANCE,
                                            "gpu": torch.cuda.get_device_name(0)})
    assert rel <= gpu_check.RESUME_TOLERANCE


@pytest.mark.gpu
def test_mixed_and_cpu_decoders_skip_the_same_broken_jpegs(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = gpu_check.probe_broken(tmp_path / "broken", ["dali", "dali-cpu"])
    assert res["skipped"]["dali"] == res["skipped"]["dali-cpu"] and "good" not in res["skipped"]["dali"]
