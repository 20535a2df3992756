"""Two-stage prediction on the synthetic AI Hub tree: a detector trained (1 epoch, DALI CPU) on its converted
combination images, a timm classifier checkpoint with the tree's class map; both modes through the CLI and
the library, the existing project's state-dict checkpoints, and the scoring helpers."""
from __future__ import annotations

import json

import pytest
import torch

from pillsnap_dali import inference
from pillsnap_dali.commands import predict
from pillsnap_dali.training.checkpoint import FORMAT, preprocess_dict, save_checkpoint
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.config import PreprocessConfig, load_config
from pillsnap_dali.data.manifest import read_manifest
from pillsnap_dali.geometry import letterbox_geometry

LOW_CONF = "predict.conf=0.001"  # a 1-epoch detector is unsure of everything: keep its boxes to check their form


@pytest.fixture(scope="module")
def stage(synth_tree, tmp_path_factory):
    """Manifests + YOLO dataset of the synthetic tree, a 1-epoch detector and a classifier checkpoint."""
    import timm

    from pillsnap_dali.training.detector import DetectRun, train_detector
    from pillsnap_dali.data.yolo import convert_stage

    tmp = tmp_path_factory.mktemp("predict")
    sets = [f"data.root={synth_tree.root}", f"data.artifacts={tmp / 'artifacts'}", LOW_CONF]
    cfg = load_config(stage="demo", sets=sets)
    data_yaml = convert_stage(cfg)
    run = DetectRun(data_yaml=data_yaml, model="yolo11n.yaml", epochs=1, imgsz=160, batch_size=4,
                    backend="dali-cpu", out=tmp / "runs" / "detect_demo", device="cpu")
    train_detector(run)
    cm = ClassMap.load(data_yaml.parent.parent / "class_map.json")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=len(cm))
    ckpt = tmp / "classifier.pt"
    save_checkpoint(ckpt, {"format": FORMAT, "model_name": "resnet18", "num_classes": len(cm),
                           "model": model.state_dict(), "ema": None, "deploy": "model", "class_map": cm.to_dict(),
                           "preprocess": preprocess_dict(PreprocessConfig(img_size=48, resize_mode="squash"))})
    return {"cfg": cfg, "sets": sets, "manifests": data_yaml.parent.parent, "detector": run.out / "weights" / "best.pt",
            "classifier": ckpt, "model": model, "class_map": cm, "tmp": tmp}


def _combo_images(stage, split="val") -> list[str]:
    m = read_manifest(stage["manifests"] / f"detect_{split}.csv")
    return [p for p in m.paths if not p.endswith("_index.png")]


def _check_topk(topk: list, cm: ClassMap, k: int) -> None:
    assert len(topk) == k and all(t["code"] in cm.index for t in topk)
    confs = [t["confidence"] for t in topk]
    assert confs == sorted(confs, reverse=True) and all(0 <= c <= 1 for c in confs)


