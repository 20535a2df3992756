"""The doctor: verdicts from a fake capability table (Blackwell without sm_120 kernels, old drivers, CPU-only
torch on a GPU box, DALI/torch CUDA mismatch) and a real run on this machine."""
from __future__ import annotations

import json

import pytest
import torch

from pillsnap_dali.commands import doctor
from pillsnap_dali.commands.doctor import FAIL, OK, WARN, Facts, Gpu, has_kernels, judge, verdict

ARCH_CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]       # torch 2.7 cu126: no Blackwell
ARCH_CU128 = ARCH_CU126 + ["sm_100", "sm_120"]
RTX5080 = Gpu("NVIDIA GeForce RTX 5080", (12, 0), 16.0)
H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80.0)


def facts(**kw) -> Facts:
    base = dict(cpu_cores=16, torch_version="2.8.0+cu128", torch_cuda="12.8", arch_list=ARCH_CU128, gpus=[RTX5080],
                cuda_available=True, driver="575.51.03", dali_version="1.52.0", dali_package="nvidia-dali-cuda120",
                dali_cuda=12, nvimgcodec="0.6.0", mixed_decode=OK, gpu_decoder=OK, hw_jpeg=False, versions={"ultralytics": "8.4.190", "timm": "1.0.31"},
                disk_path="/data", free_gb=500.0)
    base.update(kw)
    return Facts(**base)


def by_what(lines, what):
    return next(ln for ln in lines if ln.what == what)


def test_a_good_blackwell_workstation_is_ready():
    f = facts()
    lines = judge(f)
    assert all(ln.status != FAIL for ln in lines)
    status, last = verdict(f, lines)
    assert status == 0 and "dali on NVIDIA GeForce RTX 5080" in last


def test_torch_without_sm_120_kernels_names_the_fix():
    f = facts(torch_version="2.7.0+cu126", torch_cuda="12.6", arch_list=ARCH_CU126, mixed_decode=OK)
    lines = judge(f)
    k = by_what(lines, "kernels gpu0")
    assert k.status == FAIL and "this torch has no sm_120 kernels" in k.detail
    assert "torch>=2.7 from the cu128 index" in k.fix and doctor.CU128_INDEX in k.fix
    status, last = verdict(f, lines)
    assert status == 1 and "sm_120" in last


@pytest.mark.parametrize("arch, cap, ok", [
    (["sm_80"], (8, 6), True),        # an sm_80 cubin runs on an RTX 3090 (8.6)
    (["sm_86"], (8, 0), False),       # not the other way round
    (["sm_90"], (12, 0), False),      # no cubin across majors
    (["compute_90"], (12, 0), True),  # PTX is JIT-compiled for newer GPUs
    (["sm_120"], (12, 0), True), ([], (9, 0), False),
    (["sm_90a"], (9, 0), True),       # arch-specific cubins (torch cu126+ lists sm_90a): that capability only
    (["sm_90a"], (9, 1), False),
    (["sm_100f"], (10, 3), True),     # family cubins: the major, minors at or above
    (["sm_100a", "sm_120a"], (12, 0), True), (["sm_100a"], (12, 0), False),
    (["compute_120"], (12, 0), True), (["compute_120"], (10, 0), False),
    (["lto_90", "bogus", "sm_", "sm_9x", "compute_100f"], (10, 0), True)])  # odd entries: never an error
def test_kernel_compatibility_rules(arch, cap, ok):
    assert has_kernels(arch, cap) is ok


def test_every_arch_form_torch_prints_parses():
    assert doctor.parse_arch("sm_90a") == ("sm", 9, 0, "a") and doctor.parse_arch("sm_100f") == ("sm", 10, 0, "f")
    assert doctor.parse_arch("compute_120") == ("compute", 12, 0, "") and doctor.parse_arch("sm_86") == ("sm", 8, 6, "")
    assert doctor.parse_arch("sm_") is None and doctor.parse_arch("gfx90a") is None
    lines = judge(facts(gpus=[H100], arch_list=["sm_80", "sm_90a", "sm_100f", "sm_120", "compute_120"]))
    assert by_what(lines, "kernels gpu0").status == OK  # the doctor itself did not raise on these


@pytest.mark.parametrize("torch_cuda, flavour", [("12.8", "nvidia-dali-cuda120"), ("13.0", "nvidia-dali-cuda130"),
                                                 ("13.1", "nvidia-dali-cuda130"), (None, "nvidia-dali-cuda120")])
def test_fix_lines_name_the_dali_flavour_of_torchs_cuda(torch_cuda, flavour):
    f = facts(torch_cuda=torch_cuda, driver="580.65", dali_version=None, mixed_decode=None)
    fix = by_what(judge(f), "DALI").fix
    assert f"'{flavour}>=1.45'" in fix and f"PILLSNAP_DALI_CUDA={flavour[-3:-1]} pip install -e ." in fix
    old = by_what(judge(facts(torch_cuda=torch_cuda, driver="580.65", dali_version="1.40.0")), "DALI")
    assert old.status == FAIL and flavour in old.fix and "cuda1" + ("2" if "13" in flavour else "3") not in old.fix


