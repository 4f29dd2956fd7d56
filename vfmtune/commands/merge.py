"""`vfmtune export-merged`: a LoRA run's adapters merged into a plain checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.adapt.lora import merge_lora
from vfmtune.choices import ConfigError, FinetuneMode
from vfmtune.compose import to_container
from vfmtune.config import MergeCommand
from vfmtune.io import torch_save
from vfmtune.loading import load_model
from vfmtune.run import ConfigLike, command_config, make_run_dir


def export_merged(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Merge a LoRA run's adapters into the backbone and write a plain checkpoint (`merged.ckpt`).

    Merged and unmerged logits are compared on random images; the max abs difference is reported and
    above `merge_atol` the export fails. The merged checkpoint loads in `evaluate` / `predict` like
    any other (`ckpt=RUN_DIR/merged.ckpt`).

    Example:
        >>> vfmtune.export_merged(overrides=["ckpt=runs/train/lora"])["max_abs_diff"]
        3.1e-07
    """
    config = command_config(cfg, overrides, MergeCommand, "merge")
    if not config.ckpt:
        raise ConfigError("export-merged needs ckpt=PATH (a LoRA run directory, .ckpt file or adapter folder).")
    model = load_model(config.ckpt)
    trained = model.config
    if trained.finetune.mode != FinetuneMode.lora:
        raise ConfigError(f"ckpt={config.ckpt} was trained with finetune.mode={trained.finetune.mode}, not lora: nothing to merge.")
    merged, diff = merge_lora(model, config.merge_atol, trained.backbone.img_size or 224)
    plain = dataclasses.replace(trained, finetune=dataclasses.replace(trained.finetune, mode=FinetuneMode.frozen))
    out = make_run_dir(run_dir, "export-merged")
    state = {**{f"backbone.{k}": v for k, v in merged.state_dict().items()}, **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
    target = out / "merged.ckpt"
    torch_save({"state_dict": state, "hyper_parameters": {"task": "classify", "config": to_container(plain), "classes": model.classes,
                                                          "class_counts": model.class_counts, "merged_from": str(config.ckpt)}}, target)
    print(f"merged LoRA into the backbone: max abs logit diff {diff:.3g} (merge_atol={config.merge_atol}); wrote {target}")
    return {"run_dir": str(out), "checkpoint": str(target), "max_abs_diff": diff}
