"""The synthetic AI Hub tree: layout, names, label JSONs, defects, determinism, CLI, demo cache."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillsnap_dali.config import load_config
from pillsnap_dali.commands.synth import main
from pillsnap_dali.data.synth import (COMPLETE_MARKER, DEFECT_KINDS, SynthError, SynthSummary, ensure_demo_data,
                                 generate)

# docs/aihub_format.md, written out here independently of the generator's own constant
IMAGE_KEYS = """file_name width height imgfile drug_N drug_S back_color drug_dir light_color camera_la camera_lo size
dl_idx dl_mapping_code dl_name dl_name_en img_key dl_material dl_material_en dl_custom_shape dl_company dl_company_en
di_company_mf di_company_mf_en item_seq di_item_permit_date di_class_no di_etc_otc_code di_edi_code chart drug_shape
thick leng_long leng_short print_front print_back color_class1 color_class2 line_front line_back img_regist_ts
form_code_name mark_code_front_anal mark_code_back_anal mark_code_front_img mark_code_back_img mark_code_front
mark_code_back change_date id""".split()
INT_KEYS = {"width", "height", "camera_la", "camera_lo", "size", "item_seq", "id"}
NUM_KEYS = {"thick", "leng_long", "leng_short"}
NAME_RE = re.compile(r"^K-(\d{6}(?:-\d{6}){0,3})_0_([012])_([01])_([012])_(60|70|75|90)_(\d{3})_200$")
RAW_TOP = "166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터/01.데이터"
REQUIRED = ("drug_N", "dl_name", "drug_shape", "color_class1", "dl_company")
LOOK = ("drug_shape", "color_class1", "color_class2", "form_code_name", "dl_custom_shape", "leng_long",
        "leng_short", "thick")


def _rel(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _png_ok(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def _digests(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(root: Path) -> dict:
    """Label path -> parsed JSON (None when unparsable), every JSON under the label folders."""
    return {p: _load(p) for p in root.rglob("*.json") if "라벨링데이터" in p.parts or "labels" in p.parts}


def _label_of(png: Path) -> Path:
    """The single-pill label path of an image of the raw layout (TS_n/K-x/stem.png -> TL_n/K-x_json/stem.json)."""
    folder = png.parent.parent.name.replace("TS_", "TL_", 1).replace("VS_", "VL_", 1)
    base = Path(str(png.parent.parent.parent).replace("원천데이터", "라벨링데이터"))
    return base / folder / f"{png.parent.name}_json" / f"{png.stem}.json"


def _iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_raw_layout_names_and_label_schema(synth_tree):
    root, codes = synth_tree.root, synth_tree.codes
    train = root / RAW_TOP / "1.Training"
    # classes are spread over TS_1/TS_2 with matching TL_1/TL_2; validation lives in 2.Validation
    singles = sorted(p.name for p in (train / "원천데이터/단일경구약제 5000종").iterdir())
    assert singles == ["TS_1_단일", "TS_2_단일"]
    assert sorted(p.name for p in (train / "라벨링데이터/단일경구약제 5000종").iterdir()) == ["TL_1_단일", "TL_2_단일"]
    assert (root / RAW_TOP / "2.Validation/원천데이터/경구약제조합 5000종/VS_1_조합").is_dir()
    assert len(codes) == 6 and codes == sorted(codes) and all(re.fullmatch(r"K-\d{6}", c) for c in codes)
    assert np.diff([int(c[2:]) for c in codes]).max() > 1            # drawn, not consecutive
    pngs = [p for p in root.rglob("*.png") if not p.name.endswith("_index.png")]
    assert all(NAME_RE.match(p.stem) for p in pngs), [p.name for p in pngs if not NAME_RE.match(p.stem)][:3]
    rotations = {int(NAME_RE.match(p.stem).group(6)) for p in pngs}
    assert rotations <= set(range(0, 360, 20)) and len(rotations) > 5
    meta_seen: dict = {}
    for path, doc in _labels(root).items():
        if doc is None or doc["images"][0]["drug_N"] is None:
            continue
        assert list(doc) == ["images", "type", "annotations", "categories"] and doc["type"] == "instances"
        info = doc["images"][0]
        assert list(info) == IMAGE_KEYS and len(info) == 50
        for key, value in info.items():
            want = int if key in INT_KEYS else (int, float) if key in NUM_KEYS else str
            assert value is None or isinstance(value, want), (key, value)
        assert info["file_name"] == info["imgfile"] == path.stem + ".png"
        assert (info["width"], info["height"]) == (122, 160)
        assert info["dl_idx"] == str(int(info["drug_N"][2:]) - 1) and info["dl_mapping_code"] == info["drug_N"]
        ann = doc["annotations"][0]
        assert list(ann) == ["area", "iscrowd", "bbox", "category_id", "ignore", "segmentation", "id", "image_id"]
        assert ann["category_id"] == 1 and ann["image_id"] == info["id"]
        assert doc["categories"] == [{"supercategory": "pill", "id": 1, "name": "Drug"}]
        if "단일경구약제 5000종" in path.parts and info["dl_name"]:
            meta = (info["dl_name"], info["item_seq"], info["color_class1"], info["print_front"])
            assert meta_seen.setdefault(info["drug_N"], meta) == meta   # metadata consistent per K-code
    assert set(meta_seen) == set(codes)


def test_combination_labels_one_json_per_pill(synth_tree):
    root = synth_tree.root
    defects = json.loads((root / "defects.json").read_text(encoding="utf-8"))["files"]
    missing = {Path(p).stem for p in defects["combo_missing_pill_json"]}
    extra = {Path(p).stem for p in defects["double_label"]}
    folders = [p for p in root.rglob("K-*") if p.is_dir() and "경구약제조합 5000종" in p.parts and "원천데이터" in p.parts]
    assert sorted(p.name for p in folders) == sorted(synth_tree.combos["train"] + synth_tree.combos["val"])
    for folder in folders:
        codes = ["K-" + c for c in folder.name[2:].split("-")]
        assert len(codes) in (3, 4) and codes == sorted(codes) and set(codes) <= set(synth_tree.codes)
        shots = sorted(p for p in folder.glob("*.png") if not p.name.endswith("_index.png"))
        assert [NAME_RE.match(p.stem).group(5) for p in shots] == ["70", "75", "90"]
        assert (folder / f"{folder.name}_index.png").is_file()
        label_dir = Path(str(folder).replace("원천데이터", "라벨링데이터").replace("/TS_", "/TL_").replace("/VS_", "/VL_"))
        label_dir = label_dir.with_name(folder.name + "_json")
        for shot in shots:
            docs = [_load(p) for p in sorted(label_dir.glob(f"K-*/{shot.stem}.json"))]
            want = len(codes) - (shot.stem in missing) + (shot.stem in extra)
            assert len(docs) == want
            assert {d["images"][0]["file_name"] for d in docs} == {shot.name}
            boxes = [d["annotations"][0]["bbox"] for d in docs]
            with Image.open(shot) as im:
                assert im.size == (122, 160)
            for b in boxes:
                assert 0 <= b[0] and b[0] + b[2] <= 122 and 0 <= b[1] and b[1] + b[3] <= 160 and min(b[2:]) > 10
            clean = [d["annotations"][0]["bbox"] for d in docs if d["images"][0]["drug_N"] in codes]
            assert len(clean) == len(codes) - (shot.stem in missing)
            assert all(_iou(a, b) < 0.2 for i, a in enumerate(clean) for b in clean[i + 1:])   # 2x2, apart


def _disk_defects(root: Path) -> dict:
    """Count the defects from what is on disk, independently of the generator's bookkeeping."""
    found = {k: 0 for k in DEFECT_KINDS}
    labels = _labels(root)
    image_stems = {p.stem for p in root.rglob("*.png")}
    label_stems = {p.stem for p in labels}
    for path, doc in labels.items():
        found["orphan_label"] += path.stem not in image_stems
        if doc is None:
            found["unparsable_json"] += 1
            continue
        info, bbox = doc["images"][0], doc["annotations"][0]["bbox"]
        found["null_metadata"] += any(info[k] in (None, "") for k in REQUIRED)
        found["zero_dimension"] += any(info[k] == 0 for k in ("thick", "leng_long", "leng_short"))
        if len(bbox) != 4:
            found["bbox_bad_len"] += 1
        elif min(bbox[2:]) <= 0:
            found["bbox_nonpositive"] += 1
        elif bbox[0] + bbox[2] > info["width"] or bbox[1] + bbox[3] > info["height"]:
            found["bbox_outside"] += 1
    for png in root.rglob("*.png"):
        if png.stat().st_size == 0:
            found["empty_file"] += 1
        elif not _png_ok(png):
            found["truncated_png"] += 1
        found["orphan_image"] += not png.name.endswith("_index.png") and png.stem not in label_stems
    return found


