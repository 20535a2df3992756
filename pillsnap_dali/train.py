"""``python -m pillsnap_dali.train``: from manifest to report.

    python -m pillsnap_dali.train --stage demo
    python -m pillsnap_dali.train --stage 3
    python -m pillsnap_dali.train --manifest artifacts/stage3/manifest_train.csv --num-classes 1000 \\
        --target-accuracy 0.85 --epochs 50 --batch-size 16
    torchrun --nproc_per_node=2 -m pillsnap_dali.train --stage demo
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from pillsnap_dali.data.classmap import ClassMapMismatch
from pillsnap_dali.config import Config, ConfigError, dump_config, load_config, stage_name
from pillsnap_dali.data.manifest import ManifestError, class_map_for, read_manifest, split_missing

_logger = logging.getLogger("pillsnap_dali.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pillsnap_dali.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["demo", "1", "2", "3", "4"], help="stage overlay (configs/stage<N>.yaml)")
    p.add_argument("--config", help="a YAML file merged over base + stage")
    p.add_argument("--data-root", help="AI Hub tree to scan (default: data.root; --stage demo without one "
                   "generates its synthetic tree, a real stage uses its manifests already built in data.artifacts)")
    p.add_argument("--manifest", help="training manifest CSV (ours or the existing project's 4-column one)")
    p.add_argument("--val-manifest", help="validation manifest (default: manifest_val.csv beside --manifest)")
    p.add_argument("--num-classes", type=int, help="expected number of classes; checked against the class map")
    p.add_argument("--target-accuracy", type=float, help="stop when val top-1 reaches this (0..1)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--img-size", type=int)
    p.add_argument("--model", help="any timm model name (default tf_efficientnetv2_s)")
    p.add_argument("--pretrained", help="imagenet (timm's published weights: HF cache, downloaded once when "
                   "online) or a local weights file (head rows by K-code); default: random weights")
    p.add_argument("--backend", choices=["auto", "dali", "dali-cpu", "pil"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="DALI CPU threads / PIL workers")
    p.add_argument("--resume", nargs="?", const="__last__", help="checkpoint to resume (default: the run's last.pt)")
    p.add_argument("--out", help="runs folder (default runs/)")
    p.add_argument("--name", help="run name (default: stage<N>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dry-run", action="store_true", help="build everything, run two steps, write nothing heavy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, repeatable")
    return p.parse_args(argv)


_FLAG_KEYS = {"data_root": "data.root", "target_accuracy": "train.target_accuracy", "epochs": "train.epochs",
              "batch_size": "train.batch_size", "lr": "train.lr", "img_size": "preprocess.img_size",
              "model": "model.name", "pretrained": "model.pretrained", "backend": "loader.backend",
              "device": "train.device", "out": "train.out", "name": "train.name", "seed": "train.seed"}


def resolve_config(args: argparse.Namespace) -> Config:
    from pillsnap_dali.config import set_nested
    overrides: dict = {}
    for attr, key in _FLAG_KEYS.items():
        v = getattr(args, attr)
        if v is not None:
            set_nested(overrides, key, v)
    if args.threads is not None:
        set_nested(overrides, "loader.threads", args.threads)
        set_nested(overrides, "loader.workers", args.threads)
    return load_config(stage=args.stage, path=args.config, overrides=overrides, sets=args.set,
                       default_stage=stage_of_manifest(args.manifest))


def stage_of_manifest(manifest: str | None) -> str | None:
    """``--manifest`` without ``--stage``: the stage its folder says (``stage3``, ``demo``), or the one recorded
    in the ``report.json`` beside it; else ``custom`` (base.yaml only: EfficientNetV2-S at 384 px, never the
    demo's small model). No manifest: None (the config's stage, ``demo`` by default)."""
    if not manifest:
        return None
    folder = Path(manifest).resolve().parent
    name = folder.name.lower()
    if name == "demo" or (name.startswith("stage") and name[5:] in ("1", "2", "3", "4")):
        return name.replace("stage", "")
    report = folder / "report.json"
    if report.exists():
        import json
        try:
            stage = str(json.loads(report.read_text(encoding="utf-8")).get("inputs", {}).get("stage", ""))
        except (ValueError, OSError):
            stage = ""
        if stage in ("demo", "1", "2", "3", "4"):
            return stage
    return "custom"


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.train.device
    cuda = torch.cuda.is_available() and want != "cpu"
    if world > 1:
        import torch.distributed as dist
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
    from pillsnap_dali.data.build import ensure_manifests
    import torch.distributed as dist

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
    """Manifests -> TrainData. Class identity is the K-code; unknown val classes are reported, not remapped."""
    from pillsnap_dali.training.engine import TrainData
    if args.manifest:
        train_path = Path(args.manifest)
        val_path = Path(args.val_manifest) if args.val_manifest else _val_path(train_path)
    else:
        d = _manifests_once(cfg)
        train_path, val_path = d / "manifest_train.csv", d / "manifest_val.csv"
    train, val = read_manifest(train_path), read_manifest(val_path)
    class_map = class_map_for(train_path, train)
    train, bad_t = split_missing(train)
    val, bad_v = split_missing(val)
    quarantine += bad_t + bad_v
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
    return TrainData(class_map, train, val, train.labels(class_map), val.labels(class_map))


def run_dir_path(cfg: Config) -> Path:
    """``<train.out>/<train.name or stage<N>>``."""
    return Path(cfg.train.out) / (cfg.train.name or stage_name(cfg.stage))


def prepare_run_dir(cfg: Config, resume: bool, is_main: bool) -> Path:
    run_dir = run_dir_path(cfg)
    if is_main and not resume and (run_dir / "checkpoints").exists():
        old = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(run_dir.stat().st_mtime))}")
        shutil.move(str(run_dir), old)
        _logger.info("an earlier run was in %s: moved to %s (use --resume to continue a run)", run_dir, old)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def setup_logging(run_dir: Path | None, rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(fh)


# settings a resumed run must share with its checkpoint (the weights, the classes, what one step and one
# epoch are); the others are the checkpoint's from then on (the optimizer and schedule states are restored)
RESUME_MUST_MATCH = ("model.name", "preprocess.img_size", "preprocess.resize_mode", "preprocess.crop_pct",
                     "preprocess.mean", "preprocess.std", "train.batch_size", "train.optimizer")
# restored with the optimizer state: the command line's values do not apply
RESUME_TAKEN_FROM_CHECKPOINT = ("train.lr", "train.weight_decay", "train.momentum")
# rebuilt from the config: the new values apply from the resumed step on
RESUME_APPLIED = ("train.warmup_epochs", "train.epochs", "train.ema_decay")


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_resume(path: Path, cfg: Config, class_map) -> dict:
    """The checkpoint to resume from (loaded once, handed to the trainer). Refused when its class map, model,
    preprocessing, batch size or optimizer differs, naming what differs; settings the checkpoint's optimizer
    overrides are warned about."""
    from pillsnap_dali.training import checkpoint as ckpt
    st = ckpt.load_training_state(path, class_map)
    old, new = st.get("config") or {}, cfg.to_dict()
    diff = [f"{k} {_get(old, k)!r} -> {_get(new, k)!r}" for k in RESUME_MUST_MATCH if _get(old, k) != _get(new, k)]
    if diff:
        raise ConfigError(f"--resume {path}: the checkpoint was trained with other settings ({'; '.join(diff)}); "
                          "resume with the same ones, or start a new run (--pretrained to start from its weights)")
    for k in RESUME_TAKEN_FROM_CHECKPOINT:
        if _get(old, k) != _get(new, k):
            _logger.warning("--resume: %s %r is ignored, the checkpoint's optimizer goes on with %r",
                            k, _get(new, k), _get(old, k))
    for k in RESUME_APPLIED:
        if _get(old, k) != _get(new, k) and (k != "train.ema_decay" or cfg.train.ema):
            _logger.info("--resume: %s is now %r (was %r): the schedule / EMA follow it from here", k,
                         _get(new, k), _get(old, k))
    return st


def run(args: argparse.Namespace) -> dict:
    from pillsnap_dali.training.engine import RunSpec, Trainer
    from pillsnap_dali.evaluate import after_training
    from pillsnap_dali.training.report import write_report
    cfg = resolve_config(args)
    rank, world, device = init_distributed(cfg)
    setup_logging(None, rank)
    resume = args.resume is not None
    # resuming another run's checkpoint into this run dir starts a new run there: an earlier run in it is moved
    # aside as for any new run (its metrics.jsonl must not mix with this one's)
    continuing = resume and (args.resume == "__last__"
                             or Path(args.resume).resolve().is_relative_to(run_dir_path(cfg).resolve()))
    run_dir = None if args.dry_run else prepare_run_dir(cfg, continuing, rank == 0)
    setup_logging(run_dir, rank)
    quarantine: list = []
    data = load_data(cfg, args, quarantine)
    resume_path = resume_state = None
    if resume:
        resume_path = (Path(args.resume) if args.resume != "__last__"
                       else (run_dir or run_dir_path(cfg)) / "checkpoints" / "last.pt")  # dry runs make no dir
        if not resume_path.exists():
            raise ConfigError(f"--resume: {resume_path} does not exist")
        resume_state = check_resume(resume_path, cfg, data.class_map)  # before the run dir is rewritten
    if run_dir and rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
        data.class_map.save(run_dir / "class_map.json")
        if quarantine:
            import csv
            with open(run_dir / "quarantine.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([("path", "reason"), *quarantine])
    spec = RunSpec(cfg=cfg, data=data, device=device, run_dir=run_dir, rank=rank, world_size=world,
                   dry_run=args.dry_run, resume=resume_path, resume_state=resume_state,
                   max_steps=2 if args.dry_run else None)
    trainer = Trainer(spec)
    del resume_state  # restored: the loaded checkpoint is not kept through the training
    _logger.info("model %s, %d classes, %d px (%s), backend %s, device %s, %d rank(s)", cfg.model.name,
                 len(data.class_map), cfg.preprocess.img_size, cfg.preprocess.resize_mode, trainer.backend, device, world)
    summary = trainer.fit()
    if run_dir and rank == 0 and not args.dry_run:
        if not summary["interrupted"]:  # the deployed weights on the test split (evaluate.after_training)
            summary["test"] = after_training(run_dir, data.train.path, cfg, device)
        header = {"stage": cfg.stage, "model": cfg.model.name, "classes": len(data.class_map),
                  "image size": f"{cfg.preprocess.img_size} ({cfg.preprocess.resize_mode})", "backend": trainer.backend,
                  "device": str(device), "ranks": world, "train rows": len(data.train), "val rows": len(data.val)}
        summary["report"] = str(write_report(run_dir, summary, header, examples=data.val))
    summary["run_dir"] = str(run_dir) if run_dir else None
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ConfigError, ManifestError, ClassMapMismatch, ValueError, FileNotFoundError) as e:
        logging.getLogger("pillsnap_dali.train").debug("failure", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_top1"]
        print(f"{summary['reason']}; best val top-1 {best:.4f}" if best >= 0 else summary["reason"])
        if summary.get("test"):
            t = summary["test"]
            met = "" if t["targets_met"] is None else "; stage targets " + ("met" if t["targets_met"] else "NOT met")
            print(f"test split: top-1 {t['top1']:.4f}, top-5 {t['top5']:.4f}, macro F1 {t['macro_f1']:.4f}{met}")
        if summary.get("report"):
            print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
