"""The one DALI runner behind the classification and the detection loaders.

A loader describes its graph (a builder ``(source, PipelineOptions) -> Pipeline`` from ``pipelines/``) and how
one manifest row becomes the graph's per-sample inputs (``Feed``); the runner does the rest, once for both:

- **one live pipeline**: built on the first epoch, fed each epoch's order through its external source
  (``Reader``), reset at the end of an epoch and rebuilt only after a failure. Augmentation that must not
  depend on the pipeline's life is drawn on the host and fed as inputs (``Feed.extra``).
- **read-ahead**: the next batch's files are read (bytes + header check) by ``readers`` threads while DALI
  works on the current one.
- **recovery**: DALI aborts the whole pipeline on one undecodable file ("Current pipeline object is no longer
  valid"). The rows in flight are probed one by one with one reused batch-1 pipeline of the same graph
  (``Probe``); the bad ones are skipped (the loader's ``on_skip``), the others go back to the head of the
  stream, and the epoch goes on. A batch that fails while no single file does is retried, never skipped; after
  ``MAX_RETRIES`` retries the run stops with ``PipelineFailure``.
- **decoder paths**: on a GPU with a hardware JPEG engine DALI sends a row to the engine or to the CUDA decoder
  by its index in the batch (``hw_decoder_load``). The probe tries a row on both (``PROBE_PATHS``); it is bad
  only when both fail, and a row that decodes on one path only is delivered alone on that path.
- **device memory**: an allocation or CUDA error is never a corrupt file, nor is nvImageCodec's "Failed to
  decode sample" on a nearly full device (probe included). The dead pipelines are dropped, collected, DALI's
  unused memory released and torch's cache emptied, the pipeline rebuilt and the batch retried once; a second
  failure stops the run with ``DeviceMemoryError`` (batch size, image size and memory figures in the message).
  Nothing goes to the skip log for these.
- **the copy out of DALI** (``to_torch``, CPU and GPU) and **seeding** (``seeds.derive_seed`` of (epoch, rank,
  pipelines built), 31 bits).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.seeds import derive_seed

_logger = logging.getLogger(__name__)

ROWS = "rows"  # the input every graph carries and returns last (pipelines.ROWS)
_DEAD_PIPELINE = ("Current pipeline object is no longer valid", "Critical error in pipeline")
# allocation and CUDA failures (DALI's own and the CUDA runtime's texts, e.g. NVIDIA/DALI issue 5609)
_DEVICE_ERRORS = ("Can't allocate", "out of memory", "CUDA error", "cudaErrorMemoryAllocation",
                  "CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorIllegalAddress", "CUDA driver error",
                  "CUDA allocation failed")
# nvImageCodec's failures, its allocator's included, reach DALI's decoder as "Failed to decode sample #i":
# a bad file, or no memory. Under memory pressure (free device memory below LOW_GPU_MEMORY of the total) it
# counts as a device error; otherwise the probe decides.
_AMBIGUOUS_DECODE = ("Failed to decode sample",)
LOW_GPU_MEMORY = 0.05
# the decoder paths a GPU probe tries (DALI's hw_decoder_load): the hardware JPEG engine, then the CUDA decoder
PROBE_PATHS = (1.0, 0.0)
MAX_RETRIES = 2  # retries of a batch that fails in the pipeline while each of its files goes through alone


class PipelineFailure(PillsnapError, RuntimeError):
    """The DALI pipeline keeps failing on a batch although no single file of it fails alone."""


class DeviceMemoryError(PillsnapError, RuntimeError):
    """DALI could not allocate (or hit a CUDA error) twice on the same batch: not a data problem."""


def is_device_error(err: BaseException) -> bool:
    return isinstance(err, MemoryPressure) or (
        isinstance(err, (RuntimeError, MemoryError)) and any(s in str(err) for s in _DEVICE_ERRORS))


def is_ambiguous_decode(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _AMBIGUOUS_DECODE)


def under_memory_pressure(figures: dict) -> bool:
    """Whether ``memory_figures`` shows a device nearly full (free < LOW_GPU_MEMORY of the total)."""
    free, total = figures.get("gpu_free_mb"), figures.get("gpu_total_mb")
    return bool(free is not None and total and free / total < LOW_GPU_MEMORY)


class MemoryPressure(RuntimeError):
    """An ambiguous decode failure ("Failed to decode sample") while the device is nearly full: counted as
    a device error, never as a bad file."""


def is_dead_pipeline(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _DEAD_PIPELINE)


def dali_reason(err: BaseException) -> str:
    """The operator's own message out of DALI's multi-line error."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = text.split("Current pipeline object is no longer valid", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ("DALI: " + " ".join(lines))[:300] if lines else "DALI: pipeline error"


