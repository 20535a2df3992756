"""Reading and writing manifest CSVs (ours and the existing project's).

Ours: ``row,image_path,mapping_code,image_type,source,combo_id,width,height,boxes,orig_path``
  - ``row``: 0..N-1, the row id carried through the loaders (every sample is traceable to its row); a file
    read with repeated or non-integer ids is refused, naming the lines (``_check_unique_rows``)
  - ``boxes``: JSON list of ``{"bbox": [x, y, w, h], "code": "K-code"}``, one per pill JSON, bbox in pixels
    (COCO, top-left origin) exactly as the label had it (possibly malformed: consumers validate)
  - ``combo_id``: the combination folder name (split unit); the image stem's code part for singles
  - ``orig_path``: the source PNG when ``image_path`` points into a JPEG cache, else empty
Legacy (the existing PillSnap project): exactly ``image_path,mapping_code,image_type,source``.

The manifest never copies data: it only lists absolute paths.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pillsnap_dali.atomic import atomic_open
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.data.columns import Interned, Ints, JsonPacked, Packed, Pairs

_logger = logging.getLogger(__name__)

COLUMNS = ["row", "image_path", "mapping_code", "image_type", "source", "combo_id", "width", "height",
           "boxes", "orig_path"]
LEGACY_COLUMNS = ["image_path", "mapping_code", "image_type", "source"]


class ManifestError(PillsnapError, ValueError):
    pass


def _column(kind, **kw):
    """A Manifest attribute kept as a compact column: assigning any sequence stores it as ``kind``."""
    name = f"_{kw.pop('attr')}"

    def get(self):
        return getattr(self, name)

    def put(self, values):
        setattr(self, name, kind.of(values, **kw))
    return property(get, put)


class Manifest:
    """Column-wise rows of one split. ``len(m)`` rows, indexed ``0..len(m)-1``; ``file_rows`` keeps each one's
    row number in the manifest file (its ``row`` column, else its line order) through ``subset``, so a row
    dropped before training does not renumber what skipped.csv reports.

    The columns (``paths codes image_types sources combo_ids boxes orig_paths sizes file_rows``) are compact
    sequences (``pillsnap_dali.data.columns``, about 0.2 KB per row where Python lists of strings took
    1.35 KB): index, slice, iterate and compare them like lists; ``boxes[i]`` is a freshly parsed list,
    ``sizes[i]`` a ``(width, height)`` tuple, ``file_rows[i]`` an int. Assigning a column (any sequence)
    stores it compactly; they are filled by ``read_manifest`` and the constructor, never appended to by
    consumers. ``sizes`` / ``file_rows`` may be empty (unknown sizes; rows 0..len-1)."""
    paths = _column(Packed, attr="paths", split_dirs=True)
    codes = _column(Interned, attr="codes")
    image_types = _column(Interned, attr="image_types")
    sources = _column(Interned, attr="sources")
    combo_ids = _column(Packed, attr="combo_ids")
    boxes = _column(JsonPacked, attr="boxes")
    orig_paths = _column(Packed, attr="orig_paths", split_dirs=True)
    sizes = _column(Pairs, attr="sizes")
    file_rows = _column(Ints, attr="file_rows")

    def __init__(self, path: str | None, paths: Sequence[str], codes: Sequence[str], image_types: Sequence[str],
                 sources: Sequence[str], combo_ids: Sequence[str], boxes: Sequence[list], orig_paths: Sequence[str],
                 sizes: Sequence[tuple[int, int]] = (), fmt: str = "pillsnap", file_rows: Sequence[int] = ()):
        self.path, self.fmt = path, fmt
        self.paths, self.codes, self.image_types, self.sources = paths, codes, image_types, sources
        self.combo_ids, self.boxes, self.orig_paths, self.sizes, self.file_rows = (combo_ids, boxes, orig_paths,
                                                                                   sizes, file_rows)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"Manifest({self.path!r}, {len(self)} rows, {self.fmt})"

    def file_row(self, i: int) -> int:
        """Row ``i``'s number in the manifest file it was read from."""
        return self.file_rows[i] if self.file_rows else i

    def source_path(self, i: int) -> str:
        """Row ``i``'s original image: its boxes' pixels refer to it, not to a resized JPEG-cache copy."""
        return self.orig_paths[i] or self.paths[i]

    def replace(self, **columns) -> "Manifest":
        """A copy with the named columns (or ``path``/``fmt``) replaced, as ``dataclasses.replace`` did when
        the manifest was a dataclass: ``m.replace(paths=[...])``."""
        names = ("path", "paths", "codes", "image_types", "sources", "combo_ids", "boxes", "orig_paths", "sizes",
                 "fmt", "file_rows")
        unknown = sorted(set(columns) - set(names))
        if unknown:
            raise TypeError(f"Manifest has no column {', '.join(unknown)}")
        return Manifest(**{n: columns[n] if n in columns else getattr(self, n) for n in names})

    def subset(self, idx) -> "Manifest":
        idx = list(idx)
        return Manifest(self.path, self.paths.take(idx), self.codes.take(idx), self.image_types.take(idx),
                        self.sources.take(idx), self.combo_ids.take(idx), self.boxes.take(idx),
                        self.orig_paths.take(idx), self.sizes.take(idx) if self.sizes else (), self.fmt,
                        self.file_rows.take(idx) if self.file_rows else idx)

    def labels(self, class_map: ClassMap) -> list[int]:
        """Class id of every row; a K-code missing from the class map is an error naming it."""
        table = self.codes.table
        missing = sorted({c for c in table if c not in class_map.index})
        if missing:
            raise ManifestError(f"{len(missing)} K-code(s) of {self.path} are not in the class map: "
                                f"{', '.join(missing[:20])}")
        ids = np.asarray([class_map.index[c] for c in table] or [0], dtype=np.int64)
        return ids[self.codes.ids()].tolist()


