"""The shared DALI runner on real DALI CPU pipelines: device-memory failures, failures no file reproduces, live
pipelines across epochs, one reused probe pipeline. A GPU allocation failure cannot happen on a CPU, so its
exact DALI text (NVIDIA/DALI issue 5609) is raised by a thin wrapper around the real pipeline on a chosen run."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import Manifest
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.loaders.runner import (MAX_RETRIES, DeviceMemoryError, PipelineFailure, is_dead_pipeline,
                                          is_device_error, memory_figures, rss_mb)
from pillsnap_dali.skiplog import SkipLog

CPU = torch.device("cpu")
# NVIDIA/DALI issue 5609: what a mixed decoder's allocation failure looks like
ALLOC_TEXT = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
              "which was used in the pipeline definition with the following traceback:\n\n"
              "encountered:\n\nCan't allocate 201326592 bytes on device 0.\n"
              "Current pipeline object is no longer valid.")
DEAD_TEXT = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
             "encountered:\n\nsomething went wrong in this batch only\nCurrent pipeline object is no longer valid.")


def _manifest(paths) -> Manifest:
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], [f"K-{i % 3:06d}" for i in range(n)], ["single"] * n,
                    ["test"] * n, [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runner_split")
    paths = []
    for i in range(20):
        a = np.zeros((80, 64, 3), np.uint8)
        a[..., 0] = (np.arange(64)[None] * 4 + i * 9) % 256
        a[..., 1] = np.arange(80)[:, None] * 3 % 256
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def _cfg(*sets):
    return load_config(stage="demo", sets=["preprocess.img_size=32", "train.batch_size=8", "loader.threads=2",
                                           "loader.workers=0", *sets])


class _Failing:
    """The real pipeline, except that the runs numbered in ``fail_at`` (counted over every pipeline the
    loader builds) raise ``RuntimeError(text)`` instead of running."""

    def __init__(self, pipe, counter: dict, fail_at: set, text: str):
        self._pipe, self._counter, self._fail_at, self._text = pipe, counter, fail_at, text

    def run(self):
        self._counter["runs"] += 1
        if self._counter["runs"] in self._fail_at:
            raise RuntimeError(self._text)
        return self._pipe.run()

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def _inject(runner, fail_at: set, text: str) -> dict:
    counter = {"runs": 0}
    build = runner.build
    runner.build = lambda source, opts: _Failing(build(source, opts), counter, fail_at, text)
    return counter


def _loader(split, log, train=True, *sets):
    return build_loader(_manifest(split), [i % 3 for i in range(len(split))], _cfg(*sets), train=train, device=CPU,
                        backend="dali-cpu", skip_log=log)


def _rows(loader, epoch=0) -> list[int]:
    loader.set_epoch(epoch)
    return [r for b in loader for r in b.rows.tolist()]


def test_error_classes():
    assert is_device_error(RuntimeError(ALLOC_TEXT)) and is_dead_pipeline(RuntimeError(ALLOC_TEXT))
    for text in ("CUDA error: out of memory", "cudaErrorMemoryAllocation", "CUDA error (2): out of memory"):
        assert is_device_error(RuntimeError(text))
    assert not is_device_error(RuntimeError(DEAD_TEXT)) and is_dead_pipeline(RuntimeError(DEAD_TEXT))
    assert memory_figures(None)["rss_mb"] > 0 and rss_mb() > 0


@pytest.mark.parametrize("train", [True, False])
def test_an_allocation_failure_is_retried_and_skips_nothing(split, tmp_path, caplog, train):
    log = SkipLog(tmp_path / "skipped.csv")
    loader = _loader(split, log, train)
    counter = _inject(loader.runner, {2}, ALLOC_TEXT)
    with caplog.at_level(logging.WARNING, logger="pillsnap_dali.loaders.runner"):
        rows = _rows(loader)
    assert sorted(rows) == list(range(20)) and len(rows) == 20  # every row once: the batch came back
    assert len(log) == 0 and loader.epoch_stats()["skipped"] == 0
    assert loader.runner.builds == 2 and counter["runs"] > 2  # rebuilt once, then it went on
    assert "unused memory released" in caplog.text
    log.ensure_file()
    assert list(csv.DictReader(open(log.path, encoding="utf-8"))) == []


def test_a_second_allocation_failure_stops_with_a_clear_error(split, tmp_path):
    log = SkipLog(tmp_path / "skipped.csv")
    loader = _loader(split, log, True)
    _inject(loader.runner, {2, 3}, ALLOC_TEXT)
    with pytest.raises(DeviceMemoryError, match=r"batch size 8, image size 32 px.*rss_mb.*Can't allocate"):
        _rows(loader)
    assert len(log) == 0 and not log.path.exists()


def test_a_failure_no_file_reproduces_is_retried_not_skipped(split):
    log = SkipLog(None)
    loader = _loader(split, log, True)
    _inject(loader.runner, {2, 5}, DEAD_TEXT)  # two failures far apart, each on a batch of good files
    rows = _rows(loader)
    assert sorted(rows) == list(range(20)) and len(log) == 0
    assert loader.runner.probe.builds == 1  # one probe pipeline for every probe


def test_a_batch_that_keeps_failing_without_a_culprit_stops_the_run(split):
    log = SkipLog(None)
    loader = _loader(split, log, True)
    _inject(loader.runner, set(range(2, 2 + MAX_RETRIES + 1)), DEAD_TEXT)
    with pytest.raises(PipelineFailure, match="although each of its files goes through the graph alone"):
        _rows(loader)
    assert len(log) == 0


def test_pipelines_live_across_epochs_and_keep_epochs_reproducible(split, tmp_path):
    """One training and one validation pipeline for three epochs (rebuilt only after the broken file's failure
    in epoch 0, found by the one probe pipeline); an epoch's pixels do not depend on the pipeline's history (a fresh loader, or one
    rebuilt after a failure, gives the same batch)."""
    bad = tmp_path / "bad.png"
    data = split[0].read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # truncated: the header reads, the pixels do not
    paths = [*split[:9], bad, *split[9:]]
    log = SkipLog(None)
    train, val = _loader(paths, log, True), _loader(paths, log, False)
    for epoch in range(3):
        assert len(_rows(train, epoch)) == 20 and len(_rows(val, epoch)) == 20
    assert train.runner.builds == 2 and val.runner.builds == 1  # one each, and one rebuild after the failure
    assert len(log) == 1 and log.entries[0]["reason"].startswith("DALI: ")
    assert train.runner.probe.builds <= 1 + len(log)  # one probe pipeline, rebuilt only after a file killed it
    train.set_epoch(3)
    lived = next(iter(train)).images
    fresh = _loader(paths, log, True)
    _inject(fresh.runner, {1}, DEAD_TEXT)  # and its first pipeline dies at once: rebuilt
    fresh.set_epoch(3)
    assert torch.equal(next(iter(fresh)).images, lived) and fresh.runner.builds == 2


def test_the_detection_loader_shares_the_allocation_rule(tmp_path):
    from pipelines import PipelineOptions

    from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split
    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (48, 32), (i * 40, 90, 200)).save(images / f"d{i}.png")
        (labels / f"d{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n")

    def make(log):
        return DaliDetectLoader(read_yolo_split(images), batch_size=2, imgsz=32, augment=None, shuffle=False,
                                options=PipelineOptions(device="cpu"), skip_log=log, split="train")
    log = SkipLog(tmp_path / "skipped.csv")
    loader = make(log)
    _inject(loader.runner, {2}, ALLOC_TEXT)
    for _ in range(2):  # and the pipeline lives on into the next epoch
        assert sorted(f for b in loader for f in b["im_file"]) == sorted(str(p) for p in images.iterdir())
    assert loader.runner.builds == 2 and len(log) == 0 and loader.skipped == []
    again = make(log)
    _inject(again.runner, {2, 3}, ALLOC_TEXT)
    with pytest.raises(DeviceMemoryError, match="batch size 2, image size 32 px"):
        list(again)
    assert len(log) == 0


def test_one_memory_format_setting_and_the_training_devices_gpu(split):
    from pillsnap_dali.config import ConfigError, memory_layout
    from pillsnap_dali.loaders.dali_loader import dali_device_id

    with pytest.raises(ConfigError, match="loader.layout"):
        _cfg("train.channels_last=true")
    assert memory_layout("auto", "cuda") == "NHWC" and memory_layout("auto", "cpu") == "NCHW"
    assert memory_layout("NHWC", "cpu") == "NHWC"
    auto = next(iter(_loader(split, SkipLog(None), False))).images  # auto on the CPU: plain NCHW
    assert auto.is_contiguous() and not auto.is_contiguous(memory_format=torch.channels_last)
    nhwc = next(iter(_loader(split, SkipLog(None), False, "loader.layout=NHWC"))).images
    assert nhwc.shape == auto.shape and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert dali_device_id(torch.device("cuda", 1)) == 1  # --device cuda:1: DALI decodes on GPU 1


@pytest.mark.parametrize("failures", [1, MAX_RETRIES])
def test_a_batch_failing_up_to_the_documented_retries_comes_back_whole(split, caplog, failures):
    """The runner's documented count (module docstring, docs/reliability.md): a batch no single file explains is
    retried MAX_RETRIES = 2 times; the last of them still delivers every row, none skipped."""
    assert MAX_RETRIES == 2
    log = SkipLog(None)
    loader = _loader(split, log, True)
    _inject(loader.runner, set(range(2, 2 + failures)), DEAD_TEXT)  # consecutive failures of one batch
    with caplog.at_level(logging.WARNING, logger="pillsnap_dali.loaders.runner"):
        rows = _rows(loader)
    assert sorted(rows) == list(range(20)) and len(log) == 0
    assert f"the batch is retried ({failures} of {MAX_RETRIES})" in caplog.text

# nvImageCodec's failures reach DALI's mixed decoder as this line (a bad file, or its allocator failed)
AMBIGUOUS_TEXT = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
                  "encountered:\n\nFailed to decode sample #3 : /data/a.jpg\n"
                  "Current pipeline object is no longer valid.")
CUDA_ALLOC_TEXT = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
                   "encountered:\n\nCUDA allocation failed\nCurrent pipeline object is no longer valid.")
FULL_GPU = {"rss_mb": 900.0, "gpu_free_mb": 310.0, "gpu_total_mb": 16303.0}   # an RTX 5080 nearly full
ROOMY_GPU = {"rss_mb": 900.0, "gpu_free_mb": 9000.0, "gpu_total_mb": 16303.0}


def test_dali_and_nvimagecodec_allocation_texts():
    from pillsnap_dali.loaders.runner import MemoryPressure, is_ambiguous_decode, under_memory_pressure
    assert is_device_error(RuntimeError(CUDA_ALLOC_TEXT))
    assert not is_device_error(RuntimeError(AMBIGUOUS_TEXT)) and is_ambiguous_decode(RuntimeError(AMBIGUOUS_TEXT))
    assert is_device_error(MemoryPressure("probe failed while the device is nearly full"))
    assert under_memory_pressure(FULL_GPU) and not under_memory_pressure(ROOMY_GPU)
    assert not under_memory_pressure({"rss_mb": 1.0})  # no GPU figure (dali-cpu): never pressure


def test_the_dead_pipeline_is_gone_before_memory_is_released(split, monkeypatch):
    """The retry frees memory only if nothing holds the failed pipeline when DALI's pools are released (the
    epoch loop's local and the error's traceback did)."""
    import weakref

    from pillsnap_dali.loaders import runner as runner_mod
    loader = _loader(split, SkipLog(None), True)
    built = []
    build = loader.runner.build
    counter = {"runs": 0}

    def tracked(source, opts):
        pipe = _Failing(build(source, opts), counter, {2}, CUDA_ALLOC_TEXT)
        built.append(weakref.ref(pipe))
        return pipe
    loader.runner.build = tracked
    seen = []
    monkeypatch.setattr(runner_mod, "release_unused_memory", lambda: seen.append([r() is None for r in built]))
    assert sorted(_rows(loader)) == list(range(20))
    assert seen == [[True]]  # one release, after the only pipeline built so far was collected


def test_an_ambiguous_decode_failure_on_a_full_gpu_is_memory_not_a_bad_file(split, tmp_path, monkeypatch):
    from pillsnap_dali.loaders import runner as runner_mod
    monkeypatch.setattr(runner_mod, "memory_figures", lambda device_id: dict(FULL_GPU))
    log = SkipLog(tmp_path / "skipped.csv")
    loader = _loader(split, log, True)
    _inject(loader.runner, {2}, AMBIGUOUS_TEXT)
    assert sorted(_rows(loader)) == list(range(20)) and len(log) == 0 and loader.runner.builds == 2
    again = _loader(split, log, True)
    _inject(again.runner, {2, 3}, AMBIGUOUS_TEXT)
    with pytest.raises(DeviceMemoryError, match="Failed to decode sample"):
        _rows(again)
    assert len(log) == 0 and not log.path.exists()


def test_a_one_image_probe_that_fails_under_memory_pressure_skips_nothing(split, tmp_path, monkeypatch):
    """The batch dies for a reason of its own; each probe then fails with the ambiguous text while the device
    is full: no row goes to skipped.csv, the run stops with the device-memory error."""
    from pillsnap_dali.loaders import runner as runner_mod
    figures = {"now": ROOMY_GPU}
    monkeypatch.setattr(runner_mod, "memory_figures", lambda device_id: dict(figures["now"]))
    log = SkipLog(tmp_path / "skipped.csv")
    loader = _loader(split, log, True)
    _inject(loader.runner, {2}, DEAD_TEXT)
    probe_build = loader.runner.probe.build

    def failing_probe(source, opts):
        figures["now"] = FULL_GPU  # the device fills up while the rows are probed
        return _Failing(probe_build(source, opts), {"runs": 0}, set(range(1, 100)), AMBIGUOUS_TEXT)
    loader.runner.probe.build = failing_probe
    rows = _rows(loader)  # first device failure: retried, and the retry goes through
    assert sorted(rows) == list(range(20)) and len(log) == 0
    figures["now"] = ROOMY_GPU
    probe = runner_mod.Probe(failing_probe, loader.runner.feed, loader.runner.opts, pressure=lambda: False)
    assert probe.problem(0, 0).startswith("DALI: ")   # roomy device: the probe's failure is the file's
    probe = runner_mod.Probe(failing_probe, loader.runner.feed, loader.runner.opts, pressure=lambda: True)
    with pytest.raises(runner_mod.MemoryPressure):
        probe.problem(0, 0)


class _PathSplit:
    """The real pipeline, as a GPU with a hardware JPEG engine runs it: the first ``hw`` rows of a batch go to
    the hardware decoder (DALI's hw_decoder_load), and ``bad_row`` fails there (its CUDA decode works)."""

    def __init__(self, pipe, bad_row: int, hw_share: float, counter: dict):
        self._pipe, self._bad, self._hw, self._counter = pipe, bad_row, hw_share, counter

    def run(self):
        outs = self._pipe.run()
        rows = np.asarray(outs[-1].as_tensor()).reshape(-1).tolist()
        if self._bad in rows[:int(round(len(rows) * self._hw))]:
            self._counter["hw_failures"] += 1
            raise RuntimeError(AMBIGUOUS_TEXT)
        return outs

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def _split_paths(loader, bad_row: int, bad_on: set):
    """Give the runner's probe the two decoder paths, ``bad_row`` failing on the loads in ``bad_on``."""
    r = loader.runner
    counter = {"hw_failures": 0}
    build = r.build
    r.build = lambda source, opts: _PathSplit(build(source, opts), bad_row, 1.0, counter)
    r.probe.paths = (1.0, 0.0)
    r.probe.build_on_path = lambda source, opts, hw: _PathSplit(build(source, opts), bad_row,
                                                                1.0 if hw in bad_on else 0.0, counter)
    return counter


def test_a_file_that_fails_on_the_hardware_path_only_is_delivered_not_skipped(split):
    log = SkipLog(None)
    loader = _loader(split, log, False)
    counter = _split_paths(loader, 5, {1.0})
    rows = _rows(loader)
    assert sorted(rows) == list(range(20)) and len(rows) == 20 and len(log) == 0
    assert loader.runner.probe.works_on == {5: 0.0} and counter["hw_failures"] >= 2  # batch + the hw probe
    assert loader.runner.probe.builds == 3  # one per path, and the hardware one rebuilt after row 5 killed it
    assert loader.runner._blind_failures == 0


def test_a_file_that_fails_on_both_paths_is_skipped_once(split):
    log = SkipLog(None)
    loader = _loader(split, log, False)
    _split_paths(loader, 5, {1.0, 0.0})
    rows = _rows(loader)
    assert sorted(rows) == [r for r in range(20) if r != 5] and len(log) == 1 and log.entries[0]["row"] == 5
    assert loader.runner.probe.works_on == {}


def test_the_gpu_classification_loader_gives_the_probe_both_paths(split):
    """A ``dali`` loader's probe tries hw_decoder_load 1 then 0 (its runner builds the graph with the load
    fixed); ``dali-cpu`` has one decoder path."""
    from pillsnap_dali.loaders.runner import PROBE_PATHS, Probe
    cpu = _loader(split, SkipLog(None), False)
    assert cpu.runner.probe.paths == (None,) and cpu.runner.probe.build_on_path is not None
    import dataclasses
    gpu_opts = dataclasses.replace(cpu.runner.opts, device="gpu", device_id=0)
    probe = Probe(cpu.runner.build, cpu.runner.feed, gpu_opts, cpu.runner.probe.build_on_path)
    assert probe.paths == PROBE_PATHS == (1.0, 0.0)
