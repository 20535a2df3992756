"""``detect --resume`` (Ultralytics' own resume through our DALI trainer) and the detection graph's
augmentation drawn on the host from (seed, epoch, row). Real DALI CPU pipelines, a real tiny YOLO run."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillsnap_dali.loaders.augment import draw_detect
from pipelines.colour import DETECT_FIELDS

HYP = {"fliplr": 0.5, "flipud": 0.5, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}


def test_detection_draws_are_a_pure_function_of_seed_epoch_and_row():
    rows = np.arange(64)
    a = draw_detect(HYP, 3, 1, rows)
    assert a.shape == (64, len(DETECT_FIELDS)) and a.dtype == np.float32
    np.testing.assert_array_equal(a, draw_detect(HYP, 3, 1, rows))  # the same values twice
    # a row's draw does not depend on the batch it lands in
    np.testing.assert_array_equal(a[[40, 7]], draw_detect(HYP, 3, 1, np.array([40, 7])))
    other_epoch, other_seed = draw_detect(HYP, 3, 2, rows), draw_detect(HYP, 4, 1, rows)
    assert not np.array_equal(a, other_epoch) and not np.array_equal(a, other_seed)
    assert len({tuple(r) for r in a}) == 64  # every row its own draw
    flips = a[:, :2]
    assert set(np.unique(flips)) <= {0.0, 1.0} and 0 < flips.mean() < 1
    assert np.all(np.abs(a[:, 2]) <= 360 * 0.015) and np.all((a[:, 3] >= 0.3) & (a[:, 3] <= 1.7))
    assert np.all((a[:, 4] >= 0.6) & (a[:, 4] <= 1.4))
    never = draw_detect({"fliplr": 0.0, "flipud": 1.0}, 0, 0, rows)
    assert not never[:, 0].any() and never[:, 1].all() and np.all(never[:, 2] == 0) and np.all(never[:, 3:] == 1)


# ------------------------------------------------------------------------------------------ a tiny YOLO set
def _yolo(root: Path, n_train: int = 6, n_val: int = 2, size: int = 96) -> Path:
    """images/{train,val} PNGs with one or two coloured boxes each, their YOLO labels, and data.yaml."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((size, size + 16, 3), 200, np.uint8)
            lines = []
            for k in range(1 + i % 2):
                x, y = int(rng.integers(4, size - 40)), int(rng.integers(4, size - 40))
                img[y:y + 30, x:x + 30] = (40 + 80 * k, 90, 160)
                lines.append(f"{k} {(x + 15) / (size + 16):.5f} {(y + 15) / size:.5f} {30 / (size + 16):.5f} "
                             f"{30 / size:.5f}")
            Image.fromarray(img).save(root / "images" / split / f"{split}_{i}.png")
            (root / "labels" / split / f"{split}_{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return root / "data.yaml"


def _loader(yolo: Path, seed: int = 0):
    from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split
    from pipelines import PipelineOptions

    return DaliDetectLoader(read_yolo_split(yolo.parent / "images" / "train"), batch_size=3, imgsz=64, augment=HYP,
                            shuffle=True, options=PipelineOptions(device="cpu", num_threads=1, seed=seed),
                            split="train")


def _epoch(loader) -> list:
    return [(b["im_file"], b["img"].numpy().copy(), b["bboxes"].numpy().copy()) for b in loader]


def test_a_resumed_detection_epoch_sees_the_same_rows_and_draws(tmp_path):
    yolo = _yolo(tmp_path / "yolo")
    run = _loader(yolo)
    first, second = _epoch(run), _epoch(run)  # epochs 0 and 1 of an uninterrupted run
    fresh = _loader(yolo)  # a new process resuming at epoch 1: a new pipeline, nothing of the old one's state
    fresh.set_epoch(1)
    again = _epoch(fresh)
    assert [b[0] for b in again] == [b[0] for b in second]
    for (_, img_a, box_a), (_, img_b, box_b) in zip(again, second):
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(box_a, box_b)
    # and the epochs differ from each other: the draws (and the order) are per epoch
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, second)) or \
        [b[0] for b in first] != [b[0] for b in second]


