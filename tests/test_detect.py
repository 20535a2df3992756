"""Detection: YOLO conversion of combination images (defects injected), the DALI letterbox graph, and a short
DALI-fed Ultralytics training that completes offline. Real files, real DALI (CPU), real Ultralytics."""
from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.data.manifest import Manifest, read_manifest, write_manifest
from pillsnap_dali.data.yolo import BoxRules, clean_boxes, convert_manifests, detection_manifests

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


def test_drop_incomplete_leaves_out_images_missing_a_pill_box(defect_tree, tmp_path):
    report = convert_manifests(detection_manifests(defect_tree), tmp_path / "yolo",
                               BoxRules(0.02, 0.9, drop_incomplete=True))
    skipped = {Path(p).stem for p, r in report.skipped_images if r == "fewer boxes than drugs in its name"}
    assert skipped == {"b_75", "c_90", "d_70"} and report.images["train"] == 3
    assert not (tmp_path / "yolo" / "labels" / "train" / "b_75.txt").exists()


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



def test_convert_stage_on_the_synthetic_tree_handles_every_injected_box_defect(synth_tree, tmp_path):
    """The real on-disk layout end to end (scan -> manifests -> YOLO), singles included as one-box images."""
    from pillsnap_dali.config import load_config
    from pillsnap_dali.data.yolo import convert_stage

    cfg = load_config(stage="demo", sets=[f"data.root={synth_tree.root}", f"data.artifacts={tmp_path}",
                                          "detect.include_singles=true"])
    yolo = convert_stage(cfg).parent
    report = json.loads((yolo / "convert_report.json").read_text())
    injected = json.loads((Path(synth_tree.root) / "defects.json").read_text())
    assert report["box_events"] == {
        "bad_length": injected["counts"]["bbox_bad_len"], "not_numeric": 0,
        "non_positive_size": injected["counts"]["bbox_nonpositive"],
        "outside_image": injected["counts"]["bbox_outside"], "clipped": 0,
        "merged": injected["counts"]["double_label"]}
    special = {Path(f).stem for k in ("combo_missing_pill_json", "double_label") for f in injected["files"][k]}
    combos = [f for f in (yolo / "labels").rglob("K-*-*_*.txt")]
    assert combos and report["images"]["train"] > len([f for f in combos if f.parent.name == "train"])
    for f in combos:  # one label file per image, one line per pill of its name
        n_codes = len(f.stem.split("_")[0].split("-")) - 1
        lines = f.read_text().splitlines()
        assert len(lines) == n_codes or (f.stem in special and 2 <= len(lines) < n_codes), f.name


# ------------------------------------------------------------------------------------------ DALI loader
def _loader(yolo: Path, split: str, augment=None, imgsz=64, batch_size=4, skip_log=None):
    from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split
    from pipelines import PipelineOptions

    return DaliDetectLoader(read_yolo_split(yolo / "images" / split), batch_size=batch_size, imgsz=imgsz,
                            augment=augment, shuffle=augment is not None, options=PipelineOptions(device="cpu"),
                            skip_log=skip_log, split=split)


def test_dali_batches_have_the_ultralytics_format(converted):
    yolo, _ = converted
    loader = _loader(yolo, "train")
    batches = list(loader)
    assert len(loader) == 2 and [b["img"].shape[0] for b in batches] == [4, 2]
    b = batches[0]
    assert str(b["img"].dtype) == "torch.uint8" and tuple(b["img"].shape[1:]) == (3, 64, 64)
    assert b["cls"].shape == (len(b["batch_idx"]), 1) and b["bboxes"].shape == (len(b["batch_idx"]), 4)
    assert b["ori_shape"][0] == (H, W) and b["ratio_pad"][0] == ((0.5, 0.5), (8, 0))  # 128 -> 64 high, 16 px pad
    assert int(b["batch_idx"].max()) == 3
    # the first box of a_70 in the letterboxed frame: x * 0.5 + 8 px pad, over 64
    first = b["bboxes"][b["batch_idx"] == 0][0].numpy()
    x, y, w, h = QUAD[0]
    np.testing.assert_allclose(first, [((x + w / 2) * 0.5 + 8) / 64, (y + h / 2) * 0.5 / 64, w / 2 / 64, h / 2 / 64],
                               atol=1e-5)


def test_dali_flips_move_boxes_with_the_pixels(converted):
    yolo, _ = converted
    flipped = next(iter(_loader(yolo, "val", augment={"fliplr": 1.0, "flipud": 1.0}, batch_size=1)))
    plain = next(iter(_loader(yolo, "val", batch_size=1)))
    assert plain["im_file"] == flipped["im_file"]
    np.testing.assert_array_equal(flipped["img"][0].numpy(), plain["img"][0].flip(1).flip(2).numpy())
    np.testing.assert_allclose(flipped["bboxes"][:, :2].numpy(), 1 - plain["bboxes"][:, :2].numpy(), atol=1e-5)


