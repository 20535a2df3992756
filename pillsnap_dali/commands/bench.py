"""``python -m pillsnap_dali.bench {decode,step,scan,predict,readers,epochs,ops}``: the benchmarks behind
docs/benchmarks.md; the measuring code lives in ``pillsnap_dali.benchmarks``.

Each command's measuring module (and torch) is imported when that command runs: ``bench scan`` and every
``--help`` load neither torch nor the loaders, so the imports inside the ``_<command>`` functions are
deliberate."""
from __future__ import annotations

import argparse
import json
import sys
import time

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.commands.common import add_shared_flags, check_device, config_from_args, run_cli
from pillsnap_dali.errors import UsageError
from pillsnap_dali.sysinfo import available_cores


def _step_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench step",
                                description="model-only training throughput on synthetic input (the ceiling)")
    add_shared_flags(p, ("stage",), helps={"stage": "config stage whose model / image size / batch size are used; "
                                                    "one of %(choices)s (default: %(default)s)"})
    p.set_defaults(stage="3")
    p.add_argument("--model", help="timm model name (default: the stage's model.name)")
    p.add_argument("--img-size", type=int, help="input size in pixels (default: the stage's preprocess.img_size)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the stage's train.batch_size)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the stage's class count)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repetition (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions after a warm-up; the median is reported "
                                                       "(default: %(default)s)")
    p.add_argument("--torch-threads", default="torch",
                   help="comma-separated torch thread settings, each measured: torch (torch's default, one per core),"
                        " auto (train.torch_threads=auto: the cores the stage's loader leaves), or a number "
                        "(default: %(default)s)")
    p.add_argument("--busy", default="0", help="comma-separated counts of competing busy processes (Python loops, "
                                              "one core each) started for the measurement, e.g. 0,1 "
                                              "(default: %(default)s)")
    add_shared_flags(p, ("device", "config", "set"))
    p.add_argument("--json", help="write the result here (default: not written)")
    return p


def _step(a: argparse.Namespace) -> int:
    import torch
    from pillsnap_dali.benchmarks.step import bench_step, bench_step_threads
    cfg = config_from_args(a, {"model": "model.name", "img_size": "preprocess.img_size"})
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device in (None, "auto") else a.device)
    # the demo stage takes every class of its synthetic tree (manifest.classes is only an upper bound there)
    n = a.num_classes or (cfg.data.synth.classes if cfg.stage == "demo" else cfg.manifest.classes)
    kw = dict(device=dev, batch=a.batch_size or cfg.train.batch_size, steps=a.steps, reps=a.reps, num_classes=n)
    settings = [s.strip() for s in a.torch_threads.split(",") if s.strip()]
    busy = [int(b) for b in a.busy.split(",")]
    if settings == ["torch"] and busy == [0]:
        res = bench_step(cfg, **kw)  # torch's own threads, nothing else running: the plain ceiling
        return _emit({"model": res["model"], "px": res["img_size"], "batch": res["batch"], "device": res["device"],
                      "img/s median": f"{res['images_per_s']:.1f}", "min": f"{res['min']:.1f}",
                      "max": f"{res['max']:.1f}"}, res, a.json)
    runs = bench_step_threads(cfg, settings=settings, busy=busy, **kw)
    return _emit([{"model": r["model"], "px": r["img_size"], "batch": r["batch"], "device": r["device"],
                   "busy processes": r["busy"], "torch threads": f"{r['setting']} ({r['torch_threads']})",
                   "img/s median": f"{r['images_per_s']:.1f}", "min": f"{r['min']:.1f}", "max": f"{r['max']:.1f}"}
                  for r in runs], {"runs": runs}, a.json)


def _emit(rows: dict | list, result: dict, json_path: str | None) -> int:
    """Print a result (one row, or rows with the same keys) as a markdown table; write the whole result as JSON
    when asked."""
    rows = [rows] if isinstance(rows, dict) else rows
    print("| " + " | ".join(rows[0]) + " |\n" + "|---" * len(rows[0]) + "|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench predict",
                                description="latency per image, file to top-k (p50/p95), one image at a time")
    p.add_argument("inputs", nargs="+", help="images or folders (required)")
    p.add_argument("--classifier", required=True, help="classifier checkpoint (required)")
    p.add_argument("--detector", help="YOLO weights, needed for combo mode (default: none)")
    p.add_argument("--mode", choices=["single", "combo"], default="combo",
                   help="single: whole image; combo: detect then classify (default: %(default)s)")
    p.add_argument("--conf", type=float, default=0.25, help="detector confidence; 0 with --max-det 4: four crops "
                   "per image, as with untrained weights of the same compute (default: %(default)s)")
    p.add_argument("--max-det", type=int, default=300, help="detections kept per image (default: %(default)s)")
    add_shared_flags(p, ("device",), helps={"device": "cpu | cuda | cuda:N (default: cuda when available, else "
                                                      "cpu)"})
    p.add_argument("--json", help="write the result here (default: not written)")
    return p


