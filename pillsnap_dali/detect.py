"""Detector training: Ultralytics YOLO fed by the DALI graph of ``pipelines/detect.py``.

``python -m pillsnap_dali.detect --stage N [--model yolo11m.yaml|PATH] [--epochs E] [--imgsz 640]
[--backend dali|dali-cpu|ultralytics]`` converts the stage's combination images to a YOLO dataset
(``yolo_convert``), then trains. The DALI backends plug into Ultralytics through its extension hooks only:
a ``DetectionTrainer`` subclass whose ``get_dataloader`` returns a ``DaliDetectLoader`` yielding the batch
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
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.geometry import cxcywh_to_ltrb as _xywh_to_ltrb, letterbox_geometry
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, read_encoded_upright
from pillsnap_dali.loaders.common import SkipLog

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


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class DetectSamples:
    """One split of a YOLO dataset: image paths and their labels (class ids, normalized xywh boxes).

    ``labels`` follows Ultralytics' dataset attribute of the same name (dicts with ``cls`` ``(n, 1)``), so its
    label statistics (max objects per image, class counts) work on our loader too.
    """
    im_files: list[str]
    labels: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.im_files)


def _read_label(path: Path) -> np.ndarray:
    """``(n, 5)`` float32 rows ``cls cx cy w h``; a missing label file is an image without objects."""
    if not path.exists():
        return np.zeros((0, 5), np.float32)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != 5]
    if bad:
        raise ValueError(f"{path}: label lines must have 5 values (cls cx cy w h), got {bad[0]}")
    return np.array(rows, np.float32).reshape(-1, 5)


def read_yolo_split(images_dir: str | Path) -> DetectSamples:
    """Images of ``.../images/<split>`` with labels from the sibling ``.../labels/<split>``."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"YOLO image folder not found: {images_dir}")
    labels_dir = images_dir.parent.parent / "labels" / images_dir.name  # <root>/images/<split>
    files = sorted(str(p) for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    samples = DetectSamples(files)
    for f in files:
        lab = _read_label(labels_dir / (Path(f).stem + ".txt"))
        samples.labels.append({"im_file": f, "cls": lab[:, :1].copy(), "bboxes": lab[:, 1:].copy()})
    _logger.info("%s: %d images, %d boxes", images_dir, len(files), sum(len(lb["cls"]) for lb in samples.labels))
    return samples


@dataclass
class DaliOptions:
    device: str = "cpu"            # "gpu" (decode on the GPU, every image op there) | "cpu"
    threads: int = 2               # DALI CPU threads
    device_id: int | None = None   # CUDA device for "gpu"
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS  # files claiming more are skipped from the header (data.max_pixels)
    readers: int = 4               # threads reading the next batches' files during the step (loader.readers)


@dataclass
class _Item:
    """One sample ready to feed: its index, encoded bytes, letterbox geometry and ltrb boxes."""
    index: int
    data: np.ndarray
    shape: tuple[int, int]            # original (h, w)
    geometry: tuple[int, int, int, int]  # new_h, new_w, top, left
    boxes: np.ndarray                 # (n, 4) ltrb normalized to the original image


def _read_ahead(chunks, read, threads: int, depth: int = 2):
    """``[read(x) for x in chunk]`` for each chunk in order; with ``threads`` > 0 the next ``depth`` chunks
    are being read by a thread pool while the caller works on the current one (0: read in place)."""
    if threads <= 0:
        for chunk in chunks:
            yield [read(x) for x in chunk]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="pillsnap-detect-read") as pool:
        ahead: deque = deque()
        for chunk in chunks:
            ahead.append([pool.submit(read, x) for x in chunk])
            if len(ahead) >= depth:
                yield [f.result() for f in ahead.popleft()]
        while ahead:
            yield [f.result() for f in ahead.popleft()]


