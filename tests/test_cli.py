"""The one CLI convention, through each of the seven CLIs: the shared flags are accepted and reach the config,
only expected errors become one line with exit status 2, input mistakes are named, every flag's help has its
default. Real files, real manifests, real (tiny) training runs."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pillsnap_dali.commands import bench as bench_cmd, common as cli, detect, predict, train
from pillsnap_dali.commands import manifest as manifest_cmd, prepare as prepare_cmd
from pillsnap_dali.training import detector
from pillsnap_dali.config import STAGES, ConfigError
from pillsnap_dali.data import synth
from pillsnap_dali.data.cache import InsufficientSpaceError, PrepareError
from pillsnap_dali.data.classmap import ClassMapMismatch
from pillsnap_dali.data.manifest import ManifestError
from pillsnap_dali.data.synth import SynthError
from pillsnap_dali.commands import synth as synth_cli
from pillsnap_dali.errors import PillsnapError, UsageError
from pillsnap_dali.training.checkpoint import CheckpointError

# like test_train's, without a --set of loader.threads (--threads is under test here)
TINY = ["--model", "test_efficientnet", "--img-size", "32", "--batch-size", "16", "--lr", "0.003",
        "--set", "train.warmup_epochs=0", "--set", "train.log_interval=2", "--set", "train.max_skipped=0.1"]


def _train(manifests: Path, runs: Path, *extra) -> list[str]:
    return ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(runs), *TINY, *extra]


def _data_dir(root: Path) -> Path:
    """The raw layout's ``.../01.데이터`` (the folder holding 1.Training and 2.Validation)."""
    return next(root.glob("*/01.데이터"))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return {"train": train.build_parser(), "manifest": manifest_cmd._parser(), "synth": synth_cli._parser(),
            "prepare": prepare_cmd._parser(), "detect": detect.build_parser(), "predict": predict.build_parser(),
            **{f"bench {k}": p for k, p in bench_cmd.parsers().items()}}


# ------------------------------------------------------------------------------------------ errors
def test_every_expected_error_is_a_pillsnap_error_and_keeps_its_old_base():
    for cls, old in ((ConfigError, ValueError), (ManifestError, ValueError), (ClassMapMismatch, ValueError),
                     (CheckpointError, ValueError), (SynthError, ValueError), (PrepareError, RuntimeError),
                     (InsufficientSpaceError, RuntimeError), (UsageError, ValueError)):
        assert issubclass(cls, PillsnapError) and issubclass(cls, old), cls


def test_run_main_turns_only_expected_errors_into_one_line(tmp_path, capsys):
    def raising(e):
        def fn():
            raise e
        return fn

    assert cli.run_main(raising(ManifestError("manifest x.csv: bad row 3"))) == 2
    assert capsys.readouterr().err == "error: manifest x.csv: bad row 3\n"
    assert cli.run_main(lambda: open(tmp_path / "absent.csv")) == 2  # an OS error: the path, what happened
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent.csv'}: No such file or directory\n"
    for bug in (ValueError("a bug"), KeyError("k"), TypeError("t")):  # not expected: the traceback stays
        with pytest.raises(type(bug)):
            cli.run_main(raising(bug))
    assert cli.run_main(lambda: 1) == 1 and cli.run_main(lambda: None) == 0