def free_device_memory() -> None:
    """After the failed pipelines were dropped: collect them, give DALI's pooled but unused memory back, and
    empty torch's cache (what a retry needs; the references must be gone first or nothing is freed)."""
    gc.collect()
    release_unused_memory()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def release_unused_memory() -> None:
    """Give DALI's pooled but unused host and device memory back (absent in old DALI releases: skipped)."""
    try:
        from nvidia.dali.backend import ReleaseUnusedMemory
    except ImportError:
        return
    try:
        ReleaseUnusedMemory()
    except RuntimeError as e:  # a broken CUDA context: the retry will tell
        _logger.warning("DALI could not release its unused memory: %s", e)


def rss_mb() -> float:
    """This process's resident memory in MiB (``/proc/self/statm``; 0 where it does not exist)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def memory_figures(device_id: Optional[int]) -> dict:
    """RSS (MiB) and, on a CUDA device, its free/total memory (MiB): for error messages and benchmarks."""
    out = {"rss_mb": round(rss_mb(), 1)}
    if device_id is not None and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info(device_id)
            out.update(gpu_free_mb=round(free / 2 ** 20, 1), gpu_total_mb=round(total / 2 ** 20, 1))
        except RuntimeError as e:
            out["gpu"] = f"unknown ({e})"
    return out


def to_torch(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A DALI output (CPU or GPU TensorList, dense) copied into a new torch tensor (``feed_ndarray``).

    DALI reuses its buffers on later iterations, hence the copy. GPU output goes straight into a CUDA tensor
    on the current stream (no host round trip); CPU output bound for a CUDA device lands in pinned memory.
    """
    from nvidia.dali.backend import TensorGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = data.as_tensor()
    device = torch.device(device)
    on_gpu = isinstance(dense, TensorGPU)
    out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device if on_gpu else "cpu",
                      pin_memory=not on_gpu and device.type == "cuda")
    if on_gpu:
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
    else:
        feed_ndarray(dense, out)
    return out


@dataclass(frozen=True)
class Feed:
    """How rows become a graph's inputs.

    ``inputs``: the graph's input names in its order (``ROWS`` is filled by the runner). ``read(row)``:
    ``(sample, None)`` with a value per other input (and anything the loader keeps with it, e.g. the upright
    size), or ``(None, reason)`` to skip the row. ``extra(rows, samples, epoch)``: inputs made per batch (the
    host-drawn augmentation), ``{name: values with one entry per sample}``.
    """
    inputs: tuple
    read: Callable[[int], tuple]
    extra: Optional[Callable[[np.ndarray, list, int], dict]] = None


def _batch_inputs(feed: Feed, rows: list, samples: list, epoch: int) -> tuple:
    """The source's tuple for one batch; extras are also kept in each sample (for the probe, the collate)."""
    for name, values in (feed.extra(np.asarray(rows, np.int64), samples, epoch) if feed.extra else {}).items():
        for s, v in zip(samples, values):
            s[name] = v
    return tuple(np.asarray(rows, dtype=np.int64) if name == ROWS else [s[name] for s in samples]
                 for name in feed.inputs)


