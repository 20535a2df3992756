"""Hostile inputs, each class through the CLIs: one ``error:`` line naming the file and exit status 2, before
anything is built. Row ids of a manifest, the parts of a checkpoint (checked like a config file), config files
(encoding, duplicate keys, ranges), class map JSONs, manifest cells."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pillsnap_dali.commands import evaluate, export, predict, train
from pillsnap_dali.config import ConfigError, PreprocessConfig, load_config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.data.manifest import ManifestError, read_manifest
from pillsnap_dali.training.checkpoint import CheckpointError, FORMAT, load_checkpoint, preprocess_dict, \
    save_checkpoint, validate_checkpoint

CODES = ["K-000101", "K-000202"]
HEADER = "row,image_path,mapping_code,image_type,source\n"


def _one_error(capsys, *names) -> str:
    err = capsys.readouterr().err  # train logs INFO lines on stderr too: the error line is the one to count
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(str(n) in lines[0] for n in names), (names, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_ck(tmp_path_factory) -> dict:
    """A complete checkpoint of ours (a tiny timm model, the demo config), as a dict to corrupt and save."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CODES))
    cfg = load_config("demo", sets=["preprocess.img_size=32"])
    return {"format": FORMAT, "model_name": "test_efficientnet", "num_classes": len(CODES),
            "model": model.state_dict(), "ema": None, "deploy": "model", "class_map": ClassMap(CODES).to_dict(),
            "preprocess": preprocess_dict(cfg.preprocess), "config": cfg.to_dict()}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "pill.png"
    Image.new("RGB", (40, 48), (200, 180, 30)).save(p)
    return p


def _save(tmp_path, ck: dict, name="bad.pt") -> Path:
    path = tmp_path / name
    save_checkpoint(path, ck)
    return path


def _manifest(tmp_path, rows: list[str], name="m.csv", header=HEADER) -> Path:
    p = tmp_path / name
    p.write_text(header + "".join(r + "\n" for r in rows), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------- 4. row ids
def test_repeated_row_ids_are_refused_naming_the_lines_in_the_reader_and_through_train(tmp_path, capsys):
    """Two manifests concatenated: every repeated id named with both of its lines; never de-duplicated later."""
    rows = [f"{i},/x/{n}.png,K-000101,single,s" for n in ("a", "b") for i in range(2)]
    m = _manifest(tmp_path, rows)
    with pytest.raises(ManifestError) as err:
        read_manifest(m)
    assert "row 0 on lines 2 and 4" in str(err.value) and "row 1 on lines 3 and 5" in str(err.value)
    val = _manifest(tmp_path, ["0,/x/v.png,K-000101,single,s"], "val.csv")
    assert train.main(["--manifest", str(m), "--val-manifest", str(val), "--out", str(tmp_path / "runs")]) == 2
    assert "repeated row id" in _one_error(capsys, m)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cell, why", [("x7", "not an integer"), ("-1", "out of range"), ("1e400", "not an integer"),
                                       ("99999999999999999999", "out of range")])
def test_a_row_id_that_is_no_row_number_is_refused(tmp_path, cell, why):
    m = _manifest(tmp_path, ["0,/x/a.png,K-000101,single,s", f"{cell},/x/b.png,K-000101,single,s"])
    with pytest.raises(ManifestError, match=f"line 3 has a row id .*{why}"):
        read_manifest(m)


def test_unique_row_ids_keep_their_numbers_and_pandas_floats_still_read(tmp_path):
    m = _manifest(tmp_path, ["7,/x/a.png,K-000101,single,s", "3.0,/x/b.png,K-000101,single,s"])
    assert read_manifest(m).file_rows == [7, 3]
    legacy = _manifest(tmp_path, ["/x/a.png,K-000101,single,s"] * 2, "legacy.csv",
                       "image_path,mapping_code,image_type,source\n")
    assert read_manifest(legacy).file_rows == [0, 1]  # no row column: line order, unique by construction


@pytest.mark.parametrize("cells, what", [("1e400,5", "not a number"), ("4294967296,5", "out of range"),
                                         ("-3,5", "out of range")])
