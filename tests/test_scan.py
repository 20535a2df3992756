"""The AI Hub scanner on small real trees: layouts, pairing, combination merging, defects."""
import json
import os
import unicodedata
from pathlib import Path

import pytest

from pillsnap_dali.benchmarks.scan import TreeSpec, label_json, make_tree, source_dirs
from pillsnap_dali.data.scan import scan_tree, tree_fingerprint


def _tree(tmp_path, layout="raw", **kw) -> Path:
    spec = TreeSpec(n_images=kw.pop("n_images", 12), classes=kw.pop("classes", 4), combos=kw.pop("combos", 2),
                    per_source=2, layout=layout, **kw)
    return make_tree(tmp_path / layout, spec)


def _label(root, part, kind, folder, stem, code="K-000001", **changes) -> Path:
    """Rewrite (or create) one label JSON with some image keys or the bbox changed."""
    _, lbl = source_dirs(root, "raw", part, kind, 1)
    sub = lbl / f"{folder}_json" / (code if kind == "combination" else "")
    sub.mkdir(parents=True, exist_ok=True)
    doc = json.loads(label_json(stem, code, changes.pop("bbox", [300, 400, 380, 420]), 1))
    doc["images"][0].update(changes)
    path = sub / f"{stem}.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", ["raw", "raw_underscore", "english"])
def test_layouts_pair_images_and_merge_combination_boxes(tmp_path, layout):
    root = _tree(tmp_path, layout, val_per_class=1)
    res = scan_tree(root)
    assert res.counts["images"] == 12 + 4 + 2 * 4 and res.counts["index_images"] == 2
    assert len(res.records) == 12 + 4 + 2 * 3
    assert sorted(p for p, _ in res.quarantine) == sorted(
        str(p) for p in Path(root).rglob("*_index.png"))
    combos = [r for r in res.records if r.image_type == "combination"]
    assert len(combos) == 6
    for r in combos:
        assert len(r.boxes) == 3 == len(r.label_paths) == len(r.codes)   # one box per pill JSON, merged
        assert r.code == r.codes[0] == r.combo_id.split("-", 1)[0] + "-" + r.combo_id.split("-")[1]
        assert {b["code"] for b in r.boxes} == set(r.codes)
    singles = [r for r in res.records if r.image_type == "single"]
    assert all(Path(r.image_path).name.startswith(r.code + "_") for r in singles)
    assert {r.part for r in singles} == {"train", "val"}
    assert all(r.source.startswith("VS_" if r.part == "val" else "TS_") for r in singles)
    assert all(r.width == 976 and r.height == 1280 and os.path.isabs(r.image_path) for r in res.records)
    assert res.dl_idx_convention == "raw: K-1"
    assert set(res.meta) == {f"K-{i:06d}" for i in range(1, 5)}
    assert res.meta["K-000001"]["dl_name"] == "테스트정 1mg"
    assert not any(v for k, v in res.defects.items() if k != "near_identical_pair")
    assert tree_fingerprint(root)["files"] == res.counts["images"] + res.counts["labels"]


def test_defects_are_counted_and_nothing_crashes(tmp_path):
    root = _tree(tmp_path, classes=3, n_images=15, combos=1)
    img_dir, _ = source_dirs(root, "raw", "train", "single", 1)
    singles = sorted((img_dir / "K-000001").glob("*.png"))
    stems = [p.stem for p in singles]
    lbl = lambda s: _label(root, "train", "single", "K-000001", s)  # noqa: E731
    lbl(stems[0]).write_text('{"images": [{"file_name"', encoding="utf-8")        # unparsable
    _label(root, "train", "single", "K-000001", stems[1], bbox=[1, 2, 3])         # bbox_bad_len
    _label(root, "train", "single", "K-000001", stems[2], bbox=[6567, 625, 311, 315])  # bbox_outside
    _label(root, "train", "single", "K-000001", stems[3], bbox=[10, 10, 0, 50], dl_name=None)  # nonpositive+null
    (img_dir / "K-000001" / "K-000001_9_9_9_9_90_000_200.png").write_bytes(b"\x89PNG")  # orphan image
    lbl("K-000001_7_7_7_7_90_000_200")                                             # orphan label
    (img_dir / "K-000002" / singles[0].name.replace("K-000001", "K-000002")).write_bytes(b"")  # empty file
    combo_dir = next((source_dirs(root, "raw", "train", "combination", 1)[1]).iterdir())
    first_pill = sorted(combo_dir.iterdir())[0]
    victim = sorted(first_pill.iterdir())[0]
    victim.unlink()                                                                # combo_missing_pill_json
    twin = sorted(sorted(combo_dir.iterdir())[1].iterdir())[1]                     # double label on image 1
    doc = json.loads(twin.read_text(encoding="utf-8"))
    doc["annotations"][0]["bbox"] = json.loads(
        (sorted(combo_dir.iterdir())[2] / twin.name).read_text(encoding="utf-8"))["annotations"][0]["bbox"]
    twin.write_text(json.dumps(doc), encoding="utf-8")
    res = scan_tree(root)
    d = res.defects
    assert (d["unparsable_json"], d["bbox_bad_len"], d["bbox_outside"], d["bbox_nonpositive"]) == (1, 1, 1, 1)
    assert (d["null_metadata"], d["orphan_image"], d["orphan_label"], d["empty_file"]) == (1, 1, 1, 1)
    assert (d["combo_missing_pill_json"], d["double_label"]) == (1, 1)
    reasons = dict(res.quarantine)
    assert reasons[str(singles[0])] == "unparsable json"
    assert reasons[str(img_dir / "K-000001" / "K-000001_9_9_9_9_90_000_200.png")] == "no label"
    assert sorted(reasons.values()).count("orphan label") == 1 and "empty file" in reasons.values()
    bad_box = next(r for r in res.records if Path(r.image_path).stem == stems[1])
    assert bad_box.boxes == [{"bbox": [1, 2, 3], "code": "K-000001"}]    # kept raw for the converter
    short = next(r for r in res.records if Path(r.image_path).stem == victim.stem)
    assert len(short.boxes) == 2 and len(short.codes) == 3


