"""The detection loader: batches for Ultralytics' DetectionTrainer/DetectionValidator from the DALI graph of
``pipelines/detect.py``, on the shared ``runner.DaliRunner`` (live pipeline, read-ahead, recovery, copy).

What is detection-specific lives here: a YOLO split on disk (``read_yolo_split``), how an image row becomes
the graph's inputs (bytes, ltrb boxes, the letterbox geometry from the upright header size) and the batch
dict Ultralytics expects.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines import ENCODED, PipelineOptions
from pipelines.detect import BOXES, DRAWS, GEOMETRY, DetectSpec, augments, detect_inputs, detect_pipeline

from pillsnap_dali.errors import InputError
from pillsnap_dali.geometry import PAD_VALUE, cxcywh_to_ltrb, letterbox_geometry
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, read_encoded_upright
from pillsnap_dali.loaders.augment import draw_detect
from pillsnap_dali.loaders.common import EpochPlan, RowOrder
from pillsnap_dali.loaders.runner import DaliRunner, Feed, to_torch
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)


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
        raise InputError(f"{path}: label lines must have 5 values (cls cx cy w h), got {bad[0]}")
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


class DaliDetectLoader:
    """Looks like Ultralytics' DataLoader where its trainer looks (``dataset``, ``batch_size``,
    ``num_workers``, ``sampler``, ``drop_last``, ``len()``, ``reset()``, ``close()``). A file that cannot be
    read or decoded is logged, listed in ``skipped`` and left out of later epochs: never a black image with a
    label. With a ``skip_log`` (the run's ``skipped.csv``, shared by the training and validation loaders) each
    skip is written the moment it is found, and files already in it are left out from the start (a rerun in
    the same run dir does not retry them). ``options``: the one ``PipelineOptions`` (its batch size is
    ``batch_size``); ``readers``, ``max_pixels``: ``loader.readers``, ``data.max_pixels``.
    """

    def __init__(self, samples: DetectSamples, *, batch_size: int, imgsz: int, augment: dict | None,
                 shuffle: bool, options: PipelineOptions, skip_log: SkipLog | None = None, split: str = "",
                 readers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
        if len(samples) == 0:
            raise InputError("the detection split has no images")
        self.dataset, self.batch_size, self.imgsz = samples, int(batch_size), int(imgsz)
        self.augment, self.shuffle, self.max_pixels = augment, shuffle, max_pixels
        self.options = dataclasses.replace(options, batch_size=self.batch_size)
        self.num_workers, self.drop_last = options.num_threads, False
        self.split = split
        # rows in the skip log are indices into this split's image list: the split is named with the backend
        self.backend = ("dali" if options.device == "gpu" else "dali-cpu") + (f"/{split}" if split else "")
        # the shared row plan and skip bookkeeping (loaders.common.EpochPlan): files in the skip log (this
        # run's, or an earlier run's in the same run dir) are left out by path, like the classification loaders'
        self.skip_log = skip_log if skip_log is not None else SkipLog(None)
        self.order = RowOrder(shuffle=shuffle, seed=self.options.seed)
        self.skipped: list[tuple[str, str]] = []  # this loader's own skips, (path, reason)
        self._epoch = 0
        self._plan: EpochPlan | None = None
        self._last_stats: dict = {}
        if len(self.skip_log):
            excluded = self._next_plan().stats["excluded"]
            if excluded:
                _logger.info("%d image(s) skipped in an earlier run are left out", excluded)
        spec = DetectSpec(imgsz=self.imgsz, augment=augment, pad_value=PAD_VALUE)
        feed = Feed(inputs=tuple(i.name for i in detect_inputs(spec)), read=self._read,
                    extra=self._draws if augments(spec) else None)
        self.runner = DaliRunner(lambda source, o: detect_pipeline(source, spec, o), feed, self.options, self._skip,
                                 readers=readers, what=f"batch size {self.batch_size}, image size {self.imgsz} px")

    def _next_plan(self) -> EpochPlan:
        return EpochPlan(self.dataset.im_files, self.order, self._epoch, self.skip_log.paths)

    @property
    def sampler(self) -> range:
        return range(len(self._next_plan().order))

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __bool__(self) -> bool:  # the validator tests ``self.dataloader or ...``
        return True

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` is (its order and its draws): the trainer's, so a resumed run's epoch
        is the interrupted one's (``training.detector`` sets it at each epoch start)."""
        self._epoch = int(epoch)

    def _draws(self, rows: np.ndarray, samples: list, epoch: int) -> dict:
        """The batch's augmentation, drawn on the host from (seed, epoch, row) (``augment.draw_detect``)."""
        return {DRAWS: list(draw_detect(self.augment, self.options.seed, epoch, rows))}

    def reset(self) -> None:
        """Ultralytics' DataLoader call: nothing to do (the pipeline lives across epochs)."""

    def close(self) -> None:
        self.runner.close()

    def epoch_stats(self) -> dict:
        """The last epoch's accounting (``EpochPlan.stats``: rows, yielded, skipped, excluded, dropped)."""
        return dict(self._last_stats)

    def _skip(self, i: int, reason: str) -> None:
        path = self.dataset.im_files[i]
        self.skipped.append((path, reason))
        self._plan.stats["skipped"] += 1
        self.skip_log.add(i, path, reason, self.backend, self.runner.reader.epoch, split=self.split)

    def _read(self, i: int) -> tuple:
        """The image's inputs from one header parse: the pixel limit and the upright (h, w) as DALI decodes
        it (EXIF orientation applied, the frame Ultralytics keeps labels in); a header PIL cannot read is
        "unreadable header: ..."."""
        data, reason, shape = read_encoded_upright(self.dataset.im_files[i], self.max_pixels)
        if reason is not None:
            return None, reason
        geometry = letterbox_geometry(*shape, self.imgsz)
        return {ENCODED: data, BOXES: cxcywh_to_ltrb(self.dataset.labels[i]["bboxes"]),
                GEOMETRY: np.array(geometry, np.int32), "shape": tuple(shape), "letterbox": geometry}, None

    def __iter__(self):
        plan = self._plan = self._next_plan()
        self._last_stats = plan.stats
        epoch, self._epoch = self._epoch, self._epoch + 1
        yield from self.runner.epoch(plan.order, epoch, False, self._collate)

    def _collate(self, outs, samples: list) -> dict:
        images, boxes, _ = outs
        self._plan.stats["yielded"] += len(samples)
        per = [np.asarray(boxes[k]).reshape(-1, 4) for k in range(len(samples))]
        cls = [self.dataset.labels[s["row"]]["cls"].reshape(-1, 1) for s in samples]
        device = torch.device("cuda", self.options.device_id) if self.options.device == "gpu" else torch.device("cpu")
        return {
            "img": to_torch(images, torch.uint8, device),
            "cls": torch.from_numpy(np.concatenate(cls).astype(np.float32)),
            "bboxes": torch.from_numpy(np.concatenate(per).astype(np.float32)),
            "batch_idx": torch.cat([torch.full((len(p),), float(k)) for k, p in enumerate(per)]),
            "im_file": tuple(self.dataset.im_files[s["row"]] for s in samples),
            "ori_shape": tuple(s["shape"] for s in samples),
            "resized_shape": tuple(s["letterbox"][:2] for s in samples),
            "ratio_pad": tuple(((g[0] / h, g[1] / w), (g[3], g[2]))
                               for g, (h, w) in ((s["letterbox"], s["shape"]) for s in samples)),
        }
