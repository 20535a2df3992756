"""Detector training: Ultralytics YOLO fed by the DALI graph of ``pipelines/detect.py``, through Ultralytics'
extension hooks only (a ``DetectionTrainer`` subclass whose ``get_dataloader`` returns the DALI detection
loader, ``loaders.detect``), fully offline (``weights.ultralytics_offline``; models from a yaml or a local
``.pt``), bf16 only where native, resumable (Ultralytics' own resume from ``weights/last.pt``). The command,
its options and the run dir it writes: ``pillsnap_dali.commands.detect``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.device import DeviceMismatch, DevicePlan, native_bf16, select_device
from pillsnap_dali.errors import PillsnapError, one_line, os_error_line
from pillsnap_dali.imageio import DEFAULT_MAX_PIXELS
from pillsnap_dali.skiplog import SkipLog
from pillsnap_dali.weights import check_detector_weights, load_yolo, ultralytics_offline

_logger = logging.getLogger(__name__)

AUG_KEYS = ("fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v")  # Ultralytics hyperparameters the DALI graph honours
METRIC_KEYS = {"precision": "metrics/precision(B)", "recall": "metrics/recall(B)",
               "mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)"}


# ------------------------------------------------------------------------------------------------- trainer
def check_same_gpu(model_device, options) -> None:
    """DALI must decode on the GPU the detector trains on (an Ultralytics that rewrites CUDA_VISIBLE_DEVICES
    puts the model on ``cuda:0`` whatever was asked): a mismatch is an error, not a silent copy per batch."""
    if options.device != "gpu":
        return
    dev = torch.device(model_device)
    if dev.type != "cuda" or (dev.index or 0) != (options.device_id or 0):
        raise DeviceMismatch(f"Ultralytics put the detector on {dev} but DALI decodes on "
                             f"cuda:{options.device_id or 0}: install ultralytics>=8.4.138 (earlier releases "
                             "remap CUDA_VISIBLE_DEVICES)")


def _sync_loader_epoch(trainer) -> None:
    """Ultralytics' epoch start: our training loader's epoch (its order and draws) is the trainer's, also on a
    resumed run, which starts at the checkpoint's next epoch."""
    loader = getattr(trainer, "train_loader", None)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(trainer.epoch)


@functools.cache
def dali_trainer_class():
    """``DetectionTrainer`` subclass whose loaders are DALI graphs (built lazily: imports Ultralytics)."""
    ultralytics_offline()
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import DEFAULT_CFG

    class DaliDetectionTrainer(DetectionTrainer):
        """Only ``get_dataloader`` changes; the training loop, loss and validator are Ultralytics' own."""

        def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None, dali=None, skip_log=None,
                     readers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
            from pipelines import PipelineOptions

            self.dali = dali or PipelineOptions()
            self.skip_log, self.readers, self.max_pixels = skip_log, readers, max_pixels
            self.dali_loaders: list = []
            super().__init__(cfg, overrides, _callbacks)
            self.add_callback("on_train_epoch_start", _sync_loader_epoch)

        def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
            from pillsnap_dali.loaders.detect import DaliDetectLoader, read_yolo_split

            if self.world_size > 1:
                raise NotImplementedError("the DALI detection loader runs on one GPU; use --backend ultralytics "
                                          "for multi-GPU detection training")
            check_same_gpu(self.device, self.dali)
            augment = {k: float(getattr(self.args, k)) for k in AUG_KEYS} if mode == "train" else None
            loader = DaliDetectLoader(read_yolo_split(dataset_path), batch_size=batch_size, imgsz=self.args.imgsz,
                                      augment=augment, shuffle=mode == "train", options=self.dali,
                                      skip_log=self.skip_log, split=mode, readers=self.readers,
                                      max_pixels=self.max_pixels)
            self.dali_loaders.append(loader)
            return loader

        def skipped(self) -> list[tuple[str, str]]:
            return sorted({s for loader in self.dali_loaders for s in loader.skipped})

    return DaliDetectionTrainer


@dataclass
class DetectRun:
    """What a detection training needs, unpacked from the config at one seam (``run_from_config``)."""
    data_yaml: Path
    model: str
    epochs: int
    imgsz: int
    batch_size: int
    backend: str        # dali | dali-cpu | ultralytics
    out: Path           # run dir
    workers: int = 2    # ultralytics backend loader workers
    threads: int = 2    # DALI CPU threads
    seed: int = 0
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    readers: int = 4
    flipud: float = 0.5  # detect.flipud
    resume: Optional[Path] = None  # an interrupted run's weights/last.pt: Ultralytics' own resume continues it


