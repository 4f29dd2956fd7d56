"""LoRA / DoRA adapters on a timm backbone via peft, saved as peft-standard adapters plus the head.

The backbone becomes a `peft.PeftModel`; only the low-rank matrices (and the head) train. A run's
adapter folder holds `adapter_model.safetensors` + `adapter_config.json` (peft's `save_pretrained`),
`head.safetensors` and `vfmtune.json` (classes, config, and a digest of the base weights so that an
adapter is never silently applied to another backbone). LoRA: https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from vfmtune.choices import ConfigError
from vfmtune.config import FinetuneConfig
from vfmtune.embedding_cache import weights_digest
from vfmtune.io import atomic_path, write_text

# timm's ViT, DINOv2, EVA and SAM encoders all name their layers blocks.N.attn.{qkv,proj} and
# blocks.N.mlp.{fc1,fc2} (SAM's lin1/lin2 are renamed on load), so one table serves the families.
TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ["attn.qkv", "attn.proj"],
    "attn_mlp": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
}


def lora_targets(targets: Any) -> list[str]:
    """A preset name or a list of module-name suffixes -> the suffixes peft matches against."""
    if isinstance(targets, str):
        return TARGET_PRESETS.get(targets, [targets])
    if not targets:
        raise ConfigError(f"finetune.targets is empty. Use a preset ({', '.join(TARGET_PRESETS)}) or module names.")
    return [str(t) for t in targets]


def apply_lora(backbone: nn.Module, ft: FinetuneConfig) -> PeftModel:
    """Wrap a (frozen) timm backbone in peft LoRA adapters on the `finetune.targets` layers.

    Args:
        backbone: a timm model.
        ft: the `finetune` config section (rank, alpha, dropout, targets, use_dora).

    Example:
        >>> peft_backbone = apply_lora(vit, FinetuneConfig(mode="lora", rank=8, targets="attn"))
        >>> feats = peft_backbone(images)  # [B, D], as before
    """
    suffixes = lora_targets(ft.targets)
    linear_names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    for suffix in suffixes:
        if not any(n == suffix or n.endswith("." + suffix) for n in linear_names):
            raise ConfigError(
                f"finetune.targets: {suffix!r} matches no linear layer of this backbone. Presets: "
                f"{', '.join(TARGET_PRESETS)}; linear layers look like {', '.join(linear_names[:4])}, ..."
            )
    if ft.rank < 1:
        raise ConfigError(f"finetune.rank={ft.rank} must be >= 1 (8-16 is usual).")
    config = LoraConfig(
        r=int(ft.rank),
        lora_alpha=float(ft.alpha),
        lora_dropout=float(ft.dropout),
        target_modules=suffixes,
        use_dora=bool(ft.use_dora),
        bias="none",
    )
    return get_peft_model(backbone, config)


def base_weights_digest(backbone: nn.Module) -> str:
    """Identity of the frozen base weights under the adapters (LoRA/DoRA tensors excluded), under
    their plain timm names so that it equals the digest of the same backbone before peft wrapped it."""
    return weights_digest({
        name.replace("base_model.model.", "").replace(".base_layer", ""): t
        for name, t in backbone.state_dict().items()
        if "lora_" not in name
    })


def save_adapter(backbone: PeftModel, head: nn.Module, meta: dict[str, Any], folder: str | Path) -> Path:
    """Write a peft-standard adapter (`save_pretrained`), the head and `vfmtune.json` (the caller's
    `meta`, e.g. classes and config, plus the base weights' digest) into `folder`."""
    folder = Path(folder)
    backbone.save_pretrained(folder)
    with atomic_path(folder / "head.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    write_text(folder / "vfmtune.json", json.dumps({**meta, "base_digest": base_weights_digest(backbone)}, indent=2))
    return folder


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    """`vfmtune.json` of an adapter folder written by `save_adapter`."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / "vfmtune.json").is_file():
        raise FileNotFoundError(f"{folder}: not a vfmtune adapter folder (adapter_config.json, vfmtune.json missing).")
    return json.loads((folder / "vfmtune.json").read_text())


def load_adapter(backbone: nn.Module, head: nn.Module, folder: str | Path) -> PeftModel:
    """Inject and load a saved adapter into `backbone` (its plain base model) and the saved head into
    `head`; another base backbone (by weights digest) is a ConfigError.

    Example:
        >>> backbone = load_adapter(create_backbone(...), head, "runs/train/lora/adapter")
    """
    folder = Path(folder)
    meta = read_adapter_meta(folder)
    name = meta["config"]["backbone"]["name"]
    try:
        peft_backbone = PeftModel.from_pretrained(backbone, folder)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{folder}: the adapter's weights are a pickle that needs code to load; refused (weights_only). "
                          "Fix: save adapters with peft's save_pretrained (safetensors).") from e
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder}: the adapter does not fit this backbone ({e}).") from e
    digest = base_weights_digest(peft_backbone)
    if digest != meta["base_digest"]:
        raise ConfigError(
            f"{folder}: this adapter was trained on backbone {name!r} (weights {meta['config']['backbone']['weights']}, "
            f"digest {meta['base_digest']}), but the backbone given has other weights (digest {digest}). Fix: load it "
            "onto the same backbone and weights it was trained with."
        )
    head.load_state_dict(load_file(folder / "head.safetensors"))
    return peft_backbone


@torch.no_grad()
def merge_lora(model: Any, atol: float, img_size: int, n: int = 4, seed: int = 0) -> tuple[nn.Module, float]:
    """Merge the adapters into the backbone weights (peft `merge_and_unload`) and check that logits
    agree with the unmerged model on `n` random images. Returns (merged timm backbone, max abs diff).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, img_size, img_size, generator=g)
    model.eval()
    before = model(x)
    merged = model.backbone.merge_and_unload()
    after = model.head(merged(x))
    diff = float((before - after).abs().max())
    if not diff <= atol:
        raise ValueError(f"Merged LoRA model differs from the unmerged one: max abs logit diff {diff:.3g} > merge_atol={atol}.")
    return merged, diff