def test_corrupt_image_is_skipped_and_logged(converted, tmp_path):
    import shutil

    yolo, _ = converted
    split = tmp_path / "yolo"
    shutil.copytree(yolo / "labels" / "val", split / "labels" / "val")
    (split / "images" / "val").mkdir(parents=True)
    for p in (yolo / "images" / "val").iterdir():
        shutil.copy(p.resolve(), split / "images" / "val" / p.name)
    bad = split / "images" / "val" / "v0.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header reads, the pixels do not
    log_path = tmp_path / "run" / "skipped.csv"
    loader = _loader(split, "val", skip_log=SkipLog(log_path))
    batches = list(loader)
    assert [b["im_file"] for b in batches] == [(str(split / "images" / "val" / "v1.png"),)]
    assert loader.skipped and loader.skipped[0][0] == str(bad) and len(loader) == 1
    # the shared row plan's accounting (loaders.common.EpochPlan), as the classification loaders keep it
    assert loader.epoch_stats() == {"rows": 2, "yielded": 1, "skipped": 1, "excluded": 0, "dropped": 0}
    rows = list(csv.DictReader(log_path.open(encoding="utf-8")))  # written as found, the classification format
    assert [(r["path"], r["backend"], r["epoch"]) for r in rows] == [(str(bad), "dali-cpu/val", "0")]
    assert rows[0]["reason"].startswith("DALI: ")
    rerun = _loader(split, "val", skip_log=SkipLog(log_path))  # a rerun in the same run dir: left out at once
    assert len(rerun) == 1 and [b["im_file"] for b in rerun] == [(str(split / "images" / "val" / "v1.png"),)]
    assert rerun.skipped == [] and len(SkipLog(log_path)) == 1
    assert rerun.epoch_stats() == {"rows": 2, "yielded": 1, "skipped": 0, "excluded": 1, "dropped": 0}


def test_every_real_world_file_is_yielded_once_or_skipped(tmp_path, odd_images):
    """All of the odd-image corpus (tests/corpus.py, plus shared/testdata/real_images when present; valid, odd,
    broken; each with one box) through the detection loader: nothing stops an epoch, each file is yielded
    once or skipped with a reason, none is retried."""
    import shutil

    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    real = [p for p in odd_images if p.suffix.lower() not in (".txt", ".md")]
    for i, p in enumerate(real):
        dst = images / f"r{i:04d}.png"  # Ultralytics lists images by extension; the bytes stay what they are
        shutil.copy(p, dst)
        (labels / f"r{i:04d}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    loader = _loader(tmp_path, "train", augment={"fliplr": 0.5}, batch_size=8)
    first = [f for b in loader for f in b["im_file"]]
    skipped = {path for path, _ in loader.skipped}
    assert len(first) == len(set(first)) and set(first).isdisjoint(skipped)
    assert len(first) + len(skipped) == len(real) and len(skipped) == len(loader.skipped) > 0
    assert all(reason for _, reason in loader.skipped)
    assert any(reason.startswith("too many pixels: ") for _, reason in loader.skipped)
    second = [f for b in loader for f in b["im_file"]]
    assert sorted(second) == sorted(first) and len(loader.skipped) == len(skipped)  # no retries


def test_exif_rotated_image_is_letterboxed_upright(tmp_path):
    """DALI applies EXIF orientation; the letterbox geometry must use the upright size (80 wide x 40 high for
    a 40 x 80 file with orientation 6), or the resize would distort it."""
    images, labels = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 80), (200, 30, 30)).save(images / "rot.jpg", exif=exif.tobytes(), quality=95)
    (labels / "rot.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    loader = _loader(tmp_path, "val", imgsz=64)
    batch = next(iter(loader))
    assert batch["ori_shape"] == ((40, 80),) and batch["resized_shape"] == ((32, 64),)
    img = batch["img"][0].numpy()  # CHW uint8: rows 16..47 hold the picture, the rest is padding
    assert (img[:, :14] == 114).all() and (img[:, 50:] == 114).all()
    assert img[0, 20:44].mean() > 150 and img[1, 20:44].mean() < 80


def test_an_epoch_left_early_leaves_nothing_for_the_next(converted):
    """The next batch is scheduled before the current one is handed over: a consumer that stops early must
    not get that stale batch (other images' pixels and boxes) at the start of the next epoch."""
    yolo, _ = converted
    reference = [(b["im_file"], b["img"].clone(), len(b["bboxes"])) for b in _loader(yolo, "train", batch_size=2)]
    loader = _loader(yolo, "train", batch_size=2)
    next(iter(loader))  # stop after one batch
    again = [(b["im_file"], b["img"], len(b["bboxes"])) for b in loader]
    assert [f for f, _, _ in again] == [f for f, _, _ in reference]
    assert all(torch.equal(a, r) and na == nr for (_, a, na), (_, r, nr) in zip(again, reference))


def test_png_header_and_exif_are_read_without_decoding_the_pixels(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from pillsnap_dali.imageio import read_encoded_upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 80), (10, 20, 30)).save(tmp_path / "rot.png", exif=exif.tobytes())
    Image.new("RGB", (40, 80), (10, 20, 30)).save(tmp_path / "plain.png")

    def no_decode(self):
        raise AssertionError("pixels decoded")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    assert read_encoded_upright(str(tmp_path / "rot.png"), 10**6)[1:] == (None, (40, 80))
    assert read_encoded_upright(str(tmp_path / "plain.png"), 10**6)[1:] == (None, (80, 40))


