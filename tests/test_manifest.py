"""Stage manifests: sampling, splitting, reuse, determinism, accounting, legacy import, the CLI."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from pillsnap_dali.benchmarks.scan import TreeSpec, label_json, make_tree, source_dirs
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.config import ManifestConfig, load_config
from pillsnap_dali.commands.manifest import main
from pillsnap_dali.data.build import build_manifests, import_legacy, plan_quotas
from pillsnap_dali.data.checks import check_manifests, kcode_problem
from pillsnap_dali.data.manifest import ManifestError, guess_encoding, read_manifest

from oslimits import READ_ONLY, error_lines, run_cli



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("aihub")
    return make_tree(root, TreeSpec(n_images=60, classes=6, combos=4, per_source=3, val_per_class=2))


def _paths(out: Path, split: str, kind="manifest") -> list:
    return read_manifest(out / f"{kind}_{split}.csv").paths


def _quarantined(out: Path) -> dict:
    with open(out / "quarantine.csv", encoding="utf-8") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def _check_accounting(out: Path, report: dict) -> None:
    """Every discovered image is in exactly one split, or quarantined, or counted as not sampled."""
    split_paths = [p for s in ("train", "val", "test") for p in _paths(out, s)]
    assert len(split_paths) == len(set(split_paths))
    q_images = {p for p, r in _quarantined(out).items() if r != "orphan label"}
    assert not q_images & set(split_paths)
    acc = report["accounting"]
    assert acc["in_splits"] == len(split_paths) and acc["quarantined_images"] == len(q_images)
    assert len(split_paths) + len(q_images) + report["not_sampled"] == acc["discovered_images"]


def test_demo_build_takes_everything_and_splits_by_combination(tree, tmp_path):
    cfg = load_config(stage="demo")
    out = tmp_path / "demo"
    report = build_manifests(cfg, tree, out)
    _check_accounting(out, report)
    splits = report["splits"]
    assert splits["train"] + splits["val"] == 60 + 12 and splits["test"] == 12 and report["not_sampled"] == 0
    assert 12 <= splits["val"] <= 12 + 12   # two units of each class; a combination unit holds 3 images
    assert report["dl_idx_convention"] == "raw: K-1" and report["quarantine"]["by_reason"] == {"index image": 4}
    train, val = read_manifest(out / "manifest_train.csv"), read_manifest(out / "manifest_val.csv")
    assert set(val.codes) == set(train.codes) == set(ClassMap.load(out / "class_map.json").codes)
    combos = lambda m: {c for c, t in zip(m.combo_ids, m.image_types) if t == "combination"}  # noqa: E731
    assert combos(train) and combos(val) and not combos(train) & combos(val)
    cm = ClassMap.load(out / "class_map.json")
    assert cm.codes == sorted(cm.codes) and cm.meta["K-000003"]["dl_name"] == "테스트정 3mg"
    det = {s: read_manifest(out / f"detect_{s}.csv") for s in ("train", "val", "test")}
    assert len(det["train"]) + len(det["val"]) == 12 and len(det["val"]) == 3
    assert all(len(b) == 3 for b in det["train"].boxes) and not combos(det["train"]) & combos(det["val"])
    # the two-stage score (detect_val) never sees a combination the classifier trained on
    assert combos(det["val"]) and not combos(det["val"]) & combos(train)
    assert not set(det["val"].paths) & set(train.paths)


def test_detection_val_combinations_stay_out_of_classifier_train_for_every_seed(tree, tmp_path):
    for seed in range(6):
        out = tmp_path / f"s{seed}"
        build_manifests(load_config(stage="demo", sets=[f"manifest.seed={seed}"]), tree, out)
        train = read_manifest(out / "manifest_train.csv")
        det_val = read_manifest(out / "detect_val.csv")
        assert det_val.paths and not set(det_val.combo_ids) & set(train.combo_ids), seed


def test_same_inputs_same_bytes_and_reuse(tree, tmp_path):
    cfg = load_config(stage="1", sets=["manifest.images=24", "manifest.classes=4"])
    a, b = tmp_path / "a", tmp_path / "b"
    ra = build_manifests(cfg, tree, a, seed=7)
    build_manifests(cfg, tree, b, seed=7)
    for f in ("manifest_train.csv", "manifest_val.csv", "manifest_test.csv", "detect_train.csv",
              "class_map.json", "quarantine.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert ra["got"] == {"images": 24, "classes": 4, "smaller_than_stage": False}
    assert all(n["val"] >= 1 and n["train"] >= 1 for n in ra["per_class"].values())
    stamp = (a / "manifest_train.csv").stat().st_mtime_ns
    assert build_manifests(cfg, tree, a, seed=7) == ra                       # reused, not rewritten
    assert (a / "manifest_train.csv").stat().st_mtime_ns == stamp
    rc = build_manifests(cfg, tree, a, seed=8)                               # another seed: rebuilt
    assert rc["inputs"]["seed"] == 8 and (a / "manifest_train.csv").stat().st_mtime_ns != stamp


def test_a_label_fixed_in_place_makes_the_manifests_stale(tree, tmp_path):
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(tree, root, symlinks=True)
    cfg, out = load_config(stage="demo"), tmp_path / "m"
    first = build_manifests(cfg, root, out)
    assert build_manifests(cfg, root, out) == first                          # same files: reused
    label = sorted(Path(root).rglob("*.json"))[0]
    label.write_text(label.read_text(encoding="utf-8") + " ", encoding="utf-8")  # same count, other content
    again = build_manifests(cfg, root, out)
    assert again["inputs"]["files"]["files"] == first["inputs"]["files"]["files"]
    assert again["inputs"]["files"]["digest"] != first["inputs"]["files"]["digest"]


def test_plan_quotas_tiered_and_smaller_tree():
    sizes = {f"K-{i:06d}": 100 - i for i in range(1, 8)}
    units = dict.fromkeys(sizes, 5)
    m = ManifestConfig(sampling="tiered", tiers=[[2, 50], [3, 20], [1, 5]])
    quotas, _ = plan_quotas(sizes, units, m, seed=0)
    assert quotas == {"K-000001": 50, "K-000002": 50, "K-000003": 20, "K-000004": 20, "K-000005": 20,
                      "K-000006": 5}
    uniform, notes = plan_quotas(sizes | {"K-000099": 1}, units | {"K-000099": 1},
                                 ManifestConfig(images=30, classes=3), seed=0)
    assert len(uniform) == 3 and sum(uniform.values()) == 30 and "K-000099" not in uniform and notes


def test_odd_images_mixed_in_every_image_accounted(tree, tmp_path, odd_images):
    root = tmp_path / "mixed"
    shutil.copytree(tree, root)
    img_dir, lbl_dir = source_dirs(root, "raw", "train", "single", 9)
    (img_dir / "K-000777").mkdir(parents=True)
    (lbl_dir / "K-000777_json").mkdir(parents=True)
    for i, src in enumerate(odd_images):
        stem = f"K-000777_{i:03d}_{src.stem[:20]}"
        shutil.copyfile(src, img_dir / "K-000777" / f"{stem}{src.suffix}")
        (lbl_dir / "K-000777_json" / f"{stem}.json").write_text(
            label_json(stem, "K-000777", [1, 1, 5, 5], i), encoding="utf-8")
    cfg = load_config(stage="demo")
    for mode in ("header", "full"):
        out = tmp_path / mode
        report = build_manifests(cfg, root, out, verify=mode)
        _check_accounting(out, report)
        reasons = {r.split(":", 1)[0] for r in _quarantined(out).values()}
        assert {"bad header", "too many pixels", "truncated png"} <= reasons
        assert "K-000777" in report["per_class"] and report["defects"]["truncated_png"] >= 1
        texts = sum(p.suffix == ".txt" for p in odd_images)   # the corpora's text files: labelled, not images
        assert report["scan"]["other_files"] == texts >= 1 and report["defects"]["orphan_label"] == texts
    assert "decode failed" in reasons and report["verify"]["checked"] >= len(odd_images) - texts


def test_legacy_import_quarantines_missing_and_unknown_classes(tree, tmp_path):
    singles = sorted(str(p) for p in Path(tree).rglob("K-00000[12]_*.png"))
    rows = [[p, Path(p).name[:8], "single", "TS_1"] for p in singles[:3] + singles[-3:]]
    rows.append([str(tmp_path / "gone.png"), "K-000001", "single", "TS_1"])
    for name, extra in (("train.csv", rows), ("val.csv", [[singles[5], "K-000009", "single", "VS_1"]])):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([["image_path", "mapping_code", "image_type", "source"], *extra])
    out = tmp_path / "legacy"
    report = import_legacy([tmp_path / "train.csv", tmp_path / "val.csv"], load_config(), out, verify="header")
    assert report["splits"] == {"train": 6, "val": 0}
    assert ClassMap.load(out / "class_map.json").codes == ["K-000001", "K-000002"]
    q = _quarantined(out)
    assert q[str(tmp_path / "gone.png")] == "missing file"
    assert q[singles[5]] == "class not in training manifest: K-000009"


def test_legacy_import_reports_images_and_combinations_shared_with_train(tree, tmp_path, caplog):
    combos = sorted(str(p) for p in Path(tree).rglob("*.png") if "조합" in str(p) and "_index" not in p.name)
    by_folder: dict = {}
    for p in combos:
        by_folder.setdefault(Path(p).parent.name, []).append(p)
    (folder, shots), = list(by_folder.items())[:1]
    code = folder.split("-")[0] + "-" + folder.split("-")[1]
    single = sorted(str(p) for p in Path(tree).rglob(f"{code}_*.png"))[0]
    head = [["image_path", "mapping_code", "image_type", "source"]]
    train = [[p, code, "combination", "TS_1"] for p in shots[:-1]] + [[single, code, "single", "TS_1"]]
    val = [[shots[-1], code, "combination", "TS_1"], [single, code, "single", "TS_1"]]  # split by image
    for name, rows in (("train.csv", train), ("val.csv", val)):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(head + rows)
    with caplog.at_level("WARNING"):
        report = import_legacy([tmp_path / "train.csv", tmp_path / "val.csv"], load_config(), tmp_path / "out")
    assert report["leaks"] == {"val": {"same_image": 1, "same_combination": 1}}
    assert "optimistic" in caplog.text
    assert report["splits"] == {"train": len(shots), "val": 2}  # counted and said, never moved


def test_a_non_utf8_file_name_is_quarantined_not_a_crash(tree, tmp_path):
    import os
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(tree, root, symlinks=True)
    png = sorted(Path(root).rglob("K-000001_*.png"))[0]
    label = next(Path(root).rglob(f"{png.stem}.json"))
    cp949 = "경구약제".encode("cp949")  # not UTF-8: Python names it with surrogate escapes
    for f in (png, label):
        os.rename(os.fsencode(f), os.fsencode(f.with_name("x")) + cp949 + os.fsencode(f.suffix))
    out = tmp_path / "out"
    report = build_manifests(load_config(stage="demo"), root, out)
    _check_accounting(out, report)
    bad = [r for p, r in _quarantined(out).items() if "\\x" in p]
    assert bad and bad[0].startswith("path is not valid UTF-8")


def test_cli(tree, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--data-root", str(tree), "--stage", "demo", "--out", str(out), "--seed", "3"]) == 0
    assert "test 12 images, 6 classes" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["inputs"]["seed"] == 3
    assert main(["--data-root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_synthetic_tree_header_verify_report(synth_tree, tmp_path):
    expected = json.loads((Path(synth_tree.root) / "defects.json").read_text(encoding="utf-8"))["counts"]
    out = tmp_path / "synth"
    report = build_manifests(load_config(stage="demo"), synth_tree.root, out, verify="header")
    _check_accounting(out, report)
    assert report["defects"] == expected
    assert report["splits"]["test"] > 0 and set(report["per_class"]) == set(synth_tree.codes)
    q = _quarantined(out)
    assert {"truncated png", "empty file", "no label", "unparsable json", "index image"} <= set(q.values())


def test_ensure_manifests_builds_into_the_stage_dir(tree, tmp_path):
    from pillsnap_dali.data.build import ensure_manifests
    cfg = load_config(stage="1", sets=[f"data.root={tree}", f"data.artifacts={tmp_path / 'art'}",
                                       "manifest.images=12", "manifest.classes=3"])
    out = ensure_manifests(cfg)
    assert out == tmp_path / "art" / "stage1" and (out / "report.json").exists()
    assert len(ClassMap.load(out / "class_map.json")) == 3


def test_training_keeps_the_manifest_steps_split_and_verification(tree, tmp_path):
    """manifest --verify header --seed 7, then train/detect (ensure_manifests with the config's defaults):
    the verified split is kept, not rebuilt unverified with seed 42; later, no --data-root is needed."""
    from pillsnap_dali.data.build import ensure_manifests
    sets = [f"data.artifacts={tmp_path / 'art'}", "manifest.images=24", "manifest.classes=4"]
    out = tmp_path / "art" / "stage1"
    assert main(["--data-root", str(tree), "--stage", "1", "--out", str(out), "--verify", "header", "--seed", "7",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    built = (out / "manifest_train.csv").read_bytes()
    stamp = (out / "manifest_train.csv").stat().st_mtime_ns
    assert ensure_manifests(load_config(stage="1", sets=[f"data.root={tree}", *sets])) == out
    assert (out / "manifest_train.csv").stat().st_mtime_ns == stamp  # reused as built
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["seed"] == 7 and report["inputs"]["verify"] == "header"
    assert ensure_manifests(load_config(stage="1", sets=sets)) == out  # no data.root: the stage's manifests
    assert (out / "manifest_train.csv").read_bytes() == built


def test_legacy_class_map_json_forms_keep_their_ids_or_are_refused():
    by_code = ClassMap.from_dict({"K-000009": 1, "K-000002": 0, "K-000005": 2})
    by_id = ClassMap.from_dict({"2": "K-000005", "0": "K-000002", "1": "K-000009"})
    assert by_code.codes == by_id.codes == ["K-000002", "K-000009", "K-000005"]
    for bad in ({"K-000001": 1, "K-000002": 2},          # counted from 1: renumbering would shift every output
                {"K-000001": 0, "K-000002": 2},          # a gap
                {"K-000001": 0, "K-000002": 0},          # one id twice
                {"1": "K-000001", "2": "K-000002"}):
        with pytest.raises(ValueError, match="ids must be 0..1"):
            ClassMap.from_dict(bad)


def test_sizes_written_as_floats_by_pandas_still_read_and_garbage_is_a_clear_error(tmp_path):
    from pillsnap_dali.data.manifest import ManifestError
    f = tmp_path / "m.csv"
    f.write_text("image_path,mapping_code,image_type,source,width,height\n/x.png,K-000001,single,s,976.0,1280.0\n",
                 encoding="utf-8")
    assert read_manifest(f).sizes == [(976, 1280)]
    f.write_text("image_path,mapping_code,image_type,source,width,height\n/x.png,K-000001,single,s,wide,1280\n",
                 encoding="utf-8")
    with pytest.raises(ManifestError, match="line 2 has a width/height"):
        read_manifest(f)


def test_an_older_format_build_is_rebuilt_from_its_tree_without_data_root(tree, tmp_path):
    from pillsnap_dali.data.build import FORMAT_VERSION, ensure_manifests
    sets = [f"data.artifacts={tmp_path / 'art'}", "manifest.images=24", "manifest.classes=4"]
    out = ensure_manifests(load_config(stage="1", sets=[f"data.root={tree}", *sets]))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["inputs"]["format_version"] = FORMAT_VERSION - 1  # a build of the leaky split
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    ensure_manifests(load_config(stage="1", sets=sets))  # no data.root: rebuilt from the recorded tree
    again = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert again["inputs"]["format_version"] == FORMAT_VERSION and again["inputs"]["data_root"] == str(tree.resolve())


def test_without_data_root_a_stage_checks_its_manifests_against_their_tree_or_uses_them_as_they_are(tree, tmp_path):
    import shutil

    from pillsnap_dali.data.build import ManifestError, ensure_manifests
    root = tmp_path / "tree"
    shutil.copytree(tree, root, symlinks=True)
    sets = [f"data.artifacts={tmp_path / 'art'}", "manifest.images=24", "manifest.classes=4"]
    out = ensure_manifests(load_config(stage="1", sets=[f"data.root={root}", *sets]))
    label = sorted(root.rglob("*.json"))[0]
    label.write_text(label.read_text(encoding="utf-8") + " ", encoding="utf-8")  # the tree changed
    digest = json.loads((out / "report.json").read_text(encoding="utf-8"))["inputs"]["files"]["digest"]
    ensure_manifests(load_config(stage="1", sets=sets))  # no data.root: checked against the recorded tree
    again = json.loads((out / "report.json").read_text(encoding="utf-8"))["inputs"]["files"]["digest"]
    assert again != digest
    shutil.rmtree(root)  # the tree is gone: the manifests are used as they are
    assert ensure_manifests(load_config(stage="1", sets=sets)) == out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["inputs"]["format_version"] = 0
    (out / "report.json").write_text(json.dumps(report), encoding="utf-8")
    with pytest.raises(ManifestError, match="older format"):
        ensure_manifests(load_config(stage="1", sets=sets))


@pytest.mark.parametrize("cell, why", [("K-000001", None), ("K-000001\u200b", "invisible character U+200B"),
                                       ("\ufeffK-000001", "invisible character U+FEFF"),
                                       ("k-000001", "lower case"), ("K- 000001", "spaces inside"),
                                       ("K-000001 K-000002", "two K-codes in one cell"),
                                       ("K-000001/K-000001_0_2.png", "a path, not a K-code"),
                                       ("K-00001", "not K- and six digits"), ("K-٠٠٠٠٠١", "not K- and six digits")])
def test_a_k_code_cell_is_k_and_six_digits_or_named_for_what_it_is(cell, why):
    got = kcode_problem(cell)
    assert got == why if why is None or not why.startswith("invisible") else got.startswith(why)


def _legacy_csv(path: Path, rows: list, encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows([["image_path", "mapping_code", "image_type", "source"], *rows])
    return path


def _singles(tree, n: int) -> list:
    return [[str(p), p.name[:8], "single", "TS_1"] for p in sorted(Path(tree).rglob("K-00000[1-3]_*.png"))[:n]]


def test_legacy_manifests_are_checked_like_built_ones(tree, tmp_path):
    rows = _singles(tree, 30)
    codes = sorted({r[1] for r in rows})
    train = [r for c in codes for r in [x for x in rows if x[1] == c][:-2]]
    val = [r for c in codes[:-1] for r in [x for x in rows if x[1] == c][-2:]]   # none of the last class
    dup, moved = train[0], train[1]
    m_train = read_manifest(_legacy_csv(tmp_path / "train.csv", train + [dup]))
    m_val = read_manifest(_legacy_csv(tmp_path / "val.csv", val + [[moved[0], codes[1], "single", "VS_1"]]))
    found = {f.check: f for f in check_manifests(m_train, m_val).findings}
    assert {k: f.level for k, f in found.items()} == {"duplicate_rows": "warning", "code_conflict": "warning",
                                                       "val_in_train": "warning", "class_without_val": "warning"}
    assert found["duplicate_rows"].count == 1 and dup[0] in found["duplicate_rows"].message
    assert found["class_without_val"].message.endswith(codes[-1]) and moved[0] in found["code_conflict"].message
    bad = train[:3] + [[train[3][0], "k-000002", "single", "TS_1"], [train[4][0], "K-000002\u200b", "single", "x"],
                       [train[0][0], codes[-1], "single", "TS_1"]]
    checks = check_manifests(read_manifest(_legacy_csv(tmp_path / "bad.csv", bad)),
                             read_manifest(_legacy_csv(tmp_path / "same.csv", bad[::-1])))
    assert {(f.check, f.level) for f in checks.errors} == {("kcode_format", "error"), ("code_conflict", "error"),
                                                           ("same_split", "error")}
    with pytest.raises(ManifestError) as err:
        checks.raise_errors()
    assert "'k-000002' (lower case, line 5)" in str(err.value) and "U+200B" in str(err.value)
    assert str(tmp_path / "bad.csv") in str(err.value) and "training images" in str(err.value)


def test_a_manifest_that_is_not_utf8_names_the_encoding_it_probably_is(tree, tmp_path, capsys):
    rows = [[p, c, t, "TS_1_단일"] for p, c, t, _ in _singles(tree, 4)]
    korean = _legacy_csv(tmp_path / "excel.csv", rows, encoding="cp949")
    with pytest.raises(ManifestError, match=r"excel\.csv is not UTF-8 .*probably cp949"):
        read_manifest(korean)
    assert main(["--legacy", str(korean), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(korean) in err and "cp949" in err
    western = _legacy_csv(tmp_path / "western.csv", [[str(tmp_path / "café.png"), "K-000001", "single", "x"]],
                          encoding="cp1252")
    with pytest.raises(ManifestError, match="probably cp1252"):
        read_manifest(western)
    assert guess_encoding("\ufeffimage_path".encode("utf-16")) == "utf-16"


def test_manifest_checks_reach_the_manifest_cli_and_the_trainings_report(synth_tree, tree, tmp_path, capsys):
    from pillsnap_dali.commands import train
    rows = _singles(tree, 12)
    bad = _legacy_csv(tmp_path / "bad.csv", rows[:-1] + [[rows[-1][0], "K-000003 ", "single", "TS_1"],
                                                        [rows[0][0], "K-12345", "single", "TS_1"]])
    assert main(["--legacy", str(bad), "--out", str(tmp_path / "refused")]) == 2
    assert "'K-12345' (not K- and six digits, line 14)" in capsys.readouterr().err  # the trailing space: trimmed
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "built"
    build_manifests(load_config("demo"), synth_tree.root, out)
    src = list(csv.DictReader(open(out / "manifest_train.csv", encoding="utf-8")))
    legacy = [[r["image_path"], r["mapping_code"], r["image_type"], r["source"]] for r in src]
    _legacy_csv(tmp_path / "manifest_train.csv", legacy + legacy[:2])
    _legacy_csv(tmp_path / "manifest_val.csv", [r for r in legacy[-6:] if r[1] != legacy[0][1]])
    assert main(["--legacy", str(tmp_path / "manifest_train.csv"), str(tmp_path / "manifest_val.csv"),
                 "--out", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    assert "warning:" in printed and "2 duplicate row(s)" in printed
    checks = json.loads((tmp_path / "imported" / "report.json").read_text(encoding="utf-8"))["checks"]
    assert {c["check"] for c in checks} >= {"duplicate_rows", "val_in_train", "class_without_val"}
    assert train.main(["--manifest", str(tmp_path / "manifest_train.csv"), "--out", str(tmp_path / "runs"),
                       "--name", "r", "--model", "test_efficientnet", "--img-size", "32", "--epochs", "1",
                       "--batch-size", "16", "--set", "loader.threads=1", "--set", "loader.workers=1"]) == 0
    report = (tmp_path / "runs" / "r" / "report.md").read_text(encoding="utf-8")
    assert "manifest checks: warning duplicate_rows: 2 duplicate row(s)" in report
    assert "class_without_val" in report and "val_in_train" in report


def test_a_full_disk_or_an_unwritable_dir_is_one_line_naming_the_path(tree, tmp_path):
    out = tmp_path / "out"
    run = run_cli("pillsnap_dali.manifest", ["--data-root", tree, "--stage", "demo", "--out", out],
                  file_limit=3000)                      # every file over 3 kB fails, as on a full disk
    (line,) = error_lines(run)
    assert run.returncode == 2 and line.startswith(f"error: {out}/") and ": File too large" in line, line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "report.json").exists()
    run = run_cli("pillsnap_dali.manifest", ["--data-root", tree, "--stage", "demo", "--out", READ_ONLY / "m"])
    assert run.returncode == 2 and error_lines(run) == [f"error: {READ_ONLY}: Operation not permitted"]
    legacy = _legacy_csv(tmp_path / "train.csv", _singles(tree, 4))
    run = run_cli("pillsnap_dali.manifest", ["--legacy", legacy, tmp_path / "val_missing.csv", "--out", out])
    assert run.returncode == 2 and error_lines(run) == [f"error: --legacy {tmp_path / 'val_missing.csv'} does not "
                                                        "exist"]
