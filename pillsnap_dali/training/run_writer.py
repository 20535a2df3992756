"""What a training run writes, and where: the engine decides, this module writes.

In ``<run_dir>`` (``out_dir``; None for a dry run, which writes nothing):

- ``metrics.jsonl``: one JSON line per finished epoch (rank 0), and the epoch's log line;
- ``checkpoints/last.pt`` after every epoch and at a stop, ``best.pt`` when the deployed weights improved,
  ``epoch_NNNN.pt`` every ``train.save_every`` epochs (rank 0; contents: ``training_checkpoint``, format in
  ``training.checkpoint``); under DDP every other rank writes ``checkpoints/epoch_position.rank<r>.json`` at a
  stop (``training.resume.save_rank_position``);
- ``per_class.csv`` and ``confusions.json``: the last evaluation's details (rank 0);
- ``skipped.csv`` (rank 0) / ``skipped.rank<r>.csv``: the skip log (``badfiles.skip_log_for``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.nn as nn

from pillsnap_dali import badfiles
from pillsnap_dali.config import Config
from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.training import checkpoint as ckpt
from pillsnap_dali.training import pretrained
from pillsnap_dali.training.metrics import top_confusions, write_per_class
from pillsnap_dali.training.resume import rng_state, save_rank_position

_logger = logging.getLogger(__name__)


def training_checkpoint(*, cfg: Config, class_map: ClassMap, model: nn.Module, ema, optimizer, scheduler, scaler,
                        run: dict, backend: str, world_size: int, skipped: list, run_inputs: dict | None = None) -> dict:
    """A training checkpoint's dict (``training.checkpoint``'s format): the weights, the optimizer bundle's
    states, this process's RNG states, the config, class map and preprocessing, the run's state ``run``
    (``RunState.to_checkpoint``), the skip log's entries, where the starting weights came from and the run's
    inputs (``run_inputs``: the manifests trained, validated and tested on)."""
    return {"format": ckpt.FORMAT, "model_name": cfg.model.name, "num_classes": len(class_map),
            "model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(), "config": cfg.to_dict(), "class_map": class_map.to_dict(),
            "preprocess": ckpt.preprocess_dict(cfg.preprocess), "backend": backend, "world_size": world_size,
            "skipped": [dict(e) for e in skipped], "weights_origin": pretrained.weights_origin(model, cfg),
            "run_inputs": dict(run_inputs or {}), **run}


class RunWriter:
    """The files of one run on one rank (module docstring); ``out_dir=None`` (a dry run) writes nothing."""

    def __init__(self, out_dir: Path | None, rank: int = 0):
        self.out, self.rank = (Path(out_dir) if out_dir else None), rank

    @property
    def writes_checkpoints(self) -> bool:
        return self.out is not None and self.rank == 0

    def skip_log(self) -> SkipLog:
        return badfiles.skip_log_for(self.out, self.rank)

    def checkpoints(self, state: dict, epoch: int, *, complete: bool, best: bool, save_every: int) -> None:
        """last.pt, and epoch_NNNN.pt / best.pt when due (rank 0; each written atomically, in the order that
        survives a crash between them: ``checkpoint.save_pair``)."""
        if not self.writes_checkpoints:
            return
        d = self.out / "checkpoints"
        extra = (d / f"epoch_{epoch + 1:04d}.pt",) if complete and save_every and (epoch + 1) % save_every == 0 else ()
        ckpt.save_pair(d, state, best=best, extra=extra)

    def rank_position(self, *, epoch: int, interruption: int, step: int, position: int, rng: dict) -> None:
        """Under DDP, where this rank (not 0, whose position is in the checkpoint) stopped, and its RNG."""
        if self.out is not None:
            save_rank_position(self.out / "checkpoints", self.rank, epoch=epoch, interruption=interruption,
                               step=step, position=position, rng=rng)

    def best_checkpoint(self) -> str | None:
        best = self.out / "checkpoints" / "best.pt" if self.out else None
        return str(best) if best and best.exists() else None

    def eval_details(self, epoch: int, res: dict, class_map: ClassMap) -> None:
        """per_class.csv and confusions.json of the last evaluation (rank 0)."""
        if not self.writes_checkpoints:
            return
        write_per_class(self.out / "per_class.csv", res, class_map)
        (self.out / "confusions.json").write_text(json.dumps(
            {"epoch": epoch, "pairs": top_confusions(res, class_map, 20)}, ensure_ascii=False, indent=1),
            encoding="utf-8")

    def epoch_row(self, row: dict, epochs: int) -> None:
        """The epoch's log line and its line in metrics.jsonl (rank 0)."""
        if self.rank != 0:
            return
        ema = ""
        if "ema_val_top1" in row:
            ema = f" | EMA top-1 {row['ema_val_top1']:.4f}" + (" (deployed)" if row["selected"] == "ema" else "")
        _logger.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f top-1 %.4f top-5 %.4f F1 %.4f | "
                     "%.1f img/s, data %.0f%%%s", row["epoch"], epochs, row["train_loss"], row["train_acc"],
                     row["val_loss"], row["val_top1"], row["val_top5"], row["val_macro_f1"], row["images_per_s"],
                     100 * row["data_share"], ema + (" *best*" if row["best"] else ""))
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
