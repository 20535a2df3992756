"""PNG -> JPEG cache (the command: ``python -m pillsnap_dali.prepare --manifest M --cache-dir DIR``).

DALI decodes JPEG on the GPU (nvJPEG) but PNG only on the CPU, so for the real PNG data the GPU path alone
does not remove the decode bottleneck. This module transcodes every manifest row's image once to a baseline
JPEG (optionally resized so its long side is ``max_side``, aspect kept) and writes a new manifest in our
format that points at the cache; the loaders take it unchanged.

The users' disk is 97 % full, so the cache is built to be small and safe:

- every run (``--dry-run`` too) estimates the cache size from a seeded sample and refuses to start when the
  free space left after it would fall under ``free_space_margin_gb``; the free space is re-checked while the
  run goes and the run stops cleanly (writing the manifest of what is done) if it falls under the margin;
- each JPEG is written to a temp file and renamed, so the cache only ever holds complete files; a rerun
  resumes (a row whose cache file exists is not redone) and removes the temp files an interrupted run left;
- the cache file of a source is ``<cache>/<sha1[:2]>/<sha1>.jpg`` with the sha1 of the absolute source path,
  so different trees never collide; its JPEG comment records the source's size (so a resumed row needs
  neither the source decoded nor a side file to scale its boxes) and its file size and mtime (a source
  replaced since is transcoded again);
- unreadable sources are logged, listed in ``<cache>/<manifest stem>_skipped.csv`` (path, reason; one file per
  source manifest, so preparing train then val into one cache keeps both lists) and left out of the new
  manifest: ``rows_in == cached + skipped + remaining``;
- the class map is settled before anything is transcoded: the source's ``class_map.json`` (or, for a legacy
  manifest without one, its sorted K-codes) must match the cache's; a legacy manifest whose codes are all in
  the cache's map (a val split without some class) takes the cache's map;
- a final check decodes a sample of the outputs; a bad output is an error (and is removed, so a rerun redoes it).

``loader.cache`` puts the cache in ``train``'s default path: ``choose_cache`` decides from the key, the loader
backend and the inputs (``auto``: PNG inputs with ``dali``, or with ``dali-cpu`` when the cache shrinks them and
the run has 2 epochs or more; never ``pil``), ``ensure_cache`` builds or reuses it (one space check for all
the manifests first) in ``<data.artifacts>/jpeg640`` with each source folder's manifests under
``manifests/<folder>-<hash>/``.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from pillsnap_dali.atomic import atomic_write_text, pid_alive
from pillsnap_dali.data.classmap import ClassMap, ClassMapMismatch
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS, open_rgb
from pillsnap_dali.data.manifest import Manifest, read_manifest, write_manifest
from pillsnap_dali.errors import PillsnapError

_logger = logging.getLogger(__name__)

GB = 1e9
SLACK = 1.10                    # the size estimate is the sample mean x rows, plus 10 %
CHUNK = 32                      # sources per worker task
SKIPPED_SUFFIX = "_skipped.csv"   # <cache>/<source manifest stem>_skipped.csv


def skipped_csv(cache_dir: str | Path, manifest_path: str | Path) -> Path:
    """Where ``prepare`` lists the unreadable sources of one source manifest."""
    return Path(cache_dir) / f"{Path(manifest_path).stem}{SKIPPED_SUFFIX}"
STAMP_JSON = "prepare_options.json"
Progress = Callable[[int, int], None]   # progress(done, total) of one manifest's sources
LOCK_FILE = ".prepare.lock"
_COMMENT_TAG = "pillsnap_dali.prepare"
SUBSAMPLING = {"444": 0, "420": 2}   # PIL's JPEG subsampling codes


class PrepareError(PillsnapError, RuntimeError):
    """The cache cannot be built as asked (bad options, a busy or foreign cache dir, a failed final check)."""


class InsufficientSpaceError(PrepareError):
    """Free space after the estimated cache would fall under the configured margin."""


@dataclass
class PrepareOptions:
    quality: int = 95
    max_side: Optional[int] = 640          # None keeps the source size
    subsampling: str = "444"               # "444" | "420"
    workers: int = 2                       # <= 1: in this process
    margin_gb: float = 20.0                # free space that must remain after the cache
    sample: int = 32                       # rows transcoded for the estimate, outputs re-read at the end
    max_pixels: int = DEFAULT_MAX_PIXELS   # decompression-bomb guard (config data.max_pixels)
    dry_run: bool = False                  # estimate and check the space, write nothing
    limit: Optional[int] = None            # transcode at most this many new rows (a partial run)
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, **overrides) -> "PrepareOptions":
        """Options from a resolved Config (``prepare`` and ``data.max_pixels``); None overrides are ignored."""
        p = cfg.prepare
        opts = cls(quality=p.quality, max_side=p.max_side, subsampling=p.subsampling, workers=p.workers,
                   margin_gb=p.free_space_margin_gb, sample=p.sample, max_pixels=cfg.data.max_pixels)
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        return opts

    def validate(self) -> None:
        if not 1 <= self.quality <= 100:
            raise PrepareError(f"quality must be in 1..100, got {self.quality}")
        if self.max_side is not None and self.max_side < 16:
            raise PrepareError(f"max_side must be >= 16 (or None to keep the size), got {self.max_side}")
        if self.subsampling not in SUBSAMPLING:
            raise PrepareError(f"subsampling must be one of {sorted(SUBSAMPLING)}, got {self.subsampling!r}")
        if self.margin_gb < 0 or self.sample < 1 or (self.limit is not None and self.limit < 0):
            raise PrepareError("margin_gb must be >= 0, sample >= 1 and limit >= 0")


@dataclass
class PrepareReport:
    rows_in: int = 0
    cached: int = 0                 # rows in the new manifest
    transcoded: int = 0             # of which transcoded by this run
    reused: int = 0                 # of which found complete in the cache (resume)
    skipped: int = 0                # unreadable sources, listed in <manifest stem>_skipped.csv
    remaining: int = 0              # rows not reached (limit, or stopped on free space)
    source_bytes: int = 0           # of the cached rows' sources
    cache_bytes: int = 0            # of the cached rows' JPEGs
    estimate_bytes: int = 0         # the pre-run estimate for the rows still to do
    free_bytes: int = 0             # free space when the run started
    tmp_removed: int = 0            # temp files of an interrupted run, removed
    seconds: float = 0.0
    dry_run: bool = False
    stopped: Optional[str] = None   # why the run stopped early, if it did
    manifest_out: Optional[str] = None
    skipped_csv: Optional[str] = None

    @property
    def ratio(self) -> float:
        """Cache bytes / source bytes of the cached rows (0 when nothing is cached)."""
        return self.cache_bytes / self.source_bytes if self.source_bytes else 0.0

    def summary(self) -> str:
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        lines = [f"rows in       {self.rows_in}",
                 f"cached        {self.cached} (transcoded {self.transcoded}, reused {self.reused})",
                 f"skipped       {self.skipped}" + (f" -> {self.skipped_csv}" if self.skipped else ""),
                 f"remaining     {self.remaining}" + (f" ({self.stopped})" if self.stopped else ""),
                 f"source bytes  {mb(self.source_bytes)}", f"cache bytes   {mb(self.cache_bytes)}",
                 f"ratio         {self.ratio:.3f}", f"estimate      {mb(self.estimate_bytes)} "
                 f"(free {self.free_bytes / GB:,.1f} GB)", f"seconds       {self.seconds:.1f}"]
        if self.manifest_out:
            lines.append(f"manifest      {self.manifest_out}")
        if self.dry_run:
            lines.insert(0, "dry run: nothing written")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Encode:
    """What a worker needs to transcode one source (picklable)."""
    quality: int
    max_side: Optional[int]
    subsampling: str
    max_pixels: int

    def stamp(self) -> dict:
        return {"quality": self.quality, "max_side": self.max_side, "subsampling": self.subsampling}


@dataclass(slots=True)
class _Outcome:
    src: str
    dst: str
    ok: bool
    reason: str = ""
    src_wh: tuple = (0, 0)          # oriented source size
    out_wh: tuple = (0, 0)
    src_bytes: int = 0
    out_bytes: int = 0
    reused: bool = False


def cache_path_for(src: str | Path, cache_dir: str | Path) -> Path:
    """``<cache>/<sha1[:2]>/<sha1>.jpg`` with the sha1 of the absolute source path."""
    digest = hashlib.sha1(os.path.abspath(str(src)).encode("utf-8")).hexdigest()
    return Path(cache_dir) / digest[:2] / f"{digest}.jpg"


# ---------------------------------------------------------------------------------------------- one image
def fit_size(w: int, h: int, max_side: Optional[int]) -> tuple[int, int]:
    """Size with the long side at most ``max_side``, aspect kept (never upscales)."""
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _source_stamp(st: os.stat_result) -> str:
    """``bytes=N mtime=NS`` of the source file: a cache file records it, so a replaced source is redone."""
    return f"bytes={st.st_size} mtime={st.st_mtime_ns}"


def _encode(im: Image.Image, enc: _Encode, fh, stamp: str = "") -> tuple[int, int]:
    """Resize (LANCZOS after a box reduce) and write a baseline JPEG to ``fh``; returns the output size."""
    src_wh = im.size
    out_wh = fit_size(*src_wh, enc.max_side)
    if out_wh != src_wh:
        im = im.resize(out_wh, Image.Resampling.LANCZOS, reducing_gap=3.0)
    comment = f"{_COMMENT_TAG} src={src_wh[0]}x{src_wh[1]}{' ' + stamp if stamp else ''}".encode()
    im.save(fh, "JPEG", quality=enc.quality, subsampling=SUBSAMPLING[enc.subsampling], progressive=False,
            optimize=False, comment=comment)
    return out_wh


def _comment_fields(im: Image.Image) -> Optional[dict]:
    """``{"src": "WxH", "bytes": ..., "mtime": ...}`` from one of our cache files' JPEG comment, else None."""
    raw = im.info.get("comment", b"")
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if not text.startswith(_COMMENT_TAG + " src="):
        return None
    return dict(f.split("=", 1) for f in text[len(_COMMENT_TAG):].split() if "=" in f)