def test_defects_json_matches_disk(synth_tree):
    root = synth_tree.root
    report = json.loads((root / "defects.json").read_text(encoding="utf-8"))
    counts, files = report["counts"], report["files"]
    assert set(counts) == set(DEFECT_KINDS) and all(counts[k] >= 1 for k in DEFECT_KINDS)
    assert counts == synth_tree.defects and all(counts[k] == len(files[k]) for k in DEFECT_KINDS
                                                if k != "near_identical_pair")
    on_disk = _disk_defects(root)
    for kind in ("orphan_label", "unparsable_json", "null_metadata", "zero_dimension", "bbox_bad_len",
                 "bbox_nonpositive", "bbox_outside", "empty_file", "truncated_png", "orphan_image"):
        assert on_disk[kind] == counts[kind], kind
    listed = [f for k in DEFECT_KINDS for f in files[k]]
    assert all("/1.Training/" in f for f in listed)                    # the Validation part stays clean
    assert all((root / f).exists() for k, fs in files.items() if k != "orphan_label" for f in fs)
    # double_label: a second code's JSON on the same pill; near-identical pair: same look, other imprint
    extra = _load(root / files["double_label"][0])
    twins = [_load(p) for p in (root / files["double_label"][0]).parent.parent.glob(
        f"*/{Path(files['double_label'][0]).name}")]
    assert extra["images"][0]["drug_N"] not in Path(files["double_label"][0]).parent.parent.name
    assert max(_iou(extra["annotations"][0]["bbox"], t["annotations"][0]["bbox"]) for t in twins
               if t is not extra and t["images"][0]["drug_N"] != extra["images"][0]["drug_N"]) >= 0.9
    (a, b), = report["pairs"]
    assert {synth_tree.meta[a][k] for k in LOOK} != {None} and all(
        synth_tree.meta[a][k] == synth_tree.meta[b][k] for k in LOOK)
    assert synth_tree.meta[a]["print_front"] != synth_tree.meta[b]["print_front"]