def test_label_frame_of_an_exif_rotated_image_without_a_manifest_size_is_upright(tmp_path):
    """Boxes are normalized by the size the decoders deliver (EXIF applied), as the letterbox uses it."""
    from pillsnap_dali.data.yolo import image_size
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (80, 40), (10, 20, 30)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    Image.new("RGB", (80, 40), (10, 20, 30)).save(tmp_path / "plain.jpg")
    assert image_size(str(tmp_path / "rot.jpg")) == (40, 80)
    assert image_size(str(tmp_path / "plain.jpg")) == (80, 40)
    assert image_size(str(tmp_path / "rot.jpg"), (976, 1280)) == (976, 1280)  # the manifest's size wins
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(OSError):
        image_size(str(tmp_path / "empty.png"))


# ------------------------------------------------------------------------------------------ training
def test_dali_fed_ultralytics_training_completes_offline(converted, tmp_path, monkeypatch):
    from pillsnap_dali.training.detector import DetectRun, train_detector

    yolo, _ = converted
    monkeypatch.setenv("HOME", str(tmp_path))  # any download or settings write would land here: none may
    run = DetectRun(data_yaml=yolo / "data.yaml", model="yolo11n.yaml", epochs=1, imgsz=160, batch_size=4,
                    backend="dali-cpu", out=tmp_path / "runs" / "detect_test", device="cpu")
    summary = train_detector(run)
    out = run.out
    assert (out / "weights" / "best.pt").is_file() and (out / "weights" / "last.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"precision", "recall", "mAP50", "mAP50-95"} and metrics == summary
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("precision", "recall", "mAP50", "mAP50-95"))
    assert metrics["backend"] == "dali-cpu" and (out / "skipped.csv").read_text().startswith("row,split,path,reason,backend,epoch")
    assert not list(tmp_path.glob("*.pt")) and not list(Path.cwd().glob("yolo*.pt"))  # nothing fetched
    from pillsnap_dali.inference import load_detector  # our own checkpoint passes the weights_only loader
    assert type(load_detector(out / "weights" / "best.pt").model).__name__ == "DetectionModel"



def test_cli_ultralytics_backend_trains_from_an_existing_data_yaml(converted, tmp_path, capsys):
    from pillsnap_dali.commands import detect

    yolo, _ = converted
    rc = detect.main(["--data", str(yolo / "data.yaml"), "--model", "yolo11n.yaml", "--epochs", "1", "--imgsz", "160",
                      "--batch-size", "4", "--backend", "ultralytics", "--set", f"train.out={tmp_path}",
                      "--set", "train.device=cpu", "--set", "detect.workers=0"])
    assert rc == 0
    out = capsys.readouterr().out  # Ultralytics logs to stdout too: the summary is the last JSON object
    printed = json.loads(out[out.rindex("{\n"):])
    assert Path(printed["weights"]).is_file() and "mAP50" in printed
    assert json.loads((tmp_path / "detect_demo" / "metrics.json").read_text())["backend"] == "ultralytics"


def test_cli_refuses_a_missing_weights_file(converted, tmp_path, capsys):
    from pillsnap_dali.commands import detect

    yolo, _ = converted
    rc = detect.main(["--data", str(yolo / "data.yaml"), "--model", str(tmp_path / "nope.pt"),
                      "--set", f"train.out={tmp_path}"])
    assert rc == 2 and "nothing is downloaded" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ GPU (CUDA only)