def _src_size_from_comment(im: Image.Image) -> Optional[tuple[int, int]]:
    fields = _comment_fields(im)
    if fields is None:
        return None
    w, _, h = fields["src"].partition("x")
    return int(w), int(h)


def _reuse(src: str, dst: str) -> Optional[_Outcome]:
    """The outcome of an existing cache file from its header alone; None if it is not one of ours or its
    source changed since (size or mtime differ from what the file recorded)."""
    try:
        with Image.open(dst) as im:
            src_wh, out_wh, fmt, fields = _src_size_from_comment(im), im.size, im.format, _comment_fields(im)
    except (OSError, ValueError, SyntaxError) as e:
        src_wh, fmt, fields = None, f"unreadable ({e})", None
    if fmt != "JPEG" or src_wh is None:
        _logger.warning("cache file %s of %s is not one of ours (%s): redoing it", dst, src, fmt)
        return None
    try:
        st = os.stat(src)
    except OSError as e:  # the cache is a function of the source: no source, no row
        return _Outcome(src, dst, False, reason=f"source unreadable: {e.strerror}")
    if "bytes" in fields and f"bytes={fields['bytes']} mtime={fields.get('mtime')}" != _source_stamp(st):
        _logger.info("source %s changed since %s was made: redoing it", src, dst)
        return None
    return _Outcome(src, dst, True, src_wh=src_wh, out_wh=out_wh, src_bytes=st.st_size,
                    out_bytes=os.path.getsize(dst), reused=True)