class Reader:
    """The pipeline's external source: batches of this epoch's rows, in order.

    Rows whose ``read`` gives a reason are skipped here (``on_skip``), before DALI sees them, and the batch is
    filled up from the following rows. A batch handed out stays in ``in_flight`` until ``complete`` gets its
    outputs. With ``readers > 0`` the next batch's files are read by that many threads while DALI works on
    the current one; the order, the skips and the accounting are those of reading in place (a skip is logged
    when its batch is handed out; after a failure the rows read ahead go back behind the rows in flight).
    """

    def __init__(self, feed: Feed, batch_size: int, on_skip: Callable[[int, str], None], readers: int = 0):
        self.feed, self.batch_size, self.on_skip = feed, batch_size, on_skip
        self.queue: deque = deque()
        self.in_flight: deque = deque()
        self.epoch, self.drop_last, self.dropped, self._stopped = 0, False, 0, False
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="pillsnap-read") if readers > 0 else None
        self._ahead: Optional[list] = None  # [(row, future of read)] of the next batch

    def start(self, order: Sequence[int], epoch: int, drop_last: bool) -> None:
        self._return_ahead()
        self.queue = deque(int(r) for r in order)
        self.in_flight.clear()
        self.epoch, self.drop_last, self.dropped, self._stopped = int(epoch), bool(drop_last), 0, False

    def _start_ahead(self) -> None:
        rows = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
        self._ahead = [(r, self._pool.submit(self.feed.read, r)) for r in rows] or None

    def __call__(self):
        if self._stopped:
            raise StopIteration
        rows, samples = [], []

        def take(row, result):
            sample, reason = result
            if reason is not None:
                self.on_skip(row, reason)
            else:
                sample["row"] = row
                rows.append(row)
                samples.append(sample)
        if self._pool is not None:
            if self._ahead is None:
                self._start_ahead()
            ahead, self._ahead = self._ahead or [], None
            for row, fut in ahead:
                take(row, fut.result())
        while len(rows) < self.batch_size and self.queue:  # all rows, or the top-up after skips
            row = self.queue.popleft()
            take(row, self.feed.read(row))
        if self._pool is not None:
            self._start_ahead()  # the next batch is read while DALI decodes this one
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            self.dropped += len(rows)
            raise StopIteration
        self.in_flight.append((rows, samples))
        return _batch_inputs(self.feed, rows, samples, self.epoch)

    def complete(self, rows: np.ndarray) -> list:
        """The samples of the oldest batch in flight, whose outputs carry ``rows``."""
        expected, samples = self.in_flight.popleft()
        if rows.tolist() != expected:
            raise RuntimeError(f"DALI returned rows {rows.tolist()[:8]}... for a batch fed as {expected[:8]}...")
        return samples

    def take_in_flight(self) -> list:
        """The rows DALI holds, in order, for recovery; rows read ahead go back to the head of the queue."""
        self._return_ahead()
        rows = [r for batch, _ in self.in_flight for r in batch]
        self.in_flight.clear()
        return rows

    def _return_ahead(self) -> None:
        if self._ahead:
            for _, fut in self._ahead:
                fut.cancel()
            self.requeue([r for r, _ in self._ahead])
        self._ahead = None

    def requeue(self, rows: Sequence[int]) -> None:
        """Put rows back at the head of the stream, in their order."""
        self.queue.extendleft(reversed(list(rows)))

    def stop(self) -> None:
        """End the epoch at the next call (a consumer that stopped early)."""
        self._stopped = True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Probe:
    """Runs one row at a time through batch-1 pipelines of the same graph and device, kept between probes
    and epochs (rebuilt only after one failed).

    On a GPU with ``build_on_path(source, opts, hw_decoder_load)``, a row is tried on the hardware JPEG path
    (load 1.0: what a batch-1 pipeline takes anyway) and, if that fails, on the CUDA decoder (load 0.0): in a
    batch, DALI sends a row to one or the other by its index, so a file that fails on one path only is not
    bad. ``works_on[row]`` keeps the path that decoded such a row. ``pressure()``: whether the device is
    nearly full (then an ambiguous decode failure is raised as ``MemoryPressure``, never a skip)."""

    def __init__(self, build: Callable, feed: Feed, opts, build_on_path: Optional[Callable] = None,
                 pressure: Callable[[], bool] = lambda: False):
        self.build, self.feed, self.build_on_path, self.pressure = build, feed, build_on_path, pressure
        self.opts = dataclasses.replace(opts, batch_size=1, num_threads=1, prefetch=1)
        self.paths = PROBE_PATHS if build_on_path is not None and opts.device == "gpu" else (None,)
        self.builds = 0
        self.works_on: dict = {}
        self._pipes: dict = {}
        self._next: Optional[tuple] = None

    def _source(self):
        return self._next

    def _pipe(self, path):
        if path not in self._pipes:
            self._pipes[path] = (self.build(self._source, self.opts) if path is None else
                                 self.build_on_path(self._source, self.opts, path))
            self.builds += 1
        return self._pipes[path]

    def run(self, row: int, epoch: int, path=None):
        """The graph's outputs for ``row`` alone on ``path`` (DALI's buffers: copy before the next run)."""
        sample, reason = self.feed.read(row)
        if reason is not None:
            raise RuntimeError(reason)
        self._next = _batch_inputs(self.feed, [row], [sample], epoch)
        return self._pipe(path).run(), sample

    def problem(self, row: int, epoch: int) -> Optional[str]:
        """None if the row goes through the graph on one of the paths, else the reason it does not. Device
        errors propagate (an ambiguous one under memory pressure as ``MemoryPressure``)."""
        sample, reason = self.feed.read(row)
        if reason is not None:
            return reason
        failed: dict = {}
        for path in self.paths:
            self._next = _batch_inputs(self.feed, [row], [sample], epoch)
            try:
                self._pipe(path).run()
            except RuntimeError as e:
                self._pipes.pop(path, None)  # dead: rebuilt for the next probe
                if is_device_error(e):
                    raise
                if is_ambiguous_decode(e) and self.pressure():
                    raise MemoryPressure(f"a one-image probe failed while the device is nearly full: "
                                         f"{dali_reason(e)}") from None
                failed[path] = dali_reason(e)
        if len(failed) == len(self.paths):
            return next(iter(failed.values()))
        if failed:  # one path only: the row goes through alone, on the other
            self.works_on[row] = next(p for p in self.paths if p not in failed)
            (bad_path, why), = failed.items()
            _logger.warning("row %d fails on one decoder path only (hw_decoder_load %s: %s): delivered alone "
                            "on hw_decoder_load %s", row, bad_path, why, self.works_on[row])
        return None

    def close(self) -> None:
        self._pipes.clear()


