"""``python -m pillsnap_dali.bench decode`` (``scripts/bench_decode.sh``): DALI against PIL, with ceilings.

On one set of images (a manifest or a folder, or generated 976x1280 photo-like images in PNG and in JPEG)
it measures the images/s of the PIL DataLoader (workers = cores), ``dali-cpu`` and, with CUDA, ``dali``,
all producing the same 384 px training output with the same augmentations; the peer arms a user would
pick instead of DALI (``opencv``, ``torchvision``, ``pil-draft``; ``torchvision-gpu`` with CUDA; see
``pillsnap_dali.benchmarks.peers``) and each DALI arm's ratio to the best of them (``vs_best_peer``,
``best_peer`` in the JSON); the decode-only ceilings (PIL
and DALI, same threads; DALI on the GPU too) and the model-only training throughput on synthetic input.
Median of ``--reps`` epochs after a warm-up, with min and max, CPU utilization, peak PSS of the process tree (shared pages counted once),
and GPU utilization / memory / decoder use where NVML exposes them. Writes ``results.json``, prints a
markdown table and saves ``bars.png``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pillsnap_dali.benchmarks.loaders import (CPU_PEER_ARMS, GPU_PEER_ARMS, bench_decode, bench_manifest, machine_info,
                                         write_bench_images)
from pillsnap_dali.benchmarks.peers import PEERS, missing_note
from pillsnap_dali.benchmarks.step import bench_step
from pillsnap_dali.config import load_config
from pillsnap_dali.data.cache import PrepareOptions, prepare_cache
from pillsnap_dali.data.manifest import read_manifest, write_manifest

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    """What ``bench decode`` measures (the command's flags, one field each; see its ``--help``)."""
    manifest: str | None = None
    images: str | None = None
    formats: str = "png,jpeg,cache640"
    n: int = 24
    limit: int = 256
    rows: int = 128
    size: int = 384
    batch: int = 16
    reps: int = 3
    threads: int = 1
    arms: str | None = None
    model: str | None = None
    no_model: bool = False
    out: str = "bench_results/decode"
    workdir: str = "bench_results/images"


def _sources(a) -> dict:
    if a.manifest:
        m = read_manifest(a.manifest)
        return {Path(a.manifest).name: m.subset(range(min(a.limit, len(m))))}
    if a.images:
        return {Path(a.images).name: a.images}
    out = {}
    for fmt in [f.strip() for f in a.formats.split(",") if f.strip()]:
        if fmt == "cache640":
            out[fmt] = _jpeg_cache(Path(a.workdir), a.n, 640, a.threads)
            continue
        d = Path(a.workdir) / f"{fmt}_976x1280"
        write_bench_images(d, a.n, fmt=fmt)
        out[fmt] = d
    return out


def _jpeg_cache(workdir: Path, n: int, max_side: int, workers: int) -> Path:
    """The generated PNGs through ``prepare`` (q95, 4:4:4, long side ``max_side``): the cached manifest."""
    pngs = write_bench_images(workdir / "png_976x1280", n, fmt="png")
    manifest = workdir / f"png_976x1280_{n}.csv"
    write_manifest(bench_manifest([str(p) for p in pngs]), manifest)
    report = prepare_cache(manifest, workdir / f"cache{max_side}_{n}",
                           PrepareOptions(max_side=max_side, margin_gb=0.0, workers=workers))
    return Path(report.manifest_out)


def _model_ceiling(a, cuda: bool) -> dict | None:
    if a.no_model:
        return None
    name = a.model or ("tf_efficientnetv2_s" if cuda else "resnet18")
    cfg = load_config("3", sets=[f"model.name={name}", f"preprocess.img_size={a.size}"])
    dev = torch.device("cuda" if cuda else "cpu")
    return bench_step(cfg, device=dev, batch=a.batch if not cuda else max(a.batch, 64),
                      steps=3 if not cuda else 20, warmup=1 if not cuda else 5, reps=a.reps, num_classes=1000)


def _table(results: dict, model: dict | None) -> str:
    lines = ["| input | arm | img/s (median) | min | max | vs pil | vs best peer | of its ceiling | CPU util "
             "| peak PSS MB | GPU util |", "|---" * 11 + "|"]
    for src, res in results.items():
        r, ratios = res["results"], res.get("vs_best_peer", {})
        pil = r.get("pil", {}).get("images_per_s")
        for arm, v in r.items():
            vs = f"{v['images_per_s'] / pil:.2f}x" if pil and arm.startswith("dali") and "decode" not in arm else ""
            best = f"{ratios[arm]:.2f}x" if arm in ratios else ""
            ceil = f"{v['of_ceiling']:.0%}" if "of_ceiling" in v else ""
            gpu = f"{v['gpu_util']:.0f} %" if "gpu_util" in v else ""
            lines.append(f"| {src} | {arm} | {v['images_per_s']:.1f} | {v['min']:.1f} | {v['max']:.1f} | {vs} | {best} "
                         f"| {ceil} | {100 * v['cpu_util']:.0f} % | {v['peak_pss_mb']:.0f} | {gpu} |")
    if model:
        lines.append(f"| synthetic | model-only {model['model']} @{model['img_size']} b{model['batch']} "
                     f"({model['device']}) | {model['images_per_s']:.1f} | {model['min']:.1f} | {model['max']:.1f} "
                     "| | | | | | |")
    return "\n".join(lines)


def _best_peer_lines(results: dict) -> str:
    """One line per input: its best peer per device and each DALI arm's ratio to it."""
    lines = []
    for src, res in results.items():
        for device, best in res.get("best_peer", {}).items():
            ratios = ", ".join(f"{arm} {r:.2f}x" for arm, r in res["vs_best_peer"].items()
                               if arm.startswith("dali-cpu") == (device == "cpu"))
            lines.append(f"{src}: best {device} peer {best['arm']} {best['images_per_s']:.1f} img/s; {ratios}")
    return "\n".join(lines)


def _colour_of(label: str) -> str:
    """Bar colour of a ``"input\narm"`` label: ceilings grey, DALI blue, peers orange."""
    src, arm = label.split("\n")
    if "decode" in arm or src == "model-only":
        return "#999999"
    return "#4c72b0" if arm.startswith("dali") else "#dd8452"


def _arms(a, cuda: bool) -> tuple[list[str], list[str]]:
    """(arms to run, one note per peer arm that cannot run here)."""
    if a.arms:
        wanted = [x.strip() for x in a.arms.split(",") if x.strip()]
    else:
        wanted = (["pil", "dali-cpu", "dali-cpu:colour-graph", *CPU_PEER_ARMS[1:], "pil-decode", "dali-decode"]
                  + (["dali", "dali:colour-graph", *GPU_PEER_ARMS, "dali-gpu-decode"] if cuda else []))
    notes = [n for arm in wanted if arm in PEERS and (n := missing_note(arm))]
    return [arm for arm in wanted if not (arm in PEERS and missing_note(arm))], notes


def _plot(results: dict, model: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, vals = [], []
    for src, res in results.items():
        for arm, v in res["results"].items():
            labels.append(f"{src}\n{arm}")
            vals.append(v["images_per_s"])
    if model:
        labels.append(f"model-only\n{model['model']}")
        vals.append(model["images_per_s"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(vals)), 4))
    ax.bar(range(len(vals)), vals, color=[_colour_of(lab) for lab in labels])
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("images/s (median)")
    ax.set_title("input pipelines at 384 px, same augmentations (blue: DALI, orange: peers, grey: ceilings)")
    for i, (lab, v) in enumerate(zip(labels, vals)):
        src, arm = lab.split("\n")
        ratio = results.get(src, {}).get("vs_best_peer", {}).get(arm)
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x best peer", (i, v), ha="center", va="bottom", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(a: DecodeOptions, command: str = "") -> str:
    """Run the benchmark; returns the text the command (``python -m pillsnap_dali.bench decode``) prints."""
    cuda = torch.cuda.is_available()
    arms, notes = _arms(a, cuda)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, src in _sources(a).items():
        results[name] = bench_decode(src, size=a.size, batch=a.batch, reps=a.reps, threads=a.threads,
                                     backends=arms, min_rows=a.rows)
    model = _model_ceiling(a, cuda)
    payload = {"machine": {**machine_info(), "gpu": torch.cuda.get_device_name(0) if cuda else None},
               "command": command, "inputs": results,
               "model_only": model, "skipped_arms": notes}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    table = _table(results, model)
    (out / "table.md").write_text(table + "\n")
    _plot(results, model, out / "bars.png")
    m = payload["machine"]
    return (f"machine: {m['cores']} cores, {m['cpu']}, GPU: {m['gpu'] or 'none'}; threads {a.threads}, "
            f"{a.size} px, batch {a.batch}, median of {a.reps}\n" + "".join(n + "\n" for n in notes)
            + f"{table}\n{_best_peer_lines(results)}\nresults: {out}/results.json, {out}/bars.png")
