"""Image verification before an image enters a manifest.

- ``header``: ``imageio.check_header`` (magic bytes, the formats the loaders take, a PNG's IEND, the size
  from the header), no decoding.
- ``full``: ``imageio.check_full`` (the header check, then a full PIL decode) in a process pool. Results are
  cached in a JSON file keyed by path + size + mtime_ns, so a rerun only decodes what changed.

A failure is the checks' short stable reason string ("empty file", "not an image", "unsupported format: GIF",
"too many pixels: WxH = N > max_pixels M", "invalid size WxH", "truncated png", "decode failed: ..."), shared
with the loaders; success is ``None``.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS, check_full, check_header

_logger = logging.getLogger(__name__)

MODES = ("none", "header", "full")
CACHE_NAME = "verify_cache.json"
# bumped when the reason texts change, so a cache never serves another version's wording (2: imageio's)
CACHE_VERSION = 2


@dataclass
class VerifySettings:
    mode: str = "none"            # none | header | full
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 2              # processes for the full decode; <= 1 decodes in this process
    cache_path: Path | None = None


def _full_job(args: tuple) -> str | None:
    return check_full(*args)


class Verifier:
    """Checks images under one mode; ``bad(paths)`` returns {path: reason} for the failures only."""

    def __init__(self, settings: VerifySettings):
        if settings.mode not in MODES:
            raise ValueError(f"verify mode must be one of {MODES}, got {settings.mode!r}")
        self.s = settings
        self.cache: dict = self._load_cache() if settings.mode == "full" else {}
        self.memo: dict = {}      # path -> reason or None, for this run (a path is checked once)
        self.checked = 0
        self.decoded = 0

    def _load_cache(self) -> dict:
        p = self.s.cache_path
        if not p or not Path(p).exists():
            return {}
        try:
            with open(p, encoding="utf-8") as fh:
                data = json.load(fh)
            if data.get("max_pixels") == self.s.max_pixels and data.get("version") == CACHE_VERSION:
                return dict(data.get("results", {}))
            _logger.info("verify cache %s was made with another pixel limit or version: not used", p)
        except (OSError, ValueError, AttributeError) as e:
            _logger.warning("verify cache %s unreadable (%s): starting a new one", p, e)
        return {}

    def bad(self, paths: list[str]) -> dict[str, str]:
        if self.s.mode == "none" or not paths:
            return {}
        todo = [p for p in dict.fromkeys(paths) if p not in self.memo]
        self.checked += len(todo)
        if self.s.mode == "header":
            self.memo.update({p: check_header(p, self.s.max_pixels) for p in todo})
        elif todo:
            self.memo.update(self._full(todo))
        return {p: self.memo[p] for p in paths if self.memo[p]}

    def _full(self, paths: list[str]) -> dict:
        keys = {p: _cache_key(p) for p in paths}
        todo = [p for p in paths if keys[p] is None or keys[p] not in self.cache]
        results = {p: self.cache[keys[p]] for p in paths if keys[p] is not None and keys[p] in self.cache}
        jobs = [(p, self.s.max_pixels) for p in todo]
        if self.s.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=self.s.workers) as pool:
                out = list(pool.map(_full_job, jobs, chunksize=max(1, len(jobs) // (self.s.workers * 8))))
        else:
            out = [_full_job(j) for j in jobs]
        self.decoded += len(todo)
        for p, r in zip(todo, out):
            results[p] = r
            if keys[p] is not None:
                self.cache[keys[p]] = r
        return results

    def save(self) -> None:
        if self.s.mode == "full" and self.s.cache_path:
            atomic_write_text(self.s.cache_path, json.dumps(
                {"version": CACHE_VERSION, "max_pixels": self.s.max_pixels, "results": self.cache},
                ensure_ascii=False))


def _cache_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # never cached: a missing file is checked again next time
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"
