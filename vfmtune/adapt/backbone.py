"""The configured backbone with its adaptation applied: what every task that fine-tunes one starts from."""

from __future__ import annotations

from torch import nn

from vfmtune.adapt.freeze import apply_finetune
from vfmtune.adapt.lora import apply_lora
from vfmtune.backbones import create_backbone
from vfmtune.choices import ConfigError, FinetuneMode
from vfmtune.config import Config


def adapted_backbone(config: Config, load_weights: bool = True) -> nn.Module:
    """`config.backbone` with `config.finetune` applied: frozen / trainable parameters (by mode and name
    patterns), gradient checkpointing, LoRA adapters (peft).

    Args:
        config: the run's config.
        load_weights: the configured weights; False when a checkpoint's state dict replaces them anyway.

    Example:
        >>> backbone = adapted_backbone(typed({"finetune": {"mode": "last_blocks", "n_blocks": 2}}))  # doctest: +SKIP
    """
    b, ft = config.backbone, config.finetune
    backbone = create_backbone(b.name, weights=str(b.weights) if load_weights else "none", path=b.path, img_size=b.img_size,
                               drop_path_rate=b.drop_path_rate, global_pool=b.global_pool)
    apply_finetune(backbone, ft.mode, ft.n_blocks, ft.freeze, ft.unfreeze)
    if ft.grad_checkpointing:
        try:  # before peft wraps the model: timm's forward_features reads the flag on the model itself
            backbone.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as e:
            raise ConfigError(f"finetune.grad_checkpointing=true: {b.name} does not support it in timm ({e}).") from e
    if ft.mode == FinetuneMode.lora:
        backbone = apply_lora(backbone, ft)
    return backbone