def resolve_device(device: str, backend: str) -> tuple[DevicePlan, str]:
    """(device plan, backend): one CUDA device for DALI, torch and Ultralytics alike (``device.select_device``);
    ``dali`` without CUDA falls back to ``dali-cpu``, loudly."""
    plan = select_device(device)
    if backend == "dali" and not plan.cuda:
        _logger.warning("--backend dali decodes on the GPU but training runs on %s: using dali-cpu", plan.torch)
        backend = "dali-cpu"
    return plan, backend


def accepts_bf16(check_cfg=None) -> bool:
    """Whether the installed Ultralytics trains with ``amp="bf16"``. Decided by its own argument check, not
    its version number: a release that knows bf16 accepts "bf16" and names it when refusing a wrong value;
    earlier ones refuse "bf16" (a bool-only key) or let any string through to ``torch.tensor(amp)``, a
    TypeError at the first epoch."""
    if check_cfg is None:
        ultralytics_offline()
        from ultralytics.cfg import check_cfg
    try:
        check_cfg({"amp": "bf16"})
    except Exception:
        return False
    try:
        check_cfg({"amp": "no-such-precision"})
    except (TypeError, ValueError) as e:
        return "bf16" in str(e)
    return False


def amp_setting(cuda: bool, bf16: bool, bf16_accepted: bool) -> bool | str:
    """Ultralytics' ``amp``: off on the CPU, "bf16" where the GPU has it natively and Ultralytics takes it, else
    True (fp16 + GradScaler; Ultralytics runs its AMP check, which offline is skipped with a warning)."""
    if not cuda:
        return False
    return "bf16" if bf16 and bf16_accepted else True


def _train_args(run: DetectRun, device: str) -> dict:
    """Ultralytics' train arguments; ``device`` in its spelling ("cpu" or a CUDA index such as "1")."""
    cuda = device != "cpu"
    amp = amp_setting(cuda, cuda and native_bf16(int(device)), cuda and accepts_bf16())
    return dict(data=str(run.data_yaml), epochs=run.epochs, imgsz=run.imgsz, batch=run.batch_size, device=device,
                workers=run.workers, project=str(run.out.parent.resolve()), name=run.out.name, exist_ok=True,
                plots=False, amp=amp, pretrained=run.model.endswith(".pt"), seed=run.seed, flipud=run.flipud,
                verbose=False)


def _load_model(spec: str):
    """A YOLO model from an Ultralytics yaml (built from scratch) or a LOCAL .pt (never downloaded, never
    unpickled beyond torch/Ultralytics layers: ``weights.load_yolo``)."""
    return load_yolo(spec, task="detect")


def _write_outputs(run: DetectRun, trainer, backend: str) -> dict:
    metrics = {k: float(trainer.metrics.get(v, float("nan"))) for k, v in METRIC_KEYS.items()}
    skipped = trainer.skipped() if hasattr(trainer, "skipped") else []
    summary = {**metrics, "model": run.model, "backend": backend, "epochs": run.epochs, "imgsz": run.imgsz,
               "batch_size": run.batch_size, "weights": str(Path(trainer.best).resolve()),
               "data": str(run.data_yaml), "skipped_images": len(skipped)}
    atomic_write_text(run.out / "metrics.json", json.dumps(summary, indent=1))
    # the DALI loaders wrote each skip as it was found (their log, not read again); the ultralytics backend has none
    (getattr(trainer, "skip_log", None) or SkipLog(run.out / "skipped.csv")).ensure_file()
    return summary


class OutputError(PillsnapError, ValueError):
    """The run cannot write its outputs (read-only or full disk, no permission): one line naming the path."""


