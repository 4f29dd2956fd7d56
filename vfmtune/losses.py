"""Loss functions, built from the `loss` config section."""

from __future__ import annotations

from typing import Any

from torch import nn

from vfmtune.config import ConfigError

LOSSES = ("ce",)


def build_loss(cfg: dict[str, Any]) -> nn.Module:
    """The training loss: logits [B, C] and labels [B] -> scalar."""
    if cfg["name"] == "ce":
        return nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    raise ConfigError(f"loss.name={cfg['name']!r} is not one of {', '.join(LOSSES)}.")
