"""Where work outside the Trainer runs (embedding and teacher caches, evaluation, prediction), and this
process's share of it in a multi-process run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vfmtune.config import Config


def compute_device(cfg: Config) -> torch.device:
    """The GPU when the trainer config would use one (`trainer.accelerator` auto / gpu / cuda and CUDA
    available), else the CPU."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and cfg.trainer.get("devices") != 0
    return torch.device("cuda") if use_gpu else torch.device("cpu")


@dataclass(frozen=True)
class Shard:
    """This process's part of work split across the processes of a run (Lightning DDP): rank `rank` of
    `world` does every `world`-th item; `barrier()` returns once every rank has reached it."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
