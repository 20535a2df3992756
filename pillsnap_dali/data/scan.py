"""Scan an AI Hub oral-drug tree: pair images with their label JSONs, one record per image.

The layouts, names, label keys and defects it handles are described in docs/aihub_format.md.

Reads both layouts (the raw Korean release, with spaces or underscores in folder names, and the existing
project's English rename). Source folders are found by name anywhere under the root:
``TS_n_단일`` / ``TL_n_조합`` / ``VS_n_single`` / ``VL_n_combo``... (T = AI Hub Training, V = Validation;
S = images, L = labels). An image ``TS_n_x/<folder>/<stem>.png`` pairs with every label
``TL_n_x/<folder>_json/**/<stem>.json`` (one JSON per pill: a combination image gets all its boxes).

No bad label crashes a scan: every problem is counted under a defect name (the names of the synthetic
generator's ``defects.json``) and the image goes to ``quarantine`` with a short stable reason, or is kept
with its raw (possibly malformed) boxes for the detection converter to validate.

Speed: one ``os.scandir`` walk, one ``stat`` per image (empty files, verification cache key), one
``json.loads`` per label; no image is opened here (see ``verify.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pillsnap_dali.data.classmap import META_KEYS
from pillsnap_dali.geometry import iou_xywh
from pillsnap_dali.imageio import IMAGE_SUFFIXES, NotRegularFile, open_regular

_logger = logging.getLogger(__name__)

SOURCE_RE = re.compile(r"^(?P<part>[TV])(?P<role>[SL])_(?P<n>\d+)_(?P<kind>단일|조합|single|combo|combination)$")
KCODE_RE = re.compile(r"^K-\d{6}$")
COMBO_RE = re.compile(r"^K-\d{6}(?:-\d{6})+$")
IMAGE_EXTS = frozenset(IMAGE_SUFFIXES)
UNSUPPORTED_EXTS = frozenset({".gif", ".tif", ".tiff", ".jp2", ".j2k", ".pnm", ".ppm", ".pgm", ".ico", ".heic",
                              ".avif", ".dds", ".tga", ".psd", ".svg"})
DEFECTS = ("combo_missing_pill_json", "bbox_outside", "double_label", "unparsable_json", "bbox_bad_len",
           "bbox_nonpositive", "null_metadata", "zero_dimension", "orphan_image", "orphan_label",
           "truncated_png", "empty_file", "near_identical_pair")
# metadata that a real label always fills; an empty or null value here (or any null) is null_metadata;
# a 0 in SIZE_META, or no usable width/height, is zero_dimension
REQUIRED_META = ("drug_N", "dl_name", "drug_shape", "color_class1", "dl_company")
SIZE_META = ("thick", "leng_long", "leng_short")
# what a pill looks like, imprint aside: two K-codes sharing this differ only by imprint
LOOK_KEYS = ("drug_shape", "color_class1", "color_class2", "form_code_name", "dl_custom_shape", "leng_long",
             "leng_short", "thick")
DOUBLE_LABEL_IOU = 0.9


@dataclass(slots=True)
class ImageRecord:
    """One image and everything its labels say about it."""
    image_path: str           # absolute
    label_paths: list         # absolute, sorted
    code: str                 # the class: drug_N (fallbacks in _pill_code); combination: first folder code
    codes: list               # K-codes of all pills (combination: from the folder name)
    image_type: str           # single | combination
    source: str               # TS_n_단일 / VS_n_single ... folder name
    part: str                 # train (AI Hub Training) | val (AI Hub Validation)
    combo_id: str             # combination folder name; for singles the code
    width: int                # from the label JSON (0 when unknown)
    height: int
    boxes: list               # [{"bbox": raw list, "code": K}] one per pill JSON
    size: int = 0             # file bytes
    mtime_ns: int = 0


@dataclass
class ScanResult:
    root: str
    records: list = field(default_factory=list)        # ImageRecord, sorted by image_path
    quarantine: list = field(default_factory=list)     # (path, reason): images, and labels with no image
    defects: dict = field(default_factory=dict)        # defect name -> count
    dl_idx_convention: str = "unknown"                  # "raw: K-1" | "k" | "mixed" | "unknown"
    meta: dict = field(default_factory=dict)           # K-code -> drug metadata (META_KEYS)
    counts: dict = field(default_factory=dict)         # images, labels, source_dirs, other_files, dl_idx_*

    def quarantined_images(self) -> list:
        return [(p, r) for p, r in self.quarantine if r != "orphan label"]


@dataclass(slots=True)
class _Source:
    path: str
    name: str
    part: str        # train | val
    role: str        # S (images) | L (labels)
    n: str
    kind: str        # single | combination


class _LabelError(Exception):
    """A label file that cannot be used; ``args[0]`` is the quarantine reason."""


def _as_source(path: str, name: str) -> _Source | None:
    m = SOURCE_RE.match(unicodedata.normalize("NFC", name))
    if not m:
        return None
    kind = "single" if m["kind"] in ("단일", "single") else "combination"
    return _Source(path, name, "train" if m["part"] == "T" else "val", m["role"], m["n"], kind)


def _new_dir(entry, seen: set) -> bool:
    """True the first time a directory (followed through symlinks) is met: a link loop is walked once."""
    try:
        st = entry.stat()
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        _logger.warning("skipped %s: a folder already walked (symlink loop or duplicate link)", entry.path)
        return False
    seen.add(key)
    return True


def _listdir(d: str) -> list:
    try:
        return list(os.scandir(d))
    except OSError as e:
        _logger.warning("cannot list %s: %s (its files are not scanned)", d, e.strerror)
        return []


def find_sources(root: str | Path) -> list[_Source]:
    """Every TS/TL/VS/VL folder under ``root`` (not descending into them), sorted by path."""
    found, stack, seen = [], [str(root)], set()
    while stack:
        for e in _listdir(stack.pop()):
            if not e.is_dir() or not _new_dir(e, seen):
                continue
            src = _as_source(e.path, e.name)
            if src:
                found.append(src)
            else:
                stack.append(e.path)
    return sorted(found, key=lambda s: s.path)


def _files(top: str):
    """Yield (top-level folder name, DirEntry) for every file below ``top``; top-level files get folder "".

    A source folder inside the source (``TS_1_단일/TS_1_단일/K-.../``, what unzipping into a folder of the
    zip's name gives) is looked through: its sub-folders are the top-level folders."""
    stack, seen = [(top, "")], set()
    while stack:
        d, folder = stack.pop()
        for e in _listdir(d):
            if e.is_dir():
                if _new_dir(e, seen):
                    nested = not folder and _as_source(e.path, e.name) is not None
                    stack.append((e.path, folder or ("" if nested else e.name)))
            else:
                yield folder, e


def tree_fingerprint(root: str | Path) -> dict:
    """What the manifests of ``root`` depend on, cheaply (names, sizes and mtimes; no file is read): the number
    of files in its source folders and an order-free digest of (path, size, mtime). A label fixed in place or
    an image replaced by another of the same name changes the digest, so old manifests are not reused."""
    n, acc = 0, 0
    for src in find_sources(root):
        for _, e in _files(src.path):
            try:
                st = e.stat()
                key = f"{e.path}|{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                key = f"{e.path}|?"
            n += 1
            acc = (acc + int.from_bytes(hashlib.blake2b(os.fsencode(key), digest_size=8).digest(), "big")) % 2 ** 64
    return {"files": n, "digest": f"{acc:016x}"}


class _Scan:
    """The accumulator of one scan: the paired files, then the records, quarantine and defect counts."""

    def __init__(self, root: str):
        self.res = ScanResult(root=root, defects={k: 0 for k in DEFECTS})
        self.images: dict = {}      # key -> (source, folder, DirEntry)
        self.labels: dict = {}      # key -> [label path]
        self.counts = Counter()
        self.dl_idx = Counter()

    def collect(self, src: _Source) -> None:
        self.counts["source_dirs"] += 1
        for folder, e in _files(src.path):
            stem, ext = os.path.splitext(e.name)
            ext = ext.lower()
            if src.role == "L":
                if ext == ".json":
                    key = (src.part, src.kind, src.n, folder[:-5] if folder.endswith("_json") else folder, stem)
                    self.labels.setdefault(key, []).append(e.path)
                    self.counts["labels"] += 1
                else:
                    self._other(e.path)
            elif ext in IMAGE_EXTS or ext in UNSUPPORTED_EXTS:
                self._add_image((src.part, src.kind, src.n, folder, stem), (src, folder, e))
                self.counts["images"] += 1
            else:
                self._other(e.path)

    def _add_image(self, key: tuple, item: tuple) -> None:
        """One image per (folder, name without extension): labels pair by name. A second file of the same
        name (x.png beside x.jpg) is quarantined; the PNG (the release's format) is kept, else the path sorting
        first, whatever the walk order."""
        prev = self.images.get(key)
        if prev is None:
            self.images[key] = item
            return
        keep, drop = sorted((prev, item), key=lambda t: (not t[2].name.lower().endswith(".png"), t[2].path))
        self.images[key] = keep
        self.quarantine(drop[2].path, f"same name as {keep[2].name}, another extension")

    def _other(self, path: str) -> None:
        self.counts["other_files"] += 1
        _logger.debug("ignored (neither image nor label): %s", path)

    def quarantine(self, path: str, reason: str, defect: str | None = None) -> None:
        self.res.quarantine.append((printable_path(path), reason))
        if defect:
            self.res.defects[defect] += 1

    def pair(self) -> None:
        for key in sorted(self.images, key=lambda k: self.images[k][2].path):
            src, folder, entry = self.images[key]
            labels = sorted(self.labels.pop(key, []))
            rec = self._record(src, folder, entry, labels)
            if rec is not None:
                self.res.records.append(rec)
        for key in sorted(self.labels):
            for p in sorted(self.labels[key]):
                self.quarantine(p, "orphan label", "orphan_label")

    def _record(self, src: _Source, folder: str, entry, labels: list) -> ImageRecord | None:
        path, stem = entry.path, os.path.splitext(entry.name)[0]
        if printable_path(path) != path:  # no manifest (UTF-8 CSV) can name it, no label can be trusted to pair
            self.quarantine(path, "path is not valid UTF-8 (a zip extracted with another code page, e.g. CP949): "
                                  "rename it (convmv -f cp949 -t utf8)")
            return None
        if stem.endswith("_index"):
            self.quarantine(path, "index image")  # the layout picture of a combination folder
            self.counts["index_images"] += 1
            return None
        ext = os.path.splitext(entry.name)[1].lower()
        if ext in UNSUPPORTED_EXTS:
            self.quarantine(path, f"unsupported format: {ext[1:].upper()}")
            return None
        try:
            st = entry.stat()
        except OSError as e:  # a dangling symlink, a file removed during the walk
            self.quarantine(path, f"unreadable: {e.strerror or e}")
            return None
        if st.st_size == 0:
            self.quarantine(path, "empty file", "empty_file")
            return None
        if not labels:
            self.quarantine(path, "no label", "orphan_image")
            return None
        try:
            pills = [self._read_label(p, stem) for p in labels]
        except _LabelError as e:
            self.quarantine(path, e.args[0])
            return None
        return self._assemble(src, folder, path, stem, labels, pills, st)

    def _read_label(self, path: str, stem: str) -> tuple:
        """(code, width, height, bbox) of one pill JSON, counting its defects."""
        try:
            with open_regular(path) as fh:  # a FIFO or a device under a .json name: never a read that blocks
                raw = fh.read()
            doc = json.loads(raw)
        except NotRegularFile as e:
            self.res.defects["unparsable_json"] += 1
            raise _LabelError(f"label {path}: {e}") from None
        except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
            self.res.defects["unparsable_json"] += 1
            raise _LabelError("unparsable json") from None
        try:
            info = doc["images"][0]
            bbox = doc["annotations"][0].get("bbox") if doc.get("annotations") else None
            if not isinstance(info, dict):
                raise TypeError
        except (KeyError, IndexError, TypeError, AttributeError):
            self.res.defects["unparsable_json"] += 1
            raise _LabelError("bad label structure") from None
        code = _pill_code(info, stem, path)
        if code is None:
            self.res.defects["null_metadata"] += 1  # neither drug_N nor dl_mapping_code, nothing to fall back on
            raise _LabelError("no class")
        self._check_meta(info, code)
        width, height = _dims(info)
        if not (width and height):
            self.res.defects["zero_dimension"] += 1  # no usable image width/height
        self._check_bbox(bbox, width, height)
        return code, width, height, bbox

    def _check_meta(self, info: dict, code: str) -> None:
        if any(info.get(k) in (None, "") for k in REQUIRED_META) or None in info.values():
            self.res.defects["null_metadata"] += 1
        if any(info.get(k) == 0 for k in SIZE_META):
            self.res.defects["zero_dimension"] += 1  # a pill of 0 mm (thick / leng_long / leng_short)
        self.dl_idx[_dl_idx_kind(info.get("dl_idx"), code)] += 1
        if info.get("drug_N") == code:  # the most complete label of the code describes it (first on ties)
            meta = {k: info.get(k) for k in META_KEYS}
            old = self.res.meta.get(code)
            if old is None or _filled(meta) > _filled(old):
                self.res.meta[code] = meta

    def _check_bbox(self, bbox, width: int, height: int) -> None:
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            self.res.defects["bbox_bad_len"] += 1
            return
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            self.res.defects["bbox_nonpositive"] += 1
        elif width and height and (x + w > width or y + h > height):
            self.res.defects["bbox_outside"] += 1

    def _assemble(self, src, folder, path, stem, labels, pills, st) -> ImageRecord:
        width, height = next(((w, h) for _, w, h, _ in pills if w and h), (0, 0))
        boxes = [{"bbox": bbox, "code": code} for code, _, _, bbox in pills]
        if src.kind == "combination":
            codes = _folder_codes(folder) or _folder_codes(stem.split("_", 1)[0]) or sorted({c for c, *_ in pills})
            if missing_codes(codes, boxes):
                self.res.defects["combo_missing_pill_json"] += 1
            if _has_double_label([b["bbox"] for b in boxes]):
                self.res.defects["double_label"] += 1
            code, combo_id = codes[0], folder or stem.split("_", 1)[0]
        else:
            code = pills[0][0]
            codes, combo_id = [code], code
        return ImageRecord(path, labels, code, codes, src.kind, src.name, src.part, combo_id, width, height,
                           boxes, st.st_size, st.st_mtime_ns)

    def finish(self) -> ScanResult:
        res = self.res
        res.defects["near_identical_pair"] = count_near_identical(res.meta)
        res.dl_idx_convention = _convention(self.dl_idx)
        res.counts = dict(self.counts) | {f"dl_idx_{k}": v for k, v in sorted(self.dl_idx.items())}
        for k in ("images", "labels", "source_dirs", "other_files", "index_images"):
            res.counts.setdefault(k, 0)
        res.counts = dict(sorted(res.counts.items()))
        return res


def scan_tree(root: str | Path) -> ScanResult:
    """Scan an AI Hub tree (either layout); see the module docstring. Never raises on a bad label."""
    root = str(Path(root).resolve())
    scan = _Scan(root)
    sources = find_sources(root)
    if not sources:
        _logger.warning("no AI Hub source folders (TS_n_단일, TL_n_조합, VS_n_single...) under %s", root)
    for src in sources:
        scan.collect(src)
    scan.pair()
    res = scan.finish()
    _log_summary(res)
    return res


def _log_summary(res: ScanResult) -> None:
    c = res.counts
    _logger.info("scanned %s: %d images, %d labels in %d source folders -> %d records, %d quarantined; "
                 "dl_idx convention %s", res.root, c["images"], c["labels"], c["source_dirs"], len(res.records),
                 len(res.quarantine), res.dl_idx_convention)
    found = {k: v for k, v in res.defects.items() if v}
    if found:
        _logger.warning("defects found: %s", ", ".join(f"{k}={v}" for k, v in found.items()))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dims(info: dict) -> tuple[int, int]:
    w, h = info.get("width"), info.get("height")
    if _is_num(w) and _is_num(h) and w > 0 and h > 0:
        return int(w), int(h)
    return 0, 0


def missing_codes(codes, boxes) -> set:
    """K-codes of a combination's folder name that no pill label carries (by code: a double label on one
    pill must not hide another pill's missing JSON)."""
    return set(codes) - {b.get("code") for b in boxes}


def printable_path(path: str) -> str:
    """``path`` itself when it is valid UTF-8; else its bytes with the undecodable ones as ``\\xNN`` (a file
    name from a CP949 zip on a UTF-8 system), so it can still be written to a CSV and read by a person."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _pill_code(info: dict, stem: str, path: str = "") -> str | None:
    """The class of one pill: drug_N, else dl_mapping_code, else the code of a single's file name, else the
    label's folder (``K-000322_json/`` of a single, the pill's own ``.../K-000322/`` of a combination)."""
    for key in ("drug_N", "dl_mapping_code"):
        v = info.get(key)
        if isinstance(v, str) and KCODE_RE.match(v):
            return v
    head = stem.split("_", 1)[0]
    if KCODE_RE.match(head):
        return head
    folder = os.path.basename(os.path.dirname(path))
    folder = folder[:-5] if folder.endswith("_json") else folder
    return folder if KCODE_RE.match(folder) else None


def _folder_codes(name: str) -> list[str]:
    """``K-000250-000573-002483`` -> ["K-000250", "K-000573", "K-002483"]; [] if not that shape."""
    if not COMBO_RE.match(name):
        return []
    return ["K-" + n for n in name[2:].split("-")]


def _dl_idx_kind(value, code: str) -> str:
    try:
        idx = int(value)
    except (TypeError, ValueError):
        return "other"
    k = int(code[2:])
    return "raw" if idx == k - 1 else "k" if idx == k else "other"


def _convention(tally: Counter) -> str:
    if tally["raw"] and tally["k"]:
        return "mixed"
    if tally["raw"]:
        return "raw: K-1"
    return "k" if tally["k"] else "unknown"


def _has_double_label(bboxes: list) -> bool:
    good = [b for b in bboxes if isinstance(b, list) and len(b) == 4 and all(_is_num(v) for v in b)
            and b[2] > 0 and b[3] > 0]
    return any(iou_xywh(good[i], good[j]) >= DOUBLE_LABEL_IOU for i in range(len(good)) for j in range(i + 1, len(good)))


def _filled(meta: dict) -> int:
    """How many of the required metadata fields a label fills (its null_metadata defect leaves some empty)."""
    return sum(meta.get(k) not in (None, "") for k in REQUIRED_META)


def count_near_identical(meta: dict) -> int:
    """Pairs of K-codes that look the same (shape, colours, size, form) and differ only by imprint."""
    groups: dict = {}
    for code, m in meta.items():
        look = tuple(str(m.get(k)) for k in LOOK_KEYS)
        if all(v in ("None", "") for v in look[:3]):
            continue  # no usable description
        groups.setdefault(look, []).append(code)
    return sum(len(v) * (len(v) - 1) // 2 for v in groups.values())
