"""``python -m pillsnap_dali.train``: from manifest to report.

    python -m pillsnap_dali.train --stage demo
    python -m pillsnap_dali.train --stage 3
    python -m pillsnap_dali.train --manifest artifacts/stage3/manifest_train.csv --num-classes 1000 \\
        --target-accuracy 0.85 --epochs 50 --batch-size 16
    torchrun --nproc_per_node=2 -m pillsnap_dali.train --stage demo
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pillsnap_dali.commands.common import SHARED_KEYS, add_shared_flags, config_from_args, existing_file, key_help, run_main
from pillsnap_dali.commands.common import setup_logging as cli_logging
from pillsnap_dali import rundir
from pillsnap_dali.config import STAGES, Config, ConfigError, dump_config, stage_name
from pillsnap_dali.data.checks import check_manifests
from pillsnap_dali.data.manifest import ManifestError, class_map_for, read_manifest
from pillsnap_dali.errors import PillsnapError
from pillsnap_dali.training import multinode, pretrained, resume, stop
from pillsnap_dali.training.checkpoint import remove_orphan_temps, restore_best
from pillsnap_dali.training.engine import RunSpec, TrainData, Trainer, TrainingError
from pillsnap_dali.training.report import write_report
from pillsnap_dali.data.build import ensure_manifests
from pillsnap_dali.data.cache import PrepareError, choose_cache, describe_input, ensure_cache
from pillsnap_dali.loaders import resolve_backend
from pillsnap_dali.training.evaluation import after_training, find_test_manifest, run_manifests

_logger = logging.getLogger("pillsnap_dali.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flags(p, ("stage", "config", "data-root"), helps={"data-root": (
        "AI Hub tree to scan (config data.root; default: none: --stage demo generates its synthetic tree, a real "
        "stage uses its manifests already built in data.artifacts)"), "stage": (
        "stage whose overlay configs/stage<N>.yaml (or demo.yaml) is merged over base.yaml; one of %(choices)s "
        "(default: the --config file's stage, else the one --manifest's folder or report.json names, else demo)")})
    p.add_argument("--manifest", help="training manifest CSV, ours or the existing project's 4-column one "
                                      "(default: the stage's, built from --data-root)")
    p.add_argument("--val-manifest", help="validation manifest (default: manifest_val.csv beside --manifest)")
    p.add_argument("--num-classes", type=int, help="expected number of classes; checked against the class map "
                                                   "(default: not checked)")
    p.add_argument("--target-accuracy", type=float, help=key_help("stop when val top-1 reaches this (0..1)",
                                                                  "train.target_accuracy"))
    p.add_argument("--epochs", type=int, help=key_help("training epochs", "train.epochs"))
    p.add_argument("--batch-size", type=int, help=key_help("images per step per rank", "train.batch_size"))
    p.add_argument("--lr", type=float, help=key_help("peak learning rate", "train.lr"))
    p.add_argument("--img-size", type=int, help=key_help("square model input in pixels", "preprocess.img_size"))
    p.add_argument("--model", help=key_help("any timm model name", "model.name"))
    p.add_argument("--pretrained", help=key_help("imagenet (timm's published weights: the Hugging Face cache, "
                                                 "downloaded once when online; stages 1-4 default to it), none "
                                                 "(random weights, on purpose; the demo's default) or a local "
                                                 "weights file (head rows by K-code)", "model.pretrained"))
    p.add_argument("--backend", choices=["auto", "dali", "dali-cpu", "pil"],
                   help=key_help("image loader, one of %(choices)s", "loader.backend"))
    add_shared_flags(p, ("device",))
    p.add_argument("--threads", type=int, help="DALI CPU threads and PIL worker processes (config loader.threads "
                                               "and loader.workers; default: 'auto', the cores this process may "
                                               "use); torch's intra-op threads then take the cores left, at least 1 "
                                               "(train.torch_threads: auto; --set train.torch_threads=N fixes it)")
    add_shared_flags(p, ("resume", "out", "name"))
    p.add_argument("--seed", type=int, help=key_help("model init, shuffling and augmentation seed", "train.seed"))
    p.add_argument("--dry-run", action="store_true", help="build everything, run two steps, write nothing heavy "
                                                          "(default: off)")
    add_shared_flags(p, ("set",))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# each flag's config key (the shared flags' from cli.SHARED_KEYS); --set goes over all of them
_FLAG_KEYS = {**SHARED_KEYS, "target_accuracy": "train.target_accuracy", "epochs": "train.epochs",
              "batch_size": "train.batch_size", "lr": "train.lr", "img_size": "preprocess.img_size",
              "model": "model.name", "pretrained": "model.pretrained", "backend": "loader.backend",
              "seed": "train.seed", "threads": ("loader.threads", "loader.workers")}


def resolve_config(args: argparse.Namespace) -> Config:
    return config_from_args(args, _FLAG_KEYS, default_stage=stage_of_manifest(args.manifest))


def stage_of_manifest(manifest: str | None) -> str | None:
    """``--manifest`` without ``--stage``: the stage its folder says (``stage3``, ``demo``), or the one recorded
    in the ``report.json`` beside it; else ``custom`` (base.yaml only: EfficientNetV2-S at 384 px, never the
    demo's small model). No manifest: None (the config's stage, ``demo`` by default)."""
    if not manifest:
        return None
    folder = Path(manifest).resolve().parent
    name = folder.name.lower()
    stage = name.removeprefix("stage") if name.startswith("stage") else name
    if stage in STAGES and name == stage_name(stage):
        return stage
    report = folder / "report.json"
    if report.exists():
        try:
            stage = str(json.loads(report.read_text(encoding="utf-8")).get("inputs", {}).get("stage", ""))
        except (ValueError, OSError):
            stage = ""
        if stage in STAGES:
            return stage
    return "custom"


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.train.device
    cuda = torch.cuda.is_available() and want != "cpu"
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # a long timeout: the other ranks wait at a barrier while rank 0 builds (and verifies) the manifests
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
        if cuda:
            torch.cuda.set_device(local)
        return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")
    if want == "auto":
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {want} asked for, but CUDA is not available here")
    return 0, 1, torch.device(want)


def _val_path(train_path: Path) -> Path:
    name = train_path.name
    for a, b in (("manifest_train", "manifest_val"), ("train", "val")):
        if a in name:
            return train_path.with_name(name.replace(a, b, 1))
    raise ManifestError(f"cannot guess the validation manifest beside {train_path}: pass --val-manifest")


def _manifests_once(cfg: Config) -> Path:
    """The stage's manifest dir, built (or the synthetic tree generated) by one process: under torchrun rank 0
    builds while the other ranks wait for the dir it sends them (two builders in one dir would race on
    report.json and the verify cache, and a second reuse check would walk the whole tree again)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ensure_manifests(cfg)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = str(ensure_manifests(cfg))
        finally:
            dist.broadcast_object_list(box, src=0)  # None tells the others that rank 0 failed
        return Path(box[0])
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise ManifestError("rank 0 could not build the manifests (its error is in its log)")
    return Path(box[0])