def _transcode(src: str, dst: str, enc: _Encode) -> _Outcome:
    """One source to its cache file (temp + rename); a cache file already there is reused. A source that
    cannot be used is a skipped outcome; a cache file that cannot be written (full disk, no permission) is a
    PrepareError naming it: it says nothing about the source, so the run stops rather than skip every row."""
    if os.path.exists(dst):
        done = _reuse(src, dst)
        if done is not None:
            return done
    try:
        st = os.stat(src)
        src_bytes = st.st_size
        if src_bytes == 0:
            raise ValueError("empty file")
        im = open_rgb(src, enc.max_pixels)
        buf = io.BytesIO()
        out_wh = _encode(im, enc, buf, _source_stamp(st))
    except Exception as e:  # noqa: BLE001 -- per-file isolation: any decoder failure is a logged skip
        return _Outcome(src, dst, False, reason=f"{type(e).__name__}: {e}"[:300])
    _write_cache_file(dst, buf.getbuffer())
    return _Outcome(src, dst, True, src_wh=im.size, out_wh=out_wh, src_bytes=src_bytes, out_bytes=buf.tell())


def _write_cache_file(dst: str, data) -> None:
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise PrepareError(f"cannot write the cache file {dst}: {e.strerror or e}; the files done so far are "
                           "kept, rerun to resume") from None


def _transcode_chunk(pairs: list[tuple[str, str]], enc: _Encode) -> list[_Outcome]:
    return [_transcode(src, dst, enc) for src, dst in pairs]


# ---------------------------------------------------------------------------------------------- safety
@dataclass
class _Estimate:
    cache_bytes: int
    sampled: int
    decoded: int
    mean_ratio: float