def test_mixed_decode_that_fell_back_to_the_cpu_fails():
    """DALI's mixed gave the right image, but nvImageCodec restricted to its CUDA backend decoded nothing
    (no nvJPEG for this GPU): the image came from a CPU fallback, the GPU path is not proven."""
    f = facts(gpu_decoder="none")
    line = by_what(judge(f), "mixed decode")
    assert line.status == FAIL and "fell back to the CPU" in line.detail and line.gpu_path
    assert verdict(f, judge(f))[0] == 1
    assert by_what(judge(facts(gpu_decoder=None)), "mixed decode").status == FAIL  # not probed: not proven


def test_the_hardware_jpeg_engine_is_named():
    assert "no hardware JPEG decoder" in by_what(judge(facts(hw_jpeg=False)), "JPEG engine").detail
    assert "A100/H100-class" in by_what(judge(facts(gpus=[H100], hw_jpeg=True)), "JPEG engine").detail
    assert "not probed" in by_what(judge(facts(hw_jpeg=None)), "JPEG engine").detail


def test_the_gpu_decoder_probe_answers_without_a_gpu():
    """On this CPU machine nvImageCodec's CUDA backend cannot run: the probe gives a line, never raises."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    for kind in ("GPU_ONLY", "HW_GPU_ONLY"):
        got = doctor.nvimgcodec_decodes(kind)
        assert isinstance(got, str) and got != OK


def test_old_driver_for_blackwell_and_for_cuda_13():
    assert by_what(judge(facts(driver="560.35.03")), "driver").status == FAIL
    assert "570" in by_what(judge(facts(driver="560.35.03")), "driver").fix
    h100_cu13 = facts(gpus=[H100], torch_cuda="13.0", driver="575.51.03")
    assert by_what(judge(h100_cu13), "driver").status == FAIL and "580" in by_what(judge(h100_cu13), "driver").fix
    assert by_what(judge(facts(gpus=[H100], driver="535.104.05")), "driver").status == OK


def test_cpu_only_torch_on_a_gpu_machine_fails_with_the_cu128_index():
    f = facts(torch_version="2.8.0+cpu", torch_cuda=None, arch_list=[], cuda_available=False, mixed_decode=None)
    lines = judge(f)
    line = by_what(lines, "torch CUDA")
    assert line.status == FAIL and doctor.CU128_INDEX in line.fix
    assert verdict(f, lines)[0] == 1


def test_failed_mixed_decode_and_old_packages():
    f = facts(mixed_decode="CUDA error: no kernel image is available for execution on the device",
              dali_version="1.40.0", versions={"ultralytics": "8.3.20", "timm": None})
    lines = judge(f)
    assert by_what(lines, "mixed decode").status == FAIL and "no kernel image" in by_what(lines, "mixed decode").detail
    assert by_what(lines, "DALI").status == FAIL and "nvidia-dali-cuda120>=1.45" in by_what(lines, "DALI").fix
    assert by_what(lines, "ultralytics").fix == "pip install -U 'ultralytics>=8.4.138'"
    assert by_what(lines, "timm").status == FAIL
    assert verdict(f, lines)[0] == 1


def test_dali_built_for_another_cuda_major_than_torch():
    line = by_what(judge(facts(torch_cuda="13.0", driver="580.65")), "DALI/torch CUDA")
    assert line.status == WARN and "nvidia-dali-cuda130" in line.fix


def test_cpu_machine_verdict_is_dali_cpu_and_low_disk_warns():
    f = facts(torch_version="2.8.0+cpu", torch_cuda=None, arch_list=[], gpus=[], cuda_available=False,
              driver=None, mixed_decode=None, free_gb=3.0)
    lines = judge(f)
    assert by_what(lines, "disk").status == WARN
    assert verdict(f, lines) == (0, "CPU machine: no GPU, training runs on the dali-cpu backend (loader.backend auto)")
    assert verdict(f, lines, require_gpu=True)[0] == 1
    assert "pil backend" in verdict(facts(gpus=[], dali_version=None, mixed_decode=None), [])[1]


def test_doctor_runs_here(capsys, tmp_path):
    status = doctor.main(["--disk", str(tmp_path), "--json", str(tmp_path / "doctor.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["status"] == status and out.strip().endswith(report["verdict"])
    assert "cores for this process" in out and "torch" in out and "ultralytics" in out
    if not torch.cuda.is_available():
        assert status == 0 and "dali-cpu backend" in out
        assert doctor.main(["--require-gpu", "--disk", str(tmp_path)]) == 1


@pytest.mark.gpu
def test_mixed_decode_works_on_this_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert doctor.mixed_decode_works(0) == OK
    assert doctor.nvimgcodec_decodes("GPU_ONLY", 0) == OK
    assert doctor.nvimgcodec_decodes("HW_GPU_ONLY", 0) in (OK, "none")
