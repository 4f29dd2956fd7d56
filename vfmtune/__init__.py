"""vfmtune: fine-tune vision foundation models on your own images, offline, and take them to the edge.

The public façade; notebooks and scripts use only these names.

Example:
    >>> import vfmtune
    >>> result = vfmtune.train(overrides=["trainer.max_epochs=10"])  # packaged DINOv2-S on the textile set
    >>> model = vfmtune.load_model(result["best_checkpoint"])
"""

from __future__ import annotations

from vfmtune.api import cv, embed, evaluate, export_merged, load_config, load_model, predict, train
from vfmtune.backbones import ALIASES, create_backbone
from vfmtune.config import Config, ConfigError

__all__ = [
    "ALIASES",
    "Config",
    "ConfigError",
    "create_backbone",
    "cv",
    "embed",
    "evaluate",
    "export_merged",
    "load_config",
    "load_model",
    "predict",
    "train",
]
__version__ = "0.1.0"
