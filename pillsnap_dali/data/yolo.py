"""Combination images -> YOLO detection dataset (one class, ``pill``).

One label file per IMAGE holding every pill box of all its pill JSONs (the existing project wrote one
label file per JSON, so a 4-pill image kept one box: precision 0.28, mAP50 0.33). Each raw box goes through
the box rules of ``pillsnap_dali.geometry.clean_boxes`` (dropped: ``bad_length``, ``not_numeric``,
``non_positive_size``, ``outside_image``; kept: ``clipped``, ``merged``).

Images: ``*_index.png`` layout pictures are skipped; an image that cannot be read, or that has no valid
box left, is skipped; every skip and every box event is logged and counted in ``convert_report.json``.
The split is the manifest's (``detect_{train,val,test}.csv``, split by combination so near-duplicate
shots of one combination never straddle train and val). Images are SYMLINKS to the originals (the users'
disk is 97 % full): nothing is copied.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.errors import InputError
from pillsnap_dali.imageio import upright_size
from pillsnap_dali.data.manifest import Manifest, read_manifest
from pillsnap_dali.geometry import DROP_REASONS, KEEP_REASONS, BoxRules, clean_boxes
from pillsnap_dali.data.build import ensure_manifests

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")



@dataclass
class ConvertReport:
    """What the conversion did: per split counts, and every box event and image skip."""
    out_dir: str
    images: dict = field(default_factory=dict)       # split -> images written
    boxes: dict = field(default_factory=dict)        # split -> boxes written
    box_events: list = field(default_factory=list)   # BoxEvent
    skipped_images: list = field(default_factory=list)  # (path, reason)
    fewer_boxes_than_codes: int = 0  # combination images whose folder names more drugs than boxes kept

    def counts(self) -> dict:
        c = Counter(e.reason for e in self.box_events)
        return {r: c.get(r, 0) for r in DROP_REASONS + KEEP_REASONS}

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "images": self.images, "boxes": self.boxes,
                "box_events": self.counts(), "skipped_images": dict(Counter(r for _, r in self.skipped_images)),
                "fewer_boxes_than_codes": self.fewer_boxes_than_codes,
                "events": [vars(e) for e in self.box_events],
                "skipped": [{"image": p, "reason": r} for p, r in self.skipped_images]}


def yolo_lines(boxes: list[list[float]], width: int, height: int) -> list[str]:
    """Class 0, normalized center x, center y, width, height."""
    lines = []
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines


def image_size(path: str, known: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(width, height) from the manifest, else from the image header, upright (EXIF orientation applied, as
    the decoders deliver the pixels; no decode). OSError if missing/empty."""
    if os.path.getsize(path) == 0:
        raise OSError("empty file")
    if known and known[0] > 0 and known[1] > 0:
        return known
    return upright_size(path)


def _codes_in_name(combo_id: str) -> int:
    """Number of K-codes a combination folder names: ``K-000250-000573-002483`` -> 3."""
    parts = combo_id.split("_")[0].split("-")
    return max(len(parts) - 1, 0) if parts and parts[0] == "K" else 0


def _link_name(path: str, used: set[str]) -> str:
    name = Path(path).name
    stem, ext, n = Path(path).stem, Path(path).suffix, 1
    while name in used:
        name, n = f"{stem}__{n}{ext}", n + 1
    used.add(name)
    return name


def _convert_row(m: Manifest, i: int, split: str, out: Path, rules: BoxRules, used: set[str],
                 report: ConvertReport) -> int:
    """Write one image's symlink and label file; returns the boxes written (0: the image was skipped)."""
    path = m.source_path(i)
    if Path(path).name.endswith("_index.png"):
        report.skipped_images.append((path, "index_image"))
        return 0
    try:
        width, height = image_size(path, m.sizes[i] if m.sizes else (0, 0))
    except OSError as e:
        report.skipped_images.append((path, f"unreadable image: {e}"))
        return 0
    boxes, events = clean_boxes(m.boxes[i], width, height, rules, image=path)
    report.box_events.extend(events)
    if not boxes:
        report.skipped_images.append((path, "no valid box"))
        return 0
    if m.image_types[i] == "combination" and len(boxes) < _codes_in_name(m.combo_ids[i]):
        report.fewer_boxes_than_codes += 1
        if rules.drop_incomplete:  # its unlabelled pills would be taught as background
            report.skipped_images.append((path, "fewer boxes than drugs in its name"))
            return 0
    name = _link_name(path, used)
    os.symlink(os.path.abspath(path), out / "images" / split / name)
    # a plain write: the split was emptied first and data.yaml, written last, is what marks it complete
    # (an fsync per label file cost more than the conversion itself)
    (out / "labels" / split / (Path(name).stem + ".txt")).write_text("\n".join(yolo_lines(boxes, width, height)) + "\n",
                                                                    encoding="utf-8")
    return len(boxes)


