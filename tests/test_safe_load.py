"""A weights file never runs code: crafted ``.pt`` files whose unpickling would write a file are refused by
every path that loads a user's file (detector: ``detect --model``, ``predict --detector``; classifier:
``--classifier``, ``--pretrained``, ``--resume``) with one line and exit status 2, and the file never
appears. A real Ultralytics checkpoint still loads."""
from __future__ import annotations

import copy
import pathlib

import pytest
import timm
import torch
from PIL import Image

from pillsnap_dali import inference
from pillsnap_dali.commands import detect, predict
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.training import checkpoint as ckpt
from pillsnap_dali.weights import WeightsError, allowed_global, check_detector_weights, load_yolo


class _Attr:
    """Pickles as ``getattr(PosixPath, "write_text")``: only globals an Ultralytics checkpoint may name
    (``builtins.getattr``, ``pathlib.PosixPath``), so it gets past a name check to the restricted unpickler."""

    def __call__(self, *a):  # pragma: no cover - never called while pickling
        raise AssertionError

    def __reduce__(self):
        return getattr, (pathlib.PosixPath, "write_text")


class WritesFile:
    """Unpickling calls ``Path(marker).write_text("pwned")`` (``pathlib.Path.write_text`` by name)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.PosixPath(self.marker), "pwned")


class WritesFileSneaky(WritesFile):
    def __reduce__(self):
        return _Attr(), (pathlib.PosixPath(self.marker), "pwned")


def _payload(tmp_path, kind=WritesFile, name="evil.pt"):
    """(crafted checkpoint shaped like an Ultralytics / pillsnap one, the marker its unpickling would write)."""
    marker = tmp_path / f"pwned_{name}.txt"
    path = tmp_path / name
    torch.save({"model": kind(marker), "ema": kind(marker), "train_args": {}, "format": ckpt.FORMAT,
                "state_dict": {"w": torch.zeros(1)}}, path)
    return path, marker


@pytest.mark.parametrize("kind", [WritesFile, WritesFileSneaky])
def test_the_payload_is_live_when_unpickled_blindly(tmp_path, kind):
    """The crafted files do write their marker under a plain torch.load: the refusals below are real."""
    path, marker = _payload(tmp_path, kind)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", [WritesFile, WritesFileSneaky])
def test_detector_loader_refuses_a_crafted_pt_in_one_line(tmp_path, kind):
    path, marker = _payload(tmp_path, kind)
    with pytest.raises(WeightsError) as e:
        load_yolo(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


def test_name_check_refuses_what_is_not_a_layer(tmp_path):
    path, marker = _payload(tmp_path)
    with pytest.raises(WeightsError, match="pathlib.Path"):
        check_detector_weights(path)
    assert not marker.exists()
    assert allowed_global("ultralytics.nn.tasks.DetectionModel") and allowed_global("torch.nn.modules.conv.Conv2d")
    assert not allowed_global("posix.system") and not allowed_global("builtins.exec")
    assert not allowed_global("ultralytics.utils.downloads.safe_download")


def test_detect_cli_refuses_a_crafted_model(tmp_path, capsys):
    path, marker = _payload(tmp_path)
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: pill}\n")
    rc = detect.main(["--data", str(data), "--model", str(path), "--set", f"train.out={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not marker.exists()
    last = err.splitlines()[-1]  # log lines (warnings) may come first; the error is one line, no traceback
    assert "Traceback" not in err and last.startswith("error:") and str(path) in last


def _classifier(tmp_path) -> pathlib.Path:
    cm = ClassMap(codes=["K-000001", "K-000002"])
    model = timm.create_model("resnet18", num_classes=2)
    path = tmp_path / "clf.pt"
    ckpt.save_checkpoint(path, {"format": ckpt.FORMAT, "model_name": "resnet18", "num_classes": 2,
                                "model": model.state_dict(), "ema": None, "deploy": "model", "class_map": cm.to_dict(),
                                "preprocess": {"img_size": 32, "resize_mode": "squash",
                                               "mean": [0.5] * 3, "std": [0.5] * 3}})
    return path


@pytest.mark.parametrize("flag", ["--detector", "--classifier"])
def test_predict_cli_refuses_a_crafted_file(tmp_path, capsys, flag):
    path, marker = _payload(tmp_path)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (90, 90, 90)).save(image)
    other = {"--detector": ["--classifier", str(_classifier(tmp_path))], "--classifier": []}[flag]
    rc = predict.main([str(image), flag, str(path), *other, "--mode", "combo" if flag == "--detector" else "single",
                       "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 0 and str(path) in err


def test_classifier_loaders_use_weights_only(tmp_path):
    """--classifier, --pretrained and --resume all go through load_checkpoint (weights_only=True)."""
    from pillsnap_dali.training.model import load_classifier, load_pretrained as _load_pretrained
    from pillsnap_dali.training.resume import load_training_state

    path, marker = _payload(tmp_path)
    cm = ClassMap(codes=["K-000001", "K-000002"])
    for load in (lambda: ckpt.load_checkpoint(path),
                 lambda: load_training_state(path, cm),
                 lambda: _load_pretrained(timm.create_model("resnet18", num_classes=2), str(path), cm),
                 lambda: load_classifier(path, device="cpu")):
        with pytest.raises(ckpt.CheckpointError) as e:
            load()
        assert "\n" not in str(e.value).strip() and str(path) in str(e.value)
    assert not marker.exists()


def test_an_ultralytics_checkpoint_still_loads(tmp_path):
    """A checkpoint in the format Ultralytics' trainer saves (the model object, EMA, train args) loads, restricted."""
    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml", task="detect").model
    path = tmp_path / "saved.pt"
    torch.save({"epoch": -1, "best_fitness": None, "model": None, "ema": copy.deepcopy(model).half(),
                "updates": 0, "optimizer": None, "train_args": {"imgsz": 96}, "date": "x", "version": "8"}, path)
    check_detector_weights(path)
    yolo = load_yolo(path)
    assert type(yolo.model).__name__ == "DetectionModel" and inference.detector_imgsz(yolo, 640) == 96
