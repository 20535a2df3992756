"""Detector training: Ultralytics YOLO fed by the DALI graph of ``pipelines/detect.py``.

``python -m pillsnap_dali.detect --stage N [--model yolo11m.yaml|PATH] [--epochs E] [--imgsz 640]
[--backend dali|dali-cpu|ultralytics]`` converts the stage's combination images to a YOLO dataset
(``yolo_convert``), then trains. The DALI backends plug into Ultralytics through its extension hooks only:
a ``DetectionTrainer`` subclass whose ``get_dataloader`` returns a ``DaliDetectLoader``
(``pillsnap_dali.loaders.detect``, on the DALI runner the classification loader uses too) yielding the batch
dict its trainer and validator expect (``img`` uint8 BCHW, ``cls``, ``bboxes`` normalized xywh,
``batch_idx``, ``im_file``, ``ori_shape``, ``resized_shape``, ``ratio_pad``). ``--backend ultralytics``
uses its own loader (mosaic and the rest of its augmentation).

Fully offline: ``YOLO_OFFLINE`` is set before Ultralytics is imported (lazily, here only), plots are off
(no font download), models are built from a yaml or a local ``.pt`` (never fetched), and AMP uses bf16 or
is off so its check never downloads a reference model.

Run dir ``<train.out>/detect_<stage>/``: ``weights/{best,last}.pt``, ``metrics.json`` (P, R, mAP50,
mAP50-95), ``skipped.csv`` (row, path, reason, backend, epoch: the images the DALI loaders could not use, written
as they are found, not retried by a rerun in the same dir), Ultralytics' ``results.csv``/``args.yaml``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)

AUG_KEYS = ("fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v")  # Ultralytics hyperparameters the DALI graph honours
METRIC_KEYS = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)",
               "mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)"}


def ultralytics_offline() -> None:
    """Call before using Ultralytics: no update checks, hub sync, downloads or pip installs.

    Importing Ultralytics also replaces ``PIL.Image.open`` process-wide with a wrapper that, on an image PIL
    cannot identify, tries to pip-install ``pi-heif`` and then fails with ModuleNotFoundError. Our loaders
    and verifiers rely on PIL's own ``UnidentifiedImageError`` for broken files, so the original is put back.
    """
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "true")
    from PIL import Image
    try:
        from ultralytics.utils import patches
    except ImportError:
        return
    if getattr(Image, "open", None) is getattr(patches, "image_open", None) and hasattr(patches, "_image_open"):
        Image.open = patches._image_open


# ------------------------------------------------------------------------------------------------- trainer
@functools.cache
def dali_trainer_class():
    """``DetectionTrainer`` subclass whose loaders are DALI graphs (built lazily: imports Ultralytics)."""
    ultralytics_offline()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import DEFAULT_CFG

    class DaliDetectionTrainer(DetectionTrainer):
        """Only ``get_dataloader`` changes; the training loop, loss and validator are Ultralytics' own."""

        def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, dali=None, skip_log=None,
                     readers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
            from pipelines import PipelineOptions

            self.dali = dali or PipelineOptions()
            self.skip_log, self.readers, self.max_pixels = skip_log, readers, max_pixels
            self.dali_loaders: list = []
            super().__init__(cfg, overrides, _callbacks)

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
            from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split

            if self.world_size > 1:
                raise NotImplementedError("the DALI detection loader runs on one GPU; use --backend ultralytics "
                                          "for multi-GPU detection training")
            augment = {k: float(getattr(self.args, k)) for k in AUG_KEYS} if mode == "train" else None
            loader = DaliDetectLoader(read_yolo_split(dataset_path), batch_size=batch_size, imgsz=self.args.imgsz,
                                      augment=augment, shuffle=mode == "train", options=self.dali,
                                      skip_log=self.skip_log, split=mode, readers=self.readers,
                                      max_pixels=self.max_pixels)
            self.dali_loaders.append(loader)
            return loader

        def skipped(self) -> list[tuple[str, str]]:
            return sorted({s for loader in self.dali_loaders for s in loader.skipped})

    return DaliDetectionTrainer


@dataclass
class DetectRun:
    """What a detection training needs, unpacked from the config at one seam (``run_from_config``)."""
    data_yaml: Path
    model: str
    epochs: int
    imgsz: int
    batch_size: int
    backend: str        # dali | dali-cpu | ultralytics
    out: Path           # run dir
    workers: int = 2    # ultralytics backend loader workers
    threads: int = 2    # DALI CPU threads
    seed: int = 0
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    readers: int = 4
    flipud: float = 0.5  # detect.flipud


def resolve_device(device: str, backend: str) -> tuple[str, str]:
    """(torch device string, backend): ``dali`` without CUDA falls back to ``dali-cpu``, loudly."""
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda:0" if cuda else "cpu"
    if backend == "dali" and not device.startswith("cuda"):
        _logger.warning("--backend dali decodes on the GPU but training runs on %s: using dali-cpu", device)
        backend = "dali-cpu"
    return device, backend