def _predict(a: argparse.Namespace) -> int:
    import torch
    from pillsnap_dali.training.model import load_classifier
    from pillsnap_dali.inference import PredictOptions, bench_predict, collect_images, load_detector
    if a.mode == "combo" and not a.detector:
        raise UsageError("--mode combo needs --detector WEIGHTS")
    device = check_device(a.device) if a.device else ("cuda" if torch.cuda.is_available() else "cpu")
    clf = load_classifier(a.classifier, device=device)
    det = load_detector(a.detector) if a.mode == "combo" else None
    paths = collect_images(a.inputs)
    res = bench_predict(paths, clf, det, PredictOptions(mode=a.mode, conf=a.conf, max_det=a.max_det))
    return _emit({"mode": res["mode"], "device": res["device"], "images": res["images"],
                  "pills/image": res["pills_per_image"], "p50 ms": f"{res['p50_ms']:.1f}",
                  "p95 ms": f"{res['p95_ms']:.1f}"}, res, a.json)


def _readers_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench readers",
                                description="dali-cpu loader with each loader.readers value: img/s and the "
                                            "training thread's time in the external source")
    p.add_argument("source", help="a folder of images or a manifest (required)")
    p.add_argument("--readers", default="0,4", help="comma-separated loader.readers values (default: %(default)s)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated storage wait per file "
                                                                 "(default: %(default)s)")
    p.add_argument("--rows", type=int, default=192, help="images per timed epoch (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed epochs; the median is reported (default: %(default)s)")
    p.add_argument("--json", help="write the result here (default: not written)")
    return p


def _readers(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks.loaders import bench_readers
    res = bench_readers(a.source, readers=[int(r) for r in a.readers.split(",")], latency_ms=a.latency_ms,
                        rows=a.rows, reps=a.reps)
    return _emit([{"readers": r, "latency ms/file": f"{a.latency_ms:g}", "img/s median": f"{v['images_per_s']:.1f}",
                   "callback ms/batch": f"{v['callback_ms_per_batch']:.1f}"} for r, v in res["results"].items()],
                 res, a.json)


def _epochs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench epochs",
                                description="RSS (and NVML device memory with CUDA) after each of N short epochs "
                                            "of the DALI classification loader: first / last / max and the slope")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default: %(default)s)")
    p.add_argument("--images", type=int, default=32, help="generated 244x320 JPEGs per epoch (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="training size in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "dali-cpu", "pil"],
                   help="loader backend (default: %(default)s: dali with CUDA, else dali-cpu)")
    p.add_argument("--workdir", default="bench_results/epochs_images", help="where the images are generated (default: %(default)s)")
    p.add_argument("--json", help="write the result here (default: not written)")
    return p


def _epochs(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks.epochs import bench_epochs
    res = bench_epochs(a.workdir, epochs=a.epochs, images=a.images, size=a.size, batch=a.batch, threads=a.threads,
                       backend=a.backend)
    rows = [{"memory": "RSS MB", **{k: f"{v:.1f}" for k, v in res["rss"].items()}}]
    if "device_mem" in res:
        rows.append({"memory": "device GB", **{k: f"{v:.3f}" for k, v in res["device_mem"].items()}})
    print(f"{res['backend']}: {res['epochs']} epochs of {res['images']} images at {res['size']} px, "
          f"median epoch {res['epoch_s_median']:.2f} s (slope: least squares from epoch 2)")
    return _emit(rows, res, a.json)


def _ops_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench ops",
                                description="CPU ms per training sample, op by op on one thread, for each arm "
                                            "of bench decode (where a peer wins, which op)")
    p.add_argument("source", help="a folder of images or a manifest (required; e.g. bench_results/images/jpeg_976x1280)")
    p.add_argument("--limit", type=int, default=16, help="files used (default: %(default)s)")
    p.add_argument("--size", type=int, default=384, help="training size (default: %(default)s)")
    p.add_argument("--json", help="write the result here (default: not written)")
    return p


def _ops(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks.loaders import _paths_of
    from pillsnap_dali.benchmarks.ops import bench_ops
    res = bench_ops(_paths_of(a.source)[:a.limit], size=a.size)
    return _emit([{"op": k, "ms/sample (1 thread)": f"{v:.2f}"} for k, v in res["ms_per_sample"].items()],
                 res, a.json)


def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench decode", description=HELP["decode"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifest", help="benchmark these images, the first --limit rows (default: generated "
                                        "images, see --formats)")
    src.add_argument("--images", help="a folder of images (default: generated images, see --formats)")
    p.add_argument("--formats", default="png,jpeg,cache640",
                   help="generated inputs when no source is given: png, jpeg (q95), cache640 (the PNGs through "
                        "`prepare --max-side 640`, the JPEG cache) (default: %(default)s)")
    p.add_argument("--n", type=int, default=24, help="generated images per format (default: %(default)s)")
    p.add_argument("--limit", type=int, default=256, help="rows taken from --manifest (default: %(default)s)")
    p.add_argument("--rows", type=int, default=128, help="images per timed epoch, the files repeated "
                                                         "(default: %(default)s)")
    p.add_argument("--size", type=int, default=384, help="output size in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed epochs after a warm-up; the median is reported "
                                                       "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=available_cores(), help="DALI threads = PIL workers "
                   "(default: the cores this process may use, %(default)s here)")
    p.add_argument("--arms", help="comma-separated arms (default: every arm this machine can run: "
                                  "pil, dali-cpu, dali-cpu:colour-graph, opencv, torchvision, pil-draft, "
                                  "pil-decode, dali-decode; with CUDA also dali, dali:colour-graph, "
                                  "torchvision-gpu, dali-gpu-decode)")
    p.add_argument("--model", help="model for the model-only ceiling (default: tf_efficientnetv2_s on a GPU, "
                                   "resnet18 on CPU)")
    p.add_argument("--no-model", action="store_true", help="skip the model-only ceiling (default: measure it)")
    p.add_argument("--out", default=f"bench_results/decode-{time.strftime('%Y%m%d-%H%M%S')}",
                   help="results folder (default: %(default)s)")
    p.add_argument("--workdir", default="bench_results/images", help="where generated images are kept "
                                                                     "(default: %(default)s)")
    return p