class DaliRunner:
    """Epochs of one graph through one live pipeline, with read-ahead and recovery (module docstring).

    ``build(source, opts)``: a built pipeline whose last output is the rows; ``build_on_path(source, opts,
    hw_decoder_load)``: the same graph with its decoder's hardware share fixed (the probe's two paths; None:
    one path); ``what``: the batch and image size, named in ``DeviceMemoryError``. ``builds``: pipelines
    built so far (probe excluded).
    """

    def __init__(self, build: Callable, feed: Feed, opts, on_skip: Callable[[int, str], None], *,
                 readers: int = 0, rank: int = 0, what: str = "", build_on_path: Optional[Callable] = None):
        self.build, self.feed, self.opts, self.on_skip = build, feed, opts, on_skip
        self.rank, self.what = rank, what or f"batch size {opts.batch_size}"
        self.reader = Reader(feed, opts.batch_size, on_skip, readers)
        self.probe = Probe(build, feed, opts, build_on_path, self.memory_pressure)
        self.pipe = None
        self.builds = 0
        self._memory_failures = self._blind_failures = 0
        self._probed_good: set = set()

    def _pipeline(self, epoch: int):
        if self.pipe is None:
            seed = derive_seed(self.opts.seed, epoch, self.rank, self.builds, bits=31)
            opts = dataclasses.replace(self.opts, seed=seed)
            self.pipe = self.build(self.reader, opts)
            self.builds += 1
        return self.pipe

    def epoch(self, order: Sequence[int], epoch: int, drop_last: bool, collate: Callable) -> Iterator:
        """``collate(outputs, samples)`` of each batch of ``order`` (copied out of DALI before the next run)."""
        self.reader.start(order, epoch, drop_last)
        self._probed_good = set()
        finished = False
        try:
            while True:
                try:  # no local holds the pipeline: a failed one is freed when the runner drops it
                    outs = self._pipeline(epoch).run()
                except StopIteration:
                    self.pipe.reset()  # the live pipeline starts the next epoch from its source
                    finished = True
                    return
                except RuntimeError as err:
                    alone = self._recover(err, epoch)
                    yield from self._deliver_alone(alone, epoch, collate)
                    continue
                samples = self.reader.complete(np.asarray(outs[-1].as_tensor(), dtype=np.int64).reshape(-1))
                self._memory_failures = self._blind_failures = 0  # only failures in a row count
                yield collate(outs, samples)
        except BaseException as e:
            if not isinstance(e, (Exception, GeneratorExit)):  # a forced stop (a signal) in the middle of a
                finished, self.pipe = True, None               # feed: the pipeline is dropped, never drained
                self.reader.stop()
                self.reader.take_in_flight()
            raise
        finally:
            if not finished:
                self._drain()

    def _drain(self) -> None:
        """A consumer stopped early: the batches DALI prefetched are run out, so that none of them reaches
        the next epoch, and the pipeline is kept."""
        self.reader.stop()
        try:
            while self.pipe is not None:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except RuntimeError:
            self.pipe = None
        self.reader.take_in_flight()

    def memory_pressure(self) -> bool:
        return under_memory_pressure(memory_figures(self.opts.device_id))

    def _is_device(self, err: BaseException) -> bool:
        return is_device_error(err) or (is_ambiguous_decode(err) and self.memory_pressure())

    def _deliver_alone(self, rows: list, epoch: int, collate: Callable) -> Iterator:
        """Rows that decode on one decoder path only, each as a batch of its own through the probe pipeline
        of that path."""
        for row in rows:
            outs, sample = self.probe.run(row, epoch, self.probe.works_on[row])
            sample["row"] = row
            yield collate(outs, [sample])

    def _recover(self, err: RuntimeError, epoch: int) -> list:
        """Handles a failed run; returns the rows to deliver alone on their one working decoder path."""
        self.pipe = None  # a failed DALI pipeline is no longer valid
        rows = self.reader.take_in_flight()
        if not self._is_device(err) and not is_dead_pipeline(err):
            raise err
        if self._is_device(err):
            self._device_failure(err, rows)
            return []
        _logger.info("DALI pipeline failed with %d row(s) in flight (%s): probing them one by one", len(rows),
                     dali_reason(err))
        try:
            bad = self._probe(rows, epoch)
        except RuntimeError as probe_err:
            if not is_device_error(probe_err):
                raise
            err.__traceback__ = None  # the batch's failure holds the dead pipeline too
            self._device_failure(probe_err, rows)
            return []
        for row, why in bad.items():
            self.on_skip(row, why)
        alone = [r for r in rows if r in self.probe.works_on and r not in bad]
        if not bad and not alone:
            self._blind_failures += 1
            if self._blind_failures > MAX_RETRIES:
                raise PipelineFailure(
                    f"the DALI pipeline failed {self._blind_failures} times in a row on a batch (rows "
                    f"{rows[:8]}{'...' if len(rows) > 8 else ''}) although each of its files goes through the "
                    f"graph alone: {dali_reason(err)}") from err
            _logger.warning("no single file reproduces the failure (%s): the batch is retried (%d of %d)",
                            dali_reason(err), self._blind_failures, MAX_RETRIES)
        self.reader.requeue([r for r in rows if r not in bad and r not in alone])
        return alone

    def _device_failure(self, err: RuntimeError, rows: list) -> None:
        """The pipelines are dropped (the failed one, the probe's) and their memory freed before the retry;
        nothing is skipped."""
        self._memory_failures += 1
        self.pipe = None
        self.probe.close()
        err.__traceback__ = None  # its frames hold the dead pipeline
        free_device_memory()
        figures = memory_figures(self.opts.device_id)
        if self._memory_failures > 1:
            raise DeviceMemoryError(
                f"DALI ran out of memory (or hit a CUDA error) twice on the same batch ({self.what}; memory "
                f"{figures}): {dali_reason(err)}. Lower train.batch_size or preprocess.img_size, or free the "
                "GPU; no file was skipped") from err
        _logger.warning("DALI could not allocate (%s; memory %s): unused memory released, pipeline rebuilt, "
                        "the batch retried", dali_reason(err), figures)
        self.reader.requeue(rows)

    def _probe(self, rows: list, epoch: int) -> dict:
        bad = {}
        for row in rows:
            if row in self._probed_good:
                continue
            why = self.probe.problem(row, epoch)
            if why is None:
                self._probed_good.add(row)
            else:
                bad[row] = why
        return bad

    def close(self) -> None:
        self.reader.close()
        self.probe.close()
        self.pipe = None
