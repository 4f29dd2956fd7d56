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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load lazily below
    from vfmtune import viz
    from vfmtune.backbones import ALIASES, create_backbone
    from vfmtune.choices import ConfigError
    from vfmtune.commands.adapt import adapt_model
    from vfmtune.commands.auto_mask import auto_mask
    from vfmtune.commands.cache import cache
    from vfmtune.commands.cv import cv
    from vfmtune.commands.distill import distill
    from vfmtune.commands.embed import embed
    from vfmtune.commands.evaluate import evaluate
    from vfmtune.commands.explore import explore
    from vfmtune.commands.export import export
    from vfmtune.commands.merge import export_merged
    from vfmtune.commands.predict import predict
    from vfmtune.commands.pseudo_label import pseudo_label
    from vfmtune.commands.shift import shift
    from vfmtune.commands.synth import synth
    from vfmtune.commands.train import train
    from vfmtune.compose import load_config
    from vfmtune.config import Config
    from vfmtune.data.subsets import subsample
    from vfmtune.loading import load_model

_PUBLIC = {
    "ALIASES": "vfmtune.backbones",
    "adapt_model": "vfmtune.commands.adapt",
    "auto_mask": "vfmtune.commands.auto_mask",
    "Config": "vfmtune.config",
    "ConfigError": "vfmtune.choices",
    "cache": "vfmtune.commands.cache",
    "create_backbone": "vfmtune.backbones",
    "cv": "vfmtune.commands.cv",
    "distill": "vfmtune.commands.distill",
    "embed": "vfmtune.commands.embed",
    "evaluate": "vfmtune.commands.evaluate",
    "explore": "vfmtune.commands.explore",
    "export": "vfmtune.commands.export",
    "export_merged": "vfmtune.commands.merge",
    "load_config": "vfmtune.compose",
    "load_model": "vfmtune.loading",
    "predict": "vfmtune.commands.predict",
    "pseudo_label": "vfmtune.commands.pseudo_label",
    "shift": "vfmtune.commands.shift",
    "synth": "vfmtune.commands.synth",
    "subsample": "vfmtune.data.subsets",
    "train": "vfmtune.commands.train",
}
# Public submodules: `vfmtune.viz.plot_embedding_map(...)` works after a bare `import vfmtune`.
_MODULES = ("viz",)
__all__ = [
    "ALIASES",
    "Config",
    "ConfigError",
    "adapt_model",
    "auto_mask",
    "cache",
    "create_backbone",
    "cv",
    "distill",
    "embed",
    "evaluate",
    "explore",
    "export",
    "export_merged",
    "load_config",
    "load_model",
    "predict",
    "pseudo_label",
    "shift",
    "subsample",
    "synth",
    "train",
    "viz",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"vfmtune.{name}")
    raise AttributeError(f"module 'vfmtune' has no attribute {name!r}")
