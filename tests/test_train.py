"""Training CLI end to end on a tiny synthetic tree (real DALI CPU, real timm, real files)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pillsnap_dali import train
from pillsnap_dali.training.checkpoint import load_checkpoint, load_classifier
from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import build_manifests

TINY = ["--model", "test_efficientnet", "--img-size", "32", "--batch-size", "16", "--lr", "0.003",
        "--set", "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1",
        "--set", "train.log_interval=2"]


@pytest.fixture(scope="module")
def manifests(synth_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    build_manifests(load_config("demo"), synth_tree.root, out)
    return out


def _args(manifests, run_root, *extra):
    return ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(run_root), *TINY, *extra]


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _write_legacy(manifests: Path, legacy: Path, drop_code: str | None = None, extra_val=()) -> Path:
    """The existing project's 4-column manifests made from ours (optionally without one class, plus rows)."""
    legacy.mkdir()
    for split in ("train", "val"):
        src = list(csv.DictReader(open(manifests / f"manifest_{split}.csv")))
        with open(legacy / f"manifest_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image_path", "mapping_code", "image_type", "source"])
            w.writerows([r["image_path"], r["mapping_code"], r["image_type"], r["source"]]
                        for r in src if r["mapping_code"] != drop_code)
            if split == "val":
                w.writerows(extra_val)
    return legacy


def test_run_dir_checkpoint_and_report(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "r", "--num-classes", "6")) == 0
    d = tmp_path / "r"
    for f in ("config.yaml", "class_map.json", "metrics.jsonl", "report.md", "per_class.csv", "confusions.json",
              "checkpoints/last.pt", "checkpoints/best.pt", "plots/curves.png", "plots/time.png"):
        assert (d / f).exists(), f
    hist = _history(d)
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        assert 0 <= h["val_top1"] <= h["val_top5"] <= 1 and h["data_time"] >= 0 and h["images_per_s"] > 0
    ck = load_checkpoint(d / "checkpoints/last.pt")  # weights_only: no arbitrary unpickling
    cm = json.loads((manifests / "class_map.json").read_text())
    assert ck["class_map"]["codes"] == cm["codes"] and ck["preprocess"]["img_size"] == 32
    assert ck["epoch"] == 1 and ck["epoch_complete"]
    # the defect tree holds truncated / empty PNGs: skipped, logged with reason, never lost
    skipped = {r["path"]: r for r in csv.DictReader(open(d / "skipped.csv"))}
    train_paths = {r["image_path"] for r in csv.DictReader(open(manifests / "manifest_train.csv"))}
    assert skipped and all(r["reason"] for r in skipped.values())
    assert hist[0]["train_images"] + len(set(skipped) & train_paths) == len(train_paths)
    assert hist[1]["train_images"] == hist[0]["train_images"]  # not retried, nothing else lost
    assert "| epoch | train loss |" in (d / "report.md").read_text()
    loaded = load_classifier(d / "checkpoints/best.pt")
    assert loaded.class_map.codes == cm["codes"] and loaded.preprocess.img_size == 32


def test_resume_reproduces_uninterrupted_run(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "3", "--name", "full", "--set", "train.save_every=1")) == 0
    full = _history(tmp_path / "full")
    ck = tmp_path / "full/checkpoints/epoch_0001.pt"
    assert train.main(_args(manifests, tmp_path, "--epochs", "3", "--name", "resumed", "--resume", str(ck))) == 0
    resumed = _history(tmp_path / "resumed")
    assert [h["epoch"] for h in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed):
        for k in ("train_loss", "val_loss", "val_top1", "train_acc"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])


def test_class_map_mismatch_and_num_classes_are_refused(manifests, tmp_path, capsys):
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--name", "a")) == 0
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--num-classes", "7")) == 2
    assert "--num-classes 7 does not match" in capsys.readouterr().err
    # a legacy manifest with one class fewer: its class map (sorted unique K-codes) differs by one K-code
    rows = list(csv.DictReader(open(manifests / "manifest_train.csv")))
    dropped = sorted({r["mapping_code"] for r in rows})[0]
    legacy = _write_legacy(manifests, tmp_path / "legacy", drop_code=dropped)
    rc = train.main(["--manifest", str(legacy / "manifest_train.csv"), "--out", str(tmp_path), *TINY,
                     "--epochs", "1", "--name", "a", "--resume", str(tmp_path / "a/checkpoints/last.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and dropped in err and "only in the checkpoint" in err
    # refused before the run dir was touched: its class map and config are the original run's
    assert json.loads((tmp_path / "a/class_map.json").read_text())["codes"] == \
        json.loads((manifests / "class_map.json").read_text())["codes"]
    assert "stage: custom" not in (tmp_path / "a/config.yaml").read_text()
    # other weights / preprocessing / batch size: refused, naming the setting
    for flag, value, key in (("--img-size", "48", "preprocess.img_size"), ("--model", "resnet18", "model.name"),
                             ("--batch-size", "8", "train.batch_size"), ("--set", "train.optimizer=sgd",
                                                                         "train.optimizer")):
        rc = train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "a", "--resume", flag, value))
        assert rc == 2 and key in capsys.readouterr().err


def test_real_stage_without_data_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--stage", "3", "--out", str(tmp_path), "--dry-run",
                       "--set", f"data.artifacts={tmp_path / 'art'}"]) == 2
    assert "stage 3 needs the AI Hub tree: pass --data-root" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()  # nothing generated behind the user's back


