"""The test-split score: after training's last epoch and through ``python -m pillsnap_dali.evaluate``, with the
stage targets, classes absent from training, the report's pictures (confused pairs, skipped files)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pillsnap_dali.commands import evaluate, train
from pillsnap_dali.training import evaluation
from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import build_manifests
from pillsnap_dali.training.checkpoint import load_checkpoint
from pillsnap_dali.training.report import SHEET_CAP, THUMB, skipped_sheet

TINY = ["--model", "resnet18", "--img-size", "48", "--batch-size", "16", "--epochs", "2", "--set",
        "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1", "--set",
        "train.tensorboard=false", "--set", "train.max_skipped=0.1"]


@pytest.fixture(scope="module")
def run(synth_tree, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    build_manifests(load_config("demo"), synth_tree.root, tmp / "m")
    assert train.main(["--manifest", str(tmp / "m" / "manifest_train.csv"), "--out", str(tmp / "runs"), "--name",
                       "r", *TINY]) == 0
    return {"tmp": tmp, "m": tmp / "m", "dir": tmp / "runs" / "r"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_training_scores_best_pt_on_the_test_split_and_pictures_the_report(run):
    d, m = run["dir"], run["m"]
    t = json.loads((d / "test" / "metrics.json").read_text())
    test_rows = _rows(m / "manifest_test.csv")
    assert t["manifest"] == str(m / "manifest_test.csv") and t["checkpoint"].endswith("checkpoints/best.pt")
    assert t["images"] + t["skipped"] + len(t["missing_files"]) + t["absent_rows"] == len(test_rows)
    assert 0 <= t["top1"] <= t["top5"] <= 1 and 0 <= t["macro_f1"] <= 1
    per_class = _rows(d / "test" / "per_class.csv")  # the same evaluation: top-1 is the support-weighted recall
    support = [int(r["support"]) for r in per_class]
    assert sum(support) == t["images"] > 0
    assert t["top1"] == pytest.approx(sum(s * float(r["recall"]) for s, r in zip(support, per_class)) / t["images"],
                                      abs=1e-4)
    assert t["targets"] == [] and t["targets_met"] is None  # the demo stage sets no target
    codes = json.loads((d / "class_map.json").read_text())["codes"]
    assert [r["k_code"] for r in _rows(d / "test" / "per_class.csv")] == codes
    recalls = [w["recall"] for w in t["worst_classes"]]
    assert recalls == sorted(recalls) and len(recalls) <= 20
    report = (d / "report.md").read_text()
    assert "## Test split" in report and f"top-1 **{t['top1']:.4f}**" in report and "Worst" in report
    # the most confused pairs, pictured with the drug names beside them
    pairs = json.loads((d / "confusions.json").read_text())["pairs"]
    assert pairs and "pictures/confused_01.png" in report and pairs[0]["true_name"] in report
    with Image.open(d / "pictures" / "confused_01.png") as im:
        assert im.height == THUMB + 16 and im.width > 2 * THUMB
    # skipped by the loader and quarantined by the manifest step: one contact sheet with the reasons
    quarantined = _rows(m / "quarantine.csv")
    assert quarantined and "## Skipped and quarantined files" in report and "pictures/skipped.png" in report
    assert all(Path(q["path"]).name in report for q in quarantined[:5])
    assert (d / "test" / "report.md").read_text().startswith("# Test report: best.pt")


def test_evaluate_top1_top5_and_per_class_are_the_models_own_answers_image_by_image(run, tmp_path):
    """The figures of ``evaluate --backend pil`` recomputed outside it: every usable test image through the
    checkpoint's PIL preprocessing (never the command line's) and the deployed weights one by one, its rank of
    the true class counted by hand."""
    from pillsnap_dali.imageio import open_rgb
    from pillsnap_dali.loaders import pil_eval_transform
    from pillsnap_dali.training.model import load_classifier
    best = run["dir"] / "checkpoints" / "best.pt"
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(best), "--manifest", str(run["m"] / "manifest_test.csv"), "--out",
                          str(out), "--backend", "pil", "--device", "cpu", "--set", "preprocess.img_size=16",
                          "--set", "preprocess.resize_mode=crop", "--set", "preprocess.std=[0.01,0.01,0.01]"]) == 0
    # the command line's preprocessing above is not the checkpoint's: evaluate uses the checkpoint's
    t = json.loads((out / "metrics.json").read_text())
    clf = load_classifier(best)
    tf = pil_eval_transform(clf.preprocess)
    ranks, per_class = [], {}
    for r in _rows(run["m"] / "manifest_test.csv"):
        try:
            x = tf(open_rgb(r["image_path"]))
        except Exception:  # the tree's broken files: skipped by evaluate too
            continue
        with torch.no_grad():
            logits = clf.model(x[None]).float()[0]
        truth = clf.class_map.index[r["mapping_code"]]
        rank = int((logits > logits[truth]).sum())  # 0: top-1
        ranks.append(rank)
        per_class.setdefault(r["mapping_code"], []).append(rank == 0)
    assert t["images"] == len(ranks) > 0
    assert t["top1"] == pytest.approx(sum(k == 0 for k in ranks) / len(ranks))
    assert t["top5"] == pytest.approx(sum(k < 5 for k in ranks) / len(ranks))
    recall = {r["k_code"]: (int(r["support"]), float(r["recall"])) for r in _rows(out / "per_class.csv")}
    for code, hits in per_class.items():
        assert recall[code] == (len(hits), pytest.approx(sum(hits) / len(hits), abs=5e-5)), code


def test_evaluate_cli_with_targets_absent_classes_and_missing_files(run, tmp_path, capsys):
    rows = _rows(run["m"] / "manifest_test.csv")
    extra = [dict(rows[0], mapping_code="K-999999", row=str(len(rows))),
             dict(rows[0], image_path=str(tmp_path / "gone.png"), row=str(len(rows) + 1))]
    manifest = tmp_path / "manifest_test.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + extra)
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(run["dir"] / "checkpoints" / "best.pt"), "--manifest", str(manifest),
                        "--out", str(out), "--set", "evaluate.target_top1=0.0", "--set",
                        "evaluate.target_class_recall=1.01"])
    assert rc == 0
    stdout = capsys.readouterr().out
    t = json.loads((out / "metrics.json").read_text())
    assert t["absent_classes"] == {"K-999999": 1} and [f["path"] for f in t["missing_files"]] == [str(tmp_path /
                                                                                                      "gone.png")]
    assert [(x["target"], x["met"]) for x in t["targets"]] == [("top-1", True), ("every class recall", False)]
    assert t["targets"][1]["classes_below"] >= 1 and t["targets_met"] is False
    assert "target top-1 >= 0%" in stdout and "NOT met" in stdout and "absent from training" in stdout
    report = (out / "report.md").read_text()
    assert "K-999999 (1)" in report and "gone.png" in report and "Stage targets NOT met" in report


def test_stage3_targets_come_from_the_config(run, tmp_path):
    cfg = load_config("3")
    assert (cfg.evaluate.target_top1, cfg.evaluate.target_top5) == (0.85, 0.95)
    assert (cfg.evaluate.target_class_precision, cfg.evaluate.target_class_recall) == (0.80, 0.80)
    t = evaluation.evaluate_checkpoint(run["dir"] / "checkpoints" / "best.pt", run["m"] / "manifest_test.csv",
                                     load_config("3", sets=["loader.threads=1"]), torch.device("cpu"), tmp_path)
    assert [x["target"] for x in t["targets"]] == ["top-1", "top-5", "every class precision", "every class recall"]
    assert [x["goal"] for x in t["targets"]] == [0.85, 0.95, 0.80, 0.80]


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    best = run["dir"] / "checkpoints" / "best.pt"
    raw = tmp_path / "raw.pt"
    torch.save(load_checkpoint(best)["model"], raw)
    cases = [(["--checkpoint", str(best), "--manifest", str(tmp_path / "nope.csv")], "nope.csv does not exist"),
             (["--checkpoint", str(raw), "--manifest", str(run["m"] / "manifest_test.csv")],
              "plain state dict: pass its class map as JSON (--class-map)")]
    for args, msg in cases:
        assert evaluate.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]


def test_the_contact_sheet_is_capped(tmp_path):
    bad = [(str(tmp_path / f"f{i}.png"), "truncated", "skipped") for i in range(SHEET_CAP + 7)]
    lines = skipped_sheet(bad, tmp_path / "pictures")
    assert lines[0] == f"## Skipped and quarantined files: {SHEET_CAP + 7} (7 more not shown)"
    assert sum(1 for line in lines if line.startswith("| `f")) == SHEET_CAP
    with Image.open(tmp_path / "pictures" / "skipped.png") as im:
        assert im.size == (6 * THUMB, (SHEET_CAP // 6) * (THUMB + 28))
