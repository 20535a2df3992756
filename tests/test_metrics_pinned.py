"""The numbers users read, pinned by known answers: top-1 and top-5 from hand-made logits, per-class precision
and recall (and per_class.csv, the worst classes, the most confused pairs) from a lopsided confusion matrix,
K-codes to class ids."""
from __future__ import annotations

import csv

import pytest
import torch

from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.data.manifest import Manifest, ManifestError
from pillsnap_dali.training.evaluation import split_known, worst_classes
from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class

CPU = torch.device("cpu")


def _logits(orders: list[list[int]], n: int) -> torch.Tensor:
    """One row per sample: the classes of ``orders[i]`` get decreasing scores (the first is the argmax)."""
    out = torch.zeros(len(orders), n)
    for i, order in enumerate(orders):
        for rank, c in enumerate(order):
            out[i, c] = 10.0 - rank
    return out


def test_top1_and_top5_from_hand_made_logits():
    # 7 classes; where each sample's true class ranks: 1st, 3rd, 5th, 6th, 7th, 1st
    orders = [[0, 1, 2, 3, 4, 5, 6], [0, 2, 1, 3, 4, 5, 6], [0, 1, 3, 4, 2, 5, 6], [0, 1, 2, 4, 5, 3, 6],
              [0, 1, 2, 3, 5, 6, 4], [0, 6, 5, 4, 3, 2, 1]]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    acc = EvalAccumulator(7, CPU, topk=5)
    acc.update(_logits(orders[:4], 7), labels[:4], torch.tensor(2.0))  # two batches: the sums carry over
    acc.update(_logits(orders[4:], 7), labels[4:], torch.tensor(1.0))
    res = acc.compute()
    assert res["count"] == 6
    assert res["top1"] == pytest.approx(2 / 6) and res["top5"] == pytest.approx(4 / 6)
    assert res["loss"] == pytest.approx(3.0 / 6)
    top2 = EvalAccumulator(7, CPU, topk=2)
    top2.update(_logits(orders, 7), labels, torch.tensor(0.0))
    assert top2.compute()["top5"] == pytest.approx(2 / 6)  # the 3rd-ranked class is no top-2 hit
    few = EvalAccumulator(3, CPU, topk=5)  # k capped at the classes: every sample is a hit
    few.update(_logits([[2, 1, 0]], 3), torch.tensor([0]), torch.tensor(0.0))
    assert (few.compute()["top1"], few.compute()["top5"]) == (0.0, 1.0)


# rows: true class, columns: predicted class; class 3 has no sample and is never predicted
CONFUSION = [[4, 2, 0, 0],
             [0, 2, 0, 0],
             [1, 1, 1, 0],
             [0, 0, 0, 0]]
CODES = ["K-000010", "K-000020", "K-000030", "K-000040"]


@pytest.fixture
def lopsided() -> dict:
    labels, preds = [], []
    for t, row in enumerate(CONFUSION):
        for p, count in enumerate(row):
            labels += [t] * count
            preds += [p] * count
    acc = EvalAccumulator(4, CPU, topk=1)
    acc.update(torch.nn.functional.one_hot(torch.tensor(preds), 4).float(), torch.tensor(labels), torch.tensor(0.0))
    return acc.compute()


def test_per_class_precision_and_recall_of_a_lopsided_confusion_matrix(lopsided):
    precision, recall, support = lopsided["_per_class"]
    assert lopsided["_confusion"].tolist() == CONFUSION
    assert support.tolist() == [6, 2, 3, 0]
    assert precision.tolist() == pytest.approx([4 / 5, 2 / 5, 1 / 1, 0])  # of the predicted as the class
    assert recall.tolist() == pytest.approx([4 / 6, 2 / 2, 1 / 3, 0])     # of the class's own samples
    assert lopsided["top1"] == pytest.approx(7 / 11)
    # macro means over the classes present in the labels (class 3 left out)
    assert lopsided["macro_precision"] == pytest.approx((0.8 + 0.4 + 1.0) / 3)
    assert lopsided["macro_recall"] == pytest.approx((4 / 6 + 1 + 1 / 3) / 3)
    f1 = [2 * p * r / (p + r) for p, r in ((0.8, 4 / 6), (0.4, 1.0), (1.0, 1 / 3))]
    assert lopsided["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_per_class_csv_worst_classes_and_confusions_of_the_lopsided_matrix(lopsided, tmp_path):
    cm = ClassMap(CODES, meta={"K-000010": {"dl_name": "aspirin"}})
    write_per_class(tmp_path / "per_class.csv", lopsided, cm)
    with open(tmp_path / "per_class.csv", newline="", encoding="utf-8") as fh:
        rows = [(r["class_id"], r["k_code"], r["dl_name"], r["support"], r["precision"], r["recall"])
                for r in csv.DictReader(fh)]
    assert rows == [("0", "K-000010", "aspirin", "6", "0.8000", "0.6667"), ("1", "K-000020", "", "2", "0.4000", "1.0000"),
                    ("2", "K-000030", "", "3", "1.0000", "0.3333"), ("3", "K-000040", "", "0", "0.0000", "0.0000")]
    worst = worst_classes(lopsided, cm, 2)
    assert [(w["k_code"], w["recall"], w["precision"]) for w in worst] == [("K-000030", 0.3333, 1.0),
                                                                          ("K-000010", 0.6667, 0.8)]
    pairs = top_confusions(lopsided, cm, 5)
    assert (pairs[0]["true"], pairs[0]["pred"], pairs[0]["count"], pairs[0]["true_name"]) == \
        ("K-000010", "K-000020", 2, "aspirin")
    assert sorted((p["true"], p["pred"], p["count"]) for p in pairs[1:]) == [("K-000030", "K-000010", 1),
                                                                            ("K-000030", "K-000020", 1)]


def _manifest(codes: list[str]) -> Manifest:
    n = len(codes)
    return Manifest("m.csv", [f"/x/{i}.png" for i in range(n)], codes, ["single"] * n, [""] * n,
                    [str(i) for i in range(n)], [[] for _ in range(n)], [""] * n)


def test_k_codes_map_to_their_class_ids_and_an_unknown_one_is_never_class_0():
    cm = ClassMap(["K-000300", "K-000100", "K-000200"])  # ids follow the map's order, not the codes' sort
    assert _manifest(["K-000100", "K-000300", "K-000200", "K-000100"]).labels(cm) == [1, 0, 2, 1]
    with pytest.raises(ManifestError, match="K-000999"):
        _manifest(["K-000100", "K-000999"]).labels(cm)
    kept, absent = split_known(_manifest(["K-000999", "K-000100", "K-000999", "K-000200"]), cm)
    assert absent == {"K-000999": 2} and kept.codes == ["K-000100", "K-000200"] and kept.file_rows == [1, 3]
    assert kept.labels(cm) == [1, 2]
