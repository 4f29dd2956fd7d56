"""LoRA / DoRA adapters on a timm backbone via peft, saved as peft-standard adapters plus the head.

The backbone becomes a `peft.PeftModel`; only the low-rank matrices (and the head) train. A run's
adapter folder holds `adapter_model.safetensors` + `adapter_config.json` (peft's `save_pretrained`),
`head.safetensors` and `vfmtune.json` (classes, config, and a digest of the base weights so that an
adapter is never silently applied to another backbone). LoRA: https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from vfmtune.config import ConfigError
from vfmtune.embedding_cache import weights_digest

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


def apply_lora(backbone: nn.Module, ft: dict[str, Any]) -> PeftModel:
    """Wrap a (frozen) timm backbone in peft LoRA adapters on the `finetune.targets` layers.

    Args:
        backbone: a timm model.
        ft: the `finetune` config section (rank, alpha, dropout, targets, use_dora).

    Example:
        >>> peft_backbone = apply_lora(vit, {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": "attn", "use_dora": False})
        >>> feats = peft_backbone(images)  # [B, D], as before
    """
    suffixes = lora_targets(ft["targets"])
    linear_names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    for suffix in suffixes:
        if not any(n == suffix or n.endswith("." + suffix) for n in linear_names):
            raise ConfigError(
                f"finetune.targets: {suffix!r} matches no linear layer of this backbone. Presets: "
                f"{', '.join(TARGET_PRESETS)}; linear layers look like {', '.join(linear_names[:4])}, ..."
            )
    if ft["rank"] < 1:
        raise ConfigError(f"finetune.rank={ft['rank']} must be >= 1 (8-16 is usual).")
    config = LoraConfig(
        r=int(ft["rank"]),
        lora_alpha=float(ft["alpha"]),
        lora_dropout=float(ft["dropout"]),
        target_modules=suffixes,
        use_dora=bool(ft.get("use_dora", False)),
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


def save_adapter(model: Any, folder: str | Path) -> Path:
    """Write a LoRA classifier's adapter (peft-standard) plus head and metadata into `folder`."""
    folder = Path(folder)
    backbone: PeftModel = model.backbone
    backbone.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, folder / "head.safetensors")
    meta = {"classes": model.classes, "config": model.config, "base_digest": base_weights_digest(backbone)}
    (folder / "vfmtune.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_adapter(folder: str | Path, backbone_overrides: dict[str, Any] | None = None) -> Any:
    """A classifier rebuilt from an adapter folder: the base backbone (from its configured weights, or
    `backbone_overrides`), the adapter and the head. Another base backbone is a ConfigError.

    Example:
        >>> model = load_adapter("runs/train/lora/adapter")
    """
    from vfmtune.tasks.classifier import Classifier

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / "vfmtune.json").is_file():
        raise FileNotFoundError(f"{folder}: not a vfmtune adapter folder (adapter_config.json, vfmtune.json missing).")
    meta = json.loads((folder / "vfmtune.json").read_text())
    config = {**meta["config"], "backbone": {**meta["config"]["backbone"], **(backbone_overrides or {})}}
    # Built without adapters (mode frozen); peft then injects and loads the saved ones.
    model = Classifier({**config, "finetune": {**config["finetune"], "mode": "frozen"}}, meta["classes"])
    try:
        backbone = PeftModel.from_pretrained(model.backbone, folder)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder}: the adapter does not fit backbone {config['backbone']['name']!r} ({e}).") from e
    digest = base_weights_digest(backbone)
    if digest != meta["base_digest"]:
        raise ConfigError(
            f"{folder}: this adapter was trained on backbone {meta['config']['backbone']['name']!r} "
            f"(weights {meta['config']['backbone']['weights']}, digest {meta['base_digest']}), but the backbone "
            f"given is {config['backbone']['name']!r} with other weights (digest {digest}). Fix: load it onto "
            "the same backbone and weights it was trained with."
        )
    model.backbone = backbone
    model.config = config
    model.head.load_state_dict(load_file(folder / "head.safetensors"))
    return model.eval()


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
