"""Torch's CPU threads are chosen with the loader and the machine's load in mind (issue 15 item 6, issue 25
item 4; figures in docs/benchmarks.md)."""
import math
import time

import pytest
import torch

from pillsnap_dali.config import ConfigError, load_config
from pillsnap_dali.threads import (apply_torch_threads, auto_threads, loader_cpu_threads, others_busy_cores,
                                   torch_threads)


def test_auto_gives_torch_the_cores_the_loader_leaves():
    cfg = load_config("demo", sets=["loader.threads=3", "loader.workers=1"])
    assert cfg.train.torch_threads == "auto"
    busy = math.nan  # the machine's load unknown: as on a busy machine, the loader rule alone
    assert torch_threads(cfg, "dali-cpu", cores=8, others_busy=busy) == 5  # 8 cores - 3 DALI threads
    assert torch_threads(cfg, "pil", cores=8, others_busy=busy) == 7  # 8 cores - 1 PIL worker process
    assert torch_threads(cfg, "dali-cpu", cores=2, others_busy=busy) == 1  # never below one
    assert loader_cpu_threads(cfg, "dali") == 3


def test_auto_takes_every_core_on_an_idle_machine_and_protects_a_busy_one():
    # idle (others below a quarter of a core): torch's own default, every core, whatever the loader
    assert auto_threads(2, loader_threads=2, others_busy=0.0) == 2
    assert auto_threads(2, loader_threads=2, others_busy=0.2) == 2
    assert auto_threads(16, loader_threads=4, others_busy=0.1) == 16
    # one busy process on 2 cores: one torch thread (two spinning OpenMP threads would fight it and DALI)
    assert auto_threads(2, loader_threads=2, others_busy=1.0) == 1
    assert auto_threads(2, loader_threads=2, others_busy=0.3) == 1
    assert auto_threads(2, loader_threads=2, others_busy=5.0) == 1  # never below one
    # a bigger machine: the cores the others leave (a core 75 % free counts), and the loader's when it leaves some
    assert auto_threads(16, loader_threads=4, others_busy=2.0) == 12   # the loader's 4 cores kept
    assert auto_threads(16, loader_threads=4, others_busy=6.0) == 10
    assert auto_threads(16, loader_threads=4, others_busy=6.3) == 9
    assert auto_threads(16, loader_threads=16, others_busy=1.0) == 15  # loader on every core (auto)
    # load unknown: as busy, the loader rule; torchrun's sibling ranks are busy by design: the loader rule too
    assert auto_threads(8, loader_threads=3, others_busy=math.nan) == 5
    assert auto_threads(8, loader_threads=3, others_busy=0.0, local_world=2) == 5
    cfg = load_config("demo", sets=["loader.threads=2"])
    assert torch_threads(cfg, "dali-cpu", cores=2, others_busy=0.0) == 2
    assert torch_threads(cfg, "dali-cpu", cores=2, others_busy=1.0) == 1


def test_the_load_sample_is_a_share_of_this_process_cores():
    # a real sample of the shared machine (its value is the machine's business: only its range is checked);
    # this process spinning during the sample is left out, so it alone cannot fill the cores
    import threading

    from pillsnap_dali.sysinfo import available_cores
    stop = threading.Event()
    spin = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spin.start()
    try:
        busy = others_busy_cores(0.2)
    finally:
        stop.set()
        spin.join()
    assert not math.isnan(busy) and 0.0 <= busy <= available_cores() * 1.05


def test_a_number_sets_torch_threads_outright_and_a_bad_one_is_a_config_error():
    assert torch_threads(load_config("demo", sets=["train.torch_threads=3"]), "dali-cpu", cores=2) == 3
    with pytest.raises(ConfigError, match="train.torch_threads"):
        torch_threads(load_config("demo", sets=["train.torch_threads=0"]), "dali-cpu")


def test_apply_sets_torch_and_the_trainer_applies_it(tmp_path):
    before = torch.get_num_threads()
    try:
        cfg = load_config("demo", sets=["train.torch_threads=1"])
        assert apply_torch_threads(cfg, "pil") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    import inspect

    from pillsnap_dali.training import engine
    assert "apply_torch_threads(cfg, self.backend)" in inspect.getsource(engine.Trainer.__init__)


def test_bench_step_compares_thread_settings_beside_busy_processes(tmp_path):
    import json

    from pillsnap_dali.commands import bench as bench_cmd
    out = tmp_path / "step.json"
    assert bench_cmd.main(["step", "--stage", "demo", "--model", "test_efficientnet", "--img-size", "32",
                       "--batch-size", "2", "--steps", "1", "--reps", "1", "--busy", "0,1",
                       "--torch-threads", "torch,auto", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["busy"], r["setting"]) for r in runs] == [(0, "torch"), (0, "auto"), (1, "torch"), (1, "auto")]
    assert all(r["images_per_s"] > 0 for r in runs)


def test_busy_processes_run_and_are_stopped():
    from pillsnap_dali.benchmarks.step import busy_processes
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    with busy_processes(1) as pids:
        assert running(pids[0])
        # not a child of this process: the load the auto thread rule samples (others' cores) includes it
        assert pids[0] not in {c.pid for c in psutil.Process().children(recursive=True)}
        time.sleep(0.5)
        assert others_busy_cores(0.5) > 0.5
    deadline = time.monotonic() + 10
    while running(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pids[0])
