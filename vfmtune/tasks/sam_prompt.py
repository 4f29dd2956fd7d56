"""The prompted-SAM task: fine-tune SAM's mask decoder (and prompt encoder, optionally LoRA on its encoder)
on prompts made from instance masks, scored per instance with ground-truth boxes.

Data: images with instance masks (`vfmtune.data.instances`: COCO JSON, instance-id PNGs, or class maps
split into connected components), scanned and split like semantic masks (`prepare_masks`), so a dataset
splits the same way for `task=segment` and `task=sam_prompt`. Multi-class data is one prompt per instance:
the prompt carries its instance's class and every metric is reported per class. With a frozen encoder
the decoder trains on cached image embeddings (one encoder pass per image, ever). A trained run is used
by `vfmtune auto-mask ckpt=RUN` and exported by `vfmtune export ckpt=RUN`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vfmtune.cache_dir import cache_dir
from vfmtune.choices import ConfigError
from vfmtune.compose import typed
from vfmtune.config import Config, ExportCommand
from vfmtune.data.instances import instance_source, load_instances
from vfmtune.data.prepare import Prepared, prepare_masks
from vfmtune.data.synthetic import add_synthetic
from vfmtune.instance_metrics import InstanceMetrics
from vfmtune.sam.embeddings import sam_embeddings
from vfmtune.tasks.base import Setup, Task
from vfmtune.tasks.sam_batches import InstanceData, InstanceImages, instance_loader
from vfmtune.tasks.sam_prompter import SamPrompter, trainable_summary


def uses_cache(config: Config, model: SamPrompter) -> bool:
    """Whether the decoder sees cached embeddings: a frozen encoder and `finetune.cache_embeddings`."""
    return config.finetune.cache_embeddings and not model.encoder_trains


def instance_datasets(config: Config, model: SamPrompter, prepared: Prepared, splits: Sequence[str], cached: bool,
                      train: bool = True) -> dict[str, InstanceImages]:
    """Per split: images (or cached embeddings) with their instances; the training split gets low-res targets."""
    refs = dict(zip(prepared.table.paths, prepared.table.instances or []))
    paths = {s: prepared.subset(s)[0] for s in splits}
    embeddings: dict[str, torch.Tensor] = {}
    if cached:
        every = [p for s in splits for p in paths[s]]
        embeddings = dict(zip(every, sam_embeddings(config, model.sam, every)))
    low_res = model.sam.prompt_encoder.mask_input_size[0]
    return {s: InstanceImages(paths[s], [refs[p] for p in paths[s]], model.transform,
                              torch.stack([embeddings[p] for p in paths[s]]) if cached and paths[s] else None,
                              low_res if train and s == "train" else None, len(prepared.table.classes), config.sam.min_area)
            for s in splits}


def count_instances(prepared: Prepared, min_area: int) -> dict[str, int]:
    """Instances per split, and how many were too small to prompt (a figure in every report)."""
    counts: dict[str, int] = {}
    dropped = 0
    for ref, split in zip(prepared.table.instances or [], prepared.splits):
        found, small = load_instances(ref, num_classes=len(prepared.table.classes), min_area=min_area)
        counts[f"{split}_instances"] = counts.get(f"{split}_instances", 0) + len(found)
        dropped += small
    if dropped:
        print(f"{dropped} instance masks below sam.min_area={min_area} pixels (or empty) left out")
    return {**counts, "instances_left_out": dropped}


class SamPromptTask(Task):
    """SAM (MobileSAM, LiteMedSAM, SAM ViT) -> masks for prompts; focal + Dice + IoU-MSE on prompts from instances."""

    name = "sam_prompt"
    target = "instances"
    schema = Config
    sections = ("sam",)
    metrics = InstanceMetrics()

    def prepare(self, config: Config, out: Path) -> Prepared:
        source, refs = instance_source(config.data, cache_dir(config.cache_dir))
        prepared = prepare_masks(config, out, source)
        by_path = dict(zip(source.paths, refs))
        prepared.table.instances = [by_path[p] for p in prepared.table.paths]
        return add_synthetic(prepared, config) if config.data.synthetic else prepared

    def setup(self, config: Config, prepared: Prepared, out: Path, **context: Any) -> Setup:
        model = SamPrompter(config, prepared.table.classes)
        print(f"SAM {config.sam.model}, finetune={config.finetune.mode}:\n{trainable_summary(model.sam)}")
        cached = uses_cache(config, model)
        datasets = instance_datasets(config, model, prepared, prepared.present, cached)
        model.embeddings_input = cached
        data = InstanceData(datasets, batch_size=config.data.batch_size, num_workers=0 if cached else config.data.num_workers)
        figures = {"sam_model": config.sam.model, "embeddings_cached": cached, **count_instances(prepared, config.sam.min_area)}
        return Setup(model, data, figures=figures)

    def load(self, checkpoint: dict[str, Any]) -> SamPrompter:
        hp = checkpoint["hyper_parameters"]
        model = SamPrompter(typed(hp["config"], Config, strict=False), hp["classes"], load_weights=False)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def evaluation(self, config: Config, model: nn.Module, prepared: Prepared, split: str) -> tuple[nn.Module, DataLoader]:
        cached = uses_cache(model.config, model)
        dataset = instance_datasets(config, model, prepared, [split], cached, train=False)[split]
        model.embeddings_input = cached
        return model, instance_loader(dataset, config.data.batch_size, 0 if cached else config.data.num_workers)

    def predict(self, model: nn.Module, paths: Sequence[str], config: Config, out: Path) -> dict[str, Any]:
        raise ConfigError("A task=sam_prompt run segments what it is prompted with: use "
                          "`vfmtune auto-mask ckpt=RUN images=DIR boxes=FILE` (or without boxes= for everything mode).")

    def export(self, model: nn.Module | None, config: ExportCommand, out: Path) -> dict[str, Any]:
        from vfmtune.sam.export import export_sam_run

        return export_sam_run(model, config, self, out)

    def report(self, metrics: dict[str, Any], classes: Sequence[str], out: Path, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            print(instance_table(metrics, classes, prefix))


def instance_table(metrics: dict[str, Any], classes: Sequence[str], prefix: str) -> str:
    """Instance IoU, Dice, mask AP and PQ, overall and per class, as a text table."""
    def f(key: str) -> str:
        v = metrics.get(key)
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"

    rows = [("all", "")] + [(c, f"/{c}") for c in classes[1:]]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{prefix}: {metrics.get(f'{prefix}/instances', 0)} instances",
             f"  {'class':<{width}}{'IoU':>8}{'Dice':>8}{'mask AP':>9}{'PQ':>8}"]
    for name, suffix in rows:
        lines.append(f"  {name:<{width}}{f(f'{prefix}/instance_iou{suffix}'):>8}{f(f'{prefix}/instance_dice{suffix}'):>8}"
                     f"{f(f'{prefix}/mask_ap{suffix}'):>9}{f(f'{prefix}/pq{suffix}'):>8}")
    return "\n".join(lines)