def test_class_fallbacks_and_dl_idx_convention(tmp_path):
    root = _tree(tmp_path, classes=2, n_images=4, combos=0)
    img_dir, _ = source_dirs(root, "raw", "train", "single", 1)
    s1, s2 = sorted(p.stem for p in (img_dir / "K-000002").glob("*.png"))
    _label(root, "train", "single", "K-000002", s1, code="K-000002", drug_N=None, dl_idx="2")
    _label(root, "train", "single", "K-000002", s2, code="K-000002", drug_N="", dl_mapping_code="")
    res = scan_tree(root)
    assert [r.code for r in res.records if "K-000002" in r.image_path] == ["K-000002", "K-000002"]
    assert res.dl_idx_convention == "mixed" and res.counts["dl_idx_k"] == 1
    assert res.defects["null_metadata"] == 2


def test_a_label_with_empty_metadata_does_not_describe_its_class(tmp_path):
    root = _tree(tmp_path, classes=2, n_images=6, combos=0)
    img_dir, _ = source_dirs(root, "raw", "train", "single", 1)
    first = sorted(p.stem for p in (img_dir / "K-000002").glob("*.png"))[0]  # scanned first
    _label(root, "train", "single", "K-000002", first, code="K-000002", dl_name=None, drug_shape="",
           color_class1=None)
    res = scan_tree(root)
    assert res.defects["null_metadata"] == 1
    meta = res.meta["K-000002"]
    assert meta["dl_name"] and meta["drug_shape"] and meta["color_class1"]  # from a complete label


def test_combination_pill_label_without_codes_takes_its_pill_folder(tmp_path):
    root = _tree(tmp_path, classes=4, n_images=4, combos=1)
    combo = next(r for r in scan_tree(root).records if r.image_type == "combination")
    label = Path(combo.label_paths[1])  # .../K-a-b-c_json/K-b/<stem>.json
    doc = json.loads(label.read_text(encoding="utf-8"))
    doc["images"][0].update(drug_N=None, dl_mapping_code=None)
    label.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    res = scan_tree(root)
    again = next(r for r in res.records if r.image_path == combo.image_path)  # not quarantined "no class"
    assert [b["code"] for b in again.boxes] == [b["code"] for b in combo.boxes] and label.parent.name in again.codes
    assert res.defects["null_metadata"] == 1


def test_a_double_label_does_not_hide_a_missing_pill(tmp_path):
    root = _tree(tmp_path, classes=4, n_images=4, combos=1)
    combo = next(r for r in scan_tree(root).records if r.image_type == "combination")
    gone, kept = Path(combo.label_paths[2]), Path(combo.label_paths[0])
    gone.unlink()  # one pill has no JSON ...
    doc = json.loads(kept.read_text(encoding="utf-8"))  # ... and another pill is labelled twice
    doc["images"][0].update(drug_N="K-099999", dl_mapping_code="K-099999")
    doc["annotations"][0]["bbox"] = [v + 1 for v in doc["annotations"][0]["bbox"]]
    extra = kept.parent.parent / "K-099999" / kept.name
    extra.parent.mkdir()
    extra.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    res = scan_tree(root)
    again = next(r for r in res.records if r.image_path == combo.image_path)
    assert len(again.boxes) == len(again.codes) == 3  # as many labels as codes, yet one pill is missing
    assert res.defects["combo_missing_pill_json"] == 1 and res.defects["double_label"] == 1


