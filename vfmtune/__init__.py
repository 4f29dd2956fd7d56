"""vfmtune: fine-tune vision foundation models on your own images, offline, and take them to the edge.

The public façade; notebooks and scripts use only these names. They are imported on first use, so
`vfmtune.runtime` (numpy + onnxruntime only) can be imported on devices without torch.

Example:
    >>> import vfmtune
    >>> result = vfmtune.train(overrides=["trainer.max_epochs=10"])  # packaged DINOv2-S on the textile set
    >>> model = vfmtune.load_model(result["best_checkpoint"])
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ALIASES": "vfmtune.backbones",
    "Config": "vfmtune.config",
    "ConfigError": "vfmtune.config",
    "create_backbone": "vfmtune.backbones",
    "cv": "vfmtune.api",
    "distill": "vfmtune.distill_api",
    "embed": "vfmtune.api",
    "evaluate": "vfmtune.api",
    "export": "vfmtune.exporter",
    "export_merged": "vfmtune.api",
    "load_config": "vfmtune.api",
    "load_model": "vfmtune.api",
    "predict": "vfmtune.api",
    "pseudo_label": "vfmtune.distill_api",
    "train": "vfmtune.api",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vfmtune' has no attribute {name!r}")
