"""ONNX export with its parity proof, and ``predict --onnx`` against the torch path: a tiny real training
(EMA on), a 1-epoch detector on the synthetic tree's combinations, real onnxruntime and Ultralytics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pillsnap_dali import onnx_export
from pillsnap_dali.commands import export, predict, train
from pillsnap_dali.config import load_config
from pillsnap_dali.data.manifest import read_manifest
from pillsnap_dali.training.checkpoint import load_checkpoint

TINY = ["--model", "resnet18", "--img-size", "48", "--batch-size", "16", "--epochs", "2", "--set",
        "train.warmup_epochs=0", "--set", "loader.threads=1", "--set", "loader.workers=1", "--set", "train.ema=true",
        "--set", "train.ema_decay=0.5", "--set", "train.tensorboard=false", "--set", "train.max_skipped=0.1"]


@pytest.fixture(scope="module")
def run(synth_tree, tmp_path_factory):
    """A trained classifier (best.pt), its manifests, a 1-epoch detector, and an export dir of both."""
    from pillsnap_dali.training.detector import DetectRun, train_detector
    from pillsnap_dali.data.yolo import convert_stage

    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(stage="demo", sets=[f"data.root={synth_tree.root}", f"data.artifacts={tmp / 'artifacts'}"])
    data_yaml = convert_stage(cfg)
    manifests = data_yaml.parent.parent
    assert train.main(["--manifest", str(manifests / "manifest_train.csv"), "--out", str(tmp / "runs"), "--name",
                       "r", *TINY]) == 0
    det = DetectRun(data_yaml=data_yaml, model="yolo11n.yaml", epochs=1, imgsz=160, batch_size=4,
                    backend="dali-cpu", out=tmp / "runs" / "detect", device="cpu")
    train_detector(det)
    best = tmp / "runs" / "r" / "checkpoints" / "best.pt"
    out = tmp / "onnx"
    rc = export.main(["--classifier", str(best), "--detector", str(det.out / "weights" / "best.pt"), "--format",
                      "onnx", "--out", str(out), "--val-manifest", str(manifests / "manifest_val.csv"), "--fp16"])
    assert rc == 0
    return {"tmp": tmp, "manifests": manifests, "best": best, "out": out,
            "detector": det.out / "weights" / "best.pt"}


def _readable(path: str) -> bool:
    from pillsnap_dali.imageio import open_rgb

    try:
        open_rgb(path)
        return True
    except Exception:  # the tree's injected defects
        return False


def _val_images(run, n=None):
    paths = [p for p in read_manifest(run["manifests"] / "manifest_val.csv").paths if _readable(p)]
    return paths[:n] if n else paths


def test_export_writes_the_onnx_pair_with_metadata_and_parity(run):
    import onnx

    out, ck = run["out"], load_checkpoint(run["best"])
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["k_codes"] == ck["class_map"]["codes"] and meta["weights"] == ck["deploy"]
    assert meta["preprocess"] == ck["preprocess"] and meta["preprocess"]["img_size"] == 48
    assert meta["drug_names"] == [ck["class_map"]["meta"][c].get("dl_name", "") for c in meta["k_codes"]]
    par = meta["parity"]["classifier"]
    assert par["images"] >= 10 and par["top1_agreement"] == 1.0 and par["max_abs_diff"] <= 1e-3
    assert meta["parity"]["classifier_fp16"]["top1_agreement"] >= 0.99
    lat = meta["latency_batch1"]["classifier"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"]
    model = onnx.load(str(out / "classifier.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["k_codes"]) == meta["k_codes"] and json.loads(props["preprocess"]) == meta["preprocess"]
    assert (out / "detector.onnx").stat().st_size > 0 and json.loads((out / "detector.json").read_text())["imgsz"] == 160
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file or dir left


def test_the_exported_weights_are_the_deployed_ones(run):
    """The ONNX logits are those of the weights best.pt deploys (EMA or model), not the other set."""
    from pillsnap_dali.onnx_runtime import load_classifier_dir
    from pillsnap_dali.training.model import load_classifier

    ck = load_checkpoint(run["best"])
    assert ck["ema"] is not None
    x, _ = onnx_export.preprocess(_val_images(run, 8), load_classifier(run["best"]).preprocess, 10**8)
    onnx_logits = load_classifier_dir(run["out"]).model(x).numpy()
    import timm
    for which in ("model", "ema"):
        m = timm.create_model("resnet18", num_classes=ck["num_classes"])
        m.load_state_dict(ck[which])
        with torch.no_grad():
            diff = np.abs(m.eval()(x).numpy() - onnx_logits).max()
        assert (diff <= 1e-3) == (which == ck["deploy"]), (which, ck["deploy"], diff)


def _predict_json(capsys, *args) -> dict:
    assert predict.main([*args, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_onnx_gives_the_torch_answers_single_and_combo(run, capsys):
    images = _val_images(run, 12)
    torch_res = _predict_json(capsys, *images, "--classifier", str(run["best"]), "--mode", "single", "--topk", "3")
    onnx_res = _predict_json(capsys, *images, "--onnx", str(run["out"]), "--mode", "single", "--topk", "3")
    for a, b in zip(torch_res["results"], onnx_res["results"], strict=True):
        assert a.keys() == b.keys() and a["image"] == b["image"]
        ta, tb = a["pills"][0]["topk"], b["pills"][0]["topk"]
        assert [t["code"] for t in ta] == [t["code"] for t in tb]
        assert [t["confidence"] for t in ta] == pytest.approx([t["confidence"] for t in tb], abs=1e-3)
        assert {k: v for k, v in ta[0].items() if k != "confidence"} == {k: v for k, v in tb[0].items()
                                                                       if k != "confidence"}
    combos = [p for p in read_manifest(run["manifests"] / "detect_val.csv").paths if not p.endswith("_index.png")][:2]
    sets = ["--set", "predict.conf=0.001"]
    t = _predict_json(capsys, *combos, "--classifier", str(run["best"]), "--detector", str(run["detector"]),
                      "--mode", "combo", *sets)
    o = _predict_json(capsys, *combos, "--onnx", str(run["out"]), "--mode", "combo", *sets)
    for a, b in zip(t["results"], o["results"], strict=True):
        # a 1-epoch detector at conf 0.001: boxes at the threshold may come and go between the two runtimes
        assert len(a["pills"]) > 0 and abs(len(a["pills"]) - len(b["pills"])) <= 2
        for pa in a["pills"][:5]:  # the most confident boxes: found by the ONNX path too, with the same top-1
            twin = [pb for pb in b["pills"] if np.abs(np.subtract(pa["box"], pb["box"])).max() <= 2.0]
            assert twin and twin[0]["topk"][0]["code"] == pa["topk"][0]["code"]


def test_a_parity_failure_writes_nothing_and_an_existing_export_stays_whole(run, tmp_path, capsys):
    out = tmp_path / "onnx"
    args = ["--classifier", str(run["best"]), "--out", str(out), "--images", *_val_images(run, 4)]
    assert export.main(args) == 0
    before = (out / "classifier.onnx").read_bytes()
    capsys.readouterr()
    assert export.main([*args, "--atol", "0", "--fp16"]) == 1  # an impossible bound
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beyond the bounds" in err[0] and "not written" in err[0]
    assert (out / "classifier.onnx").read_bytes() == before and not (out / "classifier_fp16.onnx").exists()
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "classifier.onnx"]


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys, monkeypatch):
    import sys

    ck = load_checkpoint(run["best"])
    raw = tmp_path / "raw.pt"
    torch.save(ck["model"], raw)  # a plain state dict: its K-codes are unknown
    imgs = ["--images", *_val_images(run, 2)]
    moved = tmp_path / "moved.pt"  # its recorded validation manifest is gone (the data moved since training)
    torch.save({**ck, "run_inputs": {"manifests": {"val": str(tmp_path / "gone" / "manifest_val.csv")}}}, moved)
    cases = [(["--classifier", str(raw), "--out", str(tmp_path / "o"), *imgs], "plain state dict: pass its class "
              "map as JSON (--class-map)"),
             (["--classifier", str(moved), "--out", str(tmp_path / "o")], None)]
    monkeypatch.chdir(tmp_path)  # the checkpoint's artifacts/demo is relative: absent here even after a demo run
    for args, msg in cases:
        rc = export.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        if msg is None:  # the recorded manifest is gone, the config's artifacts/demo is not this test's
            assert rc == 2 and "pass --val-manifest CSV or --images" in err[-1]
            assert f"the recorded {tmp_path / 'gone' / 'manifest_val.csv'} is gone" in err[-1]
        else:
            assert rc == 2 and msg in err[-1] and len(err) == 1
    assert export.main(["--classifier", str(raw), "--class-map", str(run["manifests"] / "class_map.json"),
                        "--model-name", "resnet18", "--set", "preprocess.img_size=48", "--out",
                        str(tmp_path / "o"), *imgs]) == 0
    capsys.readouterr()
    assert predict.main([_val_images(run, 1)[0], "--onnx", str(tmp_path / "nothing"), "--mode", "single"]) == 2
    assert "classifier.json is missing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert predict.main([_val_images(run, 1)[0], "--onnx", str(run["out"]), "--mode", "single"]) == 2
    assert capsys.readouterr().err.strip() == ("error: running ONNX models needs the onnxruntime package, which is "
                                               "not installed: pip install onnxruntime (or pip install "
                                               "'pillsnap_dali[deploy]')")


def test_the_default_parity_bounds_are_the_documented_ones_and_refuse_a_10x_difference(run):
    """docs/benchmarks.md: fp32 max abs logit diff <= 1e-3 and 100 % top-1 agreement, fp16 <= 0.05 and >= 99 %;
    what a plain ``export`` run applies (the module's export, made with the defaults, records them)."""
    args = export.build_parser().parse_args(["--classifier", "c.pt", "--out", "o"])
    assert (args.atol, args.min_agreement) == (1e-3, 1.0)
    assert (export.Bounds().atol_fp16, export.Bounds().min_agreement_fp16) == (0.05, 0.99)
    meta = json.loads((run["out"] / "classifier.json").read_text(encoding="utf-8"))
    assert (meta["parity"]["classifier"]["atol"], meta["parity"]["classifier"]["min_agreement"]) == (1e-3, 1.0)
    assert meta["parity"]["classifier_fp16"]["atol"] == 0.05
    figures = {"images": 8, "max_abs_diff": 9e-4, "top1_agreement": 1.0}
    onnx_export.check("classifier", figures, args.atol, args.min_agreement)  # within: no error
    for bad in ({"max_abs_diff": 1e-2}, {"max_abs_diff": 1.1e-3}, {"top1_agreement": 7 / 8}):
        with pytest.raises(export.ParityError, match="beyond the bounds"):
            onnx_export.check("classifier", {**figures, **bad}, args.atol, args.min_agreement)
