"""Loader benchmark: images/s of the ``pil`` and ``dali-cpu`` loaders and their decode-only ceilings.

``bench_decode`` is called by ``python -m pillsnap_dali.bench decode``. ``dali-cpu:colour-graph`` (and
``dali:colour-graph``) is the training loader with the drawn jitter + normalization in the DALI graph
instead of on the batch (``colour_in_graph``; a benchmark arm, not a training option). Every variant reads
the same files in the same process, side by side; each repetition is one full epoch (startup included) over
at least ``min_rows`` rows (the image list repeated), and the reported figure is the median of ``reps`` after one
warm-up epoch. Ceilings: ``dali-decode`` = ``fn.decoders.image`` alone with the same reader and threads;
``pil-decode`` = ``open_rgb`` (decode + RGB) alone in a pool of ``threads`` processes.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
import torch
from PIL import Image

from pillsnap_dali.benchmarks.peers import CPU_PEERS, GPU_PEERS, PEERS, input_note, make_peer_runner
from pillsnap_dali.config import Config, load_config
from pillsnap_dali.benchmarks.machine import machine_info
from pillsnap_dali.sysinfo import available_cores
from pillsnap_dali.imageio import IMAGE_SUFFIXES
from pillsnap_dali.data.manifest import Manifest, read_manifest
from pillsnap_dali.errors import InputError
from pillsnap_dali.gpumon import GpuMonitor
from pillsnap_dali.imageio import open_rgb
from pillsnap_dali.loaders import build_loader
from pillsnap_dali.loaders.runner import Reader

_logger = logging.getLogger(__name__)

BENCH_BACKENDS = ("pil", "dali-cpu", "dali-cpu:colour-graph", "pil-decode", "dali-decode")


def photo_like(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A 976x1280-like pill photo: lit background gradient, soft texture, a few pills, sensor noise."""
    import cv2

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    light = 1.0 - 0.35 * (((xx - width * rng.uniform(0.3, 0.7)) ** 2 + (yy - height * 0.4) ** 2)
                          / (width ** 2 + height ** 2))
    img = base[None, None, :] * light[..., None]
    texture = cv2.GaussianBlur(rng.normal(0, 12, (height, width)).astype(np.float32), (0, 0), 6)
    img += texture[..., None]
    for _ in range(int(rng.integers(1, 5))):
        centre = (int(rng.integers(width // 5, 4 * width // 5)), int(rng.integers(height // 5, 4 * height // 5)))
        axes = (int(rng.integers(60, 200)), int(rng.integers(40, 140)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.2) + rng.normal(0, 2.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_bench_images(out_dir: str | Path, n: int = 64, *, fmt: str = "png", size: tuple = (976, 1280),
                       quality: int = 95, seed: int = 0) -> list[Path]:
    """Write ``n`` photo-like images (PNG, or JPEG at ``quality``) once; existing files are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}[fmt]
    paths = []
    for i in range(n):
        path = out_dir / f"bench_{i:04d}{ext}"
        if not path.exists():
            arr = photo_like(size[0], size[1], np.random.default_rng([seed, i]))
            tmp = path.with_name(f".{path.name}.tmp{ext}")
            Image.fromarray(arr).save(tmp, **({"quality": quality} if ext == ".jpg" else {}))
            os.replace(tmp, path)
        paths.append(path)
    return paths


def _paths_of(source: str | Path | Manifest) -> list[str]:
    if isinstance(source, Manifest):
        return list(source.paths)
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = list(read_manifest(source).paths)
    if not paths:
        raise InputError(f"no images in {source}")
    return paths


def bench_manifest(paths: Sequence[str]) -> Manifest:
    """A one-class manifest of these files (also the tests' one-class manifest)."""
    n = len(paths)
    return Manifest(None, [str(p) for p in paths], ["K-000001"] * n, ["single"] * n, ["bench"] * n,
                    [Path(p).stem for p in paths], [[] for _ in range(n)], [""] * n)


def _decode_one(path: str) -> int:
    return open_rgb(path).width


def _time_pil_decode(paths: Sequence[str], threads: int) -> float:
    ctx = mp.get_context("fork")
    with ctx.Pool(threads) as pool:
        t0 = time.perf_counter()
        for _ in pool.imap(_decode_one, paths, chunksize=4):
            pass
        return time.perf_counter() - t0


def _time_loader(loader, epoch: int) -> float:
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


class _FileBatches:
    """A plain external source: the files' bytes in order, ``batch`` at a time (the ceiling's reader)."""

    def __init__(self, paths: Sequence[str], batch: int):
        self.paths, self.batch, self.pos = paths, batch, 0

    def __call__(self):
        if self.pos >= len(self.paths):
            raise StopIteration
        chunk = self.paths[self.pos:self.pos + self.batch]
        self.pos += len(chunk)
        return [np.fromfile(p, dtype=np.uint8) for p in chunk], np.arange(len(chunk), dtype=np.int64)


def _time_dali_decode(paths: Sequence[str], cfg: Config, threads: int, device: str = "cpu") -> float:
    from pipelines import PipelineOptions, TrainSpec, classify_pipeline, decode_graph
    opts = PipelineOptions(batch_size=cfg.train.batch_size, num_threads=threads, prefetch=cfg.loader.prefetch,
                           device=device, device_id=0 if device == "gpu" else None)
    t0 = time.perf_counter()
    pipe = classify_pipeline(_FileBatches(paths, opts.batch_size), TrainSpec(img_size=cfg.preprocess.img_size),
                             opts, graph=decode_graph)
    try:
        while True:
            pipe.run()
    except StopIteration:
        pass
    return time.perf_counter() - t0


def _make_runner(name: str, paths: Sequence[str], cfg: Config, threads: int):
    """A callable ``epoch -> seconds`` for one benchmark variant."""
    if name in PEERS:
        return make_peer_runner(name, paths, cfg, threads)
    if name == "pil-decode":
        return lambda epoch: _time_pil_decode(paths, threads)
    if name == "dali-decode":
        return lambda epoch: _time_dali_decode(paths, cfg, threads)
    if name == "dali-gpu-decode":
        return lambda epoch: _time_dali_decode(paths, cfg, threads, device="gpu")
    backend, _, variant = name.partition(":")
    if backend not in ("pil", "dali-cpu", "dali") or variant not in ("", "colour-graph"):
        raise ValueError(f"unknown benchmark variant {name!r}; choose from {list(BENCH_BACKENDS)}, dali, "
                         "dali:colour-graph, dali-cpu:colour-graph")
    device = torch.device("cuda" if backend == "dali" else "cpu")
    loader = build_loader(bench_manifest(paths), [0] * len(paths), cfg, train=True, device=device, backend=backend,
                          seed=cfg.train.seed)  # the peer arms draw with this seed too
    if variant:
        colour_in_graph(loader)
    return lambda epoch: _time_loader(loader, epoch)


def colour_in_graph(loader) -> None:
    """The benchmark arm ``:colour-graph``: the DALI training loader with the drawn jitter + normalization in
    its graph (``color_twist`` + ``crop_mirror_normalize``) instead of the batch colour step. Not a training
    option: it shows what the batch step saves."""
    loader.graph = dataclasses.replace(loader.graph, colour="graph")


def _bench_config(size: int, batch: int, threads: int) -> Config:
    return load_config(stage="demo", sets=[f"preprocess.img_size={size}", f"train.batch_size={batch}",
                                           f"loader.threads={threads}", f"loader.workers={threads}",
                                           "loader.backend=auto"])


def _cpu_seconds() -> float:
    """CPU time of this process, its finished children (DataLoader workers, pool processes) and its live
    descendants (the peer arms' persistent workers, children of a fork server: never reaped by this one)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            live += t.user + t.system
        except psutil.Error:
            pass
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + live



def bench_decode(source: str | Path | Manifest, *, size: int = 384, batch: int = 16, reps: int = 5,
                 threads: int = 2, backends: Sequence[str] = BENCH_BACKENDS, min_rows: int = 128) -> dict:
    """Images/s of each variant over the images of ``source`` (a folder of images, a manifest CSV, or a
    Manifest), training graph at ``size`` px, ``batch`` per step, ``threads`` DALI threads / PIL workers.

    Returns ``{"images": rows per epoch, "files": distinct files, "size", "batch", "threads", "reps",
    "machine": {...}, "results": {variant: {"images_per_s": median, "runs": [...],
    "cpu_ms_per_image": median CPU time of this process and its workers per image}}}``, and for every loader
    that has its ceiling measured, ``results[loader]["of_ceiling"]`` (loader / ceiling).
    """
    files = _paths_of(source)
    paths = (files * (-(-min_rows // len(files))))[:max(min_rows, len(files))]
    cfg = _bench_config(size, batch, threads)
    notes = {name: note for name in backends if name in PEERS and (note := input_note(name, files))}
    for note in notes.values():
        _logger.info("%s", note)
    backends = [name for name in backends if name not in notes]
    runners = {name: _make_runner(name, paths, cfg, threads) for name in backends}
    runs: dict = {name: [] for name in backends}
    cpu: dict = {name: [] for name in backends}
    usage: dict = {name: [] for name in backends}
    for name, run in runners.items():
        run(0)  # warm-up: page cache, pipeline code paths, worker start
    for rep in range(reps):  # interleaved, so a slow moment of a shared machine hits every variant
        for name, run in runners.items():
            c0 = _cpu_seconds()
            with ResourceSampler(gpu=name.startswith("dali:") or name in _GPU_ARMS) as sampler:
                seconds = run(rep + 1)
            runs[name].append(len(paths) / seconds)
            cpu[name].append((_cpu_seconds() - c0) / len(paths) * 1000.0)
            usage[name].append({**sampler.result(), "cpu_util": (_cpu_seconds() - c0) / seconds / available_cores()})
    results = {name: {"images_per_s": statistics.median(r), "runs": r, "min": min(r), "max": max(r),
                      "cpu_ms_per_image": statistics.median(cpu[name]), **_merge_usage(usage[name])}
               for name, r in runs.items()}
    ceilings = {"pil": "pil-decode", "dali-cpu": "dali-decode", "dali": "dali-gpu-decode"}
    for loader in results:
        ceiling = ceilings.get(loader.partition(":")[0])
        if ceiling in results and "decode" not in loader:
            results[loader]["of_ceiling"] = results[loader]["images_per_s"] / results[ceiling]["images_per_s"]
    _logger.info("bench_decode %s: %s", source,
                 ", ".join(f"{k} {v['images_per_s']:.1f} img/s" for k, v in results.items()))
    return {"images": len(paths), "files": len(files), "size": size, "batch": batch, "threads": threads,
            "reps": reps, "machine": machine_info(), "results": results, "skipped_arms": notes, **best_peer(results)}


_GPU_ARMS = ("dali", "dali-gpu-decode", "torchvision-gpu")
# the loaders a user would pick instead of DALI, per device (same training batch; not the decode-only ceilings)
CPU_PEER_ARMS = ("pil",) + CPU_PEERS
GPU_PEER_ARMS = GPU_PEERS


def best_peer(results: dict) -> dict:
    """``best_peer``: the fastest peer arm per device (``{"cpu": {"arm", "images_per_s"}, "gpu": ...}``) and
    ``vs_best_peer``: each DALI loader arm's images/s over its device's best peer (``dali-cpu*`` against the
    CPU peers, ``dali*`` against the GPU peers)."""
    best: dict = {}
    for device, peers in (("cpu", CPU_PEER_ARMS), ("gpu", GPU_PEER_ARMS)):
        measured = [(results[p]["images_per_s"], p) for p in peers if p in results]
        if measured:
            rate, arm = max(measured)
            best[device] = {"arm": arm, "images_per_s": rate}
    ratios = {}
    for arm, v in results.items():
        device = "cpu" if arm.startswith("dali-cpu") else "gpu" if arm.startswith("dali") else None
        if device in best and "decode" not in arm:
            ratios[arm] = v["images_per_s"] / best[device]["images_per_s"]
    return {"best_peer": best, "vs_best_peer": ratios}


def tree_pss_bytes(proc: psutil.Process | None = None) -> int:
    """The memory of a process tree (``proc`` and its descendants: DataLoader workers, DALI's fork server) as
    the sum of each process's PSS, where a page shared by N processes counts 1/N in each: shared pages are
    counted once in the total. (A sum of RSS counts them once per process: 9-15 GB for a 128-image epoch
    of forked workers that share torch and the interpreter.) Falls back to USS, then RSS, where the kernel does
    not report PSS."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            full = p.memory_full_info()
        except (psutil.Error, OSError):
            continue
        total += getattr(full, "pss", None) or getattr(full, "uss", None) or full.rss
    return total


class ResourceSampler:
    """Samples, in a background thread, the peak memory of this process tree (DataLoader workers included)
    as PSS (:func:`tree_pss_bytes`: shared pages counted once) and, with ``gpu=True``, NVML GPU utilization,
    memory and decoder use."""

    def __init__(self, gpu: bool = False, interval: float = 0.05):
        self.interval, self.peak_pss, self.gpu_samples = interval, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._gpu = None
        if gpu:
            self._gpu = GpuMonitor(0)

    def _loop(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self.peak_pss = max(self.peak_pss, tree_pss_bytes(me))
            except psutil.Error:
                pass
            if self._gpu is not None and self._gpu.available:
                self.gpu_samples.append(self._gpu.sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        out = {"peak_pss_mb": self.peak_pss / 2**20}
        for key in ("gpu_util", "gpu_mem_used_gb", "decoder_util", "jpg_util"):
            vals = [s[key] for s in self.gpu_samples if key in s]
            if vals:
                out[key] = max(vals) if key == "gpu_mem_used_gb" else statistics.mean(vals)
        return out


def _merge_usage(samples: list[dict]) -> dict:
    keys = {k for s in samples for k in s}
    return {k: (max if k in ("peak_pss_mb", "gpu_mem_used_gb") else statistics.median)(
        [s[k] for s in samples if k in s]) for k in sorted(keys)}


class _SlowStorage:
    """Wraps the DALI reader's file read in a sleep of ``latency_s`` per file (GIL released, like a storage
    wait): a stand-in for a cold page cache, which a benchmark cannot produce without root."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s

    def __enter__(self):
        from pillsnap_dali.loaders import dali_loader
        self._module = dali_loader
        self._orig = {name: getattr(dali_loader, name) for name in ("read_encoded", "read_encoded_upright")}
        latency = self.latency_s

        def slow(orig):
            def read(path, max_pixels):
                time.sleep(latency)
                return orig(path, max_pixels)
            return read
        if latency > 0:
            for name, orig in self._orig.items():
                setattr(dali_loader, name, slow(orig))
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(self._module, name, orig)


def bench_readers(source: str | Path | Manifest, *, readers: Sequence[int] = (0, 4), latency_ms: float = 0.0,
                  size: int = 384, batch: int = 16, threads: int = 2, rows: int = 192, reps: int = 3) -> dict:
    """The dali-cpu training loader with each ``loader.readers`` value, epochs interleaved: images/s and the
    time the training thread spends in the pipeline's external source per batch (reading in place puts the
    file reads there). ``latency_ms`` adds a per-file storage wait (see ``_SlowStorage``)."""
    files = _paths_of(source)
    paths = (files * (-(-rows // len(files))))[:max(rows, len(files))]
    base = _bench_config(size, batch, threads)
    loaders = {r: build_loader(bench_manifest(paths), [0] * len(paths),
                               dataclasses.replace(base, loader=dataclasses.replace(base.loader, readers=r)),
                               train=True, device=torch.device("cpu"), backend="dali-cpu") for r in readers}
    spent = [0.0]
    orig_call = Reader.__call__

    def timed(self):
        t0 = time.perf_counter()
        try:
            return orig_call(self)
        finally:
            spent[0] += time.perf_counter() - t0
    rates: dict = {r: [] for r in readers}
    callback: dict = {r: [] for r in readers}
    Reader.__call__ = timed
    try:
        with _SlowStorage(latency_ms / 1000.0):
            for rep in range(reps + 1):  # the first round warms up
                for r, loader in loaders.items():
                    spent[0] = 0.0
                    seconds = _time_loader(loader, rep)
                    if rep:
                        rates[r].append(len(paths) / seconds)
                        callback[r].append(spent[0] / -(-len(paths) // batch) * 1000.0)
    finally:
        Reader.__call__ = orig_call
    results = {str(r): {"images_per_s": statistics.median(rates[r]), "runs": rates[r],
                        "callback_ms_per_batch": statistics.median(callback[r])} for r in readers}
    return {"source": str(source), "images": len(paths), "latency_ms": latency_ms, "batch": batch,
            "threads": threads, "reps": reps, "machine": machine_info(), "results": results}