# ------------------------------------------------------------------------------------------ shared flags
def test_train_maps_every_shared_flag_and_set_goes_last(synth_tree, tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  epochs: 3\n  lr: 0.0123\nmodel:\n  drop_rate: 0.1\n", encoding="utf-8")
    args = train.parse_args(["--stage", "1", "--config", str(f), "--set", "train.log_interval=7",
                             "--data-root", str(synth_tree.root), "--out", str(tmp_path / "runs"), "--name", "n1",
                             "--device", "cpu", "--threads", "3", "--seed", "11", "--resume"])
    cfg = train.resolve_config(args)
    assert (cfg.stage, cfg.manifest.images, cfg.train.epochs, cfg.train.lr, cfg.model.drop_rate) == \
        ("1", 5000, 3, 0.0123, 0.1)
    assert (cfg.train.log_interval, cfg.data.root, cfg.train.device, cfg.train.seed) == \
        (7, str(synth_tree.root), "cpu", 11)
    assert (cfg.loader.threads, cfg.loader.workers) == (3, 3) and args.resume == "__last__"
    assert train.run_dir_path(cfg) == tmp_path / "runs" / "n1"
    assert train.resolve_config(train.parse_args(["--epochs", "5", "--set", "train.epochs=6"])).train.epochs == 6


def test_train_data_root_builds_the_stage_manifests_from_that_tree(synth_tree, tmp_path):
    art = tmp_path / "art"
    assert train.main(["--stage", "demo", "--data-root", str(synth_tree.root), "--set", f"data.artifacts={art}",
                       "--out", str(tmp_path), *TINY, "--epochs", "1", "--dry-run"]) == 0
    report = json.loads((art / "demo" / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["data_root"] == str(Path(synth_tree.root).resolve())


def test_train_reads_the_val_manifest_given(manifests, tmp_path, capsys):
    rows = list(csv.reader(open(manifests / "manifest_val.csv", encoding="utf-8")))
    val = tmp_path / "five.csv"
    with open(val, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows[:6])  # the header and five rows
    assert train.main(_train(manifests, tmp_path, "--epochs", "1", "--dry-run", "--val-manifest", str(val))) == 0
    assert " 5 val rows" in capsys.readouterr().err
    assert train.main(_train(manifests, tmp_path, "--dry-run", "--val-manifest", str(tmp_path / "no.csv"))) == 2
    assert f"--val-manifest {tmp_path / 'no.csv'} does not exist" in capsys.readouterr().err


def test_train_seed_and_threads_reach_the_run(manifests, tmp_path):
    assert train.main(_train(manifests, tmp_path, "--epochs", "1", "--name", "s", "--seed", "5", "--threads", "3")) == 0
    used = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text(encoding="utf-8"))
    assert used["train"]["seed"] == 5 and (used["loader"]["threads"], used["loader"]["workers"]) == (3, 3)


def test_train_loads_the_pretrained_weights_given(manifests, tmp_path, capsys):
    import timm

    ours = tmp_path / "ours.pt"
    torch.save(timm.create_model("test_efficientnet", num_classes=6).state_dict(), ours)
    assert train.main(_train(manifests, tmp_path, "--epochs", "1", "--dry-run", "--pretrained", str(ours))) == 0
    assert f"from {ours}" in capsys.readouterr().err  # "loaded N tensors from <path>"
    other = tmp_path / "resnet.pt"
    torch.save({"fc9.weight": torch.zeros(2, 2)}, other)  # nothing of this model in it
    assert train.main(_train(manifests, tmp_path, "--epochs", "1", "--dry-run", "--pretrained", str(other))) == 2
    assert "no tensor matches" in capsys.readouterr().err


def test_train_config_file_is_merged_and_its_invalid_section_reported(manifests, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 0.0042\n", encoding="utf-8")
    assert train.resolve_config(train.parse_args(["--config", str(good)])).train.lr == 0.0042
    for text, key in (("train: 5\n", "'train' must be a mapping"), ("augment:\n  hflip: 1.5\n", "augment.hflip")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text, encoding="utf-8")
        # the flags set a key of that very section: the file's fault is still reported, naming the file
        rc = train.main(_train(manifests, tmp_path, "--config", str(bad), "--epochs", "1", "--dry-run",
                               "--set", "augment.hflip=0.5"))
        err = capsys.readouterr().err
        assert rc == 2 and key in err and str(bad) in err, err


def test_manifest_cli_shared_flags(synth_tree, tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text("manifest:\n  val_fraction: 0.3\n", encoding="utf-8")
    out = tmp_path / "out"
    assert manifest_cmd.main(["--data-root", str(synth_tree.root), "--stage", "demo", "--out", str(out), "--config", str(f),
                       "--set", "manifest.seed=5", "--verify", "header"]) == 0
    inputs = json.loads((out / "report.json").read_text(encoding="utf-8"))["inputs"]
    assert (inputs["seed"], inputs["sampling"]["val_fraction"], inputs["verify"], inputs["stage"]) == \
        (5, 0.3, "header", "demo")


def test_synth_cli_takes_its_settings_from_flags_config_and_stage(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("data:\n  synth:\n    classes: 7\n    combos: 2\n", encoding="utf-8")
    assert synth_cli.main(["--out", str(tmp_path / "a"), "--config", str(f), "--set", "data.synth.images_per_class=2",
                       "--size", "64x80", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 classes, 2 + " in out and "64x80" in out
    assert synth_cli.main(["--out", str(tmp_path / "b"), "--stage", "demo", "--images-per-class", "1", "--combos", "1",
                       "--size", "64x80", "--workers", "1"]) == 0
    assert "12 classes, 1 + " in capsys.readouterr().out  # the demo overlay's data.synth.classes


def test_prepare_cli_out_and_set(manifests, tmp_path, capsys):
    rows = list(csv.reader(open(manifests / "manifest_val.csv", encoding="utf-8")))
    m = tmp_path / "few.csv"
    with open(m, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows[:4])
    shutil_free = ["--set", "prepare.free_space_margin_gb=0"]
    assert prepare_cmd.main(["--manifest", str(m), "--out", str(tmp_path / "c"), "--set", "prepare.max_side=32",
                       "--workers", "1", "--sample", "1", *shutil_free]) == 0
    cached = list(csv.DictReader(open(tmp_path / "c" / "few.csv", encoding="utf-8")))
    assert len(cached) == 3 and all(max(Image.open(r["image_path"]).size) == 32 for r in cached)
    assert prepare_cmd.main(["--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "d")]) == 2
    assert f"--manifest {tmp_path / 'none.csv'} does not exist" in capsys.readouterr().err


def test_detect_cli_has_data_root_out_name_and_device(synth_tree, tmp_path, capsys):
    art = tmp_path / "art"
    assert detect.main(["--stage", "demo", "--data-root", str(synth_tree.root), "--set", f"data.artifacts={art}",
                        "--convert-only"]) == 0
    assert (art / "demo" / "yolo" / "data.yaml").is_file()
    report = json.loads((art / "demo" / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["data_root"] == str(Path(synth_tree.root).resolve())
    args = detect.build_parser().parse_args(["--out", str(tmp_path / "runs"), "--name", "d1", "--device", "cpu",
                                             "--epochs", "2", "--data-root", str(synth_tree.root)])
    run = detector.run_from_config(detect.resolve_config(args), Path("data.yaml"))
    assert (run.out, run.device, run.epochs) == (tmp_path / "runs" / "detect_d1", "cpu", 2)


def test_predict_cli_checks_device_and_config_before_loading(tmp_path, capsys):
    clf = tmp_path / "clf.pt"
    clf.write_bytes(b"not loaded: the command line is refused first")
    common = [str(tmp_path), "--classifier", str(clf), "--mode", "single"]
    assert predict.main([*common, "--device", "gpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert predict.main([*common, "--device", "cuda:99"]) == 2
    assert "--device cuda:99: this machine has" in capsys.readouterr().err
    f = tmp_path / "p.yaml"
    f.write_text("predict:\n  conf: 2\n", encoding="utf-8")
    assert predict.main([*common, "--config", str(f), "--set", "predict.conf=0.5"]) == 2
    assert "predict.conf" in capsys.readouterr().err
    assert predict.main([*common, "--classifier", str(tmp_path / "none.pt")]) == 2
    assert "--classifier" in capsys.readouterr().err


def test_bench_step_shared_flags(tmp_path, capsys):
    assert bench_cmd.main(["step", "--device", "cuda:99"]) == 2
    assert "cuda:99" in capsys.readouterr().err
    f = tmp_path / "b.yaml"
    f.write_text("model:\n  name: test_efficientnet\n", encoding="utf-8")
    assert bench_cmd.main(["step", "--stage", "demo", "--config", str(f), "--set", "preprocess.img_size=32",
                       "--batch-size", "2", "--steps", "1", "--reps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| test_efficientnet | 32 | 2 | cpu |" in out


def test_each_cli_entry_point_reports_an_expected_error_in_one_line_with_status_2(tmp_path):
    import os
    import subprocess
    import sys

    gone = tmp_path / "gone"
    cases = {"train": ["--manifest", f"{gone}.csv"], "manifest": ["--data-root", str(gone)],
             "synth": ["--out", str(tmp_path / "s"), "--size", "10x10"],
             "prepare": ["--manifest", f"{gone}.csv", "--out", str(tmp_path / "c")],
             "detect": ["--data", f"{gone}.yaml"],
             "predict": ["x.png", "--classifier", f"{gone}.pt", "--mode", "single"],
             "bench": ["step", "--device", "cuda:99"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parent.parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = {name: subprocess.Popen([sys.executable, "-m", f"pillsnap_dali.{name}", *args], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, args in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in err, (name, err)
        assert lines[-1].startswith("error: ") and (str(gone) in lines[-1] or name in ("synth", "bench")), (name, err)


# ------------------------------------------------------------------------------------------ input mistakes
def test_stage_accepts_only_the_existing_stages_in_every_cli(capsys):
    for name, p in _parsers().items():
        stage = [a for a in p._actions if "--stage" in a.option_strings]
        assert not stage or list(stage[0].choices) == list(STAGES), name
    mains = {"train": train.main, "manifest": manifest_cmd.main, "synth": synth_cli.main, "prepare": prepare_cmd.main,
             "detect": detect.main, "predict": predict.main, "bench": lambda a: bench_cmd.main(["step", *a])}
    for name, main in mains.items():
        with pytest.raises(SystemExit) as e:
            main(["--stage", "9"])
        assert e.value.code == 2 and "invalid choice: '9'" in capsys.readouterr().err, name


def test_a_missing_manifest_is_named_not_guessed_beside(tmp_path, capsys):
    gone = tmp_path / "nope" / "manifest_train.csv"
    (tmp_path / "custom" / "checkpoints").mkdir(parents=True)  # an earlier run of that run dir stays where it is
    assert train.main(["--manifest", str(gone), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--manifest {gone} does not exist" in err and "cannot guess" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom"] and (tmp_path / "custom" / "checkpoints").is_dir()


def test_a_data_root_inside_the_tree_names_the_tree_root(synth_tree, tmp_path, capsys):
    data = _data_dir(Path(synth_tree.root))
    for deep in (data / "1.Training", data / "1.Training" / "원천데이터"):
        assert manifest_cmd.main(["--data-root", str(deep), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"pass --data-root {data.resolve()}" in err, err
        (tmp_path / "demo" / "checkpoints").mkdir(parents=True, exist_ok=True)
        assert train.main(["--stage", "demo", "--data-root", str(deep), "--out", str(tmp_path)]) == 2
        assert f"pass --data-root {data.resolve()}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing built, the earlier run not moved
    assert cli.suggested_root(data) is None and cli.suggested_root(synth_tree.root) is None


def test_the_english_layout_one_level_too_deep_is_recognised_too(tmp_path):
    en = synth.generate(tmp_path / "en", workers=1, classes=6, images_per_class=1, combos=1, size=(64, 80),
                        seed=0, layout="english")
    data = Path(en.root) / "data"
    for deep in (data / "train", data / "val" / "images", data / "train" / "labels" / "single" / "TL_1_single"):
        assert cli.suggested_root(deep) == data.resolve(), deep
        with pytest.raises(UsageError, match=f"pass --data-root {data.resolve()}"):
            cli.check_data_root(deep)
    assert cli.suggested_root(data) is None


# ------------------------------------------------------------------------------------------ help
def test_every_flag_of_every_cli_has_help_with_its_default():
    for name, p in _parsers().items():
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            text = fmt._expand_help(a) if a.help else ""
            where = f"{name} {a.option_strings or a.dest}"
            assert text and text != argparse.SUPPRESS, f"{where}: no help"
            if a.default not in (None, False, [], argparse.SUPPRESS):
                assert str(a.default) in text, f"{where}: default {a.default!r} not in {text!r}"
            else:
                assert "default" in text or "required" in text, f"{where}: no default named in {text!r}"


def test_every_cli_prints_its_help(capsys):
    for main in (train.main, manifest_cmd.main, synth_cli.main, prepare_cmd.main, detect.main, predict.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0 and "default" in capsys.readouterr().out
    assert bench_cmd.main(["--help"]) == 0 and "step" in capsys.readouterr().out


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    """A KeyboardInterrupt while a command checks its inputs or builds its data (before training's own signal
    handling) ends with one line and 130, never a traceback; an unexpected exception still propagates."""
    def interrupted():
        raise KeyboardInterrupt
    assert cli.run_main(interrupted) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted") and "Traceback" not in err[0]

    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        cli.run_main(bug)