def load_data(cfg: Config, args: argparse.Namespace, quarantine: list):
    """Manifests -> (TrainData, ManifestChecks). Class identity is the K-code; unknown val classes are reported,
    not remapped; a manifest failing a check (data/checks.py) is an error, its warnings go to the report."""
    if args.manifest:
        train_path = Path(args.manifest)
        val_path = Path(args.val_manifest) if args.val_manifest else _val_path(train_path)
    else:
        d = _manifests_once(cfg)
        train_path, val_path = d / "manifest_train.csv", d / "manifest_val.csv"
    train_path, val_path = cache_step(cfg, train_path, val_path, dry_run=args.dry_run)
    # every rank (on every machine) reads the same files, or every rank stops with one error
    multinode.check_same_inputs([train_path, val_path, train_path.parent / "class_map.json"])
    train, val = read_manifest(train_path), read_manifest(val_path)
    checks = check_manifests(train, val)
    checks.raise_errors()
    class_map = class_map_for(train_path, train)
    # a missing, empty or unreadable file stays in its split: the loaders log it in skipped.csv, one line per
    # row (row, split, path, reason), like every other unusable file; quarantine.csv holds label problems only
    unknown = [i for i, c in enumerate(val.codes) if c not in class_map.index]
    if unknown:
        codes = sorted({val.codes[i] for i in unknown})
        _logger.warning("%d validation rows have K-codes absent from the class map (%s): left out of validation",
                        len(unknown), ", ".join(codes[:10]))
        quarantine += [(val.paths[i], f"class {val.codes[i]} not in the class map") for i in unknown]
        val = val.subset(i for i in range(len(val)) if val.codes[i] in class_map.index)
    if args.num_classes is not None and args.num_classes != len(class_map):
        raise ConfigError(f"--num-classes {args.num_classes} does not match the class map of {train_path} "
                          f"({len(class_map)} K-codes: {', '.join(class_map.codes[:5])}...)")
    if not len(train) or not len(val):
        raise ManifestError(f"empty split: {len(train)} training and {len(val)} validation rows")
    _logger.info("data: %d train rows, %d val rows, %d classes (%s)", len(train), len(val), len(class_map), train_path)
    return TrainData(class_map, train, val, train.labels(class_map), val.labels(class_map)), checks