def estimate_cache_bytes(sources: list[str], enc: _Encode, sample: int, seed: int = 0) -> _Estimate:
    """Transcode a seeded sample in memory: mean JPEG bytes x len(sources) x SLACK.

    If no sampled source decodes, the estimate falls back to the sources' own bytes (a safe upper bound for
    a lossy re-encode of lossless PNGs).
    """
    picks = random.Random(seed).sample(sources, min(sample, len(sources)))
    sizes, ratios = [], []
    for src in picks:
        try:
            buf = io.BytesIO()
            _encode(open_rgb(src, enc.max_pixels), enc, buf)
        except Exception as e:  # noqa: BLE001 -- an unreadable sample is not an error here
            _logger.debug("estimate: %s unreadable (%s)", src, e)
            continue
        sizes.append(buf.tell())
        ratios.append(buf.tell() / max(1, os.path.getsize(src)))
    if sizes:
        est = int(float(np.mean(sizes)) * len(sources) * SLACK)
        return _Estimate(est, len(picks), len(sizes), float(np.mean(ratios)))
    total = sum(os.path.getsize(s) for s in sources if os.path.exists(s))
    _logger.warning("estimate: none of %d sampled sources decoded; assuming the source size (%d bytes)",
                    len(picks), total)
    return _Estimate(int(total * SLACK), len(picks), 0, 1.0)


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_writable(cache_dir: Path) -> None:
    """PrepareError naming ``cache_dir`` when it cannot be created or written (a read-only disk, no
    permission), found before any work by making and removing a temp folder in its nearest existing folder."""
    p = cache_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pillsnap-write-check-", dir=p))
    except OSError as e:
        raise PrepareError(f"cannot write the cache dir {cache_dir} (in {p}): {e.strerror or e}") from None


def check_space(cache_dir: Path, estimate_bytes: int, margin_gb: float) -> int:
    """Raise InsufficientSpaceError if free - estimate < margin; returns the free bytes."""
    free = _free_bytes(cache_dir)
    if free - estimate_bytes < margin_gb * GB:
        raise InsufficientSpaceError(
            f"refusing to build the cache in {cache_dir}: {free / GB:.2f} GB free, the cache needs about "
            f"{estimate_bytes / GB:.2f} GB, which would leave {(free - estimate_bytes) / GB:.2f} GB, under the "
            f"margin of {margin_gb:.2f} GB (prepare.free_space_margin_gb / --margin-gb); use a smaller "
            f"--max-side or --quality, free some space, or lower the margin")
    return free


def _remove_tmp(cache_dir: Path) -> int:
    """Remove the temp files an interrupted run left (JPEG temps and manifest temps)."""
    stale = list(cache_dir.glob("[0-9a-f][0-9a-f]/*.tmp")) + list(cache_dir.glob(".*.tmp[0-9]*"))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if stale:
        _logger.info("removed %d temp file(s) left by an interrupted run in %s", len(stale), cache_dir)
    return len(stale)



def _take_lock(lock: Path) -> None:
    """Create the lock file exclusively; a lock whose process is gone is stale and taken over (once)."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                raise PrepareError(f"another prepare run (pid {pid}) is using {lock.parent}; wait for it to end "
                                   f"(or remove {lock} if that process is not a prepare run)") from None
            _logger.info("removing the stale lock of pid %s in %s", pid, lock.parent)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return
    raise PrepareError(f"could not take the lock {lock}")


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One prepare run per cache dir (a second one would delete the first one's temp files)."""
    lock = cache_dir / LOCK_FILE
    _take_lock(lock)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _check_stamp(cache_dir: Path, enc: _Encode, write: bool) -> None:
    """A cache dir holds JPEGs of one encoding only: refuse to mix; record it on first use when ``write``."""
    path = cache_dir / STAMP_JSON
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != enc.stamp():
            raise PrepareError(f"{cache_dir} holds a cache made with {old}, not {enc.stamp()}: use another "
                               f"--cache-dir (or the same options) so the two are never mixed")
    elif write:
        atomic_write_text(path, json.dumps(enc.stamp()))


# ---------------------------------------------------------------------------------------------- the run
def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _run_pool(pairs: list[tuple[str, str]], enc: _Encode, workers: int) -> Iterator[list[_Outcome]]:
    """Yield the outcomes chunk by chunk; in this process when workers <= 1, else a process pool."""
    if workers <= 1:
        for chunk in _chunks(pairs, CHUNK):
            yield _transcode_chunk(chunk, enc)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch/DALI threads
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_transcode_chunk, c, enc) for c in _chunks(pairs, CHUNK)]
        try:
            for fut in cf.as_completed(futures):
                yield fut.result()
        except cf.BrokenExecutor as e:
            raise PrepareError(f"a worker process died ({e}): a decoder crash or out of memory; the files done so "
                               "far are kept; rerun with --workers 1 to see which source it is") from e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _transcode_all(pairs: list[tuple[str, str]], enc: _Encode, opts: PrepareOptions, cache_dir: Path,
                   report: PrepareReport, progress: Optional[Progress] = None) -> dict[str, _Outcome]:
    """Run every (source, cache file) pair; stop early if free space falls under the margin. ``progress(done,
    total)`` is called after each chunk (the train command's progress bar)."""
    outcomes: dict[str, _Outcome] = {}
    t0, last_log = time.monotonic(), time.monotonic()
    for chunk in _run_pool(pairs, enc, opts.workers):
        for o in chunk:
            outcomes[o.src] = o
        if progress is not None:
            progress(len(outcomes), len(pairs))
        if _free_bytes(cache_dir) < opts.margin_gb * GB:
            report.stopped = f"free space fell under the margin of {opts.margin_gb} GB"
            _logger.error("stopping: %s; the rows done so far are kept", report.stopped)
            break
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            _logger.info("%d / %d sources (%.1f/s)", len(outcomes), len(pairs),
                         len(outcomes) / (last_log - t0))
    return outcomes