class DaliDetectLoader:
    """Batches for Ultralytics' DetectionTrainer/DetectionValidator from the DALI detection graph.

    Looks like its DataLoader where the trainer looks (``dataset``, ``batch_size``, ``num_workers``,
    ``sampler``, ``drop_last``, ``len()``, ``reset()``, ``close()``). A file that cannot be read or decoded
    is logged, listed in ``skipped`` and left out of later epochs: never a black image with a label. With a
    ``skip_log`` (the run's ``skipped.csv``, shared by the training and validation loaders) each skip is
    written the moment it is found, and files already in it are left out from the start (a rerun in the
    same run dir does not retry them).
    """

    def __init__(self, samples: DetectSamples, *, batch_size: int, imgsz: int, augment: dict | None,
                 shuffle: bool, options: DaliOptions, skip_log=None, split: str = ""):
        if len(samples) == 0:
            raise ValueError("the detection split has no images")
        self.dataset, self.batch_size, self.imgsz = samples, int(batch_size), int(imgsz)
        self.augment, self.shuffle, self.options = augment, shuffle, options
        self.num_workers, self.drop_last = options.threads, False
        # rows in the skip log are indices into this split's image list: the split is named with the backend
        self.backend = ("dali" if options.device == "gpu" else "dali-cpu") + (f"/{split}" if split else "")
        self.skip_log = skip_log
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = ({i for i, p in enumerate(samples.im_files) if p in skip_log}
                               if skip_log is not None else set())
        if self._bad:
            _logger.info("%d image(s) skipped in an earlier run are left out", len(self._bad))
        self._epoch = 0
        self._pipe = None
        self._probe_pipe = None

    @property
    def sampler(self) -> range:
        return range(len(self.dataset) - len(self._bad))

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __bool__(self) -> bool:  # the validator tests ``self.dataloader or ...``
        return True

    def reset(self) -> None:
        self._pipe = self._probe_pipe = None

    def close(self) -> None:
        self._pipe = self._probe_pipe = None

    def _build(self, batch_size: int | None = None):
        from pipelines.detect import detect_pipeline

        o = self.options
        pipe = detect_pipeline(batch_size=batch_size or self.batch_size, num_threads=o.threads,
                               device_id=o.device_id if o.device == "gpu" else None,
                               seed=o.seed + 1000 * self._epoch, device=o.device, imgsz=self.imgsz,
                               augment=self.augment, prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _skip(self, item_or_index, reason: str) -> None:
        i = item_or_index.index if isinstance(item_or_index, _Item) else item_or_index
        path = self.dataset.im_files[i]
        self._bad.add(i)
        self.skipped.append((path, reason))
        if self.skip_log is not None:  # written now, logged by the skip log
            self.skip_log.add(i, path, reason, self.backend, max(self._epoch - 1, 0))
        else:
            _logger.warning("skipped %s: %s", path, reason)

    def _read(self, i: int) -> _Item | None:
        # one header parse: the pixel limit and the upright (h, w) as DALI decodes it (EXIF orientation
        # applied, the frame Ultralytics keeps labels in); a header PIL cannot read is "unreadable header: ..."
        data, reason, shape = read_encoded_upright(self.dataset.im_files[i], self.options.max_pixels)
        if reason is not None:
            self._skip(i, reason)
            return None
        h, w = shape
        return _Item(i, data, (h, w), letterbox_geometry(h, w, self.imgsz),
                     _xywh_to_ltrb(self.dataset.labels[i]["bboxes"]))

    def _probe(self, items: list[_Item]) -> dict[int, str]:
        """index -> reason, for the items the graph cannot take alone (a batch-1 pipeline of the same graph:
        only DALI itself knows what DALI cannot decode)."""
        from pillsnap_dali.loaders.dali_loader import dali_reason
        bad = {}
        for it in items:
            if self._probe_pipe is None:
                self._probe_pipe = self._build(batch_size=1)
            try:
                _, pipe = self._submit([it], self._probe_pipe)
                pipe.outputs()
                pipe.release_outputs()
            except RuntimeError as e:
                self._probe_pipe = None  # dead: rebuilt for the next probe
                bad[it.index] = dali_reason(e)
        return bad

    def _submit(self, items: list[_Item], pipe=None):
        """Feed one batch and schedule it; DALI works on it in its own threads while the trainer trains on
        the previous one. Returns what ``_collect`` needs (the pipeline is kept: ``reset()`` may drop ours)."""
        if pipe is None:
            if self._pipe is None:
                self._pipe = self._build()
            pipe = self._pipe
        pipe.feed_input("encoded", [it.data for it in items])
        pipe.feed_input("boxes", [it.boxes for it in items])
        pipe.feed_input("geometry", [np.array(it.geometry, np.int32) for it in items])
        pipe.schedule_run()
        return items, pipe

    def _collect(self, pending, blind: int = 0):
        """The scheduled batch's outputs. When the pipeline dies, the batch's files are probed one by one
        and those DALI cannot take are skipped; if no file fails alone, the batch is run once more, then
        given up with its reason (as the classification loader does). Other errors propagate.
        Returns (items, pipeline, outputs), outputs None when no item was left."""
        from pillsnap_dali.loaders.dali_loader import MAX_BLIND_FAILURES, dali_reason, is_dead_pipeline
        items, pipe = pending
        try:
            return items, pipe, pipe.outputs()
        except RuntimeError as e:
            if not is_dead_pipeline(e):
                raise
            if self._pipe is pipe:
                self._pipe = None  # a failed DALI pipeline is no longer valid
            bad = self._probe(items)
            if not bad:
                blind += 1
                if blind < MAX_BLIND_FAILURES:
                    return self._collect(self._submit(items), blind)
                why = f"pipeline failed on its batch, not on the file alone ({dali_reason(e)})"
                bad = {it.index: why for it in items}
            for it in items:
                if it.index in bad:
                    self._skip(it, bad[it.index])
            items = [it for it in items if it.index not in bad]
            if not items:
                return items, None, None
            return self._collect(self._submit(items))

    def _item_batches(self, order: np.ndarray):
        """Batches of read items in ``order``; with ``options.readers`` threads the next batches' files are
        read (bytes + header) while the trainer steps, not in the gap between steps."""
        chunks = (order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size))
        for read in _read_ahead(chunks, lambda i: self._read(int(i)), self.options.readers):
            items = [it for it in read if it]
            if items:
                yield items

    def __iter__(self):
        good = np.array([i for i in range(len(self.dataset)) if i not in self._bad], dtype=np.int64)
        if self.shuffle:
            good = np.random.default_rng(self.options.seed + self._epoch).permutation(good)
        self._epoch += 1
        batches = self._item_batches(good)
        first = next(batches, None)
        pending = self._submit(first) if first else None
        try:
            while pending is not None:
                items, pipe, outs = self._collect(pending)
                batch = self._collate(items, outs) if outs is not None else None  # copies out of DALI's buffers
                if outs is not None:
                    pipe.release_outputs()
                following = next(batches, None)  # read and scheduled before this batch is handed over
                pending = self._submit(following) if following else None
                if batch is not None:
                    yield batch
        finally:
            if pending is not None:  # the consumer stopped early: a batch is still scheduled on the pipeline,
                self._pipe = None    # whose outputs must never reach the next epoch

    def _images_to_torch(self, images) -> torch.Tensor:
        if self.options.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = images.as_tensor()
            out = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{self.options.device_id or 0}")
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
            return out
        return torch.from_numpy(images.as_array())

    def _collate(self, items: list[_Item], outs) -> dict:
        images, boxes = outs
        per = [np.asarray(boxes[k]).reshape(-1, 4) for k in range(len(items))]
        cls = [self.dataset.labels[it.index]["cls"].reshape(-1, 1) for it in items]
        return {
            "img": self._images_to_torch(images),
            "cls": torch.from_numpy(np.concatenate(cls).astype(np.float32)),
            "bboxes": torch.from_numpy(np.concatenate(per).astype(np.float32)),
            "batch_idx": torch.cat([torch.full((len(p),), float(k)) for k, p in enumerate(per)]),
            "im_file": tuple(self.dataset.im_files[it.index] for it in items),
            "ori_shape": tuple(it.shape for it in items),
            "resized_shape": tuple(it.geometry[:2] for it in items),
            "ratio_pad": tuple(((it.geometry[0] / it.shape[0], it.geometry[1] / it.shape[1]),
                                (it.geometry[3], it.geometry[2])) for it in items),
        }


