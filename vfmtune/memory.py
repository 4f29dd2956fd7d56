"""Peak memory of the training loop, for the run report: the process's resident set and GPU allocations.

`ru_maxrss` is a lifetime peak: it includes importing torch (~0.65 GB for a CUDA build of torch even on
a CPU), the data pipeline and the embedding pass, which every strategy shares. To show what training
itself costs, the peak is reset when `fit` starts (Linux: writing 5 to /proc/self/clear_refs resets
VmHWM) and read when it ends.

`lean_host_memory` trades step time for resident memory on glibc (Linux) hosts; see its docstring.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings
from typing import Any

import lightning as L
import torch
from typing_extensions import override

_STATUS = "/proc/self/status"


def status_mb(field: str) -> float | None:
    """A /proc/self/status figure in MB (VmRSS: resident now, VmHWM: peak), or None where /proc is missing."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux); False where that is not possible."""
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_LEAN_MMAP_THRESHOLD = 128 * 1024  # glibc's own initial threshold, here made fixed


def lean_host_memory() -> bool:
    """Make freed tensor memory go back to the operating system, so the resident set follows the
    tensors alive rather than the heap's high-water mark. Process-wide and permanent; glibc only.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the first
    step every activation tensor lives in the heap, where freed blocks stay resident and fragment: on a
    CPU, LoRA then peaks at about the same RSS as full fine-tuning although it stores ~40 % fewer
    activations. A fixed threshold keeps large tensors in their own mappings, returned on free; each
    step then pays for fresh pages (1.2-1.5x the step time for DINOv2-S at 224 px on 2 cores,
    `bench/host_memory.py`).

    Returns whether the setting was applied (False, with a warning, on a non-glibc C library).
    """
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _LEAN_MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        applied = False
    if not applied:
        warnings.warn(f"lean_host_memory=true needs glibc's mallopt (found C library: {libc_name}); "
                      "running with the default allocator.", stacklevel=2)
    return applied


class PeakMemory(L.Callback):
    """Records, per process, the resident set when `fit` starts and its peak during `fit`, and on a GPU
    the peak of allocated device memory. `figures` holds them (MB) once `fit` has ended."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = status_mb("VmRSS")
        self._reset = reset_peak_rss()
        self._device = pl_module.device  # at on_fit_end the strategy has already moved the module back
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = status_mb("VmHWM") if self._reset else None
        self.figures = {
            # Without a reset (not Linux) only the lifetime peak is known.
            "train_peak_rss_mb": round(peak if peak is not None else _lifetime_peak_rss_mb(), 1),
            "train_start_rss_mb": None if self._start is None else round(self._start, 1),
        }
        if self._device.type == "cuda":
            self.figures["train_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self._device) / 2**20, 1)
