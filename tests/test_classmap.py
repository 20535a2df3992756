"""Class maps are compared by K-code and position: the same codes in another order are another model."""
from __future__ import annotations

import json

import timm
import torch
from PIL import Image

from pillsnap_dali.commands import predict
from pillsnap_dali.config import PreprocessConfig
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.training.checkpoint import FORMAT, preprocess_dict, save_checkpoint

CODES = ["K-000101", "K-000202", "K-000303", "K-000404"]


def test_predict_refuses_a_class_map_with_the_same_codes_in_another_order_naming_the_moved_ones(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=len(CODES))
    ckpt = tmp_path / "classifier.pt"
    save_checkpoint(ckpt, {"format": FORMAT, "model_name": "resnet18", "num_classes": len(CODES),
                           "model": model.state_dict(), "ema": None, "deploy": "model", "class_map": ClassMap(CODES).to_dict(),
                           "preprocess": preprocess_dict(PreprocessConfig(img_size=32, resize_mode="squash"))})
    image = tmp_path / "pill.png"
    Image.new("RGB", (40, 48), (200, 180, 30)).save(image)
    args = [str(image), "--classifier", str(ckpt), "--mode", "single", "--device", "cpu", "--class-map"]
    same = tmp_path / "same.json"
    same.write_text(json.dumps({c: i for i, c in enumerate(CODES)}), encoding="utf-8")  # the users' form
    assert predict.main(args + [str(same)]) == 0
    capsys.readouterr()
    swapped = tmp_path / "swapped.json"
    order = [CODES[0], CODES[2], CODES[1], CODES[3]]  # the same set of K-codes: two of them trade places
    swapped.write_text(json.dumps({"codes": order}), encoding="utf-8")
    assert predict.main(args + [str(swapped)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "same K-codes at different class ids: K-000202 (1 vs 2), K-000303 (2 vs 1)" in err
    assert "K-000101" not in err and "K-000404" not in err  # the codes in place are not named