def _on_rank0(build, what: str):
    """``build()`` on rank 0 only, its result sent to the others, which wait (as for the manifests); None from
    rank 0 tells them it failed (its error is in its log)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = build()
        finally:
            dist.broadcast_object_list(box, src=0)
        return box[0]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise PrepareError(f"rank 0 could not build {what} (its error is in its log)")
    return box[0]


def _cache_progress():
    """``ensure_cache``'s progress: a tqdm bar per manifest on a terminal; elsewhere (a log, a pipe) one line
    per manifest when it is done (the library also logs every 30 s)."""
    bars: dict = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = tqdm(total=total, desc=f"JPEG cache {name}", unit="img", disable=not sys.stderr.isatty())
        bars[name].update(done - bars[name].n)
        if done >= total:
            bars[name].close()
            if not sys.stderr.isatty():
                print(f"JPEG cache {name}: {done}/{total} sources", file=sys.stderr)
    return update


def cache_step(cfg: Config, train_path: Path, val_path: Path, dry_run: bool = False) -> tuple[Path, Path]:
    """``loader.cache`` before any loader is built: the training, validation (and the test manifest beside the
    training one, which ``after_training`` scores) manifests replaced by their JPEG cache's, built or reused
    by rank 0 (``data.cache.ensure_cache``), or the manifests as given (``choose_cache`` says why)."""
    if cfg.loader.cache == "off":
        return train_path, val_path
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    choice = choose_cache(cfg, resolve_backend(cfg.loader.backend, device), read_manifest(train_path))
    if choice.cache_dir is None:
        _logger.info("training on the files as listed (%s)", choice.reason)
        return train_path, val_path
    if dry_run:
        _logger.info("dry run: the JPEG cache %s is not built (%s); the files as listed are used", choice.cache_dir,
                     choice.reason)
        return train_path, val_path
    test = find_test_manifest(train_path)
    sources = [train_path, val_path] + ([test] if test is not None else [])
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    _logger.info("JPEG cache %s (%s)", choice.cache_dir, choice.reason)
    cached = _on_rank0(lambda: [str(p) for p in ensure_cache(
        sources, choice.cache_dir, cfg, progress=_cache_progress() if rank0 else None)], "the JPEG cache")
    return Path(cached[0]), Path(cached[1])


def run_dir_path(cfg: Config) -> Path:
    """``<train.out>/<train.name or stage<N>>``."""
    return Path(cfg.train.out) / (cfg.train.name or stage_name(cfg.stage))


def start_run_dir(run_dir: Path, continuing: bool) -> rundir.RunDir:
    """Make the run dir this run's once every input was checked (``rundir.take``: refused when another live run
    holds it or it is not a run of ours; an earlier run in it is moved aside unless ``continuing``); temp files
    of a write killed midway are removed."""
    owned = rundir.take(run_dir, continuing)
    if (run_dir / "checkpoints").is_dir():
        remove_orphan_temps(run_dir / "checkpoints")
    return owned


def complete_metrics(run_dir: Path, history: list) -> None:
    """Append to ``metrics.jsonl`` the epochs of the resumed checkpoint's history it lacks (a stop between the
    checkpoint and the log line): the file lists every epoch the run keeps."""
    path = run_dir / "metrics.jsonl"
    seen = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                seen.add(json.loads(line)["epoch"])
    missing = [h for h in history if h["epoch"] not in seen]
    if missing:
        with open(path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(h) + "\n" for h in missing)
        _logger.info("metrics.jsonl: %d epoch row(s) of the checkpoint added (a stop before they were logged)",
                     len(missing))


def _exit_on_signal(signum, _frame):
    """SIGTERM outside the training loop (setup, the test split, the report): leave through ``finally`` (the
    lock released, a half-made run dir removed) with 128 + the signal."""
    raise SystemExit(128 + signum)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """The CLIs' logging (``cli.setup_logging``), rank 0 at INFO, and a copy in ``<run_dir>/train.log``."""
    cli_logging(logging.INFO if rank == 0 else logging.WARNING, rank=rank,
                log_file=run_dir / "train.log" if run_dir is not None and rank == 0 else None)


