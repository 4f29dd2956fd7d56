"""Optimizer parameter groups for a backbone: weight-decay rules and layer-wise lr decay (timm's)."""

from __future__ import annotations

from typing import Any, Collection, Optional

from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from vfmtune.config import ConfigError


def timm_model(backbone: nn.Module) -> nn.Module:
    """The timm model inside a backbone: itself, or the model a peft `PeftModel` wraps.

    Parameter names (`blocks.3.attn.qkv...`) and `group_matcher` come from the timm model, so block
    grouping, layer decay and the parameter table work the same with and without LoRA.
    """
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) and backbone is not get_base() else backbone


def backbone_param_groups(
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: Optional[float] = None,
    only: Optional[Collection[nn.Parameter]] = None,
) -> list[dict[str, Any]]:
    """Trainable backbone parameters as optimizer groups, each with an explicit `lr`.

    Norms, biases, tokens and position embeddings get no weight decay (timm's rules plus the model's
    `no_weight_decay()`). With `layer_decay`, timm's `param_groups_layer_decay` (BEiT's scheme) scales
    the lr of each layer by `layer_decay ** depth_below_top`.

    Args:
        backbone: a timm model, or a peft model wrapping one.
        lr: the backbone's base lr (the top layer's lr under layer decay).
        weight_decay: for weights that decay.
        layer_decay: e.g. 0.75; None or 1.0 for a flat lr.
        only: keep only these parameters (progressive unfreezing adds groups for the new ones).

    Example:
        >>> groups = backbone_param_groups(vit, lr=1e-4, weight_decay=0.05, layer_decay=0.75)
        >>> [round(g["lr"] / 1e-4, 3) for g in groups][:2]  # stem first: 0.75 ** 13 ...
    """
    model = timm_model(backbone)
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={layer_decay} must be in (0, 1]; 0.65-0.85 is usual for ViTs.")
    nwd = set(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay is None:
        groups = [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=nwd)]
    else:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=nwd, layer_decay=layer_decay)
    keep = None if only is None else {id(p) for p in only}
    out = []
    for g in groups:
        params = [p for p in g["params"] if keep is None or id(p) in keep]
        if params:
            # torch optimizers ignore timm's "lr_scale" key; the lr itself carries it.
            out.append({"params": params, "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]})
    return out