def test_legacy_manifest_with_val_only_class_and_missing_file(manifests, tmp_path):
    first = next(csv.DictReader(open(manifests / "manifest_val.csv")))
    legacy = _write_legacy(manifests, tmp_path / "legacy", extra_val=[
        [first["image_path"], "K-999999", "single", "TS_9_단일"],  # the users' old bug: a validation-only class
        ["/nonexistent/K-000001_0_2_0_0_75_260_200.png", first["mapping_code"], "single", "x"]])
    assert train.main(["--manifest", str(legacy / "manifest_train.csv"), "--out", str(tmp_path), *TINY,
                       "--epochs", "1", "--name", "l", "--dry-run"]) == 0
    assert train.main(["--manifest", str(legacy / "manifest_train.csv"), "--out", str(tmp_path), *TINY,
                       "--epochs", "1", "--name", "l"]) == 0
    q = list(csv.DictReader(open(tmp_path / "l/quarantine.csv")))
    reasons = " ".join(r["reason"] for r in q)
    assert "K-999999 not in the class map" in reasons and "missing file" in reasons
    assert "K-999999" not in json.loads((tmp_path / "l/class_map.json").read_text())["codes"]


def test_dry_run_writes_nothing_heavy(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "5", "--name", "dry", "--dry-run")) == 0
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("backend", ["dali-cpu", "pil"])
def test_float16_channels_last_loader_output_trains_on_cpu(manifests, tmp_path, backend):
    """The GPU-friendly loader settings (float16, NHWC) must not break a CPU run (no autocast there)."""
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--name", f"h{backend}", "--backend", backend,
                            "--set", "loader.dtype=float16", "--set", "loader.layout=NHWC")) == 0
    assert _history(tmp_path / f"h{backend}")[0]["train_images"] > 0


def test_target_accuracy_and_patience_stop(manifests, tmp_path, capsys):
    assert train.main(_args(manifests, tmp_path, "--epochs", "6", "--name", "t", "--target-accuracy", "0.01")) == 0
    out = capsys.readouterr().out
    hist = _history(tmp_path / "t")
    assert f"target accuracy 1.00% reached at epoch {hist[-1]['epoch']}" in out
    assert hist[-1]["val_top1"] >= 0.01 and all(h["val_top1"] < 0.01 for h in hist[:-1])
    assert train.main(_args(manifests, tmp_path, "--epochs", "6", "--name", "p", "--lr", "0",
                            "--set", "train.patience=1")) == 0
    assert "early stop" in capsys.readouterr().out and len(_history(tmp_path / "p")) < 6


def _cmd(*args):
    return [sys.executable, "-m", "pillsnap_dali.train", *args]


