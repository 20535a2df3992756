"""TensorBoard event files of a training run, read back with tensorboard's own EventAccumulator."""
from __future__ import annotations

import sys

import pytest

from pillsnap_dali.commands import train

TINY = ["--model", "test_efficientnet", "--img-size", "32", "--batch-size", "16", "--epochs", "2",
        "--set", "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1",
        "--set", "train.log_interval=1", "--set", "train.max_skipped=0.1"]


def _args(manifests, out, *extra):
    return ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(out), "--name", "r", *TINY, *extra]


def test_event_files_hold_step_and_epoch_tags(manifests, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(_args(manifests, tmp_path)) == 0
    tb = tmp_path / "r" / "tb"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    step_tags = {"train/loss", "train/acc", "train/lr", "perf/data_time", "perf/compute_time", "perf/data_share",
                 "perf/throughput"}
    epoch_tags = {f"epoch/{k}" for k in ("train_loss", "val_loss", "val_top1", "val_top5", "val_macro_f1", "lr",
                                         "data_time", "compute_time", "data_share", "images_per_s")}
    assert step_tags | epoch_tags <= tags, (step_tags | epoch_tags) - tags
    assert "perf/cuda_mem" not in tags  # CPU run: no CUDA memory to report
    epochs = acc.Scalars("epoch/val_top1")
    assert [e.step for e in epochs] == [0, 1] and all(0 <= e.value <= 1 for e in epochs)
    steps = acc.Scalars("perf/throughput")
    assert len(steps) >= 2 and all(e.value > 0 for e in steps)
    assert all(e.value >= 0 for e in acc.Scalars("perf/data_time"))
    assert [e.step for e in steps] == sorted(e.step for e in steps)  # global step: grows across epochs
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"tensorboard --logdir {tb}" in report


def test_tensorboard_off_and_missing_package(manifests, tmp_path, monkeypatch, capsys):
    assert train.main(_args(manifests, tmp_path / "off", "--set", "train.tensorboard=false", "--epochs", "1")) == 0
    assert not (tmp_path / "off" / "r" / "tb").exists()
    assert "tensorboard --logdir" not in (tmp_path / "off" / "r" / "report.md").read_text()
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed: import fails
    assert train.main(_args(manifests, tmp_path / "missing", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: TensorBoard logging (train.tensorboard) needs the tensorboard package, which is not "
                       "installed: pip install tensorboard (or turn it off: --set train.tensorboard=false)")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_run_logs_cuda_memory_and_nvml_figures(manifests, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(_args(manifests, tmp_path, "--backend", "dali", "--device", "cuda")) == 0
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "perf/cuda_mem" in tags and all(e.value > 0 for e in acc.Scalars("perf/cuda_mem"))
    assert {"perf/gpu_util", "perf/gpu_mem", "epoch/gpu_mem_peak_gb"} <= tags  # NVML (nvidia-ml-py) on CUDA