# ------------------------------------------------------------------------------------------------- trainer
@functools.cache
def dali_trainer_class():
    """``DetectionTrainer`` subclass whose loaders are DALI graphs (built lazily: imports Ultralytics)."""
    ultralytics_offline()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import DEFAULT_CFG

    class DaliDetectionTrainer(DetectionTrainer):
        """Only ``get_dataloader`` changes; the training loop, loss and validator are Ultralytics' own."""

        def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, dali: DaliOptions | None = None,
                     skip_log=None):
            self.dali = dali or DaliOptions()
            self.skip_log = skip_log
            self.dali_loaders: list[DaliDetectLoader] = []
            super().__init__(cfg, overrides, _callbacks)

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
            if self.world_size > 1:
                raise NotImplementedError("the DALI detection loader runs on one GPU; use --backend ultralytics "
                                          "for multi-GPU detection training")
            augment = {k: float(getattr(self.args, k)) for k in AUG_KEYS} if mode == "train" else None
            loader = DaliDetectLoader(read_yolo_split(dataset_path), batch_size=batch_size, imgsz=self.args.imgsz,
                                      augment=augment, shuffle=mode == "train", options=self.dali,
                                      skip_log=self.skip_log, split=mode)
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
        dev_id = int(device.split(":")[1]) if ":" in device else 0
        options = DaliOptions(device="gpu" if backend == "dali" else "cpu", threads=run.threads,
                              device_id=dev_id if backend == "dali" else None, seed=run.seed,
                              max_pixels=run.max_pixels, readers=run.readers)
        trainer = functools.partial(dali_trainer_class(), dali=options, skip_log=SkipLog(run.out / "skipped.csv"))
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
