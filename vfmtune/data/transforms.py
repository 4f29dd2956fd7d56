"""Train and eval transforms from the backbone's timm data config (resize, crop, normalisation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.data import create_transform

from vfmtune.config import AugmentConfig


def build_transforms(data_config: dict[str, Any], augment: AugmentConfig | dict[str, Any]) -> tuple[Callable, Callable]:
    """Return `(train_transform, eval_transform)` for a backbone.

    Args:
        data_config: `vfmtune.backbones.data_config(model)`: input_size, mean, std, interpolation, crop_pct.
        augment: training-only augmentation; eval never augments.

    Example:
        >>> train_tf, eval_tf = build_transforms({"input_size": (3, 224, 224)}, AugmentConfig())
    """
    aug = dict(augment) if not isinstance(augment, AugmentConfig) else augment.__dict__
    base = {k: data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode") if k in data_config}
    eval_tf = create_transform(**base, is_training=False)
    if not aug.get("enabled", True):
        return eval_tf, eval_tf
    train_tf = create_transform(
        **{k: v for k, v in base.items() if k not in ("crop_pct", "crop_mode")},
        is_training=True,
        scale=tuple(aug["scale"]),
        hflip=aug["hflip"],
        vflip=aug["vflip"],
        color_jitter=aug["color_jitter"] or None,
        auto_augment=aug["auto_augment"],
    )
    return train_tf, eval_tf

