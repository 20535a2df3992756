"""The run report: ``report.md`` with the epoch table and timing, and PNG plots."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from PIL import Image, ImageDraw

from pillsnap_dali.imageio import open_rgb

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


def write_report(run_dir: Path, summary: dict, header: dict, examples=None) -> Path:
    """``report.md`` of a run; ``examples`` (a Manifest, the validation split) gives the thumbnails of the
    most confused K-code pairs; ``summary["test"]`` (``evaluate.after_training``) adds the test-split score."""
    hist = summary["history"]
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    sessions = summary.get("sessions", 1)
    lines += [f"- stop: {summary['reason']}",
              f"- total time: {summary['total_time']:.1f} s" + (f" over {sessions} sessions (this one "
                                                               f"{summary['session_time']:.1f} s)" if sessions > 1 else ""),
              f"- deployed weights: `{summary['best_checkpoint']}` (best val top-1)" if summary.get("best_checkpoint")
              else "- deployed weights: none (no epoch completed)", ""]
    lines += random_start_lines(summary)
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
            if examples is not None:
                lines += ["", *_picture_section(lambda: confusion_pictures(pairs, examples, run_dir / "pictures"))]
    # skipped.csv (rank 0) and skipped.rank<r>.csv
    logs = [p for p in [run_dir / "skipped.csv", *sorted(run_dir.glob("skipped.rank*.csv"))] if p.exists()]
    if logs:
        paths = set()
        for log in logs:
            with open(log, newline="", encoding="utf-8") as fh:
                paths.update(rec["path"] for rec in csv.DictReader(fh))
        names = ", ".join(f"`{p.name}`" for p in logs)
        lines += ["", f"Skipped files (not decodable, logged in {names}): {len(paths)}"]
    lines += _late_sections(run_dir, summary, examples)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _late_sections(run_dir: Path, summary: dict, examples) -> list[str]:
    """The contact sheet of skipped and quarantined files, then the test-split score."""
    lines = []
    manifest_dir = [Path(examples.path).parent] if examples is not None and examples.path else []
    bad = bad_files(run_dir, *manifest_dir)  # the loaders' skips, train's and the manifest step's quarantine
    if bad:
        lines += ["", *_picture_section(lambda: skipped_sheet(bad, run_dir / "pictures"))]
    if (summary.get("test") or {}).get("not_evaluated"):
        lines += ["", "## Test split", "", f"Not evaluated: {summary['test']['not_evaluated']}.", ""]
    elif summary.get("test"):
        lines += ["", *split_section(summary["test"], run_dir / "test")]
    return lines


def random_start_lines(summary: dict) -> list[str]:
    """The flag of a pretrained run whose first epoch looks like random weights (``pretrained.random_start``)."""
    return [f"**Warning: {summary['random_start']}**", ""] if summary.get("random_start") else []


# ---------------------------------------------------------------------------------------------- pictures
THUMB = 112          # thumbnail side in pixels
PER_CLASS = 3        # thumbnails of each class of a confused pair
MAX_PAIRS = 8        # confused pairs pictured
SHEET_CAP = 24       # skipped / quarantined files pictured (the rest are counted)


def _picture_section(make) -> list[str]:
    """The markdown of a picture maker; a failure to draw costs the picture, never the report."""
    try:
        return make()
    except Exception as e:
        _logger.warning("pictures not drawn: %s", e)
        return []


def _thumb(path: str, reason: str = ""):
    """A THUMB x THUMB tile of the image (aspect kept, on grey), or a dark tile saying it cannot be shown."""
    tile = Image.new("RGB", (THUMB, THUMB), (96, 96, 96))
    try:
        im = open_rgb(path)  # the header is checked before decoding: a bomb or a broken file is refused
        im.thumbnail((THUMB, THUMB))
        tile.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    except Exception:  # the skipped files are mostly undecodable: that is what the tile shows
        tile.paste((40, 40, 40), (0, 0, THUMB, THUMB))
        ImageDraw.Draw(tile).text((6, THUMB // 2 - 6), "cannot decode", fill=(255, 120, 120))
    return tile


def _caption(canvas, xy, text: str, width: int) -> None:
    ImageDraw.Draw(canvas).text(xy, text.encode("ascii", "replace").decode()[: max(4, width // 6)], fill=(0, 0, 0))


def class_examples(manifest, codes: set, per_class: int = PER_CLASS) -> dict[str, list[str]]:
    """The first ``per_class`` images of each K-code of ``codes`` in ``manifest`` (a Manifest), single-pill
    images first (a combination image shows other drugs too)."""
    out: dict[str, list[str]] = {}
    order = sorted(range(len(manifest.paths)), key=lambda i: manifest.image_types[i] != "single")  # singles first
    for i in order:
        code = manifest.codes[i]
        if code in codes and len(out.setdefault(code, [])) < per_class:
            out[code].append(manifest.paths[i])
    return out


def confusion_pictures(pairs: list[dict], manifest, pictures: Path) -> list[str]:
    """One PNG per confused pair (true class's thumbnails | predicted class's), and the markdown table that
    shows them with the K-codes and drug names (names in the table: the PNG fonts have no Hangul)."""
    pairs = pairs[:MAX_PAIRS]
    ex = class_examples(manifest, {p["true"] for p in pairs} | {p["pred"] for p in pairs})
    pictures.mkdir(parents=True, exist_ok=True)
    lines = ["### What the most confused pairs look like", "",
             f"Left: {PER_CLASS} images of the true K-code; right: of the K-code predicted for it.", "",
             "| true | name | predicted | name | count | images (true \\| predicted) |", "|---|---|---|---|---|---|"]
    half = PER_CLASS * THUMB
    for k, p in enumerate(pairs, 1):
        canvas = Image.new("RGB", (2 * half + 12, THUMB + 16), (255, 255, 255))
        for side, code in ((0, p["true"]), (half + 12, p["pred"])):
            _caption(canvas, (side + 2, 2), ("true " if side == 0 else "predicted ") + code, half)
            for j, path in enumerate(ex.get(code, [])):
                canvas.paste(_thumb(path), (side + j * THUMB, 16))
        name = f"confused_{k:02d}.png"
        canvas.save(pictures / name)
        lines.append(f"| {p['true']} | {p['true_name']} | {p['pred']} | {p['pred_name']} | {p['count']} | "
                     f"![{p['true']} vs {p['pred']}]({pictures.name}/{name}) |")
    return lines


def bad_files(run_dir: Path, *manifest_dirs: Path) -> list[tuple[str, str, str]]:
    """(path, reason, where) of every skipped (skipped*.csv) and quarantined (quarantine.csv) file of a run
    dir and of the manifest dirs (the manifest step's quarantine), each path once."""
    found: dict[str, tuple[str, str, str]] = {}
    sources = [(p, "skipped") for p in sorted(run_dir.glob("skipped*.csv")) if not p.name.endswith(".old.csv")]
    sources += [(d / "quarantine.csv", "quarantined") for d in (run_dir, *manifest_dirs)]
    for log, where in sources:
        if not log.is_file():
            continue
        with open(log, newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                if rec.get("path") and rec["path"] not in found:
                    found[rec["path"]] = (rec["path"], rec.get("reason", ""), where)
    # the layout pictures (*_index.png) are quarantined by design: after the files that really failed
    return sorted(found.values(), key=lambda b: b[1] == "index image")


def skipped_sheet(bad: list[tuple[str, str, str]], pictures: Path, cap: int = SHEET_CAP, cols: int = 6) -> list[str]:
    """A contact sheet of at most ``cap`` skipped / quarantined files with their reasons, and its markdown."""
    shown = bad[:cap]
    rows = -(-len(shown) // cols)
    cell_h = THUMB + 28
    sheet = Image.new("RGB", (cols * THUMB, rows * cell_h), (255, 255, 255))
    for i, (path, reason, where) in enumerate(shown):
        x, y = (i % cols) * THUMB, (i // cols) * cell_h
        sheet.paste(_thumb(path), (x, y))
        _caption(sheet, (x + 2, y + THUMB + 1), Path(path).name, THUMB)
        _caption(sheet, (x + 2, y + THUMB + 13), f"{where}: {reason}", THUMB)
    pictures.mkdir(parents=True, exist_ok=True)
    sheet.save(pictures / "skipped.png")
    more = f" ({len(bad) - cap} more not shown)" if len(bad) > cap else ""
    lines = [f"## Skipped and quarantined files: {len(bad)}{more}", "",
             f"![skipped and quarantined files]({pictures.name}/skipped.png)", "", "| file | reason | |", "|---|---|---|"]
    return lines + [f"| `{Path(p).name}` | {r} | {w} |" for p, r, w in shown]


# ----------------------------------------------------------------------------------------- test split
def _met(x: dict) -> str:
    if x["met"]:
        return "yes"
    return f"NO ({x['classes_below']} classes below)" if x.get("classes_below") else "NO"


def split_section(t: dict, test_dir: Path | None = None, heading: str = "## Test split") -> list[str]:
    """The markdown of an ``evaluate`` summary: scores, targets, worst classes, absent classes."""
    where = f" (files in `{test_dir}`)" if test_dir else ""
    lines = [heading, "", f"`{t['checkpoint']}` on `{t['manifest']}`{where}: {t['images']} images, top-1 "
             f"**{t['top1']:.4f}**, top-5 **{t['top5']:.4f}**, macro precision {t['macro_precision']:.4f}, recall "
             f"{t['macro_recall']:.4f}, F1 {t['macro_f1']:.4f}; {t['skipped']} skipped.", ""]
    if t["targets"]:
        lines += ["| target | goal | value | met |", "|---|---|---|---|"]
        lines += [f"| {x['target']} | {x['goal']:.0%} | {x['value']:.4f} | {_met(x)} |" for x in t["targets"]]
        lines += ["", f"Stage targets {'met' if t['targets_met'] else 'NOT met'}.", ""]
    if t["absent_classes"]:
        lines += [absent_line(t["absent_classes"], t["absent_rows"], test_dir), ""]
    if t["worst_classes"]:
        lines += [f"Worst {len(t['worst_classes'])} classes by recall:", "",
                  "| K-code | name | support | precision | recall |", "|---|---|---|---|---|"]
        lines += [f"| {w['k_code']} | {w['dl_name']} | {w['support']} | {w['precision']:.4f} | {w['recall']:.4f} |"
                  for w in t["worst_classes"]]
    return lines


ABSENT_SHOWN = 20                  # K-codes absent from training named in the report line (the rest: counted)
ABSENT_FILE = "absent_classes.csv"  # every one of them, beside the test report


def absent_line(absent: dict, rows: int, test_dir: Path | None = None, shown: int = ABSENT_SHOWN) -> str:
    """One bounded line for the test K-codes absent from training: the first ``shown`` with their rows, then
    how many more and the file that lists them all (a foreign test manifest can have thousands)."""
    head = ", ".join(f"{c} ({n})" for c, n in list(absent.items())[:shown])
    more = len(absent) - shown
    where = f"`{(test_dir / ABSENT_FILE) if test_dir else ABSENT_FILE}`"
    tail = f" and {more} more (all in {where})" if more > 0 else ""
    return f"{rows} test rows of {len(absent)} K-code(s) absent from training (not scored): {head}{tail}"


def write_absent_classes(out_dir: Path, absent: dict) -> Path | None:
    """``absent_classes.csv`` (k_code, rows) of the test K-codes absent from training; None when there are none."""
    if not absent:
        return None
    path = out_dir / ABSENT_FILE
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["k_code", "rows"])
        w.writerows(absent.items())
    return path


def write_test_report(out_dir: Path, t: dict, manifest, class_map) -> Path:
    """``report.md`` of ``python -m pillsnap_dali.evaluate``: the test section, the confused pairs with their
    thumbnails, the skipped and missing files' contact sheet."""
    write_absent_classes(out_dir, t["absent_classes"])
    lines = [f"# Test report: {Path(t['checkpoint']).name}", "", *split_section(t, heading="## Scores")]
    if t["confusions"]:
        lines += ["", *_picture_section(lambda: confusion_pictures(t["confusions"], manifest, out_dir / "pictures"))]
    bad = bad_files(out_dir) + [(m["path"], m["reason"], "missing") for m in t["missing_files"]]
    if bad:
        lines += ["", *_picture_section(lambda: skipped_sheet(bad, out_dir / "pictures"))]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
