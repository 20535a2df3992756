"""ONNX export of the classifier (opset 17, dynamic batch, the deployed weights, K-codes and preprocessing in
the metadata) and of the detector (Ultralytics' own export), each written only after onnxruntime matches torch
on real images within the parity bounds (``Bounds``, ``check``). The command and its options:
``pillsnap_dali.commands.export``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pillsnap_dali.atomic import atomic_open
from pillsnap_dali.config import stage_name
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.onnx_runtime import CLASSIFIER, DETECTOR, INPUT, OUTPUT, OnnxModel, latency_ms, session
from pillsnap_dali.optional import require
from pillsnap_dali.data.manifest import read_manifest
from pillsnap_dali.inference import collect_images, detector_imgsz, load_detector
from pillsnap_dali.imageio import open_rgb
from pillsnap_dali.training.evaluation import recorded_manifest
from pillsnap_dali.loaders import pil_eval_transform

_logger = logging.getLogger(__name__)
OPSET = 17


class ParityError(PillsnapError, RuntimeError):
    """onnxruntime and torch disagree beyond the bounds: the file is not written."""


@dataclass
class Bounds:
    atol: float = 1e-3            # max abs logit difference, fp32
    min_agreement: float = 1.0    # share of images with the same top-1, fp32
    atol_fp16: float = 0.05
    min_agreement_fp16: float = 0.99


# ---------------------------------------------------------------------------------------- parity images
def val_manifest_of(ck: dict) -> Path | None:
    """The run's validation manifest: the one its checkpoint recorded (``run_inputs``: a run trained from
    ``--manifest ... --val-manifest ...`` too), else ``<artifacts>/<stage>/manifest_val.csv`` from its config."""
    recorded = recorded_manifest(ck, "val")
    if recorded is not None:
        return recorded
    cfg = ck.get("config") if isinstance(ck, dict) else None
    if not cfg:
        return None
    path = Path(cfg["data"]["artifacts"]) / stage_name(cfg["stage"]) / "manifest_val.csv"
    return path if path.is_file() else None


def parity_images(images: list[str], val_manifest: str | Path | None, limit: int, ck: dict | None = None) -> list[str]:
    """Image paths for the parity check: those given (folders expanded), else ``limit`` rows of the
    validation manifest spread evenly over it (so most classes are in)."""
    if images:
        return [str(p) for p in collect_images(images)][:limit]
    if val_manifest is None:
        gone = ((ck or {}).get("run_inputs") or {}).get("manifests", {}).get("val") if isinstance(ck, dict) else None
        where = f"the recorded {gone} is gone" if gone else "the run's manifest_val.csv was not found"
        raise FileNotFoundError(f"no validation images for the parity check: {where}; pass --val-manifest CSV or "
                                "--images IMAGE|DIR")
    paths = read_manifest(val_manifest).paths
    idx = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int)) if paths else []
    return [paths[i] for i in idx]


def preprocess(paths: list[str], pre, max_pixels: int) -> tuple[torch.Tensor, list[str]]:
    """The classifier input of each readable image (the checkpoint's preprocessing, as predict applies it)."""
    transform, xs, used = pil_eval_transform(pre), [], []
    for p in paths:
        try:
            xs.append(transform(open_rgb(p, max_pixels)))
            used.append(p)
        except Exception as e:  # an unreadable parity image is left out and said, never the export's end
            _logger.warning("parity image %s left out: %s", p, e)
    if not xs:
        raise FileNotFoundError(f"none of the {len(paths)} parity images could be read")
    return torch.stack(xs), used


# ------------------------------------------------------------------------------------------- classifier
def onnx_bytes(model: torch.nn.Module, img_size: int, fp16: bool, opset: int = OPSET) -> bytes:
    """The model as ONNX (TorchScript exporter: the dynamo one cannot target opset 17 with torch 2.14 here),
    batch dimension dynamic, ``input`` -> ``output``."""
    require("onnx", "onnx", "ONNX export", "pip install 'pillsnap_dali[deploy]'")
    m = model.eval().half() if fp16 else model.eval()
    x = torch.zeros(1, 3, img_size, img_size, dtype=torch.float16 if fp16 else torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(m, (x,), buf, input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                          dynamo=False, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return buf.getvalue()


def with_metadata(data: bytes, meta: dict) -> bytes:
    """``data`` with ``meta`` (values JSON-encoded unless strings) as the ONNX model's metadata_props."""
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    return proto.SerializeToString()


def parity(model_onnx: OnnxModel, reference: torch.Tensor, x: torch.Tensor, batch: int = 16) -> dict:
    """onnxruntime logits against torch's ``reference`` on the same inputs ``x``."""
    out = np.concatenate([model_onnx.run(x[i:i + batch].numpy()) for i in range(0, len(x), batch)])
    ref = reference.numpy()
    return {"images": len(x), "max_abs_diff": float(np.abs(out - ref).max()),
            "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit": float(np.abs(ref).max())}  # the scale the difference is measured against


def check(name: str, figures: dict, atol: float, min_agreement: float) -> None:
    if figures["max_abs_diff"] > atol or figures["top1_agreement"] < min_agreement:
        raise ParityError(f"{name}: onnxruntime differs from torch beyond the bounds on {figures['images']} "
                          f"images (max abs logit diff {figures['max_abs_diff']:.3g} vs {atol:g}, top-1 agreement "
                          f"{figures['top1_agreement']:.2%} vs {min_agreement:.0%}): not written")


def classifier_meta(loaded, ck: dict, checkpoint: str) -> dict:
    cm = loaded.class_map
    return {"format": "pillsnap_dali/onnx-1", "model_name": loaded.model_name, "num_classes": len(cm),
            "k_codes": list(cm.codes), "drug_names": [cm.meta.get(c, {}).get("dl_name", "") for c in cm.codes],
            "preprocess": asdict(loaded.preprocess), "input": INPUT, "output": OUTPUT, "layout": "NCHW",
            "opset": OPSET, "dynamic_batch": True, "checkpoint": str(Path(checkpoint).resolve()),
            "weights": ck["deploy"] if isinstance(ck, dict) and ck.get("format") else "state_dict",
            "epoch": ck.get("epoch") if isinstance(ck, dict) else None}


def export_classifier(loaded, ck: dict, checkpoint: str, x: torch.Tensor, out_dir: Path, bounds: Bounds,
                      fp16: bool = False) -> dict:
    """Export, prove parity on ``x``, then write ``classifier.onnx`` (+ ``_fp16``) and ``classifier.json``."""
    model = loaded.model.float().cpu().eval()
    with torch.no_grad():
        reference = torch.cat([model(x[i:i + 16]) for i in range(0, len(x), 16)]).float()
    meta = classifier_meta(loaded, ck, checkpoint)
    props = {k: meta[k] for k in ("format", "model_name", "num_classes", "k_codes", "drug_names", "preprocess",
                                  "weights")}
    files = {CLASSIFIER: (False, bounds.atol, bounds.min_agreement)}
    if fp16:
        files[f"{CLASSIFIER}_fp16"] = (True, bounds.atol_fp16, bounds.min_agreement_fp16)
    ready, meta["parity"], meta["latency_batch1"] = {}, {}, {}
    for name, (half, atol, agree) in files.items():
        data = with_metadata(onnx_bytes(_copy(model), loaded.preprocess.img_size, half), props)
        runner = OnnxModel(session(data))
        meta["parity"][name] = figures = {**parity(runner, reference, x), "atol": atol, "min_agreement": agree}
        check(name, figures, atol, agree)
        meta["latency_batch1"][name] = latency_ms(runner.run, x[:1].numpy())
        ready[name] = data
    meta["latency_batch1"]["torch"] = torch_latency(model, x[:1])
    for name, data in ready.items():  # only once every file passed
        with atomic_open(out_dir / f"{name}.onnx", "wb") as fh:
            fh.write(data)
    _write_json(out_dir / f"{CLASSIFIER}.json", {**meta, "class_map": loaded.class_map.to_dict()})
    return meta


def torch_latency(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """torch's batch-1 latency beside onnxruntime's, on one intra-op thread: on shared cores torch's spinning
    OpenMP threads make its default setting many times slower (848 ms against onnxruntime's 30 ms for the
    demo model, other processes busy), which would say nothing about the model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return {**latency_ms(model, x), "threads": 1}
    finally:
        torch.set_num_threads(threads)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=1)


# --------------------------------------------------------------------------------------------- detector
def export_detector(weights: str | Path, out_dir: Path, imgsz: int | None = None) -> dict:
    """Ultralytics' own ONNX export (opset 17, dynamic batch, no onnxslim: offline) of a copy of ``weights``
    in a temp dir inside ``out_dir``, then moved into ``detector.onnx`` (the source dir is left untouched)."""
    require("onnx", "onnx", "ONNX export", "pip install 'pillsnap_dali[deploy]'")
    detector = load_detector(weights)
    size = int(imgsz) if imgsz else detector_imgsz(detector, 640)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".detector-") as tmp:
        src = Path(tmp) / "detector.pt"
        shutil.copyfile(weights, src)
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress: keep stdout ours
            made = load_detector(src).export(format="onnx", imgsz=size, opset=OPSET, dynamic=True, simplify=False,
                                             device="cpu", verbose=False)
        Path(made).replace(out_dir / f"{DETECTOR}.onnx")
    meta = {"format": "pillsnap_dali/onnx-1", "imgsz": size, "opset": OPSET, "weights": str(Path(weights).resolve()),
            "exporter": "ultralytics"}
    _write_json(out_dir / f"{DETECTOR}.json", meta)
    return meta


# -------------------------------------------------------------------------------------------------- CLI
