"""Evaluation metrics from a confusion matrix kept on the device (one sync per evaluation)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pillsnap_dali.data.classmap import ClassMap

_logger = logging.getLogger(__name__)


class EvalAccumulator:
    """Accumulates loss, top-k hits and a confusion matrix on the device; no host sync per step."""

    def __init__(self, num_classes: int, device: torch.device, topk: int = 5):
        self.n = num_classes
        self.k = min(topk, num_classes)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.topk_hits = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        pred = logits.argmax(1)
        # index_add_, not bincount: bincount reads min/max back to the host (a sync per batch on CUDA) and
        # allocates an n*n histogram per batch (164 MB at 4,523 classes)
        self.confusion.index_add_(0, labels * self.n + pred, torch.ones_like(labels))
        top = logits.topk(self.k, dim=1).indices
        self.topk_hits += (top == labels[:, None]).any(1).sum()
        self.loss_sum += loss_sum.double()
        self.count += labels.numel()

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for t in (self.confusion, self.loss_sum, self.topk_hits, self.count):
                dist.all_reduce(t)

    def compute(self) -> dict:
        """The metrics, from per-class sums of the int64 confusion matrix where it lies (no host copy of the
        matrix, no float64 copy: the counts are exact in int64 and only the three n-vectors become float64,
        so the figures are the ones a float64 matrix gives). ``_confusion``: the accumulator's own n x n
        matrix (int64, on its device; read by ``top_confusions``, not to be changed)."""
        cm = self.confusion.view(self.n, self.n)
        sums = torch.stack([cm.diagonal(), cm.sum(1), cm.sum(0)]).cpu().double()  # the one sync
        tp, support, predicted = sums[0], sums[1], sums[2]
        count = max(int(self.count.item()), 1)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(tp))
        present = support > 0
        return {"loss": float(self.loss_sum.item()) / count, "top1": float(tp.sum()) / count,
                "top5": float(self.topk_hits.item()) / count, "count": count,
                "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
                "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
                "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
                "_per_class": (precision, recall, support), "_confusion": cm}


def write_per_class(path: Path, result: dict, class_map: ClassMap) -> None:
    precision, recall, support = result["_per_class"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class_id", "k_code", "dl_name", "support", "precision", "recall"])
        for i, code in enumerate(class_map.codes):
            w.writerow([i, code, class_map.meta.get(code, {}).get("dl_name", ""), int(support[i]),
                        f"{float(precision[i]):.4f}", f"{float(recall[i]):.4f}"])


def top_confusions(result: dict, class_map: ClassMap, n: int = 20, rows_per_chunk: int = 256) -> list[dict]:
    """The n largest off-diagonal cells: (true K-code, predicted K-code, count), with drug names; ties in
    count by (true, predicted) class id.

    Read in blocks of ``rows_per_chunk`` rows where the matrix lies: each block's per-row top n (a sort key
    ``count * classes + (classes - 1 - column)``, the diagonal set to -1) are the only candidates, so no
    copy of the whole matrix is made (at 4,523 classes a clone is 164 MB and a top-k over its 20 M cells
    another ~330 MB on a CPU)."""
    cm = result["_confusion"]
    nc = cm.shape[0]
    k = min(n, nc)
    if k == 0:
        return []
    cols = torch.arange(nc, device=cm.device)
    cand_v, cand_i = [], []
    for r0 in range(0, nc, rows_per_chunk):
        block = cm[r0:r0 + rows_per_chunk]
        rows = torch.arange(r0, r0 + block.shape[0], device=cm.device)
        key = block.to(torch.int64) * nc + (nc - 1 - cols)
        key[rows - r0, rows] = -1  # the diagonal: never a confusion
        top = key.topk(k, dim=1).indices
        vals = block.gather(1, top).to(torch.int64)
        ok = (vals > 0) & (top != rows[:, None])
        cand_v.append(vals[ok])
        cand_i.append((rows[:, None] * nc + top)[ok])
    vals, idx = torch.cat(cand_v), torch.cat(cand_i)
    cells = nc * nc  # count desc, then (true, pred) asc: one int64 key (counts < 2**63 / cells)
    pick = (vals * cells + (cells - 1 - idx)).topk(min(n, len(vals))).indices
    out = []
    for v, i in zip(vals[pick].tolist(), idx[pick].tolist()):
        t, p = divmod(i, nc)
        ct, cp = class_map.codes[t], class_map.codes[p]
        out.append({"true": ct, "pred": cp, "count": int(v),
                    "true_name": class_map.meta.get(ct, {}).get("dl_name", ""),
                    "pred_name": class_map.meta.get(cp, {}).get("dl_name", "")})
    return out
