"""The resume checkpoint's one owner (``training.resume.Resume``), per-rank RNG in a DDP position file, and a
``fit`` that reads on one screen (the engine decides; ``training.run_writer`` writes)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

from pillsnap_dali.config import load_config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.training import engine
from pillsnap_dali.training.resume import Resume, RunState, rank_rng_state, save_rank_position
from pillsnap_dali.training.run_writer import RunWriter, training_checkpoint

CPU = torch.device("cpu")


def _bundle(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched, torch.amp.GradScaler("cuda", enabled=False)


def _checkpoint(cfg, *, complete: bool, position: int, world_size: int = 1) -> dict:
    model, opt, sched, scaler = _bundle(1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    run = RunState(step=7, steps_per_epoch=10).to_checkpoint(2, complete, position, session_seconds=5.0)
    skipped = [{"row": 3, "split": "train", "path": "/d/bad.png", "reason": "empty file", "backend": "pil",
                "epoch": 1}]
    return training_checkpoint(cfg=cfg, class_map=ClassMap(["K-000001", "K-000002"]), model=model, ema=None,
                               optimizer=opt, scheduler=sched, scaler=scaler, run=run, backend="pil",
                               world_size=world_size, skipped=skipped)


def test_the_resume_checkpoint_is_restored_once_and_then_let_go(tmp_path):
    cfg = load_config(stage="demo")
    st = _checkpoint(cfg, complete=True, position=0)
    resume = Resume(tmp_path / "last.pt", st)
    run = resume.run_state(rank=0, world_size=1)
    assert (run.epoch, run.position, run.step, run.sessions, run.elapsed) == (3, 0, 7, 1, 5.0)
    model, opt, sched, scaler = _bundle(2)
    log = SkipLog(None)
    resume.restore(model=model, ema=None, optimizer=opt, scheduler=sched, scaler=scaler, skip_log=log, device=CPU)
    assert all(torch.equal(model.state_dict()[k], st["model"][k]) for k in st["model"])
    assert opt.state_dict()["state"] and "/d/bad.png" in log  # momentum buffers; the skipped file stays skipped
    with pytest.raises(RuntimeError, match="restored already"):  # one owner: its tensors are gone
        resume.restore(model=model, ema=None, optimizer=opt, scheduler=sched, scaler=scaler, skip_log=log,
                       device=CPU)
    with pytest.raises(RuntimeError, match="restored already"):
        resume.run_state(rank=0, world_size=1)


def test_a_ddp_rank_resumes_its_own_position_and_rng(tmp_path):
    """Rank 1's torch RNG at its stop (saved beside the checkpoint) is the one its first resumed step draws
    from, not rank 0's from the checkpoint: dropout masks go on as in a run never stopped."""
    cfg = load_config(stage="demo")
    st = _checkpoint(cfg, complete=False, position=4, world_size=2)
    d = tmp_path / "checkpoints"
    torch.manual_seed(99)
    torch.rand(5)
    rng = rank_rng_state(CPU)
    expected = torch.rand(3)  # what rank 1 would have drawn next
    RunWriter(tmp_path, rank=1).rank_position(epoch=2, interruption=st["interruptions"], step=7, position=6,
                                              rng=rng)
    resume = Resume(d / "last.pt", st)
    assert resume.run_state(rank=1, world_size=2).position == 6
    model, opt, sched, scaler = _bundle(3)
    resume.restore(model=model, ema=None, optimizer=opt, scheduler=sched, scaler=scaler, skip_log=SkipLog(None),
                   device=CPU)
    assert torch.equal(torch.rand(3), expected)
    save_rank_position(d, 1, epoch=2, interruption=st["interruptions"] + 1, step=9, position=8, rng=rng)
    assert Resume(d / "last.pt", st).run_state(rank=1, world_size=2).position == 4  # stale: rank 0's


def test_fit_reads_top_to_bottom_on_one_screen():
    assert len(inspect.getsource(engine.Trainer.fit).splitlines()) <= 40
    src = inspect.getsource(engine.Trainer)
    for written in ("metrics.jsonl", "per_class.csv", "confusions.json", "save_checkpoint", "skipped.csv"):
        assert written not in src, written  # the run writer's


def test_the_deployed_weights_are_the_better_of_model_and_ema():
    tr = {"train_loss": 1.0}
    res = {"loss": 1.0, "top1": 0.5, "top5": 0.9, "macro_precision": 0.5, "macro_recall": 0.5, "macro_f1": 0.5,
           "count": 10}
    row = engine.epoch_row(0, tr, res, {**res, "top1": 0.6}, 0)
    assert (row["selected"], row["selected_top1"]) == ("ema", 0.6)
    row = engine.epoch_row(0, tr, res, {**res, "top1": 0.5}, 0)
    assert (row["selected"], row["selected_top1"]) == ("model", 0.5)
    assert engine.epoch_row(0, tr, res, None, 2)["selected"] == "model"


def test_the_epoch_tally_sums_like_the_steps_and_names_the_first_non_finite_step():
    tally = engine.EpochTally(2, CPU, first_step=40, epoch=3)  # fewer planned steps than come: the buffer grows
    losses, sizes = [0.5, 1.25, 2.0, 0.75], [4, 4, 3, 1]
    for i, (loss, n) in enumerate(zip(losses, sizes)):
        logits = torch.zeros(n, 2)
        logits[: i % 2 + 1, 1] = 1.0  # 1 or 2 rows predict class 1
        tally.add(torch.tensor(loss), logits, torch.ones(n, dtype=torch.int64))
        if i == 1:
            assert tally.settle() == (0.5 * 4 + 1.25 * 4, 3, 8)  # a log point in the middle
    assert tally.settle() == (sum(a * b for a, b in zip(losses, sizes)), 5, 12)  # the last batch has 1 row
    tally.add(torch.tensor(float("nan")), torch.zeros(2, 2), torch.ones(2, dtype=torch.int64))
    tally.add(torch.tensor(float("inf")), torch.zeros(2, 2), torch.ones(2, dtype=torch.int64))
    with pytest.raises(engine.TrainingError, match=r"non-finite at step 45 \(epoch 3\)"):  # the 5th step after 40
        tally.settle()
