"""The benchmark CLI's subcommands run end to end (tiny sizes; figures live in docs/benchmarks.md)."""
import json

import pytest
import torch

from pillsnap_dali.commands import bench as bench_cmd


def test_bench_step_reports_a_rate(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench_cmd.main(["step", "--stage", "demo", "--model", "test_efficientnet", "--img-size", "32",
                       "--batch-size", "4", "--steps", "1", "--reps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images_per_s"] > 0 and res["min"] <= res["images_per_s"] <= res["max"]
    assert "| test_efficientnet | 32 | 4 | cpu |" in capsys.readouterr().out


def test_bench_decode_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "dec"
    assert bench_cmd.main(["decode", "--formats", "jpeg,cache640", "--n", "4", "--rows", "8", "--size", "32", "--batch", "4",
                       "--reps", "1", "--threads", "1", "--no-model", "--out", str(out),
                       "--workdir", str(tmp_path / "img")]) == 0
    res = json.loads((out / "results.json").read_text())
    arms = res["inputs"]["jpeg"]["results"]
    assert set(arms) >= {"pil", "dali-cpu", "dali-cpu:colour-graph", "pil-decode", "dali-decode"}
    assert all(a["images_per_s"] > 0 and a["peak_pss_mb"] > 0 for a in arms.values())
    assert 0 < arms["dali-cpu:colour-graph"]["of_ceiling"] and "of_ceiling" not in arms["dali-decode"]
    # the cache input: the generated PNGs through prepare at 640 px, benchmarked from its manifest
    from pillsnap_dali.data.manifest import read_manifest
    cached = read_manifest(tmp_path / "img" / "cache640_4" / "png_976x1280_4.csv")
    assert len(cached.paths) == 4 and all(p.endswith(".jpg") for p in cached.paths)
    assert res["inputs"]["cache640"]["results"]["dali-cpu"]["images_per_s"] > 0
    assert (out / "bars.png").stat().st_size > 0 and "| jpeg | dali-cpu |" in capsys.readouterr().out


def test_bench_scan_and_unknown_command(capsys):
    assert bench_cmd.main(["scan", "--images", "50"]) == 0
    assert "images/s" in capsys.readouterr().out
    assert bench_cmd.main(["nope"]) == 2


def test_bench_predict_combo_needs_a_detector(capsys):
    rc = bench_cmd.main(["predict", "x.png", "--classifier", "y.pt", "--mode", "combo"])  # one error line, exit 2
    assert rc == 2 and "--mode combo needs --detector" in capsys.readouterr().err


def test_bench_readers_compares_read_ahead_with_reading_in_place(tmp_path, capsys):
    from pillsnap_dali.benchmarks.loaders import write_bench_images
    write_bench_images(tmp_path / "img", 4, fmt="jpeg", size=(64, 80))
    out = tmp_path / "readers.json"
    assert bench_cmd.main(["readers", str(tmp_path / "img"), "--readers", "0,2", "--latency-ms", "5", "--rows", "16",
                       "--reps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"0", "2"} and all(v["images_per_s"] > 0 for v in res.values())
    # reading in place, the 5 ms wait of each of the batch's 16 files lands in the training thread
    assert res["0"]["callback_ms_per_batch"] > 5 * 8
    assert res["2"]["callback_ms_per_batch"] < res["0"]["callback_ms_per_batch"]
    assert "| 0 | 5 |" in capsys.readouterr().out


def test_peer_arms_draw_the_same_crop_and_flip(tmp_path):
    """OpenCV (reduced decode), torchvision and PIL draft produce the same training sample for a row: same crop
    window and flip, so the arms differ only in how they decode and resize."""
    import numpy as np

    from pillsnap_dali.benchmarks.loaders import write_bench_images
    from pillsnap_dali.benchmarks.peers import SAMPLERS, Drawer
    path = write_bench_images(tmp_path, 1, fmt="jpeg", size=(488, 640))[0]
    buf = np.fromfile(path, dtype=np.uint8)
    drawer = Drawer(96, (0.5, 1.0), (0.75, 4 / 3), 0.5, seed=3)
    d = drawer(488, 640, row=0, epoch=1)
    assert drawer.reduction(d) >= 2  # a crop >= 2x the output: the JPEG is decoded at 1/2 (or less) in the DCT
    outs = {name: sample(buf, drawer, 0, 1).float() for name, sample in SAMPLERS.items()}
    assert all(o.shape == (3, 96, 96) for o in outs.values())
    ref = outs["torchvision"]
    for name, o in outs.items():
        assert (o - ref).abs().mean() < 6, name  # same window and flip: only resampling differences
    never, always = (Drawer(96, (0.5, 1.0), (0.75, 4 / 3), p, seed=3) for p in (0.0, 1.0))
    for sample in SAMPLERS.values():
        plain, flipped = sample(buf, never, 0, 1).float(), sample(buf, always, 0, 1).float()
        assert (flipped - plain.flip(2)).abs().max() == 0 and (flipped - plain).abs().mean() > 1


def test_peer_arms_make_the_dali_cpu_training_batch(tmp_path):
    """Each peer arm applies the dali-cpu loader's own draws (crop window, flip, jitter, from the upright header
    size, EXIF-turned files included) and its colour step: the same normalized batch up to resampling, where
    another epoch's draws give a different one."""
    import numpy as np
    import torch
    from PIL import Image

    from pillsnap_dali.benchmarks.loaders import _bench_config, bench_manifest, write_bench_images
    from pillsnap_dali.benchmarks.peers import SAMPLERS, _colour, drawer_for
    from pillsnap_dali.loaders import build_loader
    paths = [str(p) for p in write_bench_images(tmp_path, 2, fmt="jpeg", size=(244, 320))]
    for orientation in (3, 6):  # turned 180 degrees; a quarter turn (sides swapped)
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.open(paths[0]).save(tmp_path / f"turned{orientation}.jpg", quality=95, exif=exif.tobytes())
        paths.append(str(tmp_path / f"turned{orientation}.jpg"))
    cfg = _bench_config(48, 4, 1)
    loader = build_loader(bench_manifest(paths), [0] * 4, cfg, train=True, device=torch.device("cpu"),
                          backend="dali-cpu", seed=cfg.train.seed)
    loader.set_epoch(1)
    batch = next(iter(loader))
    rows, drawer, colour = batch.rows.tolist(), drawer_for(cfg), _colour(cfg, "cpu")
    bufs = [np.fromfile(paths[r], dtype=np.uint8) for r in rows]

    def peer_batch(sample, epoch):
        draws = [drawer.of_file(b, r, epoch) for b, r in zip(bufs, rows)]
        return colour(torch.stack([sample(b, drawer, r, epoch, d) for b, r, d in zip(bufs, rows, draws)]),
                      np.stack([d.aug for d in draws]))
    for name, sample in SAMPLERS.items():
        diff = (peer_batch(sample, 1) - batch.images).abs().mean(dim=(1, 2, 3))
        assert diff.max() < 0.1, (name, diff)  # normalized units: resampling differences only
    assert ((peer_batch(SAMPLERS["torchvision"], 2) - batch.images).abs().mean(dim=(1, 2, 3)) > 0.3).all()


def test_bench_decode_peer_arms_and_best_peer_ratio(tmp_path, capsys):
    out = tmp_path / "dec"
    assert bench_cmd.main(["decode", "--formats", "jpeg", "--n", "4", "--rows", "8", "--size", "32", "--batch", "4",
                       "--reps", "1", "--threads", "1", "--no-model", "--arms", "dali-cpu,opencv,torchvision,pil-draft",
                       "--out", str(out), "--workdir", str(tmp_path / "img")]) == 0
    res = json.loads((out / "results.json").read_text())["inputs"]["jpeg"]
    arms = res["results"]
    assert set(arms) == {"dali-cpu", "opencv", "torchvision", "pil-draft"}
    best = res["best_peer"]["cpu"]
    assert best["images_per_s"] == max(arms[p]["images_per_s"] for p in ("opencv", "torchvision", "pil-draft"))
    assert abs(res["vs_best_peer"]["dali-cpu"] - arms["dali-cpu"]["images_per_s"] / best["images_per_s"]) < 1e-9
    assert all(a["cpu_ms_per_image"] > 0 for a in arms.values())  # the peers' workers' CPU time is counted
    text = capsys.readouterr().out
    assert f"jpeg: best cpu peer {best['arm']}" in text and "vs best peer" in text


def test_bench_epochs_reports_rss_per_epoch_and_its_slope(tmp_path, capsys):
    out = tmp_path / "epochs.json"
    assert bench_cmd.main(["epochs", "--epochs", "3", "--images", "4", "--size", "32", "--batch", "2", "--threads", "1",
                       "--workdir", str(tmp_path / "img"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "dali-cpu" and len(res["rss_mb"]) == 3 and res["images"] == 4
    assert res["rss"]["first"] == res["rss_mb"][0] and res["rss"]["max"] == max(res["rss_mb"]) > 50
    assert "| RSS MB |" in capsys.readouterr().out


def test_slope_per_epoch_sees_a_leak_and_ignores_the_warm_up():
    from pillsnap_dali.benchmarks.epochs import slope_per_epoch
    assert abs(slope_per_epoch([500, 900, 901, 902, 903]) - 1.0) < 1e-9  # the first epoch left out
    assert abs(slope_per_epoch([100, 100, 100])) < 1e-9 and slope_per_epoch([5.0]) == 0.0


def test_bench_ops_times_each_arm_op_by_op(tmp_path, capsys):
    from pillsnap_dali.benchmarks.loaders import write_bench_images
    write_bench_images(tmp_path / "img", 2, fmt="jpeg", size=(244, 320))
    out = tmp_path / "ops.json"
    assert bench_cmd.main(["ops", str(tmp_path / "img"), "--size", "48", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    ops = res["ms_per_sample"]
    assert all(v > 0 for v in ops.values()) and res["files"] == 2
    assert {"opencv: imdecode reduced", "torchvision: decode_image", "dali: decode + random crop (ROI decode)",
            "dali: full graph (flip in the resize, uint8 HWC)"} <= set(ops)
    assert sum(res["reductions"].values()) == 2
    assert "| opencv: imdecode full |" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_peer_arm_and_dali_against_the_best_gpu_peer(tmp_path):
    """With CUDA: torchvision's batched GPU JPEG decode + v2 on the GPU gives the batch the CPU peers give,
    and bench decode rates `dali` against it (skipped here without CUDA; run by scripts/gpu_check.sh)."""
    import numpy as np
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    from pillsnap_dali.benchmarks.loaders import write_bench_images
    from pillsnap_dali.benchmarks.peers import Drawer, gpu_batch, torchvision_sample
    path = write_bench_images(tmp_path / "img", 1, fmt="jpeg", size=(244, 320))[0]
    buf = np.fromfile(path, dtype=np.uint8)
    drawer = Drawer(48, (0.5, 1.0), (0.75, 4 / 3), 0.5)
    got = gpu_batch([torch.from_numpy(buf)], torch.tensor([0]), drawer, 1, lambda x, _aug: x)
    assert got.device.type == "cuda" and got.shape == (1, 3, 48, 48)
    assert (got[0].cpu().float() - torchvision_sample(buf, drawer, 0, 1).float()).abs().mean() < 4
    out = tmp_path / "dec"
    assert bench_cmd.main(["decode", "--formats", "jpeg", "--n", "4", "--rows", "8", "--size", "32", "--batch", "4",
                       "--reps", "1", "--threads", "1", "--no-model", "--arms", "dali,torchvision-gpu",
                       "--out", str(out), "--workdir", str(tmp_path / "img2")]) == 0
    res = json.loads((out / "results.json").read_text())["inputs"]["jpeg"]
    assert res["best_peer"]["gpu"]["arm"] == "torchvision-gpu" and res["vs_best_peer"]["dali"] > 0


def test_bench_step_logs_progress_at_least_every_interval(monkeypatch, caplog):
    """A long bench step (a 384 px model on a CPU takes minutes) says where it is between results."""
    import logging

    from pillsnap_dali.benchmarks import step as bench_step_module
    from pillsnap_dali.config import load_config

    monkeypatch.setattr(bench_step_module, "PROGRESS_SECONDS", 0.0)
    cfg = load_config(stage="demo", sets=["model.name=test_efficientnet", "preprocess.img_size=32"])
    with caplog.at_level(logging.INFO, logger="pillsnap_dali.benchmarks.step"):
        bench_step_module.bench_step(cfg, device=torch.device("cpu"), batch=2, steps=2, warmup=1, reps=2,
                                     num_classes=4)
    lines = [r.getMessage() for r in caplog.records if "steps" in r.getMessage() and "/" in r.getMessage()]
    assert lines and lines[-1].endswith("5/5 steps")


def test_tree_memory_counts_shared_pages_once():
    """The bench's memory column: a forked child shares its parent's pages; a sum of RSS counts them twice, the
    tree's PSS once (within the child's own small allocations)."""
    import os
    import signal

    import numpy as np
    import psutil

    from pillsnap_dali.benchmarks.loaders import tree_pss_bytes
    block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, touched: resident in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child touches every page read-only (shared, not copied), says so, then waits
        try:
            os.close(r)
            os.write(w, b"x" if int(block[::4096].sum()) == len(block[::4096]) else b"?")
            signal.pause()
        finally:
            os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"
        me = psutil.Process()
        rss_sum = sum(p.memory_info().rss for p in [me] + me.children(recursive=True))
        pss = tree_pss_bytes(me)
        assert rss_sum - pss > 150 * 2**20  # the 200 MB block is counted once, not twice
        assert pss > 200 * 2**20
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_bench_scan_help_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom pillsnap_dali.commands.bench import main\n"
            "try:\n    main(['scan', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "import pillsnap_dali.benchmarks.scan\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--images" in out.stdout and out.stdout.strip().endswith("no torch")


def test_bench_scale_quick_measures_every_step_and_its_growth(tmp_path, capsys):
    from pillsnap_dali.benchmarks.scale import QUICK_SIZES, STEPS, growth_exponent
    out = tmp_path / "scale.json"
    assert bench_cmd.main(["scale", "--quick", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sizes"] == list(QUICK_SIZES) and set(res["exponents"]) == set(STEPS)
    for rows in map(str, QUICK_SIZES):
        steps = res["by_size"][rows]["steps"]
        assert set(steps) == set(STEPS)
        assert all(s["wall_s"] > 0 and s["peak_traced_mb"] >= 0 and s["rss_peak_mb"] >= 0 for s in steps.values())
        # the stage build sampled the asked rows; the read gets them back, 80/20 (+ held-out combinations)
        got = steps["stage build"]["info"]["splits"]
        assert got["train"] + got["val"] == int(rows) and got["test"] > 0
        assert steps["manifest read + checks"]["info"]["train_rows"] == got["train"]
        assert steps["epoch plan + sharding"]["info"]["rows_per_rank"][0] == sum(
            steps["epoch plan + sharding"]["info"]["rows_per_rank"][1:]) == got["train"]
        ev = steps["evaluation + report"]["info"]
        assert ev["val_rows"] == got["val"] and ev["report_longest_line"] < 1000  # the absent line is capped
        b = res["manifest_bytes_per_row"][rows]
        assert b["compact"] * 3 < b["lists"]  # the compact manifest against the Python lists it replaced
    # exponents: a number wherever the figures are positive (the traced memory of reading grows with the rows)
    assert res["exponents"]["manifest read + checks"]["peak_traced_mb"] > 0.5
    assert all(isinstance(e["wall_s"], float) for e in res["exponents"].values())
    assert growth_exponent([10, 20, 40], [3, 12, 48]) == 2.0 and growth_exponent([1, 2], [5, 0]) is None
    assert "| evaluation + report | 2000 |" in capsys.readouterr().out