def _combo_id(path: str, image_type: str) -> str:
    if image_type == "combination":
        return Path(path).parent.name
    return Path(path).stem


def guess_encoding(raw: bytes) -> str:
    """The encoding a manifest that is not UTF-8 is probably in: UTF-16 (a BOM), cp949 (Korean Windows
    tools: the users' Excel) when it decodes to Hangul, else a Western 8-bit code page."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    text = raw.decode("cp949", errors="replace")
    if sum("\uac00" <= ch <= "\ud7a3" for ch in text) > text.count("\ufffd"):
        return "cp949"
    return "cp1252"


def _not_utf8(path: str, err: UnicodeDecodeError) -> ManifestError:
    with open(path, "rb") as fh:
        enc = guess_encoding(fh.read(1 << 20))
    return ManifestError(f"{path} is not UTF-8 (byte 0x{err.object[err.start]:02x} cannot be decoded); it is "
                         f"probably {enc}: save it as UTF-8 (e.g. iconv -f {enc} -t UTF-8 IN > OUT, or Excel's "
                         f"\"CSV UTF-8\")")


def read_manifest(path: str | Path) -> Manifest:
    """Read either manifest format; the format is detected from the header. A file that is not UTF-8 is an
    error naming the encoding it probably is."""
    path = str(path)
    try:
        return _read(path)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


MAX_ROW = 2 ** 62  # a row id past this is no row number (a pasted figure, an overflow): int64 everywhere


def _row_id(path: str, line: int, cell: str | None, i: int) -> int:
    """The ``row`` cell of a line (its line order when the file has none): a non-negative integer, else an error
    naming the line."""
    cell = (cell or "").strip()
    if not cell:
        return i
    try:
        row = int(float(cell)) if cell.endswith(".0") else int(cell)  # "3.0" after a round trip through pandas
    except (ValueError, OverflowError):
        raise ManifestError(f"{path}: line {line} has a row id that is not an integer: {cell[:30]!r}") from None
    if not 0 <= row < MAX_ROW:
        raise ManifestError(f"{path}: line {line} has a row id out of range [0, 2^62): {cell[:30]!r}")
    return row


def _check_unique_rows(path: str, rows: list[int]) -> None:
    """Row ids identify a row in skipped.csv and the loaders: a repeated one (two manifests concatenated) is
    refused, naming the lines that share it (never renumbered: the ids are what the user's logs refer to)."""
    first: dict[int, int] = {}
    dups = []
    for line, row in enumerate(rows, start=2):
        if row in first:
            dups.append(f"row {row} on lines {first[row]} and {line}")
        else:
            first[row] = line
    if dups:
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise ManifestError(f"{path}: {len(dups)} repeated row id(s): {'; '.join(dups[:5])}{more}; each row "
                            f"must have its own id (two manifests concatenated? renumber the row column 0..N-1)")


def _read(path: str) -> Manifest:
    try:
        return _read_rows(path)
    except csv.Error as e:  # a cell past csv's field size limit, a NUL byte: the line it was on
        raise ManifestError(f"{path}: not a readable CSV ({e})") from None


def _read_rows(path: str) -> Manifest:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if header[:len(LEGACY_COLUMNS)] == LEGACY_COLUMNS and "row" not in header:
            fmt = "legacy"
        elif all(c in header for c in ("image_path", "mapping_code")):
            fmt = "pillsnap"
        else:
            raise ManifestError(f"{path}: unrecognised manifest header {header}; expected {COLUMNS} "
                                f"or {LEGACY_COLUMNS}")
        m = Manifest(path, [], [], [], [], [], [], [], [], fmt)
        for i, r in enumerate(reader):
            p = (r.get("image_path") or "").strip()
            code = (r.get("mapping_code") or "").strip()
            if not p or not code:
                raise ManifestError(f"{path}: line {i + 2} has an empty image_path or mapping_code")
            itype = (r.get("image_type") or "single").strip() or "single"
            m.paths.append(p)
            m.codes.append(code)
            m.image_types.append(itype)
            m.sources.append((r.get("source") or "").strip())
            m.combo_ids.append((r.get("combo_id") or "").strip() or _combo_id(p, itype))
            raw_boxes = (r.get("boxes") or "").strip()
            try:
                json.loads(raw_boxes) if raw_boxes else None  # checked here, kept as text (parsed when read)
            except json.JSONDecodeError:
                raise ManifestError(f"{path}: line {i + 2} has unparsable boxes {raw_boxes[:60]!r}") from None
            m.boxes.append_text(raw_boxes)
            m.orig_paths.append((r.get("orig_path") or "").strip())
            m.file_rows.append(_row_id(path, i + 2, r.get("row"), i))
            w, h = (r.get("width") or "").strip(), (r.get("height") or "").strip()
            m.sizes.append(_size(path, i + 2, w, h))
    _check_unique_rows(path, m.file_rows)
    return m


def _size(path: str, line: int, w: str, h: str) -> tuple[int, int]:
    """(width, height) of a line's cells, (0, 0) when empty; "976.0" after a round trip through pandas is 976.
    Not a number, or not in [0, 2^31) (no image is that large: a pasted figure), is an error naming the line."""
    if not (w and h):
        return 0, 0
    try:
        size = int(float(w)), int(float(h))
    except (ValueError, OverflowError):
        raise ManifestError(f"{path}: line {line} has a width/height that is not a number: "
                            f"{w[:30]!r} x {h[:30]!r}") from None
    if not all(0 <= v < 2 ** 31 for v in size):
        raise ManifestError(f"{path}: line {line} has a width/height out of range [0, 2^31): "
                            f"{w[:30]!r} x {h[:30]!r}")
    return size


def write_manifest(m: Manifest, path: str | Path) -> None:
    """Write our format atomically (temp file, fsync, rename); rows are renumbered 0..N-1."""
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        sizes = m.sizes if m.sizes else [(0, 0)] * len(m)
        for i, (p, code, itype, src, combo, size, boxes, orig) in enumerate(zip(
                m.paths, m.codes, m.image_types, m.sources, m.combo_ids, sizes, m.boxes, m.orig_paths)):
            w.writerow([i, p, code, itype, src, combo, size[0] or "", size[1] or "",
                        json.dumps(boxes, ensure_ascii=False) if boxes else "", orig])


def class_map_for(manifest_path: str | Path, manifest: Manifest | None = None) -> ClassMap:
    """The class map beside a manifest (``class_map.json``), else the sorted unique K-codes (legacy rule)."""
    cm_path = Path(manifest_path).parent / "class_map.json"
    if cm_path.exists():
        return ClassMap.load(cm_path)
    manifest = manifest or read_manifest(manifest_path)
    _logger.warning("no class_map.json beside %s: class ids are the sorted unique K-codes of this file "
                    "(the existing project's rule)", manifest_path)
    return ClassMap(codes=sorted(set(manifest.codes)))


def split_missing(m: Manifest) -> tuple[Manifest, list[tuple[str, str]]]:
    """Drop rows whose file is missing or empty; return (kept manifest, [(path, reason)])."""
    keep, bad = [], []
    for i, p in enumerate(m.paths):
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            bad.append((p, "missing file"))
            continue
        except OSError as e:
            bad.append((p, f"unreadable: {e.strerror}"))
            continue
        if size == 0:
            bad.append((p, "empty file"))
            continue
        keep.append(i)
    for p, why in bad[:10]:
        _logger.warning("quarantined %s: %s", p, why)
    if len(bad) > 10:
        _logger.warning("... and %d more quarantined rows", len(bad) - 10)
    return (m if len(keep) == len(m) else m.subset(keep)), bad
