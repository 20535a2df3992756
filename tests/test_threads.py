"""Torch's CPU threads are chosen with the loader in mind (issue 15 item 6; figures in docs/benchmarks.md)."""
import pytest
import torch

from pillsnap_dali.config import ConfigError, load_config
from pillsnap_dali.threads import apply_torch_threads, loader_cpu_threads, torch_threads


def test_auto_gives_torch_the_cores_the_loader_leaves():
    cfg = load_config("demo", sets=["loader.threads=3", "loader.workers=1"])
    assert cfg.train.torch_threads == "auto"
    assert torch_threads(cfg, "dali-cpu", cores=8) == 5  # 8 cores - 3 DALI threads
    assert torch_threads(cfg, "pil", cores=8) == 7  # 8 cores - 1 PIL worker process
    assert torch_threads(cfg, "dali-cpu", cores=2) == 1  # never below one
    assert loader_cpu_threads(cfg, "dali") == 3


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
    from pillsnap_dali.bench.step import busy_processes
    with busy_processes(1) as procs:
        assert procs[0].poll() is None
    assert procs[0].poll() is not None