def test_a_source_unzipped_into_a_folder_of_its_own_name_pairs(tmp_path):
    root = _tree(tmp_path, classes=3, n_images=6, combos=1)
    before = scan_tree(root)
    for kind in ("single", "combination"):
        for d in source_dirs(root, "raw", "train", kind, 1):  # TS_1_x/TS_1_x/..., TL_1_x/TL_1_x/...
            inner = d / d.name
            inner.mkdir()
            for child in list(d.iterdir()):
                if child != inner:
                    child.rename(inner / child.name)
    after = scan_tree(root)
    assert len(after.records) == len(before.records) > 0
    assert not any(r.startswith(("orphan", "no label")) for _, r in after.quarantine)
    assert sorted(r.code for r in after.records) == sorted(r.code for r in before.records)


def test_k_convention_and_nfd_folder_names(tmp_path):
    root = _tree(tmp_path, classes=1, n_images=2, combos=0)
    img_dir, lbl_dir = source_dirs(root, "raw", "train", "single", 1)
    for s in [p.stem for p in (img_dir / "K-000001").glob("*.png")]:
        _label(root, "train", "single", "K-000001", s, dl_idx="1")
    for d in (img_dir, lbl_dir):  # a zip extracted on macOS: decomposed Hangul
        d.rename(d.with_name(unicodedata.normalize("NFD", d.name)))
    res = scan_tree(root)
    assert len(res.records) == 2 and res.dl_idx_convention == "k"


def test_empty_or_unrelated_root_gives_empty_result(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"123")
    res = scan_tree(tmp_path)
    assert res.records == [] and res.counts["images"] == 0 and res.dl_idx_convention == "unknown"


def test_synthetic_tree_defects_match_the_generator(synth_tree):
    expected = json.loads((Path(synth_tree.root) / "defects.json").read_text(encoding="utf-8"))
    res = scan_tree(synth_tree.root)
    want = dict(expected["counts"], truncated_png=0)   # a truncated PNG needs --verify header|full
    assert res.defects == want and expected["counts"]["truncated_png"] >= 1
    reasons = dict(res.quarantine)
    files = {k: [str(Path(synth_tree.root) / f) for f in v] for k, v in expected["files"].items()}
    assert all(reasons[p] == "no label" for p in files["orphan_image"])
    assert all(reasons[p] == "empty file" for p in files["empty_file"])
    assert all(reasons[p] == "orphan label" for p in files["orphan_label"])
    by_path = {r.image_path: r for r in res.records}
    for p in files["combo_missing_pill_json"]:
        assert len(by_path[p].boxes) == len(by_path[p].codes) - 1
    assert res.dl_idx_convention == "raw: K-1"
    assert set(res.meta) >= set(synth_tree.codes)


def test_symlink_loop_is_walked_once(tmp_path):
    root = _tree(tmp_path, classes=1, n_images=2, combos=0)
    img_dir, _ = source_dirs(root, "raw", "train", "single", 1)
    (img_dir / "K-000001" / "loop").symlink_to(img_dir)
    (root / "again").symlink_to(root)
    res = scan_tree(root)
    assert len(res.records) == 2


def test_dangling_link_and_same_name_images_are_quarantined_not_lost(tmp_path):
    """Every image file ends in exactly one place: a dangling symlink does not crash the scan, and of two
    images with one name (x.png, x.jpg) one is kept and the other quarantined, whatever the walk order."""
    root = _tree(tmp_path, classes=1, n_images=2, combos=0)
    img_dir, _ = source_dirs(root, "raw", "train", "single", 1)
    folder = img_dir / "K-000001"
    pngs = sorted(folder.glob("*.png"))
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    twin = pngs[0].with_suffix(".jpg")
    twin.write_bytes(pngs[0].read_bytes())
    res = scan_tree(root)
    quarantined = dict(res.quarantine)
    # the PNG (the release's format) is kept, the x.jpg copy beside it is quarantined
    assert sorted(r.image_path for r in res.records) == sorted([str(pngs[0]), str(pngs[1])])
    assert "same name" in quarantined[str(twin)]
    assert "unreadable" in quarantined[str(folder / "gone.png")]
    images = [p for p, _ in res.quarantine if not p.endswith(".json")]
    assert len(res.records) + len(images) == res.counts["images"]


def test_a_fifo_under_a_label_name_is_quarantined_never_read(tmp_path):
    """A FIFO (or a device) named like a label JSON: opened without blocking, its image quarantined with the
    reason, the scan goes on (before, the scan blocked for ever on the read)."""
    root = _tree(tmp_path)
    _, lbl = source_dirs(root, "raw", "train", "single", 1)
    label = sorted(lbl.rglob("*.json"))[0]
    label.unlink()
    os.mkfifo(label)
    res = scan_tree(root)
    reasons = {Path(p).stem: r for p, r in res.quarantine}
    assert "not a regular file (a FIFO)" in reasons[label.stem] and str(label) in reasons[label.stem]
    assert res.defects["unparsable_json"] == 1
    assert len(res.records) > 0