def check_inputs(cfg: Config, args: argparse.Namespace, device: torch.device, run_dir: Path):
    """Everything a run reads, checked before anything is written or moved: the manifests, the resume
    checkpoint (against the class map and settings), the loader backend and the model name."""
    import timm

    quarantine: list = []
    data, checks = load_data(cfg, args, quarantine)
    resume_from = None
    if args.resume is not None:
        resume_from = resume.check_resume(resume.resume_path(args.resume, run_dir), cfg, data.class_map)
    resolve_backend(cfg.loader.backend, device)
    if ":" not in cfg.model.name and not timm.is_model(cfg.model.name):  # (hf-hub:/local: names: timm resolves)
        raise ConfigError(f"model.name {cfg.model.name!r} is not a timm model (timm.list_models() lists them)")
    return data, checks, quarantine, resume_from


def write_run_inputs(run_dir: Path, cfg: Config, data, quarantine: list) -> None:
    dump_config(cfg, run_dir / "config.yaml")
    data.class_map.save(run_dir / "class_map.json")
    if quarantine:
        with open(run_dir / "quarantine.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([("path", "reason"), *quarantine])


def check_pretrained(cfg: Config) -> dict | None:
    """The starting weights, checked before any manifest is scanned or run dir made: ImageNet weights that
    cannot be had (offline, not in the Hugging Face cache, no model.pretrained_file) stop the run here with
    one line naming the fixes and ``--pretrained none``; a real model starting from random weights is said."""
    origin = pretrained.check_available(cfg)
    if pretrained.is_none(cfg.model.pretrained) and cfg.stage != "demo":
        _logger.warning("%s starts from random weights (model.pretrained: none); --pretrained imagenet starts from "
                        "timm's published ImageNet weights", cfg.model.name)
    return origin


def record_run_inputs(data) -> dict:
    """What the checkpoints record of this run's data (``evaluation.run_manifests``: absolute manifest paths,
    the test manifest beside the training one, read now: a broken one stops the run before anything is
    written)."""
    return run_manifests(data.train.path, data.val.path)


def say_test_note(run_inputs: dict, rank: int) -> None:
    """A run without a test split is told so when it starts (in train.log too), not only after training."""
    if run_inputs.get("test_note") and rank == 0:
        _logger.warning("%s", run_inputs["test_note"])


def start_origin(trainer, resume_from) -> dict:
    """Where the run's weights first came from: a resumed run keeps its first session's (the checkpoint's)."""
    if resume_from is not None and resume_from.weights_origin:
        pretrained.set_origin(trainer.model, resume_from.weights_origin)
    origin = pretrained.weights_origin(trainer.model, trainer.cfg)
    _logger.info("starting weights: %s", pretrained.describe(origin))
    return origin


def weights_report(summary: dict, origin: dict, run_inputs: dict, num_classes: int) -> dict:
    """The report header's lines on the starting weights and the data (and the summary's keys for them); a
    pretrained run whose first epoch looks random is flagged (warning in the log, line in the report)."""
    hist = summary.get("history") or []
    flag = pretrained.random_start(hist[0] if hist else None, num_classes, origin)
    if flag:
        _logger.warning("%s", flag)
    summary.update(weights=origin, random_start=flag, run_inputs=run_inputs)
    man = run_inputs.get("manifests") or {}
    lines = {"starting weights": pretrained.describe(origin),
             "random-start check": f"WARNING: {flag}" if flag else ("passed (first epoch learnt)" if hist and
                                                                    origin.get("kind") != "random" else "n/a"),
             "manifests": f"train {man.get('train')}, val {man.get('val')}, test {man.get('test') or 'none'}"}
    if run_inputs.get("test_note"):
        lines["test split"] = run_inputs["test_note"]
    return lines


@dataclass
class _RunInputs:
    """What ``run`` checked and hands to the training (``_train``)."""
    cfg: Config
    data: TrainData
    checks: object
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    resume_from: resume.Resume | None
    run_inputs: dict
    continuing: bool


def run(args: argparse.Namespace) -> dict:
    cfg = resolve_config(args)
    rank, world, device = init_distributed(cfg)
    setup_logging(None, rank)
    run_dir = run_dir_path(cfg)
    error = None
    try:  # every rank checks its own inputs; one that fails stops them all with one line (multinode.py)
        check_paths(args)
        check_pretrained(cfg)  # before the manifests are scanned and the run dir made
        data, checks, quarantine, resume_from = check_inputs(cfg, args, device, run_dir)
    except PillsnapError as e:
        error = e
    multinode.agree_inputs(error)
    # resuming another run's checkpoint into this run dir starts a new run there: an earlier run in it is moved
    # aside as for any new run (its metrics.jsonl must not mix with this one's)
    continuing = resume_from is not None and resume_from.path.resolve().is_relative_to(run_dir.resolve())
    inputs = _RunInputs(cfg, data, checks, rank, world, device, run_dir, resume_from, record_run_inputs(data),
                        continuing)
    owned = unhook = None
    main_thread = threading.current_thread() is threading.main_thread()  # (signals: the main thread's only)
    old_term = signal.signal(signal.SIGTERM, _exit_on_signal) if rank == 0 and main_thread else None
    try:
        if rank == 0 and not args.dry_run:  # the run really starts: only now is anything moved or written
            owned = start_run_dir(run_dir, continuing)
            unhook = stop.at_forced_exit(owned.close)
            if continuing:  # a stop between the last.pt and best.pt writes (or the log line): made to agree
                restore_best(run_dir / "checkpoints")
                complete_metrics(run_dir, resume_from.history)
            setup_logging(run_dir, rank)
            write_run_inputs(run_dir, cfg, data, quarantine)
        say_test_note(inputs.run_inputs, rank)
        summary = _train(args, inputs, owned)
    except BaseException:
        if owned is not None and owned.lock is not None and not owned.started:  # failed or stopped before the
            # training loop: no half-made run dir (a failure in the loop keeps its last.pt, skipped.csv, log)
            setup_logging(None, rank)
            owned.abandon()
        raise
    finally:
        if owned is not None:
            owned.close()
            unhook()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if world > 1:
        dist.destroy_process_group()
    return summary


def _train(args, r: _RunInputs, owned: rundir.RunDir | None) -> dict:
    """The training of a run whose inputs were checked and whose run dir is held: the trainer, its fit, the
    skip logs merged, the test split and the report."""
    if r.world > 1:
        dist.barrier()  # the other ranks open their skip logs in the run dir once rank 0 has prepared it
        if not (r.continuing or args.dry_run):  # a run dir on another machine: rank 0 did not prepare it
            multinode.set_aside_stale_log(r.run_dir, r.rank)
    spec = RunSpec(cfg=r.cfg, data=r.data, device=r.device, run_dir=r.run_dir, rank=r.rank, world_size=r.world,
                   dry_run=args.dry_run, resume=r.resume_from, run_inputs=r.run_inputs)
    trainer = Trainer(spec)
    origin = start_origin(trainer, r.resume_from)
    cfg, data = r.cfg, r.data
    _logger.info("model %s, %d classes, %d px (%s), backend %s, device %s, %d rank(s)", cfg.model.name,
                 len(data.class_map), cfg.preprocess.img_size, cfg.preprocess.resize_mode, trainer.backend, r.device,
                 r.world)
    first_step = trainer.run.step
    if owned is not None:
        owned.started = True
    summary = trainer.fit()
    multinode.merge_skip_logs(trainer.skip_log)  # every rank's skipped rows into rank 0's skipped.csv
    if owned is not None and summary["interrupted"] and trainer.run.step == first_step and owned.created:
        setup_logging(None, r.rank)
        owned.abandon()  # stopped before its first step: nothing learnt, no half-made run dir left
        summary.update(reason=f"interrupted by {summary['interrupted']} before the first step: nothing trained, "
                              f"{r.run_dir} not kept", report=None, best_checkpoint=None)
        summary["run_dir"] = None
        return summary
    if r.rank == 0 and not args.dry_run:
        if not summary["interrupted"]:  # the deployed weights on the test split (evaluation.after_training)
            summary["test"] = after_training(r.run_dir, data.train.path, cfg, r.device)
        header = {"stage": cfg.stage, "model": cfg.model.name, "classes": len(data.class_map),
                  "image size": f"{cfg.preprocess.img_size} ({cfg.preprocess.resize_mode})", "backend": trainer.backend,
                  "device": str(r.device), "ranks": r.world, "train rows": len(data.train), "val rows": len(data.val),
                  "input": describe_input(data.train.path),
                  "manifest checks": "; ".join(f"{f.level} {f.check}: {f.message}" for f in r.checks.findings) or "passed",
                  **weights_report(summary, origin, r.run_inputs, len(data.class_map))}
        summary["report"] = str(write_report(r.run_dir, summary, header, examples=data.val))
    summary["run_dir"] = None if args.dry_run else str(r.run_dir)
    return summary


def check_paths(args: argparse.Namespace) -> None:
    """The files the command line names exist (before anything is built, moved or written)."""
    existing_file(args.manifest, "--manifest")
    existing_file(args.val_manifest, "--val-manifest")
    if not pretrained.is_none(args.pretrained) and not pretrained.is_imagenet(args.pretrained):  # not a path
        existing_file(args.pretrained, "--pretrained")
    if args.resume not in (None, resume.LAST):
        existing_file(args.resume, "--resume")


def _main(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun run() checks them, every rank agreeing
        check_paths(args)
    try:
        summary = run(args)
    except TrainingError as e:  # the run started and failed (nothing learnt, a non-finite loss): status 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_top1"]
        print(f"{summary['reason']}; best val top-1 {best:.4f}" if best >= 0 else summary["reason"])
        if (summary.get("test") or {}).get("not_evaluated"):
            print(f"test split: not evaluated ({summary['test']['not_evaluated']})")
        elif summary.get("test"):
            t = summary["test"]
            met = "" if t["targets_met"] is None else "; stage targets " + ("met" if t["targets_met"] else "NOT met")
            print(f"test split: top-1 {t['top1']:.4f}, top-5 {t['top5']:.4f}, macro F1 {t['macro_f1']:.4f}{met}")
        if summary.get("report"):
            print(f"report: {summary['report']}")
    # interrupted: 128 + the signal, as a shell reports a process the signal ended (130 SIGINT, 143 SIGTERM)
    if summary.get("signal"):
        _leave_stuck_readers(128 + summary["signal"])
        return 128 + summary["signal"]
    return 0


def _leave_stuck_readers(code: int, wait_s: float = 5.0) -> None:
    """After a stop: if one of the loaders' reader threads (``pillsnap-read*``) is still inside a read, the
    interpreter's exit would wait for it for ever: the process ends here with ``code`` instead. Idle reader
    threads are left alone. (Loader worker processes end on the DataLoader's own SIGTERM, or with the process.)"""
    stuck = [t for t in threading.enumerate() if t.name.startswith("pillsnap-read") and _reading(t)]
    deadline = time.monotonic() + wait_s
    for t in stuck:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and _reading(t) for t in stuck):
        _logger.warning("a reader thread is still blocked in a read: exiting without waiting for it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reading(thread: threading.Thread) -> bool:
    """Whether ``thread`` runs the project's code now (a read), not waiting idle for work."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if f"{os.sep}pillsnap_dali{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