def test_every_class_keeps_clean_images(synth_tree):
    root = synth_tree.root
    files = json.loads((root / "defects.json").read_text(encoding="utf-8"))["files"]
    bad = {Path(f).stem for k in DEFECT_KINDS for f in files[k]}
    for code in synth_tree.codes:
        shots = [p for p in root.glob(f"{RAW_TOP}/1.Training/원천데이터/*/TS_*/{code}/*.png") if p.stem not in bad]
        assert len(shots) >= 4, code
    assert synth_tree.counts["val"]["single_images"] == 6 * 2 and synth_tree.counts["val"]["combo_images"] == 3


def test_classes_are_visually_distinct(synth_tree):
    """Nearest class-mean of the pill's colour (inside its box) beats chance by far on the validation part."""
    def feature(png: Path) -> np.ndarray:
        doc = _load(_label_of(png))
        x, y, w, h = doc["annotations"][0]["bbox"]
        with Image.open(png) as im:
            crop = np.asarray(im.convert("RGB").crop((x + w // 4, y + h // 4, x + 3 * w // 4, y + 3 * h // 4)))
        return crop.reshape(-1, 3).mean(0)

    root = synth_tree.root
    means, hits = {}, 0
    skip = {Path(f).stem for fs in json.loads((root / "defects.json").read_text("utf-8"))["files"].values() for f in fs}
    for code in synth_tree.codes:
        shots = [p for p in root.glob(f"{RAW_TOP}/1.Training/원천데이터/*/TS_*/{code}/*.png") if p.stem not in skip]
        means[code] = np.mean([feature(p) for p in shots], axis=0)
    val = sorted(root.glob(f"{RAW_TOP}/2.Validation/원천데이터/단일경구약제 5000종/VS_*/K-*/*.png"))
    for png in val:
        guess = min(means, key=lambda c: np.linalg.norm(means[c] - feature(png)))
        hits += guess == png.parent.name
    assert hits / len(val) >= 0.6, f"{hits}/{len(val)}"


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    kw = dict(classes=4, images_per_class=2, combos=1, size=(96, 128), seed=5)
    one = generate(tmp_path / "a", workers=1, **kw)
    generate(tmp_path / "b", workers=2, **kw)
    other = generate(tmp_path / "c", workers=1, **{**kw, "seed": 6})
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b and len(a) > 20
    pngs = lambda d: {v for k, v in d.items() if k.endswith(".png")}  # noqa: E731
    assert one.codes != other.codes and not pngs(a) & pngs(c)
    loaded = SynthSummary.load(tmp_path / "a")
    assert loaded.codes == one.codes and loaded.counts == one.counts and loaded.root == tmp_path / "a"


def test_english_layout_and_dl_idx_k(tmp_path):
    s = generate(tmp_path / "en", classes=4, images_per_class=2, combos=1, size=(96, 128), layout="english",
                 dl_idx="k", workers=1)
    data = s.root / "data"
    code = s.codes[0]
    img = next((data / "train/images/single/TS_1_single" / code).glob("*.png"))
    label = data / "train/labels/single/TL_1_single" / f"{code}_json" / f"{img.stem}.json"
    assert _load(label)["images"][0]["dl_idx"] == str(int(code[2:]))
    combo = s.combos["train"][0]
    assert len(list((data / "train/images/combination/TS_1_combo" / combo).glob("*.png"))) == 4
    assert len(list((data / "train/labels/combination/TL_1_combo" / f"{combo}_json").glob("K-*/*.json"))) == 3 * (
        combo.count("-"))
    assert {p.name for p in (data / "val/images/single").iterdir()} == {"VS_1_single", "VS_2_single"}
    assert (data / "val/labels/combination/VL_1_combo" / f"{s.combos['val'][0]}_json").is_dir()
    assert s.counts["train"]["single_images"] == 8 and s.counts["val"]["single_images"] == 8
    assert s.defects == {k: 0 for k in DEFECT_KINDS}


def test_cli_underscore_variant(tmp_path, capsys):
    out = tmp_path / "u"
    rc = main(["--out", str(out), "--classes", "4", "--images-per-class", "2", "--combos", "1", "--size", "96x128",
               "--underscore", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 classes" in printed and "defects: none" in printed
    rels = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert not any(" " in r for r in rels)
    assert any("/단일경구약제_5000종/TS_1_단일/" in r for r in rels) and any("/경구약제조합_5000종/TL_1_조합/" in r for r in rels)
    assert main(["--out", str(out), "--classes", "3"]) == 2                        # not empty: refused
    assert main(["--out", str(tmp_path / "x"), "--size", "big"]) == 2
    with pytest.raises(SynthError, match="images_per_class >= "):
        generate(tmp_path / "d", classes=5, images_per_class=5, combos=1, defects=True)
    with pytest.raises(SynthError, match=">= 5 classes"):
        generate(tmp_path / "d", classes=4, images_per_class=9, combos=1, defects=True)
    with pytest.raises(SynthError, match="need more classes"):
        generate(tmp_path / "d", classes=3, images_per_class=2, combos=1)
    assert not (tmp_path / "d").exists()


def test_ensure_demo_data_generates_once(tmp_path):
    cfg = load_config(stage="demo", sets=[f"data.artifacts={tmp_path}", "data.synth.classes=4",
                                          "data.synth.images_per_class=2", "data.synth.combos=1",
                                          "data.synth.size=96x128"])
    root = ensure_demo_data(cfg, workers=1)
    assert root.parent == tmp_path / "synth" and (root / COMPLETE_MARKER).is_file()
    some = next(root.rglob("*.png"))
    some.unlink()
    assert ensure_demo_data(cfg, workers=1) == root and not some.exists()          # complete: reused
    (root / COMPLETE_MARKER).unlink()                                                # as if interrupted
    assert ensure_demo_data(cfg, workers=1) == root and some.exists()              # redone
    other = load_config(stage="demo", sets=[f"data.artifacts={tmp_path}", "data.synth.classes=4",
                                            "data.synth.images_per_class=2", "data.synth.combos=1",
                                            "data.synth.size=96x128", "data.synth.seed=1"])
    assert ensure_demo_data(other, workers=1) != root
    assert [p.name for p in (tmp_path / "synth").iterdir() if p.name.startswith(".")] == []


def test_thousands_of_classes_keep_every_look_unique_but_the_injected_pair():
    from pillsnap_dali.data.scan import count_near_identical
    from pillsnap_dali.data.synth import SynthSpec
    from pillsnap_dali.data.synth.looks import make_catalog

    for defects, want in ((False, 0), (True, 1)):  # Stage 4 size: the shape/colour triples repeat
        cat = make_catalog(SynthSpec(classes=4523, images_per_class=1, combos=0, defects=defects),
                            np.random.default_rng(0))
        assert count_near_identical(cat.meta) == want == len(cat.pairs)