def _scale_boxes(boxes: list, sx: float, sy: float) -> list:
    """Boxes in the cached image's pixels; a malformed bbox is kept as it was (consumers validate)."""
    out = []
    for b in boxes:
        bb = b.get("bbox") if isinstance(b, dict) else None
        if isinstance(bb, list) and len(bb) == 4 and all(isinstance(v, (int, float)) for v in bb):
            b = {**b, "bbox": [round(bb[0] * sx, 2), round(bb[1] * sy, 2), round(bb[2] * sx, 2),
                               round(bb[3] * sy, 2)]}
        out.append(b)
    return out


def _build_manifest(m: Manifest, outcomes: dict[str, _Outcome], manifest_out: Path
                    ) -> tuple[Manifest, list[tuple[str, str]]]:
    """The cached manifest (done rows, in source order) and the skipped (path, reason) rows."""
    keep, skipped, sizes, boxes = [], [], [], []
    for i, src in enumerate(m.paths):
        o = outcomes.get(src)
        if o is None:
            continue                                  # not reached (limit / stopped): counted as remaining
        if not o.ok:
            skipped.append((src, o.reason))
            continue
        keep.append(i)
        sizes.append(o.out_wh)
        sx, sy = o.out_wh[0] / max(1, o.src_wh[0]), o.out_wh[1] / max(1, o.src_wh[1])
        boxes.append(_scale_boxes(m.boxes[i], sx, sy))
    out = m.subset(keep)
    out.path, out.fmt, out.sizes, out.boxes = str(manifest_out), "pillsnap", sizes, boxes
    out.orig_paths = [m.source_path(i) for i in keep]
    out.paths = [outcomes[m.paths[i]].dst for i in keep]
    return out, skipped


def _class_map_to_write(manifest_path: Path, m: Manifest, cache_dir: Path) -> Optional[ClassMap]:
    """The class map to put beside the cached manifest, None when the cache's own stands; raises
    ClassMapMismatch before anything is transcoded.

    Class ids must not shift when rows are skipped, so the map comes from the SOURCE: its ``class_map.json``,
    else (a legacy manifest) its sorted unique K-codes. A cache that has a map already keeps it: a source
    map must equal it; a legacy manifest's codes must all be in it (a val split lacking some class is fine).
    """
    src_map = manifest_path.parent / "class_map.json"
    dst = cache_dir / "class_map.json"
    have = ClassMap.load(dst) if dst.exists() else None
    if src_map.exists():
        cm = ClassMap.load(src_map)
        if have is None:
            return cm
        have.check_same(cm, what=f"cache dir {cache_dir}", against=f"source {manifest_path}")
        return None
    if have is None:
        return ClassMap(codes=sorted(set(m.codes)))
    unknown = sorted(set(m.codes) - set(have.codes))
    if unknown:
        raise ClassMapMismatch(f"{manifest_path} has {len(unknown)} K-code(s) not in the class map of cache dir "
                               f"{cache_dir} ({', '.join(unknown[:10])}); prepare the training manifest first, "
                               "or use another --cache-dir")
    return None


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(skipped)
    atomic_write_text(path, buf.getvalue())
    for src, why in skipped[:10]:
        _logger.warning("skipped %s: %s", src, why)
    if len(skipped) > 10:
        _logger.warning("... and %d more skipped sources, all listed in %s", len(skipped) - 10, path)


def verify_sample(outcomes: Iterable[_Outcome], sample: int, seed: int = 0) -> None:
    """Decode a seeded sample of the outputs; a bad one is removed (a rerun redoes it) and is an error."""
    done = sorted((o for o in outcomes if o.ok), key=lambda o: o.dst)
    bad = []
    for o in random.Random(seed).sample(done, min(sample, len(done))):
        try:
            with Image.open(o.dst) as im:
                im.load()
                if im.format != "JPEG" or im.size != tuple(o.out_wh) or im.info.get("progressive"):
                    raise ValueError(f"{im.format} {im.size}, expected a baseline JPEG of {tuple(o.out_wh)}")
        except Exception as e:  # noqa: BLE001 -- any failure to read back is reported
            bad.append(f"{o.dst} ({o.src}): {e}")
            with contextlib.suppress(OSError):
                os.remove(o.dst)
    if bad:
        raise PrepareError(f"final check: {len(bad)} cached file(s) do not read back (removed; rerun to redo "
                           f"them): " + "; ".join(bad[:5]))
    _logger.info("final check: %d sampled cache files decode", min(sample, len(done)))


