"""Exported models under onnxruntime: the classifier with the class map and preprocessing written beside it.

An export dir (``python -m pillsnap_dali.export``) holds ``classifier.onnx`` + ``classifier.json`` (K-codes,
drug metadata, preprocessing, parity figures), optionally ``classifier_fp16.onnx`` and ``detector.onnx`` +
``detector.json`` (Ultralytics' export; its letterbox size). ``load_classifier_dir`` gives an object shaped
like ``checkpoint.LoadedClassifier`` (``model``, ``class_map``, ``preprocess``, ``model_name``, ``source``)
whose ``model`` is a callable on normalized NCHW tensors, so ``predict`` runs the same code on both.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pillsnap_dali.config import PreprocessConfig, preprocess_from_dict
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.optional import require
from pillsnap_dali.weights import load_yolo

_logger = logging.getLogger(__name__)

CLASSIFIER, DETECTOR = "classifier", "detector"  # file stems in an export dir
INPUT, OUTPUT = "input", "output"


class ExportDirError(PillsnapError, ValueError):
    """An export dir that is missing a file or holds one that does not fit (one line, exit 2)."""


def ort():
    return require("onnxruntime", "onnxruntime", "running ONNX models", "pip install 'pillsnap_dali[deploy]'")


def providers(device: str | torch.device = "cpu") -> list[str]:
    """CUDA first where asked for and this onnxruntime build has it; the CPU always."""
    have = ort().get_available_providers()
    want = ["CUDAExecutionProvider"] if str(device).startswith("cuda") else []
    return [p for p in want if p in have] + ["CPUExecutionProvider"]


def session(model: str | Path | bytes, device="cpu"):
    """An ``InferenceSession`` on a file or on serialized bytes (a model not written yet)."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return rt.InferenceSession(src, sess_options=opts, providers=providers(device))


class OnnxModel:
    """A callable like the torch model: normalized NCHW float tensor in, logits (float32 tensor) out."""

    def __init__(self, sess):
        self.sess = sess
        self.dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=self.dtype)})[0].astype(np.float32)


@dataclass
class OnnxClassifier:
    """``checkpoint.LoadedClassifier``'s fields, with an onnxruntime model."""
    model: OnnxModel
    class_map: ClassMap
    preprocess: PreprocessConfig
    model_name: str
    source: str
    device: torch.device = torch.device("cpu")  # where predict puts its input tensors (the CPU: numpy goes in)


def read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportDirError(f"{path} is missing: export with python -m pillsnap_dali.export") from None
    except ValueError as e:
        raise ExportDirError(f"{path} is not valid JSON: {e}") from None


def load_classifier_dir(export_dir: str | Path, device="cpu", fp16: bool = False) -> OnnxClassifier:
    """The exported classifier of ``export_dir`` (``classifier.onnx``, or ``classifier_fp16.onnx``)."""
    d = Path(export_dir)
    meta = read_meta(d / f"{CLASSIFIER}.json")
    onnx_file = d / (f"{CLASSIFIER}_fp16.onnx" if fp16 else f"{CLASSIFIER}.onnx")
    if not onnx_file.is_file():
        raise ExportDirError(f"{onnx_file} is missing" + (" (export with --fp16)" if fp16 else ""))
    cm = ClassMap.from_dict(meta["class_map"])
    pre = preprocess_from_dict(meta["preprocess"], str(d / f"{CLASSIFIER}.json"))  # checked as a config file's
    ort()  # a missing package is said as such, not as a bad file
    try:
        sess = session(onnx_file, device)
    except Exception as e:  # onnxruntime's own errors (InvalidProtobuf, ...): a bad file, not a crash
        raise ExportDirError(f"{onnx_file} cannot be loaded by onnxruntime: {str(e).splitlines()[0]}") from None
    out = sess.get_outputs()[0].shape
    if out[-1] != len(cm):
        raise ExportDirError(f"{onnx_file} has {out[-1]} outputs but {CLASSIFIER}.json lists {len(cm)} K-codes")
    _logger.info("loaded ONNX classifier %s (%d classes, %d px) from %s", meta["model_name"], len(cm),
                 pre.img_size, onnx_file)
    return OnnxClassifier(OnnxModel(sess), cm, pre, meta["model_name"], "onnx")


def load_detector_dir(export_dir: str | Path):
    """``detector.onnx`` through Ultralytics (onnxruntime inside), with its letterbox size from
    ``detector.json`` (an ONNX detector has a fixed input size: predict letterboxes to it)."""
    d = Path(export_dir)
    meta = read_meta(d / f"{DETECTOR}.json")
    ort()
    detector = load_yolo(d / f"{DETECTOR}.onnx", task="detect")
    detector.pillsnap_imgsz = int(meta["imgsz"])
    return detector


def latency_ms(run, x, warmup: int = 2, budget_s: float = 10.0, max_runs: int = 30, min_runs: int = 5) -> dict:
    """p50 / p95 / mean milliseconds of ``run(x)`` after ``warmup`` untimed calls: ``max_runs`` calls, fewer
    (not under ``min_runs``) when they would take longer than ``budget_s`` (a 384 px model on 2 busy cores)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run(x)
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    runs = max(min_runs, min(max_runs, int(budget_s / max(per_call, 1e-6))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3),
            "mean_ms": round(float(np.mean(times)), 3), "runs": runs}