def test_sigterm_saves_last_and_resume_continues(manifests, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = _args(manifests, tmp_path, "--epochs", "40", "--name", "sig")
    proc = subprocess.Popen(_cmd(*args), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until training really runs
        if "step 2/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ck = load_checkpoint(tmp_path / "sig/checkpoints/last.pt")
    assert "SIGTERM" in err
    done_epochs = ck["epoch"] + (1 if ck["epoch_complete"] else 0)
    assert done_epochs < 40
    r = subprocess.run(_cmd(*args[:-4], "--epochs", str(done_epochs + 1), "--name", "sig", "--resume"),
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hist = _history(tmp_path / "sig")
    assert hist[-1]["epoch"] == done_epochs


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_torchrun_two_cpu_ranks(synth_tree, tmp_path):
    """Two ranks, manifests built by the run itself (rank 0 builds, rank 1 waits and reuses them)."""
    manifests = tmp_path / "artifacts" / "demo"
    args = ["--stage", "demo", "--set", f"data.root={synth_tree.root}", "--set", f"data.artifacts={tmp_path / 'artifacts'}",
            "--out", str(tmp_path), *TINY, "--epochs", "1", "--name", "ddp", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "pillsnap_dali.train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (manifests / "report.json").exists()
    hist = _history(tmp_path / "ddp")
    n_train = sum(1 for _ in open(manifests / "manifest_train.csv")) - 1
    skipped = set()
    for f in (tmp_path / "ddp").glob("skipped*.csv"):
        skipped |= {row["path"] for row in csv.DictReader(open(f))}
    train_rows = {row["image_path"] for row in csv.DictReader(open(manifests / "manifest_train.csv"))}
    # both ranks' images are counted (reduced) and together with the skips they cover the split
    assert hist[0]["train_images"] + len(skipped & train_rows) == n_train
    assert not list((tmp_path / "ddp").glob("metrics.rank*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_on_the_dali_backend(manifests, tmp_path):
    """The whole loop on the GPU path: mixed decode, AMP, channels_last, NVML figures in the metrics."""
    assert train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "gpu", "--backend", "dali",
                            "--device", "cuda")) == 0
    hist = _history(tmp_path / "gpu")
    assert len(hist) == 2 and all(h["images_per_s"] > 0 and 0 <= h["data_share"] <= 1 for h in hist)
    assert "gpu_mem_peak_gb" in hist[-1] or "gpu_util_mean" in hist[-1] or hist[-1]["steps"] < 2
    ck = load_checkpoint(tmp_path / "gpu/checkpoints/last.pt")
    assert ck["backend"] == "dali"


def test_manifest_without_stage_never_gets_the_demo_model(tmp_path, manifests):
    """The users' command `--manifest artifacts/stage3/manifest_train.csv ...` must train their Stage 3 model
    (EfficientNetV2-S, 384 px), not the demo's resnet18 at 96 px."""
    s3 = tmp_path / "artifacts" / "stage3"
    s3.mkdir(parents=True)
    (s3 / "manifest_train.csv").write_text("image_path,mapping_code,image_type,source\n")
    cfg = train.resolve_config(train.parse_args(["--manifest", str(s3 / "manifest_train.csv"), "--epochs", "50"]))
    assert (cfg.stage, cfg.model.name, cfg.preprocess.img_size) == ("3", "tf_efficientnetv2_s", 384)
    assert cfg.train.target_accuracy == 0.85
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert train.stage_of_manifest(str(other / "train.csv")) == "custom"
    cfg = train.resolve_config(train.parse_args(["--manifest", str(other / "train.csv")]))
    assert cfg.model.name == "tf_efficientnetv2_s" and cfg.preprocess.img_size == 384
    assert train.stage_of_manifest(str(manifests / "manifest_train.csv")) == "demo"  # from its report.json


def test_an_epoch_whose_every_file_is_broken_is_logged_not_a_crash(manifests, tmp_path):
    """Training rows that all fail (e.g. an unmounted disk): the epoch yields nothing, every row is in
    skipped.csv and the run ends normally (it used to die on the step count)."""
    src = list(csv.DictReader(open(manifests / "manifest_train.csv")))[:20]
    legacy = tmp_path / "m"
    legacy.mkdir()
    with open(legacy / "manifest_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "mapping_code", "image_type", "source"])
        for i, r in enumerate(src):
            bad = legacy / f"bad{i}.png"
            bad.write_bytes(b"not an image")
            w.writerow([str(bad), r["mapping_code"], r["image_type"], r["source"]])
    codes = {r["mapping_code"] for r in src}
    with open(legacy / "manifest_val.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "mapping_code", "image_type", "source"])
        w.writerows([r["image_path"], r["mapping_code"], r["image_type"], r["source"]]
                    for r in csv.DictReader(open(manifests / "manifest_val.csv")) if r["mapping_code"] in codes)
    assert train.main(["--manifest", str(legacy / "manifest_train.csv"), "--out", str(tmp_path), *TINY,
                       "--epochs", "1", "--name", "bad"]) == 0
    (h,) = _history(tmp_path / "bad")
    assert h["steps"] == 0 and h["train_images"] == 0
    with open(tmp_path / "bad" / "skipped.csv", newline="") as fh:
        logged = {r["path"] for r in csv.DictReader(fh)}
    assert {str(legacy / f"bad{i}.png") for i in range(20)} <= logged  # (the fixture's own defects come too)


def test_resume_keeps_counting_patience(manifests, tmp_path):
    base = _args(manifests, tmp_path, "--lr", "0", "--set", "train.patience=2", "--name", "pat")
    assert train.main([*base, "--epochs", "2"]) == 0
    assert train.main([*base, "--epochs", "6", "--resume"]) == 0
    hist = _history(tmp_path / "pat")
    bad, expected = 0, 5
    for h in hist:  # the rule over the whole history, as if the run had never stopped
        bad = 0 if h["best"] else bad + 1
        if bad >= 2:
            expected = h["epoch"]
            break
    assert hist[-1]["epoch"] == expected and [h["epoch"] for h in hist] == list(range(expected + 1))


def test_ema_checkpoints_deploy_the_weights_they_were_selected_by(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "ema", "--set", "train.ema=true",
                            "--set", "train.ema_decay=0.5")) == 0
    hist = _history(tmp_path / "ema")
    best = [h for h in hist if h["best"]][-1]
    ck = load_checkpoint(tmp_path / "ema/checkpoints/best.pt")
    assert ck["deploy"] == best["selected"] and ck["best_top1"] == best["selected_top1"]
    assert best["selected_top1"] == max(best["val_top1"], best["ema_val_top1"])
    loaded = load_classifier(tmp_path / "ema/checkpoints/best.pt")
    want = ck["ema"] if ck["deploy"] == "ema" else ck["model"]
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k].cpu(), want[k].cpu()) for k in want if k in got)


@pytest.mark.parametrize("backend", ["pil", "dali-cpu"])
def test_sigterm_mid_epoch_then_resume_trains_each_row_once(manifests, tmp_path, backend):
    """Stopped in the middle of epoch 0 and resumed: the same steps as a run never stopped (the epoch goes on
    at the row where it stopped). With ``pil`` (augmentation seeded per row) the weights are the same too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # batch 4: enough steps per epoch for the signal to land in epoch 0 on a fast machine
    common = [*_args(manifests, tmp_path, "--epochs", "2", "--backend", backend), "--batch-size", "4",
              "--set", "loader.workers=0", "--set", "loader.drop_last=true"]
    assert train.main([*common, "--name", "whole"]) == 0
    proc = subprocess.Popen(_cmd(*common, "--name", "cut", "--set", "train.log_interval=1"), stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stderr:
        if "epoch 0 step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    cut = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert cut["epoch"] == 0 and not cut["epoch_complete"] and 0 < cut["epoch_position"] and "SIGTERM" in err
    assert train.main([*common, "--name", "cut", "--resume"]) == 0
    whole = load_checkpoint(tmp_path / "whole/checkpoints/last.pt")
    resumed = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")
    assert resumed["step"] == whole["step"] and resumed["epoch"] == 1 and resumed["epoch_complete"]
    a, b = _history(tmp_path / "whole")[-1], _history(tmp_path / "cut")[-1]
    assert a["train_images"] == b["train_images"]  # epoch 1: every row once in both
    part = _history(tmp_path / "cut")[0]  # epoch 0, resumed: its train figures are the rest of the epoch's
    assert part["epoch"] == 0 and part["resumed_from_row"] == cut["epoch_position"]
    assert part["train_images"] < _history(tmp_path / "whole")[0]["train_images"]
    if backend == "pil":
        diff = max(float((whole["model"][k].float() - resumed["model"][k].float()).abs().max())
                   for k in whole["model"] if whole["model"][k].is_floating_point())
        assert diff < 1e-4 and abs(a["val_loss"] - b["val_loss"]) < 1e-4, diff


def test_pretrained_head_rows_follow_the_k_codes_never_the_positions(tmp_path):
    import timm

    from pillsnap_dali.training.checkpoint import FORMAT, save_checkpoint
    from pillsnap_dali.data.classmap import ClassMap
    from pillsnap_dali.training.engine import _load_pretrained

    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=3)
    src_map = ClassMap(["K-000001", "K-000002", "K-000003"])
    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, {"format": FORMAT, "model_name": "resnet18", "num_classes": 3, "model": src.state_dict(),
                           "class_map": src_map.to_dict()})
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    src_map.save(tmp_path / "map.json")
    new_map = ClassMap(["K-000003", "K-000009", "K-000001"])  # reordered, one code gone, one new
    w, b = src.fc.weight.detach(), src.fc.bias.detach()
    for path, map_json in ((ours, None), (plain, tmp_path / "map.json")):
        dst = timm.create_model("resnet18", num_classes=3)
        fresh = dst.fc.weight.detach().clone()
        _load_pretrained(dst, str(path), new_map, str(map_json) if map_json else None)
        assert torch.equal(dst.fc.weight[0], w[2]) and torch.equal(dst.fc.weight[2], w[0])  # by K-code
        assert torch.equal(dst.fc.bias[0], b[2]) and torch.equal(dst.fc.weight[1], fresh[1])  # the new code: fresh
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
    dst = timm.create_model("resnet18", num_classes=3)
    fresh = dst.fc.weight.detach().clone()
    _load_pretrained(dst, str(plain), new_map)  # a plain state dict, no class map: the head is left out
    assert torch.equal(dst.fc.weight, fresh) and torch.equal(dst.conv1.weight, src.conv1.weight)


def test_each_ddp_rank_resumes_an_interrupted_epoch_at_its_own_position(tmp_path):
    """Ranks read their shards at their own pace (a skipped file is replaced by the next row): rank 1 writes
    where it stopped beside the checkpoint and resumes there; a file from another interruption is ignored."""
    import types

    from pillsnap_dali.training.engine import RunSpec, Trainer

    def trainer(rank: int, step: int, position: int) -> Trainer:
        t = Trainer.__new__(Trainer)  # only the rank bookkeeping is exercised: no model, no data
        t.spec = RunSpec(cfg=None, data=None, device=torch.device("cpu"), run_dir=tmp_path, rank=rank, world_size=2)
        t.global_step, t.train_loader = step, types.SimpleNamespace(position=position)
        return t
    r1, r0 = trainer(1, 33, 21), trainer(0, 37, 20)  # uneven shards: the ranks ran different step counts
    for t in (r1, r0):
        t.interruptions = 3  # restored from the same checkpoint, then counted up once each
    r1._save_rank_position(epoch=2)
    r0._save_rank_position(epoch=2)  # rank 0's position lives in the checkpoint itself
    assert [f.name for f in (tmp_path / "checkpoints").iterdir()] == ["epoch_position.rank1.json"]
    ck = tmp_path / "checkpoints" / "last.pt"
    st = {"epoch": 2, "step": 37, "interruptions": 3}
    assert trainer(1, 0, 0)._rank_position(ck, st, fallback=20) == 21
    assert trainer(0, 0, 0)._rank_position(ck, st, fallback=20) == 20
    assert trainer(1, 0, 0)._rank_position(ck, {**st, "interruptions": 4}, fallback=20) == 20  # a stale file


def test_clean_run_has_an_empty_skipped_csv_and_a_dry_run_finds_the_run_to_resume(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--name", "a")) == 0
    bad = {r["path"] for r in csv.DictReader(open(tmp_path / "a" / "skipped.csv"))}
    clean = tmp_path / "clean"
    clean.mkdir()
    for split in ("train", "val"):
        rows = [r for r in csv.DictReader(open(manifests / f"manifest_{split}.csv")) if r["image_path"] not in bad]
        with open(clean / f"manifest_{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (clean / "class_map.json").write_text((manifests / "class_map.json").read_text())
    rc = train.main(["--manifest", str(clean / "manifest_train.csv"), "--out", str(tmp_path), *TINY, "--epochs", "1",
                     "--name", "c", "--backend", "pil"])
    assert rc == 0 and (tmp_path / "c" / "skipped.csv").read_text().strip() == "row,split,path,reason,backend,epoch"
    stamp = (tmp_path / "a" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "a", "--resume", "--dry-run")) == 0
    assert (tmp_path / "a" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp  # a dry run writes nothing


def test_resuming_another_runs_checkpoint_moves_the_runs_own_dir_aside(manifests, tmp_path):
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--name", "a")) == 0
    assert train.main(_args(manifests, tmp_path, "--epochs", "1", "--name", "b")) == 0
    rc = train.main(_args(manifests, tmp_path, "--epochs", "2", "--name", "b", "--resume",
                          str(tmp_path / "a" / "checkpoints" / "last.pt")))
    assert rc == 0
    assert [h["epoch"] for h in _history(tmp_path / "b")] == [1]  # only this run's epochs, not b's epoch 0 too
    assert len(list(tmp_path.glob("b.*"))) == 1  # the earlier b, moved aside, whole


def test_report_counts_the_skip_logs_of_every_rank_but_not_an_old_format_one(tmp_path):
    from pillsnap_dali.training.report import write_report

    (tmp_path / "skipped.csv").write_text("row,path,reason,backend,epoch\n1,/a.png,bad,pil,0\n")
    (tmp_path / "skipped.rank1.csv").write_text("row,path,reason,backend,epoch\n2,/b.png,bad,pil,0\n")
    (tmp_path / "skipped.old.csv").write_text("image_path,reason\n/c.png,bad\n")  # moved aside by SkipLog
    report = write_report(tmp_path, {"reason": "done", "best_top1": 0.5, "history": [], "total_time": 1.0}, {})
    assert "Skipped files (not decodable, logged in `skipped.csv`, `skipped.rank1.csv`): 2" in report.read_text()
