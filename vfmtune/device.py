"""Where work outside the Trainer runs (embedding and teacher caches, evaluation, prediction), this process's
share of it in a multi-process run, and the threads a head on cached embeddings trains with."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from typing_extensions import override

from vfmtune.config import Config


def compute_device(cfg: Config) -> torch.device:
    """The GPU when the trainer config would use one (`trainer.accelerator` auto / gpu / cuda and CUDA
    available), else the CPU."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and cfg.trainer.get("devices") != 0
    return torch.device("cuda") if use_gpu else torch.device("cpu")


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def drop_unusable_nvml_check(library: str = "libnvidia-ml.so.1") -> bool:
    """Unset `PYTORCH_NVML_BASED_CUDA_CHECK` (set by `import lightning`) where NVML cannot be loaded; True if unset.

    With it set, `torch.cuda.is_available()` asks NVML first, and where NVML is missing (no NVIDIA driver:
    this CPU machine, or Windows, where torch looks for the same .so name) it retries the failing dlopen on
    every call and then runs the plain CUDA check anyway. Every optimizer step calls it (its graph-capture
    check): ~90 us a step, 11 % of a cached head's fit (py-spy, BENCHMARKS.md). Unsetting changes no answer."""
    if os.environ.get(NVML_CHECK) != "1":
        return False
    try:
        ctypes.CDLL(library)  # the library torch opens (torch.cuda._raw_device_count_nvml)
    except OSError:
        del os.environ[NVML_CHECK]
        return True
    return False


@dataclass(frozen=True)
class Shard:
    """This process's part of work split across the processes of a run (Lightning DDP): rank `rank` of
    `world` does every `world`-th item; `barrier()` returns once every rank has reached it."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


class OneThread(L.Callback):
    """Trains on one intra-op thread, then restores the count: for a head on cached embeddings, whose ops are
    too small to split across cores. Split, each op waits for every OpenMP thread, and on a busy CPU that wait
    is a whole scheduler slice: a BatchNorm + linear step on [128, 384] took 15-22 ms with 2 threads and
    1.4-1.9 ms with 1 on this 2-core VM under load (BENCHMARKS.md, "Speed on this CPU")."""

    def __init__(self) -> None:
        self.saved: int | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)
            self.saved = None
