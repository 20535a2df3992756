"""The run report: ``report.md`` with the epoch table and timing, and PNG plots."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)


def write_plots(history: list[dict], plots_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    ep = [h["epoch"] for h in history]
    out = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
    ax[0].set_title("loss"), ax[0].set_xlabel("epoch"), ax[0].legend()
    ax[1].plot(ep, [h["train_acc"] for h in history], label="train")
    ax[1].plot(ep, [h["val_top1"] for h in history], label="val top-1")
    ax[1].plot(ep, [h["val_top5"] for h in history], label="val top-5")
    ax[1].set_title("accuracy"), ax[1].set_xlabel("epoch"), ax[1].legend()
    fig.tight_layout()
    out.append(plots_dir / "curves.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(ep, [h["compute_time"] for h in history], label="compute")
    ax.bar(ep, [h["data_time"] for h in history], bottom=[h["compute_time"] for h in history], label="data (waiting)")
    ax.set_xlabel("epoch"), ax.set_ylabel("seconds"), ax.set_title("data vs compute time"), ax.legend()
    fig.tight_layout()
    out.append(plots_dir / "time.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)
    return out


def write_report(run_dir: Path, summary: dict, header: dict) -> Path:
    hist = summary["history"]
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- stop: {summary['reason']}", f"- total time: {summary['total_time']:.1f} s", ""]
    if hist:
        best = max(hist, key=lambda h: h["val_top1"])
        data_t = sum(h["data_time"] for h in hist)
        comp_t = sum(h["compute_time"] for h in hist)
        imgs = sum(h["train_images"] for h in hist)
        lines += [f"Best epoch: **{best['epoch']}**, val top-1 {best['val_top1']:.4f}, top-5 {best['val_top5']:.4f}, "
                  f"macro F1 {best['val_macro_f1']:.4f}.", "",
                  f"Training time {data_t + comp_t:.1f} s over {len(hist)} epochs "
                  f"({(data_t + comp_t) / len(hist):.1f} s per epoch); data_time share "
                  f"{data_t / max(data_t + comp_t, 1e-9):.1%}; throughput {imgs / max(data_t + comp_t, 1e-9):.1f} "
                  "images/s.", "",
                  "| epoch | train loss | train acc | val loss | val top-1 | val top-5 | img/s | data % | time s | best |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for h in hist:
            lines.append(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['train_acc']:.4f} | {h['val_loss']:.4f} | "
                         f"{h['val_top1']:.4f} | {h['val_top5']:.4f} | {h['images_per_s']:.1f} | "
                         f"{100 * h['data_share']:.1f} | {h['epoch_time']:.1f} | {'*' if h.get('best') else ''} |")
        lines += ["", "Plots: `plots/curves.png` (loss, accuracy), `plots/time.png` (data vs compute time).", ""]
        if (run_dir / "tb").is_dir():
            lines += [f"TensorBoard: `tensorboard --logdir {run_dir / 'tb'}`", ""]
        try:
            write_plots(hist, run_dir / "plots")
        except Exception as e:  # a plotting failure must not lose the report
            _logger.warning("plots not written: %s", e)
    conf = run_dir / "confusions.json"
    if conf.exists():
        pairs = json.loads(conf.read_text(encoding="utf-8"))["pairs"]
        if pairs:
            lines += ["## Most confused K-code pairs (last epoch)", "", "| true | name | predicted | name | count |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['true']} | {p['true_name']} | {p['pred']} | {p['pred_name']} | {p['count']} |"
                      for p in pairs]
    # skipped.csv (rank 0) and skipped.rank<r>.csv; not skipped.old.csv (another format, moved aside by SkipLog)
    logs = [p for p in [run_dir / "skipped.csv", *sorted(run_dir.glob("skipped.rank*.csv"))] if p.exists()]
    if logs:
        paths = set()
        for log in logs:
            with open(log, newline="", encoding="utf-8") as fh:
                paths.update(rec["path"] for rec in csv.DictReader(fh))
        names = ", ".join(f"`{p.name}`" for p in logs)
        lines += ["", f"Skipped files (not decodable, logged in {names}): {len(paths)}"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
