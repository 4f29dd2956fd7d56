"""Freezing by depth or by name, built on timm's block grouping (`group_matcher`)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from timm.models import group_parameters
from torch import nn

from vfmtune.backbones import timm_model
from vfmtune.choices import ConfigError, FinetuneMode

_BLOCK_NAME = re.compile(r"(^|\.)(blocks|layers?|stages?)_?\.?\d")  # blocks.3, layer3, stages.2


def block_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names grouped by depth, input side first: stem, block 0 .. block N-1, final norm/neck.

    Uses timm's `group_matcher(coarse=True)`, the same grouping timm's layer-wise LR decay uses, so it
    works for ViTs, SAM and CNNs alike.
    """
    model = timm_model(backbone)
    return list(group_parameters(model, model.group_matcher(coarse=True)).values())


def group_label(index: int, names: Sequence[str]) -> str:
    """A readable name for a block group: "stem", "blocks.3" (or layers.N / stages.N), "norm", "neck"."""
    if index == 0:
        return "stem"
    m = re.match(r"^((?:blocks|layers?|stages?)\.?\d+)", names[0])
    return m.group(1) if m else names[0].split(".")[0]


def named_groups(backbone: nn.Module) -> dict[str, list[str]]:
    """Block groups by label, input side first (names are the timm model's parameter names)."""
    out: dict[str, list[str]] = {}
    for i, group in enumerate(block_groups(backbone)):
        out.setdefault(group_label(i, group), []).extend(group)
    return out


def keep_frozen_bn_eval(module: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode, so their running statistics
    stay those of pretraining (what a frozen layer means); ViT LayerNorms have none and train with
    their block."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _trainable_groups(groups: list[list[str]], n_blocks: int) -> list[list[str]]:
    # Groups after the last numbered block (final norm, SAM's neck) belong to the output side and
    # train whenever any block does: a frozen final norm after trained blocks only slows learning.
    tail = 0
    while tail < len(groups) and not any(_BLOCK_NAME.search(n) for n in groups[-1 - tail]):
        tail += 1
    if tail == len(groups):  # no recognisable block names: every group after the stem is a block
        tail = 0
    n_block_groups = len(groups) - tail - 1  # minus the stem
    if n_blocks > n_block_groups:
        raise ConfigError(
            f"finetune.n_blocks={n_blocks} but this backbone has {n_block_groups} blocks. "
            f"Fix: set finetune.n_blocks between 1 and {n_block_groups}, or finetune=full."
        )
    return groups[len(groups) - tail - n_blocks:]


def _match(names: Sequence[str], patterns: Sequence[str], key: str) -> set[str]:
    selected: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(
                f"{key} pattern {pattern!r} matches no backbone parameter. "
                f"Examples of names: {', '.join(names[:3])}, ..., {names[-1]}"
            )
        selected.update(hits)
    return selected


def apply_finetune(
    backbone: nn.Module,
    mode: FinetuneMode | str,
    n_blocks: int = 2,
    freeze: Sequence[str] = (),
    unfreeze: Sequence[str] = (),
) -> None:
    """Set `requires_grad` on the backbone's parameters.

    Args:
        backbone: a timm model.
        mode: "frozen" (nothing trains), "last_blocks" (the last `n_blocks` blocks and the final
            norm train), or "full"; "progressive" and "lora" start frozen (an unfreezing schedule or
            peft adapters add to it).
        n_blocks: for "last_blocks".
        freeze: fnmatch patterns of parameter names frozen after the mode is applied.
        unfreeze: fnmatch patterns trained even when the mode froze them (e.g. "*norm*").

    Example:
        >>> apply_finetune(backbone, "last_blocks", n_blocks=4, unfreeze=["pos_embed"])
    """
    mode = FinetuneMode.parse(mode, "finetune.mode")
    params = dict(backbone.named_parameters())
    names = list(params)
    if mode == "full":
        trainable = set(names)
    elif mode in ("frozen", "progressive", "lora"):
        trainable = set()
    else:
        trainable = {n for group in _trainable_groups(block_groups(backbone), n_blocks) for n in group}
    trainable |= _match(names, unfreeze, "finetune.unfreeze")
    trainable -= _match(names, freeze, "finetune.freeze")
    for name, p in params.items():
        p.requires_grad_(name in trainable)


def is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def param_table(backbone: nn.Module, head: nn.Module | None = None) -> str:
    """A text table of trainable vs total parameters per block group, printed at the start of a run."""
    rows: list[tuple[str, int, int]] = []
    params = dict(timm_model(backbone).named_parameters())  # LoRA's A/B matrices count in their block
    for label, group in named_groups(backbone).items():
        total = sum(params[n].numel() for n in group)
        train = sum(params[n].numel() for n in group if params[n].requires_grad)
        rows.append((label, train, total))
    if head is not None:
        rows.append(("head", sum(p.numel() for p in head.parameters() if p.requires_grad), sum(p.numel() for p in head.parameters())))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'group':<{width}}  {'trainable':>12}  {'total':>12}"]
    lines += [f"{name:<{width}}  {t:>12,}  {n:>12,}" for name, t, n in rows]
    t_all, n_all = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'all':<{width}}  {t_all:>12,}  {n_all:>12,}  ({100 * t_all / max(n_all, 1):.2f}% trainable)")
    return "\n".join(lines)