def test_a_huge_or_non_numeric_size_cell_is_one_line(tmp_path, capsys, cells, what):
    m = _manifest(tmp_path, [f"0,/x/a.png,K-000101,single,s,{cells}"],
                  header="row,image_path,mapping_code,image_type,source,width,height\n")
    with pytest.raises(ManifestError, match=f"line 2 has a width/height .*{what}"):
        read_manifest(m)


def test_a_cell_past_the_csv_field_limit_is_one_error_line_through_train(tmp_path, capsys):
    m = _manifest(tmp_path, ['0,/x/a.png,K-000101,single,s,"[' + "1," * 100_000 + '1]"'],
                  header="row,image_path,mapping_code,image_type,source,boxes\n")
    val = _manifest(tmp_path, ["0,/x/v.png,K-000101,single,s"], "val.csv")
    assert train.main(["--manifest", str(m), "--val-manifest", str(val), "--out", str(tmp_path / "runs")]) == 2
    assert "not a readable CSV" in _one_error(capsys, m)


# --------------------------------------------------------------------------- 5. checkpoints like configs
def _corrupt(ck: dict, key: str, value) -> dict:
    out = dict(ck)
    parts = key.split(".")
    if len(parts) == 2:
        out[parts[0]] = {**out[parts[0]], parts[1]: value}
    elif value is _DROP:
        del out[key]
    else:
        out[key] = value
    return out


_DROP = object()
# each class of fault in a checkpoint: (key, value, words of the one error line)
_FAULTS = [("preprocess.img_size", 100000, "preprocess.img_size"), ("preprocess.std", [0.0, 0.0, 0.0], "preprocess.std"),
           ("preprocess.mean", [0.5], "preprocess.mean"), ("preprocess.resize_mode", "stretch", "resize_mode"),
           ("preprocess.colour", 1, "unknown config key"), ("class_map", _DROP, "lacks class_map"),
           ("class_map", {"codes": ["K-000101", "K-000101"]}, "duplicate K-codes"), ("class_map", "K-000101", "class_map is str"),
           ("config", "stage: 3", "config is str"), ("config.train", {"lr": -1}, "train.lr"),
           ("model_name", _DROP, "lacks model_name"), ("deploy", "ema", "deploy is 'ema'"), ("model", [1], "model is list"),
           ("model", {"fc.weight": "x"}, "are not tensors")]


@pytest.mark.parametrize("key, value, words", _FAULTS, ids=[f[0] + ":" + f[2] for f in _FAULTS])
def test_a_checkpoint_is_validated_like_a_config_in_the_library(tmp_path, good_ck, key, value, words):
    path = _save(tmp_path, _corrupt(good_ck, key, value))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(load_checkpoint(path), path)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, words", [([1, 2, 3], "holds a list"), ({"fc.bias": torch.zeros(2)}, "classifier layer"),
                                            ("weights", "holds a str")], ids=["list", "no_head", "str"])
def test_a_file_that_is_no_state_dict_is_one_line_in_predict(tmp_path, capsys, image, content, words):
    path = tmp_path / "plain.pt"
    torch.save(content, path)
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps(CODES), encoding="utf-8")
    assert predict.main([str(image), "--classifier", str(path), "--class-map", str(cm), "--mode", "single",
                         "--device", "cpu"]) == 2
    assert words in _one_error(capsys, path)


def test_a_valid_checkpoint_passes_with_its_own_preprocessing(tmp_path, good_ck):
    checked = validate_checkpoint(good_ck, "x.pt")
    assert (checked.preprocess, checked.class_map.codes, checked.config.stage) == \
        (PreprocessConfig(img_size=32), CODES, "demo")


@pytest.mark.parametrize("key, value, words", [_FAULTS[0], _FAULTS[5], _FAULTS[8]], ids=["img_size", "no_map", "str_cfg"])
def test_predict_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys, good_ck, image, key, value, words):
    path = _save(tmp_path, _corrupt(good_ck, key, value))
    assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--device", "cpu"]) == 2
    assert words in _one_error(capsys, path)


