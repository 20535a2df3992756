"""Evaluation metrics without a host float64 copy of the confusion matrix, top confusions without a clone
(issue 25 item 3): the same figures as the full-matrix computation they replace; the report's line of test
K-codes absent from training stays bounded."""
import csv

import pytest
import torch

from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions
from pillsnap_dali.training.report import ABSENT_FILE, split_section, write_absent_classes


def _filled(n: int, rows: int, seed: int) -> EvalAccumulator:
    g = torch.Generator().manual_seed(seed)
    acc = EvalAccumulator(n, torch.device("cpu"))
    for _ in range(3):
        labels = torch.randint(0, n, (rows,), generator=g)
        logits = torch.randn(rows, n, generator=g)
        logits[torch.arange(rows), labels] += 1.5  # mostly right, with confusions (and ties in their counts)
        acc.update(logits, labels, torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return acc


def _full_matrix_metrics(acc: EvalAccumulator) -> dict:
    """What compute() returned before: everything from a float64 copy of the whole matrix."""
    cm = acc.confusion.view(acc.n, acc.n).cpu().double()
    count = max(int(acc.count.item()), 1)
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0
    return {"top1": float(tp.sum()) / count, "macro_precision": float(precision[present].mean()),
            "macro_recall": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
            "per_class": (precision, recall, support)}


def test_metrics_are_the_full_matrix_figures_and_the_matrix_is_not_copied():
    acc = _filled(37, 200, seed=1)
    res, ref = acc.compute(), _full_matrix_metrics(acc)
    for key in ("top1", "macro_precision", "macro_recall", "macro_f1"):
        assert res[key] == ref[key], key  # bit for bit: the counts are exact in int64 and in float64
    for mine, theirs in zip(res["_per_class"], ref["per_class"]):
        assert mine.dtype == torch.float64 and torch.equal(mine, theirs)
    # the result's matrix is the accumulator's own int64 storage: no copy of n x n cells
    assert res["_confusion"].dtype == torch.int64
    assert res["_confusion"].data_ptr() == acc.confusion.data_ptr()
    assert 0 < res["top1"] < 1 and res["count"] == 600


def _brute_force_pairs(cm: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    cells = [(-int(cm[t, p]), t, p) for t in range(cm.shape[0]) for p in range(cm.shape[1])
             if t != p and cm[t, p] > 0]
    return [(t, p, -neg) for neg, t, p in sorted(cells)[:n]]


def test_top_confusions_are_the_largest_off_diagonal_cells_ties_by_class_id():
    codes = [f"K-{i:06d}" for i in range(1, 38)]
    cmap = ClassMap(codes=codes, meta={codes[0]: {"dl_name": "first"}})
    acc = _filled(37, 200, seed=2)
    res = acc.compute()
    before = acc.confusion.clone()
    for chunk in (5, 16, 256):  # blocks that split the rows unevenly, and one block for all of them
        pairs = top_confusions(res, cmap, 20, rows_per_chunk=chunk)
        want = _brute_force_pairs(res["_confusion"], 20)
        assert [(codes.index(p["true"]), codes.index(p["pred"]), p["count"]) for p in pairs] == want
    assert len(want) == 20 and len({c for *_, c in want}) < 20  # ties in count were there to order
    assert torch.equal(acc.confusion, before)  # the accumulator's matrix is read, never changed
    named = [p for p in pairs if p["true"] == codes[0]]
    assert all(p["true_name"] == "first" for p in named)


def test_top_confusions_of_a_perfect_or_tiny_matrix():
    acc = EvalAccumulator(3, torch.device("cpu"))
    labels = torch.tensor([0, 1, 2, 2])
    acc.update(torch.eye(3)[labels] * 5, labels, torch.zeros(()))
    cmap = ClassMap(codes=["K-000001", "K-000002", "K-000003"])
    assert top_confusions(acc.compute(), cmap, 20) == []  # the diagonal is never a confusion
    acc.update(torch.eye(3)[[1, 1]] * 5, torch.tensor([0, 2]), torch.zeros(()))
    assert [(p["true"], p["pred"], p["count"]) for p in top_confusions(acc.compute(), cmap, 20)] == [
        ("K-000001", "K-000002", 1), ("K-000003", "K-000002", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_and_top_confusions_on_the_device_match_the_cpu():
    cpu = _filled(300, 400, seed=3)
    dev = EvalAccumulator(300, torch.device("cuda"))
    for t in ("confusion", "loss_sum", "topk_hits", "count"):
        getattr(dev, t).copy_(getattr(cpu, t))
    a, b = cpu.compute(), dev.compute()
    assert b["_confusion"].is_cuda and all(not t.is_cuda for t in b["_per_class"])  # per class: host vectors
    assert {k: a[k] for k in ("top1", "macro_f1")} == {k: b[k] for k in ("top1", "macro_f1")}
    cmap = ClassMap(codes=[f"K-{i:06d}" for i in range(1, 301)])
    assert top_confusions(a, cmap, 20) == top_confusions(b, cmap, 20, rows_per_chunk=64)


def test_the_absent_classes_line_is_capped_and_the_file_lists_them_all(tmp_path):
    absent = {f"K-{i:06d}": 1 + i % 3 for i in range(100000, 104523)}  # a foreign test manifest
    t = {"checkpoint": "best.pt", "manifest": "m.csv", "images": 10, "top1": 0.5, "top5": 0.9,
         "macro_precision": 0.5, "macro_recall": 0.5, "macro_f1": 0.5, "skipped": 0, "targets": [],
         "absent_classes": absent, "absent_rows": sum(absent.values()), "worst_classes": []}
    assert write_absent_classes(tmp_path, absent) == tmp_path / ABSENT_FILE
    line = next(ln for ln in split_section(t, tmp_path) if "absent from training" in ln)
    assert len(line) < 600 and "K-100019 (3)" in line and "K-100020" not in line  # the first 20 named
    assert f"and {4523 - 20} more (all in `{tmp_path / ABSENT_FILE}`)" in line
    assert line.startswith(f"{sum(absent.values())} test rows of 4523 K-code(s)")
    with open(tmp_path / ABSENT_FILE, newline="", encoding="utf-8") as fh:
        assert {r["k_code"]: int(r["rows"]) for r in csv.DictReader(fh)} == absent
    few = dict(list(absent.items())[:3])
    line = next(ln for ln in split_section({**t, "absent_classes": few}) if "absent" in ln)
    assert line.endswith("K-100000 (2), K-100001 (3), K-100002 (1)")  # all shown: no file named
    assert write_absent_classes(tmp_path / "none", {}) is None
