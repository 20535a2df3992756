"""The ``dali`` (GPU) and ``dali-cpu`` backends, with recovery from files DALI cannot decode.

DALI aborts the whole pipeline on one undecodable file ("Current pipeline object is no longer valid").
The reader is therefore ours (``RowReader``, the pipeline's external source): it remembers every batch
it handed to DALI until that batch's outputs come back. When the pipeline dies, the rows in flight are
probed one by one with a batch-1 pipeline of the same graph and device (``RowProbe``); the bad ones go to
the skip log, the good ones go back to the head of the stream, a new pipeline is built and the epoch goes
on where it was: every row is yielded exactly once or logged as skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from pipelines import (AUG, ENCODED, ROWS, BatchColour, EvalSpec, OutputSpec, PipelineOptions, TrainSpec,
                       classify_pipeline)

from pillsnap_dali.loaders.augment import draw_augment
from pillsnap_dali.loaders.common import (Batch, EpochPlan, LoaderBase, LoaderSpec, SkipLog, read_encoded,
                                          read_encoded_upright, to_device, to_device_batch)

_logger = logging.getLogger(__name__)

_DEAD_PIPELINE = ("Current pipeline object is no longer valid", "Critical error in pipeline")
# failures in a row without a culprit found by probing before the oldest in-flight batch is given up
MAX_BLIND_FAILURES = 2


def graph_spec(spec: LoaderSpec):
    """The pipelines' TrainSpec/EvalSpec for a loader spec (config unpacked here, once)."""
    pre, ld = spec.preprocess, spec.loader
    out = OutputSpec(mean=tuple(pre.mean), std=tuple(pre.std), dtype=ld.dtype, layout=ld.layout)
    if not spec.train:
        return EvalSpec(img_size=pre.img_size, resize_mode=pre.resize_mode, crop_pct=pre.crop_pct, output=out,
                        hw_decoder_load=ld.hw_decoder_load)
    return TrainSpec(img_size=pre.img_size, output=out, hw_decoder_load=ld.hw_decoder_load)


def batch_colour(graph: TrainSpec) -> BatchColour:
    """The colour step of a ``colour="batch"`` training graph (its factors are the samples' draws)."""
    out = graph.output
    return BatchColour(mean=out.mean, std=out.std, dtype=out.dtype, layout=out.layout)


def augment_draws(spec: LoaderSpec, epoch: int):
    """``draws(rows, sizes) -> (n, 9) float32`` for a training loader's epoch (None for evaluation)."""
    if not spec.train:
        return None
    return functools.partial(draw_augment, spec.augment, spec.seed, epoch)


def read_row(path: str, max_pixels: int, with_size: bool):
    """``(bytes, reason, upright (w, h))``; the size only ``with_size`` (the training graph's crop window)."""
    if not with_size:
        return (*read_encoded(path, max_pixels), None)
    buf, reason, hw = read_encoded_upright(path, max_pixels)
    return buf, reason, (hw[1], hw[0]) if hw else None


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


