"""GPU utilization and memory through NVML (nvidia-ml-py); a no-op without a GPU or without NVML."""
from __future__ import annotations

import logging

import torch

_logger = logging.getLogger(__name__)


def _cuda_uuid(index: int) -> str | None:
    """The NVML UUID ("GPU-...") of CUDA device ``index``, or None where torch does not expose it."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


class GpuMonitor:
    """NVML counters of CUDA device ``index``. NVML numbers GPUs its own way (all of them, in PCI order),
    not as CUDA does under CUDA_VISIBLE_DEVICES, so the device is found by its UUID; by index only where
    the UUID is not available."""

    def __init__(self, index: int = 0):
        self.handle = None
        self.samples: list[tuple[float, float]] = []
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # no driver, no GPU: monitoring is optional
            _logger.debug("NVML not available: %s", e)
            return
        uuid = _cuda_uuid(index)
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else None
        except Exception as e:
            _logger.debug("NVML has no device %s (%s): using index %d", uuid, e, index)
        if self.handle is None:
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as e:
                _logger.debug("NVML device %d not available: %s", index, e)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def sample(self) -> dict:
        if not self.available:
            return {}
        n = self._nvml
        util = n.nvmlDeviceGetUtilizationRates(self.handle)
        mem = n.nvmlDeviceGetMemoryInfo(self.handle)
        out = {"gpu_util": float(util.gpu), "gpu_mem_used_gb": mem.used / 2**30, "gpu_mem_total_gb": mem.total / 2**30}
        try:  # the hardware decoder (NVJPG/NVDEC), where the driver exposes it
            out["decoder_util"] = float(n.nvmlDeviceGetDecoderUtilization(self.handle)[0])
        except Exception:
            pass
        try:
            out["jpg_util"] = float(n.nvmlDeviceGetJpgUtilization(self.handle)[0])
        except Exception:
            pass
        self.samples.append((out["gpu_util"], out["gpu_mem_used_gb"]))
        return out

    def summary(self) -> dict:
        if not self.samples:
            return {}
        utils = [u for u, _ in self.samples]
        mems = [m for _, m in self.samples]
        self.samples = []
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_mem_peak_gb": max(mems)}