def _decode(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks.decode import DecodeOptions, run
    opts = DecodeOptions(**vars(a))
    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (None, False))
    print(run(opts, command=f"python -m pillsnap_dali.bench decode {given}"))
    return 0


def _scan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench scan", description=HELP["scan"])
    ap.add_argument("--images", type=int, default=100_000, help="single images in the tree (default: %(default)s)")
    ap.add_argument("--tree", default=None, help="where to build/reuse the tree (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="write the result JSON here (default: not written)")
    return ap


def _scan(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks.scan import run_scan_bench
    r = run_scan_bench(a.images, a.out, tree=a.tree)
    print(f"scanned {r['images']} images in {r['wall_s']} s: {r['images_per_s']} images/s "
          f"({r['images_per_cpu_s']} per CPU-second) on {r['cpu']}")
    return 0


def _scale_parser() -> argparse.ArgumentParser:
    from pillsnap_dali.benchmarks import scale  # the sizes' defaults (imports no torch)
    ap = argparse.ArgumentParser(prog="python -m pillsnap_dali.bench scale", description=HELP["scale"])
    ap.add_argument("--sizes", default=",".join(map(str, scale.SIZES)),
                    help="comma-separated manifest rows, at least two (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=scale.CLASSES, help="K-codes (default: %(default)s, Stage 4)")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes {scale.QUICK_SIZES} of {scale.QUICK_CLASSES} classes "
                                                         "instead of --sizes / --classes (default: off)")
    ap.add_argument("--no-trace", action="store_true", help="skip the traced run: no peak traced MB (default: traced)")
    ap.add_argument("--workdir", default=None, help="where the manifests are written (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the result JSON here (default: not written)")
    return ap


def _scale(a: argparse.Namespace) -> int:
    from pillsnap_dali.benchmarks import scale
    sizes = list(scale.QUICK_SIZES) if a.quick else [int(s) for s in a.sizes.split(",") if s.strip()]
    if len(sizes) < 2 or min(sizes) < 100:
        raise UsageError("--sizes needs at least two sizes of 100 rows or more")
    res = scale.bench_scale(sizes, scale.QUICK_CLASSES if a.quick else a.classes, trace=not a.no_trace,
                            workdir=a.workdir)
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1, ensure_ascii=False))
    print(scale.table(res))
    return 0


HELP = {"decode": "DALI vs PIL and the peer loaders (OpenCV, torchvision, PIL draft) images/s at 384 px, with ceilings "
                  "(scripts/bench_decode.sh)",
        "step": "model-only training throughput on synthetic input (the ceiling a training run is held to)",
        "scan": "scan rate of an AI Hub tree (images per CPU-second)",
        "predict": "prediction latency per image, p50/p95 (single or combo)",
        "readers": "the loader with and without read-ahead threads, optionally with a storage latency per file",
        "ops": "CPU ms per training sample, op by op on one thread, for each decode arm",
        "epochs": "RSS / device memory after each of N short epochs of the DALI loader (a leak shows as a slope)",
        "scale": "Stage 4 bookkeeping without images: time, peak memory and growth exponent of each host-side step"}
COMMANDS = {"step": (_step_parser, _step), "decode": (_decode_parser, _decode), "scan": (_scan_parser, _scan),
            "predict": (_predict_parser, _predict), "readers": (_readers_parser, _readers),
            "epochs": (_epochs_parser, _epochs), "ops": (_ops_parser, _ops), "scale": (_scale_parser, _scale)}


def parsers() -> dict:
    """Each command's argument parser (for ``--help`` checks)."""
    return {name: parser() for name, (parser, _) in COMMANDS.items()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: python -m pillsnap_dali.bench {{{','.join(COMMANDS)}}} [options]\n\n" + "\n".join(
        f"  {name:8s} {HELP[name]}" for name in COMMANDS) + "\n\n'python -m pillsnap_dali.bench COMMAND --help' "
        "for a command's options; results and commands in docs/benchmarks.md")
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    parser, body = COMMANDS[argv[0]]
    return run_cli(parser(), body, argv[1:])  # the one convention: parse, logging, expected error -> exit 2


if __name__ == "__main__":
    sys.exit(main())