def _detect_args(yolo: Path, out: Path, *extra) -> list:
    return ["--data", str(yolo), "--model", "yolo11n.yaml", "--epochs", "2", "--imgsz", "64", "--batch-size", "3",
            "--backend", "dali-cpu", "--out", str(out), "--name", "r", "--set", "train.device=cpu",
            "--set", "loader.threads=1", *extra]


def _results_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "results.csv", newline="") as fh:
        return [int(float(r["epoch"])) for r in csv.DictReader(fh, skipinitialspace=True)]


def test_detect_resume_continues_an_interrupted_run_at_its_next_epoch(tmp_path, monkeypatch, capsys):
    from ultralytics.utils.callbacks import base

    from pillsnap_dali.commands import detect
    from pillsnap_dali.training.detector import resume_state

    yolo = _yolo(tmp_path / "yolo")
    run_dir = tmp_path / "runs" / "detect_r"
    seen = []  # (trainer epoch, the DALI training loader's epoch after it) per finished epoch

    def interrupt_after_first_save(trainer):
        raise KeyboardInterrupt  # Ctrl-C the moment epoch 1's last.pt is written

    def record(trainer):
        seen.append((trainer.epoch, trainer.train_loader._epoch))

    monkeypatch.setitem(base.default_callbacks, "on_train_epoch_end",
                        [*base.default_callbacks["on_train_epoch_end"], record])
    monkeypatch.setitem(base.default_callbacks, "on_model_save",
                        [*base.default_callbacks["on_model_save"], interrupt_after_first_save])
    assert detect.main(_detect_args(yolo, tmp_path / "runs")) == 130  # Ctrl-C: one line, the shell's status
    assert _results_epochs(run_dir) == [1]
    assert resume_state(run_dir / "weights" / "last.pt")["epoch"] == 0  # one epoch of two done
    monkeypatch.setitem(base.default_callbacks, "on_model_save",
                        [f for f in base.default_callbacks["on_model_save"] if f is not interrupt_after_first_save])
    assert detect.main(_detect_args(yolo, tmp_path / "runs", "--resume")) == 0
    assert _results_epochs(run_dir) == [1, 2]  # epoch 2 added, epoch 1 not trained again
    assert seen == [(0, 1), (1, 2)]  # the resumed run's loader drew epoch 1's order and augmentation
    assert '"mAP50"' in capsys.readouterr().out
    # the finished run has nothing left to resume: one line, exit 2
    assert detect.main(_detect_args(yolo, tmp_path / "runs", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: nothing to resume") and "finished run" in err[-1]


def test_resume_without_a_last_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from pillsnap_dali.commands import detect

    yolo = _yolo(tmp_path / "yolo", n_train=1, n_val=1)
    assert detect.main(_detect_args(yolo, tmp_path / "runs", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = tmp_path / "runs" / "detect_r" / "weights" / "last.pt"
    assert err == [f"error: nothing to resume: {last} does not exist (a detector run saves weights/last.pt after "
                   "its first epoch; start without --resume)"]
    assert not (tmp_path / "runs" / "detect_r").exists()  # nothing was started


@pytest.mark.gpu
def test_gpu_detection_graph_applies_the_host_draws_as_the_cpu_graph(tmp_path):
    import torch

    from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split
    from pipelines import PipelineOptions

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    yolo = _yolo(tmp_path / "yolo")
    samples = read_yolo_split(yolo.parent / "images" / "train")
    out = {}
    for dev in ("cpu", "gpu"):
        loader = DaliDetectLoader(samples, batch_size=3, imgsz=64, augment=HYP, shuffle=True, split="train",
                                  options=PipelineOptions(device=dev, device_id=0 if dev == "gpu" else None, seed=0))
        loader.set_epoch(1)
        out[dev] = [(b["im_file"], b["img"].cpu().float(), b["bboxes"].numpy()) for b in loader]
    for (fc, ic, bc), (fg, ig, bg) in zip(out["cpu"], out["gpu"]):
        assert fc == fg  # the same rows in the same order
        np.testing.assert_allclose(bg, bc, atol=1e-6)  # the same flips
        assert (ig - ic).abs().mean() < 3  # the same HSV factors (resize and HSV kernels differ slightly)
