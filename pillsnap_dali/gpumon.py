"""GPU utilization and memory through NVML (nvidia-ml-py); a no-op without a GPU or without NVML."""
from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)


class GpuMonitor:
    def __init__(self, index: int = 0):
        self.handle = None
        self.samples: list[tuple[float, float]] = []
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # no driver, no GPU: monitoring is optional
            _logger.debug("NVML not available: %s", e)

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
