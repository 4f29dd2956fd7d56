"""Peak memory of the training loop, for the run report: the process's resident set and GPU allocations.

`ru_maxrss` is a lifetime peak: it includes importing torch (~0.65 GB for a CUDA build of torch even on
a CPU), the data pipeline and the embedding pass, which every strategy shares. To show what training
itself costs, the peak is reset when `fit` starts (Linux: writing 5 to /proc/self/clear_refs resets
VmHWM) and read when it ends.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch
from typing_extensions import override

_STATUS = "/proc/self/status"


def _status_mb(field: str) -> float | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_rss_mb() -> float:
    import resource  # Unix only; reached only where /proc is missing

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory(L.Callback):
    """Records, per process, the resident set when `fit` starts and its peak during `fit`, and on a GPU
    the peak of allocated device memory. `figures` holds them (MB) once `fit` has ended."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = _status_mb("VmRSS")
        self._reset = _reset_peak_rss()
        self._device = pl_module.device  # at on_fit_end the strategy has already moved the module back
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = _status_mb("VmHWM") if self._reset else None
        self.figures = {
            # Without a reset (not Linux) only the lifetime peak is known.
            "train_peak_rss_mb": round(peak if peak is not None else _lifetime_peak_rss_mb(), 1),
            "train_start_rss_mb": None if self._start is None else round(self._start, 1),
        }
        if self._device.type == "cuda":
            self.figures["train_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self._device) / 2**20, 1)