def check_writable(folder: Path) -> None:
    """Fail before any work when the run dir cannot be created or written (a 64 KB probe file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        try:
            probe.write_bytes(b"\0" * 65536)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the detection run dir: {os_error_line(e, folder)}") from None


def train_detector(run: DetectRun) -> dict:
    """Train; returns the metrics.json dict (P, R, mAP50, mAP50-95 of the best weights on val). An OS error
    while it writes (disk full, read-only, permission) is an ``OutputError`` naming the path."""
    if not Path(run.data_yaml).is_file():
        raise FileNotFoundError(f"YOLO data yaml not found: {run.data_yaml}")
    check_writable(run.out)
    try:
        return _train(run)
    except OSError as e:
        if e.errno is None:  # ours (a missing weights file, ...): already one line
            raise
        raise OutputError(f"detection stopped: {os_error_line(e, run.out)}") from None


def _train(run: DetectRun) -> dict:
    plan, backend = resolve_device(run.device, run.backend)
    model = _load_model(str(run.resume) if run.resume else run.model)
    args = _train_args(run, plan.ultralytics)
    if run.resume:  # Ultralytics' resume: its args, weights, optimizer and epoch come from last.pt
        args["resume"] = str(run.resume)
    trainer = None
    if backend != "ultralytics":
        from pipelines import PipelineOptions

        options = PipelineOptions(batch_size=run.batch_size, device="gpu" if backend == "dali" else "cpu",
                                  device_id=plan.dali_device_id if backend == "dali" else None,
                                  num_threads=run.threads, seed=run.seed)
        trainer = functools.partial(dali_trainer_class(), dali=options, skip_log=SkipLog(run.out / "skipped.csv"),
                                    readers=run.readers, max_pixels=run.max_pixels)
    _logger.info("training %s on %s (%s backend, %d px, %d epochs) -> %s", run.model, run.data_yaml, backend,
                 run.imgsz, run.epochs, run.out)
    model.train(trainer=trainer, **args)
    summary = _write_outputs(run, model.trainer, backend)
    _logger.info("detector: P %.3f R %.3f mAP50 %.3f mAP50-95 %.3f (weights %s)", summary["precision"],
                 summary["recall"], summary["mAP50"], summary["mAP50-95"], summary["weights"])
    return summary


class ResumeError(PillsnapError, ValueError):
    """``detect --resume`` has nothing it can continue: one line naming the checkpoint."""


def last_checkpoint(run: DetectRun) -> Path:
    """``<run dir>/weights/last.pt``, where Ultralytics saves the run after each epoch."""
    return run.out / "weights" / "last.pt"


def resume_state(path: Path) -> dict:
    """``{"epoch": last finished epoch (0-based), "epochs": the run's, "seed": its seed}`` of an interrupted
    run's checkpoint, read with the restricted loader after its pickle is scanned (``weights``); a missing
    file, a finished run (Ultralytics strips the optimizer and sets epoch -1) or a foreign file is a
    ResumeError."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"nothing to resume: {path} does not exist (a detector run saves weights/last.pt after "
                          "its first epoch; start without --resume)")
    check_detector_weights(path)
    ultralytics_offline()
    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt = torch_safe_load(str(path))[0]
    except Exception as e:  # noqa: BLE001 -- a damaged file: one line
        raise ResumeError(f"{path}: cannot be read to resume ({type(e).__name__}: {one_line(e)})") from None
    train_args = ckpt.get("train_args") or {}
    epoch, epochs = int(ckpt.get("epoch", -1)), int(train_args.get("epochs", 0))
    if epoch < 0 or ckpt.get("optimizer") is None or epoch + 1 >= epochs:
        raise ResumeError(f"nothing to resume: {path} is a finished run's checkpoint (epoch {epoch + 1} of "
                          f"{epochs}); start a new run (or train longer from it with --model {path})")
    return {"epoch": epoch, "epochs": epochs, "seed": int(train_args.get("seed", 0))}


def resumed(run: DetectRun, checkpoint: Optional[Path] = None) -> DetectRun:
    """``run`` continuing from ``checkpoint`` (default: its own ``weights/last.pt``): checked first
    (``resume_state``), with the interrupted run's seed and epochs (its DALI draws and order are the ones it
    had) and its run dir."""
    path = Path(checkpoint) if checkpoint else last_checkpoint(run)
    state = resume_state(path)
    _logger.info("resuming %s: epoch %d of %d done", path, state["epoch"] + 1, state["epochs"])
    # Ultralytics continues in the checkpoint's own run dir (its saved project/name): our outputs go there too
    out = path.parent.parent if path.parent.name == "weights" else run.out
    return dataclasses.replace(run, resume=path, seed=state["seed"], epochs=state["epochs"], out=out)


def run_from_config(cfg, data_yaml: Path) -> DetectRun:
    d = cfg.detect
    out = Path(cfg.train.out) / (f"detect_{cfg.stage}" if not cfg.train.name else f"detect_{cfg.train.name}")
    return DetectRun(data_yaml=data_yaml, model=d.model, epochs=d.epochs, imgsz=d.imgsz, batch_size=d.batch_size,
                     backend=d.backend, out=out, workers=d.workers, threads=cfg.loader.threads, seed=cfg.train.seed,
                     device=cfg.train.device, max_pixels=cfg.data.max_pixels, readers=cfg.loader.readers,
                     flipud=d.flipud)


# --------------------------------------------------------------------------------------------------- CLI
