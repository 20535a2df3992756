"""Stage 4 bookkeeping at scale, without images: time and peak memory of each host-side step at three sizes.

    python -m pillsnap_dali.bench scale [--sizes 50000,150000,500000] [--classes 4523] [--json OUT]
    python -m pillsnap_dali.bench scale --quick      # tiny sizes: the structure, in seconds

For each size (manifest rows asked of the stage build, as ``manifest.images``; Stage 4 is 500,000 rows of
4,523 classes) a synthetic scan of that many training images (+10 % to sample from, 1 % combination images,
and a Validation part of 10 % as the test split) goes through:

* ``stage build``: ``data/build.py``'s sampling, stratified train/val split and detection split on the scan
  records, then the six manifests, class map and quarantine written (verify=none: no image is opened);
* ``manifest read + checks``: train and val manifests read, ``check_manifests``, the class map, the labels;
* ``epoch plan + sharding``: ``EpochPlan`` of the train split on one rank and on each of two ranks;
* ``skip-log accounting``: 0.1 % of the rows skipped into ``skipped.csv``, the log read back as a resumed run
  does, and an epoch plan that excludes them;
* ``evaluation + report``: ``EvalAccumulator`` over the val split with synthetic logits (90 % right), its
  metrics, ``per_class.csv``, the top confusions and ``report.md`` with a test section whose absent K-codes
  are 5 % of the classes.

Time: wall and CPU seconds of a run without tracing. Memory, two figures: ``peak_traced_mb`` (tracemalloc,
Python objects and numpy buffers, from a second, traced run; tracemalloc does not see torch's tensors) and
``rss_peak_mb`` (the process's resident set sampled every 2 ms during the timed run, minus its value at the
step's start: torch included, but memory freed by an earlier step may be reused and not show). The growth
exponent of each figure is the least-squares slope of log(figure) over log(rows) across the sizes (1: linear).
The train manifest's resident bytes per row are measured (tracemalloc) as the compact ``Manifest`` and as the
Python lists of one object per value that it replaces.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

from pillsnap_dali.benchmarks.machine import load_average, machine_info
from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import _Build, _classification, _detection, _report, _write_all
from pillsnap_dali.data.checks import check_manifests
from pillsnap_dali.data.manifest import class_map_for, read_manifest
from pillsnap_dali.data.scan import ImageRecord, ScanResult
from pillsnap_dali.data.verify import Verifier, VerifySettings
from pillsnap_dali.loaders.common import EpochPlan, LoaderSpec
from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)

SIZES = (50_000, 150_000, 500_000)
QUICK_SIZES = (500, 1_000, 2_000)
CLASSES, QUICK_CLASSES = 4523, 40
STEPS = ("stage build", "manifest read + checks", "epoch plan + sharding", "skip-log accounting",
         "evaluation + report")


# ------------------------------------------------------------------------------------------ synthetic work
def synthetic_scan(rows: int, classes: int, root: str) -> ScanResult:
    """Scan records of a tree under ``root`` (never created: no image is opened) with ``rows`` * 1.1 training
    singles over ``classes`` K-codes, 1 % combination images (3 pills each) and a Validation part of
    ``rows`` / 10 singles, with the real tree's folder names and path lengths."""
    recs, per = [], max(2, math.ceil(rows * 1.1 / classes))
    train, val = "1.Training/원천데이터/단일경구약제 5000종", "2.Validation/원천데이터/단일경구약제 5000종"
    for c in range(classes):
        code = f"K-{c + 1:06d}"
        for part, base, n in (("train", train, per), ("val", val, max(1, per // 11))):
            src = f"{'TS' if part == 'train' else 'VS'}_{c // 50 + 1}_단일"
            for j in range(n):
                stem = f"{code}_0_{j % 3}_{j // 3 % 2}_{j // 6 % 3}_{(60, 70, 75, 90)[j // 18 % 4]}_{j:03d}_200"
                recs.append(_record(f"{root}/{base}/{src}/{code}/{stem}.png", [code], "single", src, part, code))
    for k in range(max(1, rows // 300)):  # 3 images per combination folder: 1 % of the rows
        codes = sorted({f"K-{(k * 7 + d * 13) % classes + 1:06d}" for d in range(3)})
        name = "K-" + "-".join(x[2:] for x in codes)
        for la in (70, 75, 90):
            path = f"{root}/1.Training/원천데이터/경구약제조합 5000종/TS_1_조합/{name}/{name}_0_2_0_2_{la}_000_200.png"
            recs.append(_record(path, codes, "combination", "TS_1_조합", "train", name))
    recs.sort(key=lambda r: r.image_path)
    return ScanResult(root=root, records=recs, defects=dict.fromkeys(
        ("truncated_png", "empty_file"), 0), meta={f"K-{c + 1:06d}": {"dl_name": f"테스트정 {c + 1}mg"}
                                                   for c in range(classes)},
        counts={"images": len(recs), "labels": sum(len(r.codes) for r in recs)})


def _record(path: str, codes: list, itype: str, source: str, part: str, combo: str) -> ImageRecord:
    labels = [path.replace("원천데이터", "라벨링데이터")[:-4] + ".json"]
    boxes = [{"bbox": [100 + 400 * (i % 2), 200 + 500 * (i // 2), 380, 420], "code": c} for i, c in enumerate(codes)]
    return ImageRecord(path, labels, codes[0], codes, itype, source, part, combo, 976, 1280, boxes)


# -------------------------------------------------------------------------------------------- the steps
class _Work:
    """What one size's steps share: the config, the scan, the output folder, the manifests once read."""

    def __init__(self, rows: int, classes: int, out: Path):
        self.cfg = load_config("4", sets=[f"manifest.images={rows}", f"manifest.classes={classes}"])
        self.rows, self.classes, self.out = rows, classes, out
        self.scan = synthetic_scan(rows, classes, str(out / "aihub"))  # paths only: no image is written
        self.train = self.val = self.class_map = None
        self.skip_runs = 0


def _stage_build(w: _Work) -> dict:
    build = _Build(w.scan, Verifier(VerifySettings("none", w.cfg.data.max_pixels, 1, None)), w.cfg.manifest.seed)
    detect = _detection(build, w.cfg.detect.val_fraction)
    held_out = frozenset(f"combo:{r.combo_id}" for r in detect["val"])
    splits, codes, dropped = _classification(build, w.cfg.manifest, held_out)
    report = _report(build, w.cfg, {"bench": "scale"}, splits, detect, codes, dropped)
    _write_all(w.out, w.scan, build, splits, detect, codes, report)
    return {"splits": report["splits"], "classes": len(codes)}


def _read_and_check(w: _Work) -> dict:
    w.train = read_manifest(w.out / "manifest_train.csv")
    w.val = read_manifest(w.out / "manifest_val.csv")
    checks = check_manifests(w.train, w.val)
    w.class_map = class_map_for(w.out / "manifest_train.csv", w.train)
    labels = w.train.labels(w.class_map)
    return {"train_rows": len(w.train), "val_rows": len(w.val), "errors": len(checks.errors),
            "labels": len(labels)}


def _epoch_plans(w: _Work) -> dict:
    rows = []
    for world in (1, 2):
        for rank in range(world):
            spec = LoaderSpec.from_config(w.cfg, train=True, seed=w.cfg.train.seed, rank=rank, world_size=world)
            plan = EpochPlan(w.train.paths, spec.row_order, epoch=3, skip_paths=set())
            rows.append(len(plan.order))
    return {"rows_per_rank": rows}


def _skip_log(w: _Work) -> dict:
    w.skip_runs += 1
    path = w.out / f"skipped.{w.skip_runs}.csv"
    quiet = logging.getLogger("pillsnap_dali.skiplog")
    level, quiet.level = quiet.level, logging.ERROR  # one warning per skipped row otherwise
    try:
        log = SkipLog(path)
        log.ensure_file()
        step = 1000
        for r in range(0, len(w.train), step):
            log.add(r, w.train.paths[r], "image file is truncated", "dali-cpu", 0, split="train")
        resumed = SkipLog(path)  # a resumed run reads it back
    finally:
        quiet.level = level
    spec = LoaderSpec.from_config(w.cfg, train=True, seed=w.cfg.train.seed)
    plan = EpochPlan(w.train.paths, spec.row_order, 1, resumed.paths, 0, resumed.paths_before(1))
    return {"skipped": len(resumed), "excluded": plan.stats["excluded"]}


def _evaluation(w: _Work) -> dict:
    import torch

    from pillsnap_dali.training.metrics import EvalAccumulator, top_confusions, write_per_class
    from pillsnap_dali.training.report import write_absent_classes, write_report
    n, labels = len(w.class_map), torch.as_tensor(w.val.labels(w.class_map))
    gen = torch.Generator().manual_seed(0)
    batch = 512
    base = torch.randn(batch, n, generator=gen)
    acc = EvalAccumulator(n, torch.device("cpu"))
    for s in range(0, len(labels), batch):
        y = labels[s:s + batch]
        wrong = torch.rand(len(y), generator=gen) < 0.1
        pred = torch.where(wrong, torch.randint(0, n, (len(y),), generator=gen), y)
        logits = base[:len(y)].clone()
        logits[torch.arange(len(y)), pred] += 8.0
        acc.update(logits, y, torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    res = acc.compute()
    run = w.out / "run"
    (run / "test").mkdir(parents=True, exist_ok=True)
    write_per_class(run / "per_class.csv", res, w.class_map)
    pairs = top_confusions(res, w.class_map, 20)
    (run / "confusions.json").write_text(json.dumps({"epoch": 3, "pairs": pairs}, ensure_ascii=False))
    absent = {f"K-{900000 + i:06d}": 1 + i % 4 for i in range(max(1, n // 20))}
    write_absent_classes(run / "test", absent)
    report = write_report(run, _summary(res, absent), {"stage": "4", "bench": "scale"})
    text = report.read_text(encoding="utf-8").splitlines()
    return {"val_rows": res["count"], "top1": round(res["top1"], 4), "report_lines": len(text),
            "report_longest_line": max(map(len, text))}


def _summary(res: dict, absent: dict) -> dict:
    hist = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": res["loss"], "val_top1": res["top1"],
             "val_top5": res["top5"], "val_macro_f1": res["macro_f1"], "data_time": 10.0, "compute_time": 90.0,
             "train_images": 400_000, "images_per_s": 4000.0, "data_share": 0.1, "epoch_time": 100.0,
             "best": e == 3} for e in (1, 2, 3)]
    test = {"checkpoint": "best.pt", "manifest": "manifest_test.csv", "images": res["count"], "top1": res["top1"],
            "top5": res["top5"], "macro_precision": res["macro_precision"], "macro_recall": res["macro_recall"],
            "macro_f1": res["macro_f1"], "skipped": 0, "targets": [], "absent_classes": absent,
            "absent_rows": sum(absent.values()), "worst_classes": []}
    return {"history": hist, "reason": "epochs done", "total_time": 300.0, "session_time": 300.0,
            "best_checkpoint": "checkpoints/best.pt", "test": test}


STEP_FNS = dict(zip(STEPS, (_stage_build, _read_and_check, _epoch_plans, _skip_log, _evaluation)))


# ------------------------------------------------------------------------------------------- measuring
class PeakRSS:
    """The resident set's peak above its value at the start, sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _measure(fn, w: _Work, trace: bool) -> dict:
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        info = fn(w)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "rss_peak_mb": round(rss.mb, 1), "info": info}
    if trace:
        tracemalloc.start()
        try:
            fn(w)
            out["peak_traced_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        finally:
            tracemalloc.stop()
    return out


def manifest_bytes_per_row(path: Path) -> dict:
    """Resident bytes per row of a manifest file read as the compact Manifest and as Python lists of one object
    per value (the representation before: str per cell, parsed boxes, a tuple per size, an int per row)."""
    out = {}
    for name, reader in (("compact", read_manifest), ("lists", _python_lists)):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            kept = reader(path)
            out[name] = round((tracemalloc.get_traced_memory()[0] - base) / max(len(kept), 1), 1)
        finally:
            tracemalloc.stop()
        del kept
    out["ratio"] = round(out["lists"] / max(out["compact"], 1e-9), 2)
    return out


class _Lists(dict):
    def __len__(self) -> int:
        return len(self["paths"])


def _python_lists(path: Path) -> _Lists:
    cols = _Lists({k: [] for k in ("paths", "codes", "image_types", "sources", "combo_ids", "boxes", "orig_paths",
                                   "sizes", "file_rows")})
    with open(path, newline="", encoding="utf-8") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            cols["paths"].append(r["image_path"].strip())
            cols["codes"].append(r["mapping_code"].strip())
            cols["image_types"].append(r["image_type"].strip())
            cols["sources"].append(r["source"].strip())
            cols["combo_ids"].append(r["combo_id"].strip())
            cols["boxes"].append(json.loads(r["boxes"]) if r["boxes"].strip() else [])
            cols["orig_paths"].append(r["orig_path"].strip())
            cols["sizes"].append((int(r["width"] or 0), int(r["height"] or 0)))
            cols["file_rows"].append(int(r["row"]))
    return cols


def growth_exponent(sizes: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) over log(size); None when a value is not positive."""
    if len(sizes) < 2 or any(v is None or v <= 0 for v in values):
        return None
    return round(float(np.polyfit(np.log(sizes), np.log(values), 1)[0]), 2)


def bench_scale(sizes=SIZES, classes: int = CLASSES, *, trace: bool = True, workdir: str | Path | None = None) -> dict:
    """Every step at every size; the growth exponents; the train manifest's bytes per row."""
    by_size, bytes_per_row = {}, {}
    _warm_up(workdir)
    for rows in sizes:
        out = Path(tempfile.mkdtemp(prefix=f"scale{rows}_", dir=workdir))
        try:
            w = _Work(rows, classes, out)
            load0 = load_average()
            steps = {name: _measure(fn, w, trace) for name, fn in STEP_FNS.items()}
            bytes_per_row[rows] = manifest_bytes_per_row(out / "manifest_train.csv")
            by_size[rows] = {"steps": steps, "load_average": [load0, load_average()],
                             "scan_records": len(w.scan.records)}
            _logger.info("scale %d rows: %s", rows, ", ".join(f"{k} {v['wall_s']:.2f} s" for k, v in steps.items()))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    keys = ("wall_s", "cpu_s", "rss_peak_mb") + (("peak_traced_mb",) if trace else ())
    exponents = {name: {k: growth_exponent(list(sizes), [by_size[r]["steps"][name][k] for r in sizes]) for k in keys}
                 for name in STEPS}
    return {"sizes": list(sizes), "classes": classes, "by_size": by_size, "exponents": exponents,
            "manifest_bytes_per_row": bytes_per_row, "memory": {"peak_traced_mb": "tracemalloc (a second run)",
                                                                "rss_peak_mb": "RSS sampled every 2 ms, minus start"},
            **machine_info()}


def _warm_up(workdir) -> None:
    """Every step once at a tiny size, untimed: the first size must not pay the imports (torch, matplotlib)."""
    out = Path(tempfile.mkdtemp(prefix="scale_warm_", dir=workdir))
    try:
        w = _Work(200, 10, out)
        for fn in STEP_FNS.values():
            fn(w)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def table(res: dict) -> str:
    """The result as markdown: one row per (step, size), then the exponents and the bytes per row."""
    lines = ["| step | rows | wall s | CPU s | peak traced MB | RSS peak MB |", "|---|---|---|---|---|---|"]
    for name in STEPS:
        for rows in res["sizes"]:
            m = res["by_size"][rows]["steps"][name]
            lines.append(f"| {name} | {rows} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | "
                         f"{m.get('peak_traced_mb', '-')} | {m['rss_peak_mb']} |")
    lines += ["", "| step | exponent: wall | CPU | peak traced | RSS peak |", "|---|---|---|---|---|"]
    for name, e in res["exponents"].items():
        lines.append(f"| {name} | {e['wall_s']} | {e['cpu_s']} | {e.get('peak_traced_mb', '-')} | "
                     f"{e['rss_peak_mb']} |")
    lines += ["", "| rows | train manifest bytes/row: compact | Python lists | lists / compact |", "|---|---|---|---|"]
    lines += [f"| {r} | {b['compact']} | {b['lists']} | {b['ratio']} |"
              for r, b in res["manifest_bytes_per_row"].items()]
    return "\n".join(lines)