def _reset_split(out: Path, split: str) -> None:
    """Remove what an earlier conversion left for this split (our symlinks, labels, Ultralytics' cache)."""
    for sub in ("images", "labels"):
        d = out / sub / split
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.exists():
            shutil.rmtree(d)  # symlinks inside are unlinked, their targets untouched
        d.mkdir(parents=True)
    (out / "labels" / f"{split}.cache").unlink(missing_ok=True)


def write_data_yaml(out: Path, splits: list[str]) -> Path:
    lines = ["# written by pillsnap_dali.yolo_convert: one class, every pill box of each image",
             f"path: {out.resolve()}"]
    lines += [f"{s}: images/{s}" for s in splits]
    lines += ["nc: 1", "names:", "  0: pill"]
    path = out / "data.yaml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _log_summary(report: ConvertReport) -> None:
    for e in report.box_events[:20]:
        _logger.warning("box %s: %s %s (%s) in %s", e.reason, e.code, e.bbox, e.detail, Path(e.image).name)
    for p, why in report.skipped_images[:20]:
        _logger.warning("skipped %s: %s", Path(p).name, why)
    hidden = max(len(report.box_events) - 20, 0) + max(len(report.skipped_images) - 20, 0)
    if hidden:
        _logger.warning("... %d more box events / skipped images: see convert_report.json", hidden)
    _logger.info("YOLO dataset in %s: images %s, boxes %s, box events %s, skipped images %d, "
                 "%d images with fewer boxes than the codes in their name", report.out_dir, report.images,
                 report.boxes, report.counts(), len(report.skipped_images), report.fewer_boxes_than_codes)


def _convert_split(parts: list[Manifest], split: str, out: Path, rules: BoxRules, report: ConvertReport) -> None:
    _reset_split(out, split)
    used: set[str] = set()
    n_img = n_box = 0
    for m in parts:
        for i in range(len(m)):
            n = _convert_row(m, i, split, out, rules, used, report)
            n_img, n_box = n_img + (n > 0), n_box + n
    report.images[split], report.boxes[split] = n_img, n_box


def convert_manifests(manifests: dict[str, list[Manifest]], out_dir: str | Path, rules: BoxRules) -> ConvertReport:
    """Write ``out_dir/{images,labels}/<split>/``, ``data.yaml`` and ``convert_report.json``.

    ``manifests`` maps a split name to the manifests whose rows go there (combinations, optionally singles).
    """
    if "train" not in manifests or "val" not in manifests:
        raise InputError(f"a detection dataset needs train and val splits, got {sorted(manifests)}")
    out = Path(out_dir)
    report = ConvertReport(out_dir=str(out.resolve()))
    (out / "data.yaml").unlink(missing_ok=True)  # written last: an interrupted conversion leaves none
    for split, parts in manifests.items():
        _convert_split(parts, split, out, rules, report)
    atomic_write_text(out / "convert_report.json", json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
    _log_summary(report)
    empty = [s for s in ("train", "val") if report.images[s] == 0]
    if empty:
        raise InputError(f"no usable image left in the {' and '.join(empty)} split(s): "
                         f"see {out / 'convert_report.json'}")
    write_data_yaml(out, list(manifests))
    return report


def _singles(path: Path) -> Manifest | None:
    """Single-pill rows of a classification manifest that carry a box (one-box detection images)."""
    if not path.exists():
        return None
    m = read_manifest(path)
    keep = [i for i in range(len(m)) if m.image_types[i] == "single" and m.boxes[i]]
    return m.subset(keep) if keep else None


def detection_manifests(manifest_dir: str | Path, include_singles: bool = False) -> dict[str, list[Manifest]]:
    """``detect_{train,val[,test]}.csv`` of a manifest dir, plus single images when ``include_singles``."""
    d = Path(manifest_dir)
    out: dict[str, list[Manifest]] = {}
    for split in SPLITS:
        p = d / f"detect_{split}.csv"
        if not p.exists():
            if split == "test":
                continue
            raise FileNotFoundError(f"{p} is missing: build the manifests first (python -m pillsnap_dali.manifest)")
        out[split] = [read_manifest(p)]
        singles = _singles(d / f"manifest_{split}.csv") if include_singles else None
        if singles is not None:
            out[split].append(singles)
    return out


def convert_stage(cfg) -> Path:
    """Build (or reuse) the stage's manifests, convert them into ``<manifest dir>/yolo``; returns data.yaml."""
    manifest_dir = Path(ensure_manifests(cfg))
    rules = BoxRules.from_config(cfg)
    out = manifest_dir / "yolo"
    convert_manifests(detection_manifests(manifest_dir, cfg.detect.include_singles), out, rules)
    return out / "data.yaml"