@pytest.mark.parametrize("key, value, words", [_FAULTS[1], _FAULTS[8], _FAULTS[10]], ids=["std0", "str_cfg", "no_name"])
def test_evaluate_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys, good_ck, key, value, words):
    path = _save(tmp_path, _corrupt(good_ck, key, value))
    m = _manifest(tmp_path, ["0,/x/a.png,K-000101,single,s"])
    assert evaluate.main(["--checkpoint", str(path), "--manifest", str(m), "--device", "cpu",
                          "--out", str(tmp_path / "ev")]) == 2
    assert words in _one_error(capsys, path)
    assert not (tmp_path / "ev").exists()


def test_export_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys, good_ck):
    path = _save(tmp_path, _corrupt(good_ck, *_FAULTS[1][:2]))
    assert export.main(["--classifier", str(path), "--out", str(tmp_path / "exp")]) == 2
    assert "preprocess.std" in _one_error(capsys, path)
    assert not (tmp_path / "exp").exists()


def test_resume_refuses_a_checkpoint_with_missing_keys_or_a_bad_config(tmp_path, capsys, good_ck, manifests):
    args = ["--manifest", str(manifests / "manifest_train.csv"), "--out", str(tmp_path / "runs"),
            "--model", "test_efficientnet", "--img-size", "32", "--device", "cpu"]
    path = _save(tmp_path, good_ck)  # complete as a classifier, but no optimizer, RNG or run state
    assert train.main(args + ["--resume", str(path)]) == 2
    line = _one_error(capsys, path)
    assert "cannot be resumed" in line and "optimizer" in line
    path = _save(tmp_path, _corrupt(good_ck, "config.train", {"epochs": 0}), "cfg.pt")
    assert train.main(args + ["--resume", str(path)]) == 2
    assert "train.epochs" in _one_error(capsys, path)


@pytest.mark.parametrize("payload, name", [(print, "print"), (os.system, "posix.system")])
def test_a_refused_pickle_is_one_short_line(tmp_path, capsys, image, payload, name):
    class Payload:
        def __reduce__(self):
            return (payload, ("true",))
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": Payload()}, path)
    assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--device", "cpu"]) == 2
    line = _one_error(capsys, path)
    assert f"GLOBAL {name}" in line and len(line) < 160 + len(str(path)) and "PyTorch" not in line, line


# ------------------------------------------------------------------------------ config files, class maps
def test_a_utf16_config_file_is_one_line_naming_it(tmp_path, capsys, good_ck, image):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  lr: 0.01\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="not UTF-8 .*UTF-16"):
        load_config("demo", path=f)
    path = _save(tmp_path, good_ck, "ok.pt")
    assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--config", str(f)]) == 2
    assert "UTF-16" in _one_error(capsys, f)


def test_a_duplicate_yaml_key_is_an_error_with_file_and_line(tmp_path, capsys, good_ck, image):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  lr: 0.01\n  epochs: 3\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config("demo", path=f)
    assert "duplicate key 'lr' (first on line 2) at line 4" in str(err.value) and str(f) in str(err.value)
    top = tmp_path / "top.yaml"
    top.write_text("train:\n  lr: 0.01\nmodel:\n  name: resnet18\ntrain:\n  epochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate key 'train'"):
        load_config("demo", path=top)
    path = _save(tmp_path, good_ck, "ok.pt")
    assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--config", str(f)]) == 2
    assert "duplicate key" in _one_error(capsys, f)


@pytest.mark.parametrize("text", ['{"codes": ["K-000101", ', "\ufeff\x00\x01", '{"codes": 5}'])
def test_a_broken_class_map_json_is_one_line_naming_it(tmp_path, capsys, good_ck, image, text):
    cm = tmp_path / "class_map.json"
    cm.write_bytes(text.encode("utf-16") if "\x00" in text else text.encode("utf-8"))
    path = _save(tmp_path, good_ck, "ok.pt")
    assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--device", "cpu",
                         "--class-map", str(cm)]) == 2
    _one_error(capsys, cm)


@pytest.mark.parametrize("key, value", [("train.epochs", 0), ("train.max_skipped", 1.5),
                                        ("train.max_skipped", -0.1)])
