"""The ``dali`` (GPU) and ``dali-cpu`` classification backends on the shared ``runner.DaliRunner``.

This module says what is classification-specific: the graph (``pipelines.classify``), how a manifest row
becomes its inputs (bytes, row id, and for training the host-drawn augmentation ``AUG`` from the upright
size in the file's header), the epoch plan and its accounting, and the batch (labels, colour step, layout).
Reading ahead, recovery from undecodable files and from allocation failures, the live pipeline and the copy
out of DALI are the runner's.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np
import torch

from pipelines import (AUG, ENCODED, BatchColour, EvalSpec, OutputSpec, PipelineOptions, TrainSpec,
                       classify_pipeline)
from pipelines.classify import classify_inputs, eval_graph, train_graph

from pillsnap_dali.imageio import read_encoded, read_encoded_upright
from pillsnap_dali.loaders.augment import draw_augment
from pillsnap_dali.loaders.common import Batch, EpochPlan, LoaderBase, LoaderSpec, to_device, to_device_batch
from pillsnap_dali.loaders.runner import DaliRunner, Feed, to_torch
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)


def graph_spec(spec: LoaderSpec):
    """The pipelines' TrainSpec/EvalSpec for a loader spec (config unpacked here, once)."""
    pre, ld = spec.preprocess, spec.loader
    out = OutputSpec(mean=tuple(pre.mean), std=tuple(pre.std), dtype=ld.dtype, layout=ld.layout)
    if not spec.train:
        return EvalSpec(img_size=pre.img_size, resize_mode=pre.resize_mode, crop_pct=pre.crop_pct, output=out,
                        hw_decoder_load=ld.hw_decoder_load)
    return TrainSpec(img_size=pre.img_size, output=out, hw_decoder_load=ld.hw_decoder_load)


def batch_colour(graph: TrainSpec) -> BatchColour:
    """The colour step of a ``colour="batch"`` training graph (its factors are the samples' ``AUG`` draws)."""
    out = graph.output
    return BatchColour(mean=out.mean, std=out.std, dtype=out.dtype, layout=out.layout)


def dali_device_id(device: torch.device) -> int:
    """The CUDA device DALI runs on: the training device's (``--device cuda:1`` -> 1)."""
    return device.index if device.index is not None else torch.cuda.current_device()


