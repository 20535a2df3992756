"""One device per process, named the same way to DALI, torch and Ultralytics, and the precision it has.

``select_device("cuda:1")`` gives a ``DevicePlan``: torch's ``cuda:1``, DALI's ``device_id=1`` and
Ultralytics' ``"1"``: all three count CUDA devices the same way, after ``CUDA_VISIBLE_DEVICES`` (which
nothing here rewrites; Ultralytics before 8.4.87 rewrote it, then put the model on ``cuda:0`` whatever was
asked: the floor is past that, and ``detect`` checks that its trainer landed where DALI decodes). The plan
also makes the device the current one (``torch.cuda.set_device``), so indexless ``cuda`` work lands on it.

Precision: ``native_bf16`` is bf16 in hardware (compute capability >= 8.0: Ampere and later), not
torch's default answer, which counts software emulation and says yes on V100 / T4, where bf16 autocast
runs slowly and fp16 + GradScaler is the right choice. Training (``training.engine.amp_settings``) and
detection both ask it: bf16 where native, else fp16 on CUDA, none on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pillsnap_dali.errors import PillsnapError

BF16_MIN_CAPABILITY = (8, 0)


class DeviceError(PillsnapError, ValueError):
    """A ``--device`` this machine cannot give: one line naming the request and what exists."""


class DeviceMismatch(DeviceError, RuntimeError):
    """Two parts of one run on different GPUs (the detector and DALI): a DeviceError (one line, exit status 2)
    that is still the RuntimeError it was raised as before."""


@dataclass(frozen=True)
class DevicePlan:
    """Where the run's tensors, DALI graphs and Ultralytics model go. ``index`` counts CUDA devices as CUDA
    (and so torch, DALI and Ultralytics) does, i.e. after ``CUDA_VISIBLE_DEVICES``; None on the CPU."""
    index: int | None

    @property
    def cuda(self) -> bool:
        return self.index is not None

    @property
    def torch(self) -> str:
        return "cpu" if self.index is None else f"cuda:{self.index}"

    @property
    def ultralytics(self) -> str:
        """Ultralytics' own spelling: a bare index ("1") or "cpu"."""
        return "cpu" if self.index is None else str(self.index)

    @property
    def dali_device_id(self) -> int | None:
        return self.index


def resolve_device(request: str | int | None, cuda_count: int) -> DevicePlan:
    """The plan for ``request`` ("auto", "cpu", "cuda", "cuda:N", "N") on a machine with ``cuda_count``
    visible CUDA devices; DeviceError for a device that is not there or for several at once."""
    req = "auto" if request is None else str(request).strip().lower()
    if req in ("auto", ""):
        return DevicePlan(0 if cuda_count else None)
    if req == "cpu":
        return DevicePlan(None)
    idx = req[5:] if req.startswith("cuda:") else ("0" if req == "cuda" else req)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{cuda_count} CUDA device(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    if "," in idx:
        raise DeviceError(f"--device {request}: one device per process (for several GPUs run torchrun, "
                          f"one process per GPU)")
    if not idx.isdigit():
        raise DeviceError(f"--device {request}: expected auto, cpu, cuda or cuda:N")
    if int(idx) >= cuda_count:
        raise DeviceError(f"--device {request}: this machine has {seen}; use cpu or cuda:0..{cuda_count - 1}"
                          if cuda_count else f"--device {request}: no CUDA device here ({seen}); use cpu")
    return DevicePlan(int(idx))


def visible_cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(request: str | int | None) -> DevicePlan:
    """``resolve_device`` on this machine; a CUDA device becomes the current one."""
    plan = resolve_device(request, visible_cuda_count())
    if plan.cuda:
        torch.cuda.set_device(plan.index)
    return plan


def bf16_from_capability(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor-core math in hardware: compute capability 8.0 (Ampere) or later."""
    return capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY


def native_bf16(index: int | None = None) -> bool:
    """Whether CUDA device ``index`` (default: the current one) runs bf16 natively. Emulated bf16 (V100, T4:
    torch's default ``is_bf16_supported()`` says yes) counts as no. Older torch without
    ``including_emulation`` is answered from the compute capability."""
    if not torch.cuda.is_available():
        return False
    index = torch.cuda.current_device() if index is None else index
    try:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4: no including_emulation argument
        return bf16_from_capability(torch.cuda.get_device_capability(index))