def test_epochs_zero_and_max_skipped_out_of_unit_range_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", sets=[f"{key}={value}"])
    assert load_config("demo", sets=["train.max_skipped=1", "train.epochs=1"]).train.max_skipped == 1


# ------------------------------------------------------------------------- 6. one image-format policy
_FORMATS = {"gif.png": "GIF", "tiff.png": "TIFF", "tiff.jpg": "TIFF", "ppm.png": "PNM", "ico.png": "ICO"}


@pytest.fixture(scope="module")
def odd_formats(tmp_path_factory) -> dict:
    """Good PNGs, then images of formats the project does not take, each under a name of one it takes."""
    import io
    folder = tmp_path_factory.mktemp("formats")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8))
    files = {}
    for i in range(6):
        rgb.save(folder / f"good{i}.png")
        files[folder / f"good{i}.png"] = None
    for name, fmt in _FORMATS.items():
        buf = io.BytesIO()
        rgb.save(buf, {"PNM": "PPM"}.get(fmt, fmt))
        (folder / name).write_bytes(buf.getvalue())
        files[folder / name] = f"unsupported format: {fmt}"
    (folder / "text.png").write_bytes(b"just some text\n")
    files[folder / "text.png"] = "not an image"
    return files


@pytest.mark.parametrize("backend", ["dali-cpu", "pil"])
def test_an_unsupported_format_is_skipped_alike_by_both_backends_and_verify(tmp_path, odd_formats, backend):
    """One decision (imageio.format_problem) for the loaders, verify's header mode and open_rgb: the same
    reason for the same file, wherever it is read."""
    from pillsnap_dali.data.manifest import Manifest
    from pillsnap_dali.imageio import check_header, format_problem, open_rgb, read_encoded
    from pillsnap_dali.loaders import build_loader
    from pillsnap_dali.skiplog import SkipLog
    paths = [str(p) for p in odd_formats]
    n = len(paths)
    m = Manifest(None, paths, ["K-000101"] * n, ["single"] * n, ["t"] * n, [f"c{i}" for i in range(n)],
                 [[] for _ in range(n)], [""] * n)
    cfg = load_config("demo", sets=["preprocess.img_size=32", "train.batch_size=4", "loader.threads=1",
                                    "loader.workers=0"])
    log = SkipLog(tmp_path / "skipped.csv")
    loader = build_loader(m, [0] * n, cfg, train=False, device=torch.device("cpu"), backend=backend, skip_log=log)
    loader.set_epoch(0)
    yielded = {paths[r] for b in loader for r in b.rows.tolist()}
    reasons = {e["path"]: e["reason"] for e in log.entries}
    for p, why in odd_formats.items():
        p = str(p)
        assert check_header(p, 10**7) == why
        if why is None:
            assert p in yielded and p not in reasons
            continue
        assert p not in yielded and reasons[p].endswith(why), (p, reasons.get(p))
        assert read_encoded(p, 10**7) == (None, why)
        with pytest.raises(ValueError, match=f"^{why}$"):
            open_rgb(p)
        with open(p, "rb") as fh:
            assert format_problem(fh.read(64)) == why


def test_a_header_pil_cannot_identify_reads_cleanly(tmp_path):
    from pillsnap_dali.imageio import read_encoded_upright
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)  # a PNG signature, then no IHDR
    buf, reason, size = read_encoded_upright(str(p), 10**7)
    assert reason == "unreadable header: UnidentifiedImageError: cannot identify image file", reason