class DaliLoader(LoaderBase):
    """``dali`` / ``dali-cpu`` backend. One pipeline per loader, kept across epochs; each epoch's order and
    augmentation (drawn on the host from (seed, epoch, row)) are fed to it, so an epoch is reproducible after
    a restart whatever the pipeline's history. A file found bad mid-epoch may make the epoch one batch
    shorter than ``len()``."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, spec: LoaderSpec, skip_log: SkipLog,
                 backend: str, file_rows: Optional[Sequence[int]] = None):
        super().__init__(paths, labels, spec, skip_log, file_rows)
        self.backend = backend
        self.graph = graph_spec(spec)  # read when a pipeline is built and the colour step chosen (bench arms set it)
        gpu = backend == "dali"
        self.device_id = dali_device_id(labels.device) if gpu else None
        self._colour: Optional[BatchColour] = None
        ld = spec.loader
        opts = PipelineOptions(batch_size=spec.batch_size, device="gpu" if gpu else "cpu", device_id=self.device_id,
                               num_threads=ld.threads, prefetch=ld.prefetch, seed=spec.seed)
        fn = train_graph if spec.train else eval_graph
        feed = Feed(inputs=tuple(i.name for i in classify_inputs(fn)), read=self._read,
                    extra=self._draw if spec.train else None)
        self.runner = DaliRunner(lambda source, o: classify_pipeline(source, self.graph, o), feed, opts,
                                 self._skip, readers=ld.readers, rank=spec.rank,
                                 what=f"batch size {spec.batch_size}, image size {spec.preprocess.img_size} px",
                                 build_on_path=lambda source, o, hw: classify_pipeline(
                                     source, dataclasses.replace(self.graph, hw_decoder_load=hw), o))
        self._epoch_plan: Optional[EpochPlan] = None
        self.consumed = 0

    def _read(self, row: int) -> tuple:
        """The row's inputs: its bytes, and for training the upright size the crop window is drawn for."""
        if not self.spec.train:
            buf, reason = read_encoded(self.paths[row], self.spec.max_pixels)
            return ({ENCODED: buf}, None) if reason is None else (None, reason)
        buf, reason, size = read_encoded_upright(self.paths[row], self.spec.max_pixels)
        return ({ENCODED: buf, "size": size}, None) if reason is None else (None, reason)

    def _draw(self, rows: np.ndarray, samples: list, epoch: int) -> dict:
        sizes = [(s["size"][1], s["size"][0]) for s in samples]  # upright (w, h)
        return {AUG: draw_augment(self.spec.augment, self.spec.seed, epoch, rows, sizes)}

    @property
    def colour(self) -> Optional[BatchColour]:
        """The batch colour step of a training graph that ends at uint8 (``colour="batch"``), else None."""
        if not isinstance(self.graph, TrainSpec) or self.graph.colour != "batch":
            return None
        if self._colour is None:
            self._colour = batch_colour(self.graph)
        return self._colour

    def _skip(self, row: int, reason: str) -> None:
        self._epoch_plan.stats["skipped"] += 1
        self.log_skip(row, reason)

    def __iter__(self):
        plan = self._epoch_plan = self.take_plan()
        self._last_stats = plan.stats
        self.position, self.consumed = plan.start, 0
        try:
            yield from self.runner.epoch(plan.order, self.epoch, self.spec.drop_last, self._batch)
        finally:
            plan.stats["dropped"] = self.runner.reader.dropped

    def _batch(self, outs, samples: list) -> Batch:
        row_ids = torch.from_numpy(np.asarray([s["row"] for s in samples], dtype=np.int64))
        self._epoch_plan.stats["yielded"] += len(row_ids)
        self._advance(row_ids.tolist())
        colour = self.colour
        aug = np.stack([s[AUG] for s in samples]) if colour is not None else None
        return dali_to_batch(outs[0], row_ids, self.label_table, self.spec.loader, colour, aug)

    def _advance(self, rows: list[int]) -> None:
        """Move the consumed count past the yielded ``rows``: they come out in plan order (recovery requeues in
        order), so every entry passed over was skipped. Row by row, so that a row drawn several times (the
        weighted sampler) is matched to its own draws."""
        order, c = self._epoch_plan.order, self.consumed
        for row in rows:
            while c < len(order) and order[c] != row:
                c += 1
            c = min(c + 1, len(order))
        self.consumed = c
        self.position = self._epoch_plan.position(c)

    def close(self) -> None:
        self.runner.close()


def dali_to_batch(images, rows: torch.Tensor, label_table: torch.Tensor, ld,
                  colour: Optional[BatchColour] = None, aug: Optional[np.ndarray] = None) -> Batch:
    """DALI output (CPU or GPU TensorList) -> Batch on the label table's device (``runner.to_torch`` copies).

    With ``colour`` the output is uint8 HWC: it moves to the training device as uint8 (a quarter of the
    float32 bytes) and ``colour`` turns it into the normalized batch there, with the samples' draws ``aug``.
    """
    device = label_table.device
    out = to_torch(images, torch.uint8 if colour is not None else getattr(torch, ld.dtype), device)
    if colour is not None:  # uint8 HWC travels (a quarter of the float32 bytes), read as logical NCHW (a view)
        out = colour(to_device(out, device).permute(0, 3, 1, 2), aug)  # normalized, ld.dtype, ld.layout
    elif ld.layout == "NHWC":
        out = out.permute(0, 3, 1, 2)  # logical NCHW, channels_last memory
    return to_device_batch(out, rows, label_table, ld.layout == "NHWC")