def test_cli_combo_json_gives_boxes_and_topk_with_metadata(stage, capsys):
    images = _combo_images(stage)[:2]
    rc = predict.main([*images, "--classifier", str(stage["classifier"]), "--detector", str(stage["detector"]),
                       "--mode", "combo", "--topk", "3", "--json", "--device", "cpu",
                       *sum((["--set", s] for s in stage["sets"]), [])])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out["results"]] == images
    assert out["latency"]["images"] == 2 and out["latency"]["p95_ms"] >= out["latency"]["p50_ms"] > 0
    pills = [p for r in out["results"] for p in r["pills"]]
    assert pills, "a detector at conf 0.001 returns boxes"
    for p in pills:
        x1, y1, x2, y2 = p["box"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and 0 < p["det_conf"] <= 1
        _check_topk(p["topk"], stage["class_map"], 3)
    assert any("dl_name" in t for p in pills for t in p["topk"])  # drug metadata from the class map


def test_single_mode_classifies_the_whole_image_with_the_checkpoint_preprocessing(stage):
    from pillsnap_dali.training.model import load_classifier
    from pillsnap_dali.imageio import open_rgb
    from pillsnap_dali.loaders import pil_eval_transform

    image = _combo_images(stage)[0]
    clf = load_classifier(stage["classifier"], device="cpu")
    (res,) = inference.predict_images([image], clf, None, "single", 2, stage["cfg"])
    assert res["mode"] == "single" and len(res["pills"]) == 1 and "box" not in res["pills"][0]
    _check_topk(res["pills"][0]["topk"], stage["class_map"], 2)
    x = pil_eval_transform(PreprocessConfig(img_size=48))(open_rgb(image))[None]  # the stored preprocessing
    with torch.no_grad():
        expected = torch.softmax(stage["model"].eval()(x), 1)[0].max().item()
    assert res["pills"][0]["topk"][0]["confidence"] == pytest.approx(expected, abs=1e-4)


def test_legacy_state_dict_with_orig_mod_prefix_and_unreadable_image(stage, tmp_path, capsys):
    sd = {f"_orig_mod.{k}": v for k, v in stage["model"].state_dict().items()}
    torch.save(sd, tmp_path / "legacy.pt")
    cm_json = tmp_path / "class_map.json"
    cm_json.write_text(json.dumps({c: i for i, c in enumerate(stage["class_map"].codes)}))  # their form
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    image = _combo_images(stage)[0]
    rc = predict.main([image, str(broken), "--classifier", str(tmp_path / "legacy.pt"), "--class-map", str(cm_json),
                       "--model-name", "resnet18", "--mode", "single", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1  # one image could not be read: said so, not dropped
    assert "ERROR unreadable image" in out and "p50" in out and stage["class_map"].codes[0][:2] in out
    # its preprocessing: 384 px squash (the users' Stage 3 model) unless the command line says otherwise
    args = predict.build_parser().parse_args([image, "--classifier", str(tmp_path / "legacy.pt"), "--class-map",
                                              str(cm_json), "--model-name", "resnet18", "--mode", "single",
                                              "--device", "cpu", "--set", "preprocess.img_size=48",
                                              "--set", "preprocess.resize_mode=crop"])
    clf, _ = predict._load_models(args, load_config(sets=args.set))
    assert (clf.preprocess.img_size, clf.preprocess.resize_mode) == (48, "crop")
    args = predict.build_parser().parse_args([image, "--classifier", str(tmp_path / "legacy.pt"), "--class-map",
                                              str(cm_json), "--model-name", "resnet18", "--mode", "single"])
    clf, _ = predict._load_models(args, load_config())
    assert (clf.preprocess.img_size, clf.preprocess.resize_mode) == (384, "squash")
    rc = predict.main([image, "--classifier", str(tmp_path / "legacy.pt"), "--class-map", str(cm_json),
                       "--mode", "single", "--device", "cpu"])  # no --model-name: tf_efficientnetv2_s
    assert rc == 2 and "does not fit timm model 'tf_efficientnetv2_s' (pass its --model-name)" in \
        capsys.readouterr().err


def test_combo_without_detector_is_refused(stage, capsys):
    rc = predict.main([_combo_images(stage)[0], "--classifier", str(stage["classifier"]), "--mode", "combo"])
    assert rc == 2 and "--detector" in capsys.readouterr().err


def test_two_stage_accuracy_scores_every_labelled_pill(stage):
    from pillsnap_dali.training.model import load_classifier

    clf = load_classifier(stage["classifier"], device="cpu")
    det = inference.load_detector(stage["detector"])
    m = read_manifest(stage["manifests"] / "detect_val.csv")
    score = inference.two_stage_accuracy(m, clf, det, stage["cfg"])
    assert score["images"] == len(_combo_images(stage)) and score["pills"] >= 3 * score["images"]
    assert score["unreadable"] == 0
    assert 0 <= score["top1_right"] <= score["detected"] <= score["pills"]


def test_eval_without_a_manifest_scores_the_run_s_recorded_test_split(stage, tmp_path, capsys):
    """``--eval`` alone: combo mode scores detect_test.csv beside the test manifest the checkpoint recorded, the
    same figures as naming it; single mode scores that test manifest's rows whole-image."""
    from pillsnap_dali.training.checkpoint import load_checkpoint

    ck = load_checkpoint(stage["classifier"])
    test = stage["manifests"] / "manifest_test.csv"
    recorded = tmp_path / "recorded.pt"
    save_checkpoint(recorded, {**ck, "run_inputs": {"manifests": {"test": str(test)}, "test_note": None}})
    sets = sum((["--set", s] for s in stage["sets"]), [])
    common = ["--classifier", str(recorded), "--detector", str(stage["detector"]), "--device", "cpu", *sets]
    assert predict.main([*common, "--mode", "combo", "--eval"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert predict.main([*common, "--mode", "combo", "--eval", str(stage["manifests"] / "detect_test.csv")]) == 0
    named = json.loads(capsys.readouterr().out)
    assert default == named and default["manifest"].endswith("detect_test.csv") and default["pills"] > 0
    assert predict.main([*common, "--mode", "single", "--eval"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["manifest"] == str(test)
    assert single["images"] + single["unreadable"] + single["absent_rows"] == len(read_manifest(test))
    assert predict.main(["--classifier", str(stage["classifier"]), "--mode", "single", "--eval"]) == 2
    assert "no test manifest recorded in it; pass --eval MANIFEST" in capsys.readouterr().err


def test_padded_box_and_matching():
    assert inference.padded_box([10, 20, 30, 60], 100, 100, 0.1) == (8, 16, 32, 64)
    assert inference.padded_box([0, 0, 100, 50], 100, 50, 0.1) == (0, 0, 100, 50)  # clipped to the image
    truth = [([0, 0, 10, 10], {"K-000001"}), ([20, 0, 30, 10], {"K-000002"})]
    result = {"pills": [{"box": [20, 0, 30, 10], "topk": [{"code": "K-000002"}]},
                        {"box": [21, 0, 31, 10], "topk": [{"code": "K-000002"}]},   # the same pill again: ignored
                        {"box": [0, 0, 9, 10], "topk": [{"code": "K-000009"}]}]}     # found, wrong code
    assert inference._score_image(result, truth) == (2, 1)


def test_bench_predict_times_each_image_with_four_crops(stage):
    from pillsnap_dali.training.model import load_classifier

    clf = load_classifier(stage["classifier"], device="cpu")
    det = inference.load_detector(stage["detector"])
    opts = inference.PredictOptions(mode="combo", topk=5, conf=0.0, max_det=4)
    bench = inference.bench_predict(_combo_images(stage)[:2], clf, det, opts, warmup=1)
    assert bench["images"] == 2 and bench["pills_per_image"] == 4.0
    assert bench["p95_ms"] >= bench["p50_ms"] > 0 and bench["device"].startswith("cpu")


@pytest.mark.parametrize("size,imgsz", [((976, 1280), 320), ((976, 1280), 640), ((244, 320), 320),
                                        ((244, 320), 640)])
def test_prediction_letterbox_is_the_training_letterbox(size, imgsz):
    """The detector sees at inference what the DALI detection graph gave it in training (users' lesson:
    training and inference once resized differently)."""
    import numpy as np
    from PIL import Image

    from pillsnap_dali.benchmarks.loaders import photo_like
    from pipelines import PipelineOptions
    from pipelines.detect import DetectSpec, detect_pipeline

    arr = photo_like(*size, np.random.default_rng(3))
    h, w = arr.shape[:2]
    pipe = detect_pipeline(None, DetectSpec(imgsz=imgsz), PipelineOptions(batch_size=1, num_threads=1, prefetch=1))
    encoded = np.frombuffer(_png_bytes(arr), dtype=np.uint8)
    pipe.feed_input("encoded", [encoded])
    pipe.feed_input("rows", [np.int64(0)])
    pipe.feed_input("boxes", [np.zeros((0, 4), np.float32)])
    pipe.feed_input("geometry", [np.asarray(letterbox_geometry(h, w, imgsz), np.int32)])
    graph = np.array(pipe.run()[0].as_tensor())[0].astype(np.float32)  # CHW uint8 values
    x, geometry = inference.letterbox(Image.fromarray(arr), imgsz)
    assert geometry == letterbox_geometry(h, w, imgsz) and x.shape == (1, 3, imgsz, imgsz)
    ours = x[0].numpy() * 255.0
    diff = np.abs(ours - graph)
    assert diff.mean() < 0.02 and diff.max() <= 1.0, (diff.mean(), diff.max())  # cv2 letterbox: 0.4-0.8 mean


def _png_bytes(arr) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("w,h,imgsz", [(976, 1280, 640), (1280, 976, 320), (244, 320, 640)])
def test_unletterbox_maps_detections_back_like_ultralytics(w, h, imgsz):
    import numpy as np
    from ultralytics.utils.ops import scale_boxes

    geometry = letterbox_geometry(h, w, imgsz)
    new_h, new_w, top, left = geometry
    rng = np.random.default_rng(0)
    xy = rng.uniform([0, 0], [w, h], size=(20, 2))
    truth = np.concatenate([xy, xy + rng.uniform(5, 200, size=(20, 2))], axis=1)
    truth[:, 2], truth[:, 3] = truth[:, 2].clip(0, w), truth[:, 3].clip(0, h)
    boxed = truth * [new_w / w, new_h / h, new_w / w, new_h / h] + [left, top, left, top]
    back = inference.unletterbox(boxed, geometry, w, h)
    assert np.abs(back - truth).max() < 1e-6
    theirs = scale_boxes((imgsz, imgsz), torch.tensor(boxed, dtype=torch.float32), (h, w)).numpy()
    assert np.abs(back - theirs).max() < 1.5  # Ultralytics uses one gain for both axes (rounding differs)


def test_a_detection_in_the_letterbox_padding_is_not_a_pill():
    import numpy as np

    geometry = letterbox_geometry(1280, 976, 640)  # 488 wide in the 640 frame: 76 px of padding each side
    boxes = np.array([[600.0, 300.0, 630.0, 340.0],    # entirely in the right padding
                      [100.0, 300.0, 200.0, 400.0]])   # on the image
    back = inference.unletterbox(boxes, geometry, 976, 1280)
    assert inference.on_image(back).tolist() == [False, True]
    with pytest.raises(ValueError, match="topk"):
        inference.options_from(load_config("demo"), "single", 0)
