"""Detection: YOLO conversion of combination images (defects injected), the DALI letterbox graph, and a short
DALI-fed Ultralytics training that completes offline. Real files, real DALI (CPU), real Ultralytics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pillsnap_dali.manifest_io import Manifest, read_manifest, write_manifest
from pillsnap_dali.yolo_convert import BoxRules, clean_boxes, convert_manifests, detection_manifests

W, H = 96, 128  # the real 976 x 1280 at a tenth
QUAD = [[8, 10, 30, 36], [56, 12, 30, 34], [10, 74, 32, 36], [54, 76, 32, 34]]  # 2x2 pills, xywh pixels
COLOURS = [(250, 250, 250), (240, 200, 40), (200, 60, 60), (80, 160, 220)]


def draw_combo(path: Path, boxes: list, size=(W, H)) -> Path:
    """A combination shot: pills as ellipses filling their boxes on a grey background."""
    im = Image.new("RGB", size, (70, 70, 70))
    d = ImageDraw.Draw(im)
    for (x, y, w, h), c in zip(boxes, COLOURS * 4):
        d.ellipse([x, y, x + w, y + h], fill=c)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def combo_manifest(rows: list[tuple[Path, list, str]]) -> Manifest:
    """rows: (image path, [{"bbox", "code"}...], combo folder name)."""
    n = len(rows)
    return Manifest(None, [str(p) for p, _, _ in rows], [c.split("-")[0] + "-" + c.split("-")[1] for *_, c in rows],
                    ["combination"] * n, ["test"] * n, [c for *_, c in rows], [b for _, b, _ in rows],
                    [""] * n, [(W, H)] * n)


def boxes_of(quad, codes):
    return [{"bbox": list(b), "code": c} for b, c in zip(quad, codes)]


CODES = ["K-000101", "K-000202", "K-000303", "K-000404"]
COMBO = "K-000101-000202-000303-000404"


@pytest.fixture(scope="module")
def defect_tree(tmp_path_factory):
    """A manifest dir with detect_{train,val}.csv over real PNGs, one defect per train image."""
    root = tmp_path_factory.mktemp("combo")
    img = lambda name, combo=COMBO: root / "TS_1_조합" / combo / name  # noqa: E731
    clean = boxes_of(QUAD, CODES)
    train = [
        (draw_combo(img("a_70.png"), QUAD), clean, COMBO),  # 4 pills, 4 boxes
        (draw_combo(img("b_75.png"), QUAD), clean[:3] + [{"bbox": [54, 76, 32], "code": CODES[3]}], COMBO),
        (draw_combo(img("c_90.png"), QUAD), clean[:3] + [{"bbox": [54, 76, -5, 34], "code": CODES[3]}], COMBO),
        (draw_combo(img("d_70.png"), QUAD), clean[:3] + [{"bbox": [6567, 62, 31, 31], "code": CODES[3]}], COMBO),
        (draw_combo(img("e_75.png"), QUAD), clean[:3] + [{"bbox": [70, 76, 27, 34], "code": CODES[3]}], COMBO),
        (draw_combo(img("f_90.png"), QUAD), clean + [{"bbox": [9, 10, 30, 36], "code": "K-000505"}], COMBO),
        (draw_combo(img("x_index.png"), QUAD), [], COMBO),
    ]
    empty = img("g_70.png")
    empty.write_bytes(b"")
    train.append((empty, clean, COMBO))
    other = "K-000111-000222-000333"
    val = [(draw_combo(img(f"v{i}.png", other), QUAD[:3]), boxes_of(QUAD[:3], CODES[:3]), other) for i in range(2)]
    write_manifest(combo_manifest(train), root / "detect_train.csv")
    write_manifest(combo_manifest(val), root / "detect_val.csv")
    return root


@pytest.fixture(scope="module")
def converted(defect_tree):
    report = convert_manifests(detection_manifests(defect_tree), defect_tree / "yolo", BoxRules(0.02, 0.9))
    return defect_tree / "yolo", report


def label_rows(yolo: Path, split: str, stem: str) -> np.ndarray:
    return np.loadtxt(yolo / "labels" / split / f"{stem}.txt", ndmin=2)


def test_four_pill_image_keeps_four_boxes_normalized(converted):
    yolo, _ = converted
    rows = label_rows(yolo, "train", "a_70")
    assert rows.shape == (4, 5) and (rows[:, 0] == 0).all()
    x, y, w, h = QUAD[0]
    np.testing.assert_allclose(rows[0, 1:], [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], atol=1e-5)
    assert (yolo / "images" / "train" / "a_70.png").is_symlink()  # never a copy of the image


@pytest.mark.parametrize("stem,reason", [("b_75", "bad_length"), ("c_90", "non_positive_size"),
                                         ("d_70", "outside_image")])
def test_bad_boxes_dropped_and_reported(converted, stem, reason):
    yolo, report = converted
    assert label_rows(yolo, "train", stem).shape == (3, 5)
    assert [e.reason for e in report.box_events if Path(e.image).stem == stem] == [reason]


def test_slightly_outside_clipped_merged_duplicates_and_skips(converted):
    yolo, report = converted
    e = label_rows(yolo, "train", "e_75")  # [70, 76, 27, 34] sticks out by 1 px of 96: clipped to x2 = 96
    assert e.shape == (4, 5) and abs((e[3, 1] + e[3, 3] / 2) - 1.0) < 1e-5
    assert label_rows(yolo, "train", "f_90").shape == (4, 5)  # two drugs on one pill: one box
    counts = json.loads((yolo / "convert_report.json").read_text())
    assert counts["box_events"] == {"bad_length": 1, "not_numeric": 0, "non_positive_size": 1, "outside_image": 1,
                                    "clipped": 1, "merged": 1}
    assert counts["skipped_images"] == {"index_image": 1, "unreadable image: empty file": 1}
    assert report.images == {"train": 6, "val": 2} and report.boxes["val"] == 6
    assert report.fewer_boxes_than_codes == 3  # b, c, d kept 3 of the 4 drugs their folder names
    data = (yolo / "data.yaml").read_text()
    assert "train: images/train" in data and "0: pill" in data


def test_clean_boxes_tolerance_is_a_fraction_of_the_side():
    rules = BoxRules(clip_tolerance=0.05, merge_iou=0.9)
    inside, ev = clean_boxes([{"bbox": [-4, 0, 20, 20]}], 100, 100, rules)  # 4 % outside: clipped
    assert inside == [[0.0, 0.0, 16.0, 20.0]] and ev[0].reason == "clipped"
    out, ev = clean_boxes([{"bbox": [-6, 0, 20, 20]}], 100, 100, rules)  # 6 % outside: dropped
    assert out == [] and ev[0].reason == "outside_image"
    out, ev = clean_boxes([{"bbox": ["a", 0, 20, 20]}, {"bbox": None}], 100, 100, rules)
    assert out == [] and [e.reason for e in ev] == ["not_numeric", "bad_length"]


def test_reconversion_replaces_the_old_split(defect_tree, converted):
    yolo, _ = converted
    stale = yolo / "labels" / "train" / "stale.txt"
    stale.write_text("0 0.5 0.5 0.1 0.1\n")
    convert_manifests(detection_manifests(defect_tree), yolo, BoxRules())
    assert not stale.exists() and label_rows(yolo, "train", "a_70").shape == (4, 5)


def test_val_split_without_images_is_an_error(tmp_path, defect_tree):
    m = read_manifest(defect_tree / "detect_train.csv")
    bad = m.subset([6])  # only the index picture
    with pytest.raises(ValueError, match="no usable image left in the val split"):
        convert_manifests({"train": [m], "val": [bad]}, tmp_path / "yolo", BoxRules())
