"""One device for DALI, torch and Ultralytics, and bf16 only where the hardware has it (device.py, detect's
precision and device choices), driven on the CPU through their decision functions."""
from __future__ import annotations

import pytest
import torch

from pillsnap_dali.config import load_config
from pillsnap_dali.device import (DeviceError, DevicePlan, bf16_from_capability, native_bf16,
                                  resolve_device, select_device)
from pillsnap_dali.training.engine import amp_settings


@pytest.mark.parametrize("request_, count, index", [
    ("auto", 0, None), ("auto", 2, 0), ("cpu", 2, None), ("cuda", 1, 0), ("cuda:1", 2, 1), ("1", 2, 1),
    ("CUDA:0", 1, 0), (None, 0, None)])
def test_one_index_for_torch_dali_and_ultralytics(request_, count, index):
    plan = resolve_device(request_, count)
    assert plan.index == index and plan.dali_device_id == index
    if index is None:
        assert plan.torch == "cpu" and plan.ultralytics == "cpu" and not plan.cuda
    else:  # the same number in each library's spelling: torch "cuda:N", Ultralytics "N", DALI device_id N
        assert plan.torch == f"cuda:{index}" and plan.ultralytics == str(index)
        assert torch.device(plan.torch).index == int(plan.ultralytics) == plan.dali_device_id


@pytest.mark.parametrize("request_, count, words", [
    ("cuda:2", 2, "has 2 CUDA device(s)"), ("cuda:0", 0, "no CUDA device here"), ("cuda:0,1", 2, "one device"),
    ("gpu", 1, "expected auto, cpu"), ("cuda:x", 1, "expected auto, cpu")])
def test_a_device_that_is_not_there_is_one_line(request_, count, words, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(DeviceError) as e:
        resolve_device(request_, count)
    assert words in str(e.value) and "\n" not in str(e.value) and str(request_) in str(e.value)


def test_select_device_on_this_machine():
    plan = select_device("auto")
    assert plan.cuda == torch.cuda.is_available()
    assert select_device("cpu") == DevicePlan(None)


@pytest.mark.parametrize("cap, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True),
                                         ((12, 0), True), (None, False)])
def test_bf16_only_from_ampere_on(cap, native):
    """V100 (7.0) and T4 (7.5) emulate bf16: no; A100, H100, RTX 5080 (12.0): yes."""
    assert bf16_from_capability(cap) is native


def test_no_bf16_and_no_autocast_on_the_cpu():
    assert amp_settings(load_config("demo"), torch.device("cpu"))[1] is None
    if not torch.cuda.is_available():
        assert native_bf16() is False


def test_ultralytics_amp_follows_hardware_and_the_installed_release():
    from pillsnap_dali.training.detector import accepts_bf16, amp_setting

    assert accepts_bf16() is True  # the installed 8.4 release validates amp and knows "bf16"

    def bool_only(cfg):  # 8.3-style: amp must be a bool
        if not isinstance(cfg["amp"], bool):
            raise TypeError(f"'amp={cfg['amp']}' is of invalid type str. 'amp' must be a bool")

    assert accepts_bf16(bool_only) is False
    assert accepts_bf16(lambda cfg: None) is False  # no validation: "bf16" would reach torch.tensor(amp)
    assert amp_setting(cuda=False, bf16=True, bf16_accepted=True) is False
    assert amp_setting(cuda=True, bf16=True, bf16_accepted=True) == "bf16"
    assert amp_setting(cuda=True, bf16=False, bf16_accepted=True) is True   # T4 / V100: fp16 + GradScaler
    assert amp_setting(cuda=True, bf16=True, bf16_accepted=False) is True   # older Ultralytics: fp16


def test_detect_train_args_on_the_cpu_have_amp_off(tmp_path):
    from pillsnap_dali.config import load_config
    from pillsnap_dali.training.detector import _train_args, resolve_device, run_from_config

    run = run_from_config(load_config("demo"), tmp_path / "data.yaml")
    assert _train_args(run, "cpu")["amp"] is False and _train_args(run, "cpu")["device"] == "cpu"
    if not torch.cuda.is_available():
        plan, backend = resolve_device("auto", "dali")
        assert plan.torch == "cpu" and backend == "dali-cpu"
        with pytest.raises(DeviceError):
            resolve_device("cuda:1", "dali")


def test_dali_and_the_detector_must_share_the_gpu():
    from pillsnap_dali.training.detector import check_same_gpu
    from pipelines import PipelineOptions

    check_same_gpu(torch.device("cuda", 1), PipelineOptions(device="gpu", device_id=1))
    check_same_gpu("cpu", PipelineOptions(device="cpu"))
    with pytest.raises(RuntimeError, match="cuda:0 but DALI decodes on cuda:1"):
        check_same_gpu(torch.device("cuda", 0), PipelineOptions(device="gpu", device_id=1))


@pytest.mark.gpu
def test_native_bf16_on_this_gpu_matches_its_capability():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert native_bf16(0) == bf16_from_capability(torch.cuda.get_device_capability(0))
    assert amp_settings(load_config("demo"), torch.device("cuda:0"))[1] in (torch.bfloat16, torch.float16)
    plan = select_device("cuda:0")
    assert torch.cuda.current_device() == plan.index == 0