def _pending_pairs(m: Manifest, cache_dir: Path) -> list[tuple[str, str]]:
    """(source, cache file) for every distinct source, in manifest order."""
    seen: dict[str, str] = {}
    for src in m.paths:
        if src not in seen:
            seen[src] = str(cache_path_for(src, cache_dir))
    return list(seen.items())


def _select(pairs: list[tuple[str, str]], limit: Optional[int]) -> tuple[list, list]:
    """(pairs to run now, pairs still to do); ``limit`` caps the sources not yet in the cache."""
    todo = [p for p in pairs if not os.path.exists(p[1])]
    if limit is None or limit >= len(todo):
        return pairs, todo
    later = set(s for s, _ in todo[limit:])
    return [p for p in pairs if p[0] not in later], todo


def prepare_cache(manifest_path: str | Path, cache_dir: str | Path, opts: PrepareOptions,
                  manifest_dir: str | Path | None = None, progress: Optional[Progress] = None) -> PrepareReport:
    """Build (or resume) the JPEG cache of a manifest; see the module docstring. Returns what it did.

    ``manifest_dir`` (default: ``cache_dir``) receives the cached manifest, its class map and skipped list:
    ``ensure_cache`` gives each source folder its own, so stages with different class maps share the JPEGs."""
    opts.validate()
    t0 = time.monotonic()
    manifest_path, cache_dir = Path(manifest_path).absolute(), Path(cache_dir).absolute()
    manifest_out = Path(manifest_dir or cache_dir).absolute() / f"{manifest_path.stem}.csv"
    if manifest_out == manifest_path:
        raise PrepareError(f"the cached manifest would overwrite its source {manifest_path}: use another --cache-dir")
    m = read_manifest(manifest_path)
    enc = _Encode(opts.quality, opts.max_side, opts.subsampling, opts.max_pixels)
    report = PrepareReport(rows_in=len(m), dry_run=opts.dry_run)
    _check_stamp(cache_dir, enc, write=False)
    check_writable(cache_dir)
    class_map = _class_map_to_write(manifest_path, m, manifest_out.parent)  # a mismatch stops us before any work
    pairs = _pending_pairs(m, cache_dir)
    run_pairs, todo = _select(pairs, opts.limit)
    est = _Estimate(0, 0, 0, 0.0)
    if todo:
        est = estimate_cache_bytes([s for s, _ in todo], enc, opts.sample, opts.seed)
    report.estimate_bytes = est.cache_bytes
    _logger.info("%d rows, %d distinct sources, %d to transcode; estimated cache growth %.1f MB "
                 "(%d/%d sampled sources decoded, mean JPEG/source %.3f)", len(m), len(pairs), len(todo),
                 report.estimate_bytes / 1e6, est.decoded, est.sampled, est.mean_ratio)
    report.free_bytes = check_space(cache_dir, report.estimate_bytes, opts.margin_gb)
    if not opts.dry_run:
        cache_dir.mkdir(parents=True, exist_ok=True)
        manifest_out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir):
            report.tmp_removed = _remove_tmp(cache_dir)
            _check_stamp(cache_dir, enc, write=True)
            outcomes = _transcode_all(run_pairs, enc, opts, cache_dir, report, progress)
            _finish(m, outcomes, manifest_path, manifest_out, report, class_map)
            verify_sample(outcomes.values(), opts.sample, opts.seed)
        if opts.limit is not None and report.remaining and not report.stopped:
            report.stopped = f"limit of {opts.limit} new rows reached; rerun to resume"
    report.seconds = time.monotonic() - t0
    return report


def _finish(m: Manifest, outcomes: dict[str, _Outcome], manifest_path: Path, manifest_out: Path,
            report: PrepareReport, class_map: Optional[ClassMap]) -> None:
    """Write the manifest of done rows, the skipped list and the class map; fill the report's counts."""
    cache_dir = manifest_out.parent
    out, skipped = _build_manifest(m, outcomes, manifest_out)
    write_manifest(out, manifest_out)
    report.manifest_out = str(manifest_out)
    report.skipped_csv = str(skipped_csv(cache_dir, manifest_path))
    _write_skipped(Path(report.skipped_csv), skipped)
    if class_map is not None and not (cache_dir / "class_map.json").exists():
        class_map.save(cache_dir / "class_map.json")
    report.cached, report.skipped = len(out), len(skipped)
    report.remaining = report.rows_in - report.cached - report.skipped
    done = [outcomes[p] for p in dict.fromkeys(m.paths) if p in outcomes and outcomes[p].ok]
    report.reused = sum(1 for o in done if o.reused)
    report.transcoded = len(done) - report.reused
    report.source_bytes = sum(o.src_bytes for o in done)
    report.cache_bytes = sum(o.out_bytes for o in done)
    if report.remaining:
        _logger.warning("%d of %d rows are not in the cache yet: rerun to resume", report.remaining, report.rows_in)