def _load_model(spec: str):
    """A YOLO model from an Ultralytics yaml (built from scratch) or a LOCAL .pt (never downloaded)."""
    ultralytics_offline()
    from ultralytics import YOLO

    if spec.endswith((".pt", ".pth")) and not Path(spec).is_file():
        raise FileNotFoundError(f"detector weights {spec} not found (nothing is downloaded: pass a local file "
                                f"or a model yaml such as yolo11m.yaml)")
    return YOLO(spec, task="detect")


def _train_args(run: DetectRun, device: str) -> dict:
    amp = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else False
    return dict(data=str(run.data_yaml), epochs=run.epochs, imgsz=run.imgsz, batch=run.batch_size, device=device,
                workers=run.workers, project=str(run.out.parent.resolve()), name=run.out.name, exist_ok=True,
                plots=False, amp=amp, pretrained=run.model.endswith(".pt"), seed=run.seed, flipud=run.flipud,
                verbose=False)


def _write_outputs(run: DetectRun, trainer, backend: str) -> dict:
    metrics = {k: float(trainer.metrics.get(v, float("nan"))) for k, v in METRIC_KEYS.items()}
    skipped = trainer.skipped() if hasattr(trainer, "skipped") else []
    summary = {**metrics, "model": run.model, "backend": backend, "epochs": run.epochs, "imgsz": run.imgsz,
               "batch_size": run.batch_size, "weights": str(Path(trainer.best).resolve()),
               "data": str(run.data_yaml), "skipped_images": len(skipped)}
    atomic_write_text(run.out / "metrics.json", json.dumps(summary, indent=1))
    # the DALI loaders wrote each skip as it was found (their log, not read again); the ultralytics backend has none
    (getattr(trainer, "skip_log", None) or SkipLog(run.out / "skipped.csv")).ensure_file()
    return summary


def train_detector(run: DetectRun) -> dict:
    """Train; returns the metrics.json dict (P, R, mAP50, mAP50-95 of the best weights on val)."""
    device, backend = resolve_device(run.device, run.backend)
    model = _load_model(run.model)
    args = _train_args(run, device)
    trainer = None
    if backend != "ultralytics":
        from pipelines import PipelineOptions

        options = PipelineOptions(batch_size=run.batch_size, device="gpu" if backend == "dali" else "cpu",
                                  device_id=torch.device(device).index or 0 if backend == "dali" else None,
                                  num_threads=run.threads, seed=run.seed)
        trainer = functools.partial(dali_trainer_class(), dali=options, skip_log=SkipLog(run.out / "skipped.csv"),
                                    readers=run.readers, max_pixels=run.max_pixels)
    _logger.info("training %s on %s (%s backend, %d px, %d epochs) -> %s", run.model, run.data_yaml, backend,
                 run.imgsz, run.epochs, run.out)
    model.train(trainer=trainer, **args)
    summary = _write_outputs(run, model.trainer, backend)
    _logger.info("detector: P %.3f R %.3f mAP50 %.3f mAP50-95 %.3f (weights %s)", summary["precision"],
                 summary["recall"], summary["mAP50"], summary["mAP50-95"], summary["weights"])
    return summary


def run_from_config(cfg, data_yaml: Path) -> DetectRun:
    d = cfg.detect
    out = Path(cfg.train.out) / (f"detect_{cfg.stage}" if not cfg.train.name else f"detect_{cfg.train.name}")
    return DetectRun(data_yaml=data_yaml, model=d.model, epochs=d.epochs, imgsz=d.imgsz, batch_size=d.batch_size,
                     backend=d.backend, out=out, workers=d.workers, threads=cfg.loader.threads, seed=cfg.train.seed,
                     device=cfg.train.device, max_pixels=cfg.data.max_pixels, readers=cfg.loader.readers,
                     flipud=d.flipud)


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default=None, help="stage whose manifests (combination images) are converted")
    p.add_argument("--config", default=None, help="extra YAML config file")
    p.add_argument("--model", default=None, help="Ultralytics model yaml (from scratch) or a local .pt")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--imgsz", type=int, default=None, help="letterbox size")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", choices=("dali", "dali-cpu", "ultralytics"), default=None)
    p.add_argument("--data", default=None, help="an existing YOLO data.yaml: skip the conversion")
    p.add_argument("--convert-only", action="store_true", help="write the YOLO dataset and stop")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    return p


def _cli_sets(args) -> list[str]:
    sets = list(args.set)
    for flag, key in (("model", "detect.model"), ("epochs", "detect.epochs"), ("imgsz", "detect.imgsz"),
                      ("batch_size", "detect.batch_size"), ("backend", "detect.backend")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    return sets


def main(argv=None) -> int:
    from pillsnap_dali.config import ConfigError, load_config
    from pillsnap_dali.data.yolo import convert_stage

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(stage=args.stage, path=args.config, sets=_cli_sets(args))
        data_yaml = Path(args.data) if args.data else convert_stage(cfg)
        if args.convert_only:
            print(f"YOLO dataset: {data_yaml}")
            return 0
        summary = train_detector(run_from_config(cfg, data_yaml))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("precision", "recall", "mAP50", "mAP50-95", "weights")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
