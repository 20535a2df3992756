"""Stage 3 the way the users run it: ImageNet weights by default (from a Hugging Face cache laid out as the hub
lays it out, offline; a one-line stop before anything is built when they are missing), and every later command
(export, evaluate, predict --eval) on a run trained from the manifest form ``--manifest ... --val-manifest ...``,
with and without a test split. Real timm, real CLIs, no network (HF_HUB_OFFLINE=1 in the subprocesses)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pillsnap_dali.commands import evaluate, export, predict, train
from pillsnap_dali.config import ConfigError, load_config
from pillsnap_dali.training import pretrained
from pillsnap_dali.training.checkpoint import load_checkpoint

MODEL = "test_efficientnet"  # timm publishes it as timm/test_efficientnet.r160_in1k
REV = "1" * 40
TINY = ["--model", MODEL, "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--set", "loader.threads=1",
        "--set", "loader.workers=1", "--set", "train.warmup_epochs=0", "--set", "train.max_skipped=0.1",
        "--set", "train.tensorboard=false", "--backend", "pil"]
REPO = Path(__file__).resolve().parents[1]


def test_real_stages_default_to_imagenet_the_demo_to_none():
    assert [load_config(s).model.pretrained for s in ("1", "2", "3", "4")] == ["imagenet"] * 4
    assert load_config("demo").model.pretrained is None and load_config("custom").model.pretrained is None
    args = train.parse_args(["--stage", "3", "--pretrained", "none"])
    train.check_paths(args)  # "none" is the opt-out, not a weights file to look for
    assert train.resolve_config(args).model.pretrained is None
    with pytest.raises(ConfigError, match="model.pretrained_file .* needs model.pretrained: imagenet"):
        load_config("demo", sets=["model.pretrained_file=model.safetensors"])  # would be ignored: refused


def test_random_start_flags_a_pretrained_first_epoch_that_looks_random():
    imagenet, ln = {"kind": "imagenet"}, math.log(1000)
    users = {"epoch": 1, "train_loss": ln * 0.99, "val_top1": 0.0125}  # their Stage 3 run's first epoch
    flag = pretrained.random_start(users, 1000, imagenet)
    assert "looks like random weights" in flag and "ln(1000)" in flag and "twice chance" not in flag
    at_chance = pretrained.random_start({"epoch": 1, "train_loss": 3.0, "val_top1": 0.0015}, 1000, imagenet)
    assert "twice chance" in at_chance and "ln(1000)" not in at_chance
    learnt = {"epoch": 1, "train_loss": 2.1, "val_top1": 0.41}
    assert pretrained.random_start(learnt, 1000, imagenet) is None
    assert pretrained.random_start(users, 1000, {"kind": "random"}) is None  # random on purpose: nothing to flag
    assert pretrained.random_start({"epoch": 1, "train_loss": 6.8, "val_top1": 0.5}, 1000, imagenet)  # loss only


def test_a_local_weights_file_is_recorded_with_its_sha256(tmp_path):
    import hashlib

    import timm

    from pillsnap_dali.training.model import build_model

    path = tmp_path / "mine.pt"
    torch.save(timm.create_model(MODEL, num_classes=4).state_dict(), path)
    cfg = load_config("demo", sets=[f"model.name={MODEL}", f"model.pretrained={path}"])
    origin = pretrained.weights_origin(build_model(cfg, 4, torch.device("cpu")), cfg)
    assert origin == {"kind": "file", "file": str(path.resolve()), "class_map": None,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert pretrained.describe(origin) == f"the local weights file {path.resolve()} (sha256 {origin['sha256']})"
    assert pretrained.describe({"kind": "random"}).startswith("none: random")


def test_a_stage_whose_test_manifest_has_no_rows_says_so(manifests, tmp_path):
    """A stage built from a tree without the AI Hub Validation part: manifest_test.csv holds the header only."""
    from pillsnap_dali.training import evaluation

    stage = tmp_path / "stage3"
    stage.mkdir()
    shutil.copy(manifests / "manifest_train.csv", stage / "manifest_train.csv")
    header = (manifests / "manifest_test.csv").read_text(encoding="utf-8").splitlines()[0]
    (stage / "manifest_test.csv").write_text(header + "\n", encoding="utf-8")
    test, note = evaluation.test_split(stage / "manifest_train.csv")
    assert test is None and note.startswith(f"no test split: {(stage / 'manifest_test.csv').resolve()} has no rows")
    assert "train/val only" in note and "Holding out a test split" in note
    (stage / "manifest_test.csv").unlink()
    assert evaluation.test_split(stage / "manifest_train.csv")[1].startswith("no test split: no test manifest")
    shutil.copy(manifests / "manifest_test.csv", stage / "manifest_test.csv")
    assert evaluation.test_split(stage / "manifest_train.csv") == (stage / "manifest_test.csv", None)


def _hf_cache(hf_home: Path) -> dict:
    """A stand-in for timm/test_efficientnet.r160_in1k in an HF_HOME, in the hub cache's own layout
    (``hub/models--timm--<name>/snapshots/<rev>/model.safetensors`` + ``refs/main``): the 1000-class state dict."""
    import timm
    from safetensors.torch import save_file

    repo = hf_home / "hub" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    torch.manual_seed(7)
    sd = {k: v.contiguous() for k, v in timm.create_model(MODEL, num_classes=1000).state_dict().items()}
    (repo / "snapshots" / REV).mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / REV / "model.safetensors"))
    return sd


def _cli(module: str, args: list, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", f"pillsnap_dali.{module}", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_offline_without_the_weights_stops_before_anything_is_built(synth_tree, tmp_path):
    art, runs = tmp_path / "art", tmp_path / "runs"
    res = _cli("train", ["--stage", "3", "--data-root", str(synth_tree.root), "--set", f"data.artifacts={art}",
                         "--out", str(runs), *TINY], tmp_path / "empty_hf")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == res.stderr.strip().splitlines()[-1]
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in errors[0]
    assert "model.pretrained_file" in errors[0] and "--pretrained none" in errors[0] and "pre-fetch" in errors[0]
    assert not art.exists() and not runs.exists()  # no manifest scanned, no run dir made
    assert "Traceback" not in res.stderr
    # the same command once the weights are in the cache (the users' first Stage 3 command, dry run)
    _hf_cache(tmp_path / "hf")
    res = _cli("train", ["--stage", "3", "--data-root", str(synth_tree.root), "--set", f"data.artifacts={art}",
                         "--out", str(runs), *TINY, "--dry-run"], tmp_path / "hf")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"starting weights: ImageNet, timm/test_efficientnet.r160_in1k revision {REV} (Hugging Face cache" \
        in res.stderr


def test_the_users_stage3_manifest_form_starts_from_the_cached_imagenet_weights(manifests, tmp_path):
    published = _hf_cache(tmp_path / "hf")
    stage3 = tmp_path / "artifacts" / "stage3"  # the folder names the stage: Stage 3's config, imagenet by default
    shutil.copytree(manifests, stage3)
    (stage3 / "report.json").unlink()
    res = _cli("train", ["--manifest", str(stage3 / "manifest_train.csv"), "--val-manifest",
                         str(stage3 / "manifest_val.csv"), "--num-classes", "6", "--out", str(tmp_path / "runs"),
                         *TINY, "--set", "train.lr=0", "--set", "evaluate.after_training=false"], tmp_path / "hf")
    assert res.returncode == 0, res.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "runs" / "stage3" / "checkpoints" / "last.pt")
    assert ck["config"]["stage"] == "3" and ck["config"]["model"]["pretrained"] == "imagenet"
    origin = ck["weights_origin"]
    snap = tmp_path / "hf" / "hub" / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / REV
    assert (origin["kind"], origin["source"], origin["hub_id"], origin["revision"]) == \
        ("imagenet", "hf-cache", "timm/test_efficientnet.r160_in1k", REV)
    assert Path(origin["file"]).resolve() == (snap / "model.safetensors").resolve()
    # lr 0: the trained parameters are the cached ones, bit for bit (the 1000-class head is the stage's 6)
    params = {n for n, _ in _named_parameters(ck["config"]["model"]["name"])}
    body = [k for k in params if not k.startswith("classifier.")]
    assert len(body) > 20 and all(torch.equal(ck["model"][k], published[k]) for k in body)
    assert ck["model"]["classifier.weight"].shape[0] == 6
    # timm's own resolution (pretrained_cfg.hf_hub_id through the hub client, HF_HUB_OFFLINE=1) reads the same file
    own = tmp_path / "timm_own.pt"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = f"import timm, torch; torch.save(timm.create_model('{MODEL}', pretrained=True).state_dict(), r'{own}')"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0
    timm_sd = torch.load(own)
    assert all(torch.equal(timm_sd[k], published[k]) for k in published)
    # the report names where the weights came from, and flags the random-looking first epoch (lr 0 learns nothing)
    report = (tmp_path / "runs" / "stage3" / "report.md").read_text(encoding="utf-8")
    assert f"- starting weights: ImageNet, timm/test_efficientnet.r160_in1k revision {REV}" in report
    assert "**Warning: the first epoch (epoch 0) looks like random weights" in report
    assert "looks like random weights" in res.stderr  # and the log says it too


def _named_parameters(name: str):
    import timm

    return timm.create_model(name, num_classes=6).named_parameters()


# --------------------------------------------------------------------------- every command on the manifest form
def _own_manifests(manifests: Path, folder: Path, with_test: bool) -> Path:
    """The fixture's manifests under the users' own names (train.csv, val.csv[, test.csv]) in a folder of
    theirs: no report.json, no stage folder name (base.yaml's stage, random weights)."""
    folder.mkdir(parents=True)
    shutil.copy(manifests / "manifest_train.csv", folder / "train.csv")
    shutil.copy(manifests / "manifest_val.csv", folder / "val.csv")
    if with_test:
        shutil.copy(manifests / "manifest_test.csv", folder / "test.csv")
    return folder


@pytest.fixture(scope="module")
def form_runs(manifests, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest_form")
    out = {}
    for name, with_test in (("with_test", True), ("no_test", False)):
        d = _own_manifests(manifests, tmp / name, with_test)
        assert train.main(["--manifest", str(d / "train.csv"), "--val-manifest", str(d / "val.csv"), "--out",
                           str(tmp / "runs"), "--name", name, *TINY, "--lr", "0.003"]) == 0
        out[name] = {"manifests": d, "run": tmp / "runs" / name}
    out["tmp"] = tmp
    return out


def test_the_checkpoint_records_the_manifests_it_trained_on(form_runs):
    d, run = form_runs["with_test"]["manifests"], form_runs["with_test"]["run"]
    ck = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ck["run_inputs"] == {"manifests": {"train": str((d / "train.csv").resolve()),
                                              "val": str((d / "val.csv").resolve()),
                                              "test": str((d / "test.csv").resolve())}, "test_note": None}
    metrics = json.loads((run / "test" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["manifest"] == str(d / "test.csv")  # training scored best.pt on the test split beside
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "- starting weights: none: random initialization" in report and "## Test split" in report


def test_export_evaluate_and_predict_find_the_run_s_manifests(form_runs, capsys):
    d, run = form_runs["with_test"]["manifests"], form_runs["with_test"]["run"]
    best = str(run / "checkpoints" / "best.pt")
    out = form_runs["tmp"] / "export"
    assert export.main(["--classifier", best, "--out", str(out), "--max-images", "8"]) == 0
    assert f"({(d / 'val.csv').resolve()})" in capsys.readouterr().out  # parity on the run's --val-manifest
    assert json.loads((out / "classifier.json").read_text())["parity"]["classifier"]["top1_agreement"] == 1.0
    assert evaluate.main(["--checkpoint", best, "--out", str(form_runs["tmp"] / "ev"), "--device", "cpu",
                          "--backend", "pil"]) == 0
    assert capsys.readouterr().out.startswith("test split: ")
    ev = json.loads((form_runs["tmp"] / "ev" / "metrics.json").read_text())
    assert ev["manifest"] == str((d / "test.csv").resolve()) and ev["images"] > 0
    assert predict.main(["--classifier", best, "--mode", "single", "--eval", "--device", "cpu"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["manifest"] == str((d / "test.csv").resolve())
    assert score["images"] + score["unreadable"] + score["absent_rows"] == len(_rows(d / "test.csv"))
    assert 0 <= score["top1"] <= score["top5"] <= 1
    # predict's whole-image path scores the test split as evaluate's PIL loader does: same rows, same top-1
    assert (score["images"], score["top1"], score["top5"]) == (ev["images"], round(ev["top1"], 4),
                                                               round(ev["top5"], 4))


def _rows(path: Path) -> list:
    return path.read_text(encoding="utf-8").strip().splitlines()[1:]


def test_a_run_without_a_test_split_says_so_everywhere(form_runs, capsys):
    d, run = form_runs["no_test"]["manifests"], form_runs["no_test"]["run"]
    best = str(run / "checkpoints" / "best.pt")
    ck = load_checkpoint(best)
    note = ck["run_inputs"]["test_note"]
    assert ck["run_inputs"]["manifests"]["test"] is None
    assert note.startswith("no test split: no test manifest") and "Holding out a test split" in note
    assert note in (run / "report.md").read_text(encoding="utf-8") and not (run / "test").exists()
    assert note in (run / "train.log").read_text(encoding="utf-8")
    assert export.main(["--classifier", best, "--out", str(form_runs["tmp"] / "export2"), "--max-images", "4"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", best, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and note in err[0] and "--manifest" in err[0]
    assert predict.main(["--classifier", best, "--mode", "single", "--eval", "--device", "cpu"]) == 2
    assert note in capsys.readouterr().err
    # a test manifest without rows (a tree without the AI Hub Validation part): said, not "0 absent K-codes"
    empty = d / "empty_test.csv"
    empty.write_text((d / "val.csv").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert evaluate.main(["--checkpoint", best, "--manifest", str(empty), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no rows: no test split" in err and "absent K-codes" not in err