class RowReader:
    """External source of one epoch: batches of ``(encoded bytes, row id)`` in this rank's order.

    Files that are missing, empty or too large (header check) are skipped here, before DALI sees them, and
    the batch is filled up from the following rows. Every batch handed out stays in ``in_flight`` until
    ``complete`` receives its outputs.

    With ``readers > 0`` the next batch's files are read (bytes + header check) by that many threads while
    DALI works on the current one, so file I/O is off the training loop's thread (DALI calls its external
    source in the thread that runs the pipeline). The order, the skips and the accounting are exactly those
    of reading in place: a skip is logged when its batch is handed out, and on a pipeline failure the rows
    read ahead go back to the queue behind the rows that were in flight.

    Training (``spec.train``): each batch also carries its samples' augmentation draws (``draw_augment`` of
    (seed, ``epoch``, row) and the upright size read from the header), the graph's ``AUG`` input; ``complete``
    gives them back for the batch colour step.
    """

    def __init__(self, order: Sequence[int], paths: Sequence[str], spec: LoaderSpec, on_skip,
                 readers: int = 0, epoch: int = 0):
        self.queue = deque(int(r) for r in order)
        self.in_flight: deque = deque()
        self._in_flight_aug: deque = deque()
        self.draw = augment_draws(spec, epoch)
        self.paths, self.on_skip = paths, on_skip
        self.batch_size, self.drop_last, self.max_pixels = spec.batch_size, spec.drop_last, spec.max_pixels
        self.dropped = 0
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="pillsnap-read") if readers > 0 else None
        self._ahead: Optional[list] = None  # [(row, future of read_encoded)] of the next batch

    def _read(self, row: int):
        """(bytes, reason, upright (w, h) or None): training needs the size for the crop window."""
        return read_row(self.paths[row], self.max_pixels, self.draw is not None)

    def _start_ahead(self) -> None:
        rows = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
        self._ahead = [(r, self._pool.submit(self._read, r)) for r in rows] or None

    def __call__(self):
        rows, bufs, sizes = [], [], []

        def take(row, result):
            buf, reason, size = result
            if reason is not None:
                self.on_skip(row, reason)
            else:
                rows.append(row)
                bufs.append(buf)
                sizes.append(size)
        if self._pool is not None:
            if self._ahead is None:
                self._start_ahead()
            ahead, self._ahead = self._ahead or [], None
            for row, fut in ahead:
                take(row, fut.result())
        while len(rows) < self.batch_size and self.queue:  # all rows, or the top-up after skips
            row = self.queue.popleft()
            take(row, self._read(row))
        if self._pool is not None:
            self._start_ahead()  # the next batch is read while DALI decodes this one
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            self.dropped += len(rows)
            raise StopIteration
        self.in_flight.append(rows)
        row_ids = np.asarray(rows, dtype=np.int64)
        if self.draw is None:
            self._in_flight_aug.append(None)
            return bufs, row_ids
        aug = self.draw(row_ids, sizes)
        self._in_flight_aug.append(aug)
        return bufs, row_ids, aug

    def complete(self, rows: np.ndarray) -> Optional[np.ndarray]:
        """Check a batch's rows against the oldest batch fed; its augmentation draws (training) or None."""
        expected = self.in_flight.popleft()
        aug = self._in_flight_aug.popleft()
        if rows.tolist() != expected:
            raise RuntimeError(f"DALI returned rows {rows.tolist()[:8]}... for a batch fed as {expected[:8]}...")
        return aug

    def take_in_flight(self) -> list[list[int]]:
        """The batches DALI holds, for recovery; rows read ahead go back to the head of the queue (they
        will follow the in-flight rows that recovery requeues)."""
        self._return_ahead()
        batches = list(self.in_flight)
        self.in_flight.clear()
        self._in_flight_aug.clear()
        return batches

    def _return_ahead(self) -> None:
        if self._ahead:
            for _, fut in self._ahead:
                fut.cancel()
            self.requeue([r for r, _ in self._ahead])
        self._ahead = None

    def requeue(self, rows: Sequence[int]) -> None:
        """Put rows back at the head of the stream, in their order."""
        self.queue.extendleft(reversed(list(rows)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class RowProbe:
    """Runs one file at a time through a batch-1 pipeline of the same graph and device (training: with the
    row's own augmentation draw, ``draw`` being the reader's)."""

    def __init__(self, spec, opts: PipelineOptions, draw=None):
        self.spec, self.draw = spec, draw
        self.opts = dataclasses.replace(opts, batch_size=1, num_threads=1, prefetch=1)
        self._pipe = None

    def problem(self, path: str, max_pixels: int, row: int = 0) -> Optional[str]:
        """None if the file goes through the graph, else the reason it does not."""
        buf, reason, size = read_row(path, max_pixels, self.draw is not None)
        if reason is not None:
            return reason
        if self._pipe is None:
            self._pipe = classify_pipeline(None, self.spec, self.opts)
        try:
            self._pipe.feed_input(ENCODED, [buf])
            self._pipe.feed_input(ROWS, [np.zeros((), dtype=np.int64)])
            if self.draw is not None:
                self._pipe.feed_input(AUG, self.draw(np.array([row]), [size]))
            self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # dead: rebuilt on the next probe
            return dali_reason(e)
        return None


class DaliLoader(LoaderBase):
    """``dali`` / ``dali-cpu`` backend. The training graph draws nothing itself: each sample's augmentation
    comes from (seed, epoch, row) through the reader, so an epoch is reproducible after a restart. A file found bad mid-epoch may make
    the epoch one batch shorter than ``len()``."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, spec: LoaderSpec, skip_log: SkipLog,
                 backend: str, file_rows: Optional[Sequence[int]] = None):
        super().__init__(paths, labels, spec, skip_log, file_rows)
        self.backend = backend
        self.graph = graph_spec(spec)
        device = labels.device
        gpu = backend == "dali"
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None

    def _options(self, restarts: int) -> PipelineOptions:
        seed = int(np.random.SeedSequence([self.spec.seed, self.epoch, self.spec.rank, restarts])
                   .generate_state(1)[0] % (2 ** 31))
        ld = self.spec.loader
        return PipelineOptions(batch_size=self.spec.batch_size, device="gpu" if self.backend == "dali" else "cpu",
                               device_id=self.device_id, num_threads=ld.threads, prefetch=ld.prefetch, seed=seed)

    def __iter__(self):
        plan = self.take_plan()
        self._last_stats = plan.stats
        self.position = plan.start
        epoch = _Epoch(self, plan)
        try:
            yield from epoch.run()
        finally:
            plan.stats["dropped"] = epoch.reader.dropped
            epoch.reader.close()
            epoch.pipe = None

    def skip(self, plan: EpochPlan, row: int, reason: str) -> None:
        plan.stats["skipped"] += 1
        self.log_skip(row, reason)


class _Epoch:
    """One epoch of a DaliLoader: the reader, the live pipeline and the recovery after a failure."""

    def __init__(self, loader: DaliLoader, plan: EpochPlan):
        self.loader, self.plan = loader, plan
        self.reader = RowReader(plan.order, loader.paths, loader.spec, lambda r, why: loader.skip(plan, r, why),
                                readers=loader.spec.loader.readers, epoch=loader.epoch)
        self.restarts = self.blind_failures = self.consumed = 0
        self.probe: Optional[RowProbe] = None
        self.probed_good: set[int] = set()
        self.pipe = None
        graph = loader.graph
        self.colour = batch_colour(graph) if isinstance(graph, TrainSpec) and graph.colour == "batch" else None

    def _new_pipeline(self):
        self.pipe = classify_pipeline(self.reader, self.loader.graph, self.loader._options(self.restarts))

    def run(self):
        self._new_pipeline()
        while True:
            try:
                images, rows = self.pipe.run()
            except StopIteration:
                return
            except RuntimeError as err:
                if not is_dead_pipeline(err):
                    raise
                self.pipe = None
                self._recover(err)
                self.restarts += 1
                self._new_pipeline()
                continue
            yield self._batch(images, rows)

    def _batch(self, images, rows) -> Batch:
        row_ids = torch.from_numpy(np.array(rows.as_tensor(), dtype=np.int64).reshape(-1))
        aug = self.reader.complete(row_ids.numpy())
        self.plan.stats["yielded"] += len(row_ids)
        self.blind_failures = 0  # "in a row": a batch that went through ends a run of unexplained failures
        self._advance(row_ids.tolist())
        return dali_to_batch(images, row_ids, self.loader.label_table, self.loader.spec.loader, self.colour, aug)

    def _advance(self, rows: list[int]) -> None:
        """Move the consumed count past the yielded ``rows``: they come out in plan order (recovery requeues in
        order), so every entry passed over was skipped. Row by row, so that a row drawn several times (the
        weighted sampler) is matched to its own draws."""
        order, c = self.plan.order, self.consumed
        for row in rows:
            while c < len(order) and order[c] != row:
                c += 1
            c = min(c + 1, len(order))
        self.consumed = c
        self.loader.position = self.plan.position(c)

    def _recover(self, err: RuntimeError) -> None:
        batches = self.reader.take_in_flight()
        rows = [r for b in batches for r in b]
        _logger.info("DALI pipeline failed with %d row(s) in flight (%s): probing them one by one",
                     len(rows), dali_reason(err))
        bad = self._probe(rows)
        if bad:
            self.blind_failures = 0
        else:
            self.blind_failures += 1
            if self.blind_failures >= MAX_BLIND_FAILURES and batches:
                why = f"pipeline failed on its batch, not on the file alone ({dali_reason(err)})"
                bad = {r: why for r in batches[0]}
        for row, why in bad.items():
            self.loader.skip(self.plan, row, why)
        self.reader.requeue([r for r in rows if r not in bad])

    def _probe(self, rows: list[int]) -> dict:
        ld = self.loader
        if self.probe is None:
            self.probe = RowProbe(ld.graph, ld._options(self.restarts), self.reader.draw)
        bad = {}
        for row in rows:
            if row in self.probed_good:
                continue
            why = self.probe.problem(ld.paths[row], ld.spec.max_pixels, row)
            if why is None:
                self.probed_good.add(row)
            else:
                bad[row] = why
        return bad


def dali_to_batch(images, rows: torch.Tensor, label_table: torch.Tensor, ld,
                  colour: Optional[BatchColour] = None, aug: Optional[np.ndarray] = None) -> Batch:
    """DALI output (CPU or GPU TensorList) -> Batch on the label table's device.

    The DALI buffer is reused by later iterations, so it is copied (``feed_ndarray``): into a new CPU tensor,
    or for GPU output straight into a CUDA tensor on the current stream (no host round trip). With
    ``colour`` the output is uint8 CHW: it moves to the training device as uint8 (a quarter of the float32
    bytes) and ``colour`` turns it into the normalized batch there, with the samples' draws ``aug``.
    """
    from nvidia.dali.backend import TensorGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    dtype = torch.uint8 if colour is not None else getattr(torch, ld.dtype)
    on_gpu = isinstance(dense, TensorGPU)
    device = label_table.device
    # DALI CPU output bound for a GPU lands in pinned memory straight away (to_device then copies once)
    out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device if on_gpu else "cpu",
                      pin_memory=not on_gpu and device.type == "cuda")
    if on_gpu:
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device))
    else:
        feed_ndarray(dense, out)
    if colour is not None:
        out = colour(to_device(out, device), aug)  # uint8 travels; normalized, ld.dtype, channels_last for NHWC
    elif ld.layout == "NHWC":
        out = out.permute(0, 3, 1, 2)  # logical NCHW, channels_last memory
    return to_device_batch(out, rows, label_table, ld.layout == "NHWC")
