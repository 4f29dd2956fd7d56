"""Where work outside the Trainer runs (embedding and teacher caches, evaluation, prediction)."""

from __future__ import annotations

import torch

from vfmtune.config import Config


def compute_device(cfg: Config) -> torch.device:
    """The GPU when the trainer config would use one (`trainer.accelerator` auto / gpu / cuda and CUDA
    available), else the CPU."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and cfg.trainer.get("devices") != 0
    return torch.device("cuda") if use_gpu else torch.device("cpu")