# --------------------------------------------------------------- 6. a last training batch of one sample
@pytest.mark.parametrize("backend, device", [
    ("pil", "cpu"), ("dali-cpu", "cpu"),
    pytest.param("dali", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")])])
def test_a_last_training_batch_of_one_sample_is_left_out_not_a_batchnorm_crash(tmp_path, capsys, backend, device):
    """9 rows, batch size 8, 32 px: the epoch's last batch holds one sample; a BatchNorm model (timm's
    test_efficientnet) cannot train on it (a 1x1 feature map), so it is left out with a warning, the run ends.
    On CUDA the probe runs under the step's AMP and channels_last layout."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 9), ("val", 4)):
        lines = [HEADER.strip()]
        for i in range(n):
            p = tmp_path / f"{name}{i}.png"
            Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)).save(p)
            lines.append(f"{i},{p},{CODES[i % 2]},single,s")
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc = train.main(["--manifest", str(tmp_path / "train.csv"), "--val-manifest", str(tmp_path / "val.csv"),
                     "--out", str(tmp_path / "runs"), "--name", "r", "--model", "test_efficientnet", "--img-size", "32",
                     "--batch-size", "8", "--epochs", "1", "--device", device, "--backend", backend,
                     "--set", "loader.workers=0", "--set", "loader.threads=1", "--set", "train.warmup_epochs=0",
                     "--set", "evaluate.after_training=false"])
    assert rc == 0
    assert "a batch of one sample (row [" in capsys.readouterr().err
    ck = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    assert ck["step"] == 1 and ck["epoch_complete"]  # the one full batch trained; the lone sample did not


# ------------------------------------------------------- 7. a checkpoint's preprocessing wins over the CLI's
def test_the_command_lines_preprocessing_never_overrides_a_checkpoints(tmp_path, capsys, good_ck):
    """Our checkpoint carries the preprocessing it was trained with (32 px squash here): predict with
    ``--set preprocess.*`` or ``--config`` gives exactly the scores of predict without them (and says so); a
    plain state dict takes the command line's."""
    from pillsnap_dali.training.model import load_classifier
    sharp = {k: v * 50 if k.startswith("classifier.") else v for k, v in good_ck["model"].items()}
    good_ck = {**good_ck, "model": sharp}  # confidences far from uniform: a change of input shows in them
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 44, 3), np.uint8)).save(image)
    path = _save(tmp_path, good_ck, "ok.pt")
    other = PreprocessConfig(img_size=64, resize_mode="crop", mean=[0.1] * 3, std=[0.9] * 3)
    assert load_classifier(path, preprocess=other).preprocess == PreprocessConfig(img_size=32)
    plain = tmp_path / "plain.pt"
    torch.save(good_ck["model"], plain)
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps(CODES), encoding="utf-8")
    assert load_classifier(plain, class_map_json=cm, model_name="test_efficientnet",
                           preprocess=other).preprocess == other

    def scores(*extra) -> list:
        assert predict.main([str(image), "--classifier", str(path), "--mode", "single", "--device", "cpu",
                             "--json", *extra]) == 0
        captured = capsys.readouterr()
        return [r["pills"] for r in json.loads(captured.out)["results"]], captured.err
    own, _ = scores()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess:\n  img_size: 64\n  resize_mode: crop\n", encoding="utf-8")
    for extra in (["--set", "preprocess.img_size=64", "--set", "preprocess.resize_mode=crop",
                   "--set", "preprocess.std=[0.9,0.9,0.9]"], ["--config", str(cfg)]):
        got, err = scores(*extra)
        assert got == own and "the preprocessing of the command line is not used" in err
    plain_args = [str(image), "--classifier", str(plain), "--class-map", str(cm), "--model-name",
                  "test_efficientnet", "--mode", "single", "--device", "cpu", "--json"]
    assert predict.main(plain_args + ["--set", "preprocess.img_size=32"]) == 0
    a = json.loads(capsys.readouterr().out)["results"][0]["pills"]
    assert predict.main(plain_args + ["--set", "preprocess.img_size=64", "--set", "preprocess.resize_mode=crop"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["pills"] != a  # the override is real where it applies


def test_the_one_sample_probe_sees_the_batchnorm_inputs_and_touches_nothing():
    """one_sample_trains: False only when a BatchNorm layer would get one value per channel (timm's
    test_efficientnet: 1x1 at 32 px, 2x2 at 64 px); no running statistic, no mode and no random state changes."""
    from pillsnap_dali.training.model import one_sample_trains
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=2).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x32, x64 = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 64, 64)
    rng = torch.get_rng_state()
    assert one_sample_trains(model, lambda: model(x32)) is False
    assert one_sample_trains(model, lambda: model(x64)) is True
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    no_norm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert one_sample_trains(no_norm, lambda: no_norm(x32)) is True
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the probe spares the run
        model(x32)