# ---------------------------------------------------------------------------------------------- train's cache
AUTO, OFF = "auto", "off"   # loader.cache; anything else is a folder
MANIFESTS = "manifests"     # <cache>/manifests/<source folder name>-<hash>/: ensure_cache's cached manifests
_SIZE_SAMPLE = 8            # source headers read to tell whether the cache would shrink the images
CacheProgress = Callable[[str, int, int], None]   # (source manifest name, sources done, sources in it)


@dataclass(frozen=True)
class CacheChoice:
    """What ``loader.cache`` means for one run: the cache folder (None: the files as listed) and why."""
    cache_dir: Optional[Path]
    reason: str


def auto_cache_dir(cfg) -> Path:
    """``<data.artifacts>/jpeg640``: one cache per data root and encoding (``_q<quality>``/``_420`` are added when
    ``prepare`` differs from its defaults, since a cache never mixes encodings), shared by every stage: a JPEG
    is keyed by its source's path, so rows that two stages share are transcoded once."""
    p = cfg.prepare
    name = f"jpeg{p.max_side or 'full'}" + (f"_q{p.quality}" if p.quality != 95 else "")
    return Path(cfg.data.artifacts) / (name + (f"_{p.subsampling}" if p.subsampling != "444" else ""))


def cache_of(manifest_path: str | Path | None) -> Optional[Path]:
    """The cache folder a cached manifest belongs to (``prepare``'s: its own folder; ``ensure_cache``'s: two
    above), else None."""
    if not manifest_path:
        return None
    folder = Path(manifest_path).absolute().parent
    return next((d for d in (folder, folder.parent.parent) if (d / STAMP_JSON).is_file()), None)


def describe_input(manifest_path: str | Path | None) -> str:
    """The report's line on what was trained on: the JPEG cache (its folder) or the files as listed."""
    cache = cache_of(manifest_path)
    if cache is None:
        return f"the image files as listed in {manifest_path} (no JPEG cache)"
    stamp = json.loads((cache / STAMP_JSON).read_text(encoding="utf-8"))
    return (f"JPEG cache {cache} (long side {stamp.get('max_side') or 'as the source'} px, quality "
            f"{stamp.get('quality')}, {stamp.get('subsampling')}) via {manifest_path}")


def _larger_than(m: Manifest, max_side: Optional[int], seed: int = 0) -> bool:
    """Whether a seeded sample of the sources' headers has a long side above ``max_side`` (the cache resizes)."""
    if max_side is None:
        return False
    for src in random.Random(seed).sample(m.paths, min(_SIZE_SAMPLE, len(m.paths))):
        try:
            with Image.open(src) as im:
                if max(im.size) > max_side:
                    return True
        except Exception:  # noqa: BLE001 -- an unreadable file (a bomb too) is the loaders' or prepare's to report
            continue
    return False


def choose_cache(cfg, backend: str, m: Manifest) -> CacheChoice:
    """``loader.cache`` for a training manifest and the resolved loader backend. ``auto``: the GPU decoder
    (``dali``) reads JPEG only, so PNG inputs are always cached; on ``dali-cpu`` the cache pays when it shrinks
    the images (sources above ``prepare.max_side``: 4.49x the PNG throughput at 976x1280) and the run has
    epochs enough to win back the transcoding (36 ms of CPU per image once, against 23.6 -> 4.9 ms per image and
    epoch in the loader: about two epochs); ``pil`` never (the fallback and
    reference path, trained on the files as listed). ``off``: never; a folder: that cache, any backend."""
    mode = cfg.loader.cache
    if mode == OFF:
        return CacheChoice(None, "loader.cache is off")
    if cache_of(m.path) is not None:
        return CacheChoice(None, f"{m.path} is a JPEG cache's manifest already")
    if mode != AUTO:
        return CacheChoice(Path(mode).expanduser(), "loader.cache names it")
    if not any(p.lower().endswith(".png") for p in m.paths):
        return CacheChoice(None, "no PNG input")
    if backend == "pil":
        return CacheChoice(None, "loader.cache auto does not cache for the pil backend")
    if backend == "dali-cpu" and cfg.train.epochs < 2:
        return CacheChoice(None, "a run of under 2 epochs would not win back the transcoding on the CPU")
    if backend == "dali-cpu" and not _larger_than(m, cfg.prepare.max_side, cfg.train.seed):
        return CacheChoice(None, f"the PNGs are not larger than prepare.max_side ({cfg.prepare.max_side} px): "
                                 "re-encoding them at their size gains little on the CPU")
    return CacheChoice(auto_cache_dir(cfg), f"loader.cache auto: PNG inputs, backend {backend}")