def _needs_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
def test_gpu_graph_matches_the_cpu_graph(converted):
    from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split
    from pipelines import PipelineOptions

    _needs_cuda()
    yolo, _ = converted
    samples = read_yolo_split(yolo / "images" / "train")
    batches = {dev: next(iter(DaliDetectLoader(samples, batch_size=4, imgsz=64, augment=None, shuffle=False,
                                               options=PipelineOptions(device=dev, device_id=0 if dev == "gpu" else None))))
               for dev in ("cpu", "gpu")}
    gpu, cpu = batches["gpu"], batches["cpu"]
    assert gpu["img"].is_cuda and gpu["img"].shape == cpu["img"].shape
    assert (gpu["img"].cpu().float() - cpu["img"].float()).abs().mean() < 3  # resize kernels differ slightly
    np.testing.assert_allclose(gpu["bboxes"].numpy(), cpu["bboxes"].numpy(), atol=1e-6)


@pytest.mark.gpu
def test_gpu_dali_training_completes(converted, tmp_path):
    from pillsnap_dali.training.detector import DetectRun, train_detector

    _needs_cuda()
    yolo, _ = converted
    run = DetectRun(data_yaml=yolo / "data.yaml", model="yolo11n.yaml", epochs=1, imgsz=160, batch_size=4,
                    backend="dali", out=tmp_path / "detect_gpu", device="cuda:0")
    assert train_detector(run)["backend"] == "dali"
    assert (run.out / "weights" / "best.pt").is_file()


def test_ultralytics_import_leaves_pil_open_alone(tmp_path):
    """Ultralytics patches PIL.Image.open to pip-install pi-heif on unknown files; we put PIL's back, so a
    junk file is PIL's UnidentifiedImageError (a logged skip) and never an install attempt or an import error."""
    import PIL.Image

    from pillsnap_dali.weights import ultralytics_offline
    from pillsnap_dali.imageio import read_encoded

    ultralytics_offline()
    importlib.import_module("ultralytics")  # its import patches PIL.Image.open

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)  # a PNG signature: PIL's open is asked
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(junk)
    buf, reason = read_encoded(str(junk), 10_000_000)
    assert reason is None and buf is not None  # header unreadable: the decoder decides, nothing crashes
    text = tmp_path / "text.png"
    text.write_bytes(b"not an image at all" * 10)  # no signature: the format policy refuses it before PIL
    assert read_encoded(str(text), 10_000_000) == (None, "not an image")


def test_detect_flipud_comes_from_the_config(tmp_path):
    from pillsnap_dali.config import load_config
    from pillsnap_dali.training.detector import _train_args, run_from_config

    run = run_from_config(load_config("demo", sets=["detect.flipud=0.2"]), tmp_path / "data.yaml")
    assert run.flipud == 0.2 and _train_args(run, "cpu")["flipud"] == 0.2
    assert _train_args(run_from_config(load_config("demo"), tmp_path / "data.yaml"), "cpu")["flipud"] == 0.5


# ------------------------------------------------------------------------------------------ OS errors
def _last_line_error(err: str, path) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and str(path) in lines[-1] and "Traceback" not in err


def test_an_output_dir_that_cannot_be_created_is_one_line(converted, tmp_path, capsys):
    from pillsnap_dali.commands import detect

    yolo, _ = converted
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = detect.main(["--data", str(yolo / "data.yaml"), "--model", "yolo11n.yaml", "--epochs", "1", "--imgsz", "64",
                      "--set", f"train.out={blocker}", "--set", "train.device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write the detection run dir" in err and "Not a directory" in err
    _last_line_error(err, blocker)


def test_a_permission_error_names_the_path(converted, capsys):
    from pillsnap_dali.commands import detect

    yolo, _ = converted
    rc = detect.main(["--data", str(yolo / "data.yaml"), "--model", "yolo11n.yaml", "--set", "train.out=/sys/pillsnap"])
    err = capsys.readouterr().err
    assert rc == 2 and any(w in err for w in ("Operation not permitted", "Permission denied", "Read-only"))
    _last_line_error(err, "/sys/pillsnap")


def test_a_full_disk_during_training_is_one_line(converted, tmp_path):
    """Files may grow to 1 MB only (RLIMIT_FSIZE, as a full disk): the first weights file fails to save."""
    import subprocess
    import sys

    yolo, _ = converted
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); "
            "from pillsnap_dali.commands import detect; sys.exit(detect.main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "--data", str(yolo / "data.yaml"), "--model", "yolo11n.yaml",
                          "--epochs", "1", "--imgsz", "64", "--batch-size", "4", "--backend", "dali-cpu",
                          "--set", f"train.out={tmp_path}", "--set", "train.device=cpu"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HOME": str(tmp_path)})
    assert res.returncode == 2
    _last_line_error(res.stderr, tmp_path)
    assert "disk full?" in res.stderr.strip().splitlines()[-1]