def cached_manifest_dir(cache_dir: Path, manifest_path: Path) -> Path:
    """``<cache>/manifests/<folder name>-<sha1[:8] of the folder>``: the cached manifests of one source folder
    (its class map beside them), so stages with different class maps share one cache's JPEGs."""
    folder = manifest_path.absolute().parent
    digest = hashlib.sha1(str(folder).encode("utf-8")).hexdigest()[:8]
    return cache_dir / MANIFESTS / f"{folder.name}-{digest}"


def _check_total_space(paths: list[Path], cache_dir: Path, opts: PrepareOptions) -> int:
    """One estimate and one space check for every manifest's sources not yet in the cache, before any work."""
    todo = {}
    for path in paths:
        for src in read_manifest(path).paths:
            dst = cache_path_for(src, cache_dir)
            if src not in todo and not dst.exists():
                todo[src] = dst
    if not todo:
        return 0
    enc = _Encode(opts.quality, opts.max_side, opts.subsampling, opts.max_pixels)
    est = estimate_cache_bytes(sorted(todo), enc, opts.sample, opts.seed)
    _logger.info("JPEG cache %s: %d sources to transcode, about %.1f MB", cache_dir, len(todo), est.cache_bytes / 1e6)
    try:
        check_space(cache_dir, est.cache_bytes, opts.margin_gb)
    except InsufficientSpaceError as e:
        raise InsufficientSpaceError(f"{e} (or train on the files as listed: --set loader.cache=off)") from None
    return est.cache_bytes


def _accept(report: PrepareReport, path: Path, max_skipped: float) -> None:
    """A cache that is not complete, or that left out more of a split than the loaders may skip, is an error."""
    if report.remaining:
        raise PrepareError(f"the JPEG cache of {path} is incomplete: {report.remaining} of {report.rows_in} rows "
                           f"not cached ({report.stopped}); free some space and rerun (it resumes), or "
                           "--set loader.cache=off")
    share = report.skipped / max(1, report.rows_in)
    if share > max_skipped:
        raise PrepareError(f"{report.skipped} of {report.rows_in} sources of {path} cannot be read (listed in "
                           f"{report.skipped_csv}), more than train.max_skipped ({max_skipped:.0%})")
    if report.skipped:
        _logger.warning("%d unreadable source(s) of %s are left out of the cache: listed in %s", report.skipped,
                        path, report.skipped_csv)


def ensure_cache(manifests: Sequence[str | Path], cache_dir: str | Path, cfg,
                 progress: Optional[CacheProgress] = None) -> list[Path]:
    """The cached manifest of each of ``manifests`` (same order; the training one first, its class map rules),
    the JPEGs built, resumed or reused first (``prepare_cache``: every cache file already there is checked
    against its source's size and mtime, an interrupted build resumes). One disk-space check for all of them
    comes first (``InsufficientSpaceError`` with the size needed); an incomplete cache, or one leaving out more
    than ``train.max_skipped`` of a split as unreadable, is a ``PrepareError``."""
    cache_dir = Path(cache_dir).expanduser().absolute()
    opts = PrepareOptions.from_config(cfg)
    opts.validate()
    paths = [Path(p).absolute() for p in manifests]
    _check_stamp(cache_dir, _Encode(opts.quality, opts.max_side, opts.subsampling, opts.max_pixels), write=False)
    check_writable(cache_dir)
    _check_total_space(paths, cache_dir, opts)
    out = []
    for n, path in enumerate(paths):
        folder = cached_manifest_dir(cache_dir, path)
        if n == 0 and (folder / "class_map.json").exists():
            (folder / "class_map.json").unlink()  # derived: rewritten from the training manifest's own map
        bar = None if progress is None else functools.partial(progress, path.name)
        try:
            report = prepare_cache(path, cache_dir, opts, manifest_dir=folder, progress=bar)
        except ClassMapMismatch:
            if n == 0:
                raise
            # a legacy val/test manifest with K-codes the training one lacks (train reports them, as without the
            # cache): its cached manifest goes to a folder of its own, with its own class map
            _logger.warning("%s has K-codes that %s lacks: its cached manifest goes to %s", path, paths[0],
                            folder / path.stem)
            report = prepare_cache(path, cache_dir, opts, manifest_dir=folder / path.stem, progress=bar)
        _accept(report, path, cfg.train.max_skipped)
        _logger.info("JPEG cache of %s: %d rows (%d transcoded, %d reused) in %.1f s -> %s", path.name, report.cached,
                     report.transcoded, report.reused, report.seconds, report.manifest_out)
        out.append(Path(report.manifest_out))
    return out
