"""The distillation task: a small timm student learns a frozen vfmtune classifier's outputs.

Training batches hold one un-normalised [0, 1] view per image (teacher and student each normalise
it their own way), its label (`UNLABELED` for teacher-labelled images) and, when the teacher is
frozen and views are deterministic, the teacher's cached embedding. A trained student is evaluated,
predicted with and exported like a classifier, on images at its own input size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vfmtune.compose import typed
from vfmtune.config import AugmentConfig, DataConfig, DistillCommand
from vfmtune.data.datamodule import ImageDataset, SplitData
from vfmtune.data.prepare import Prepared, training_only_images
from vfmtune.data.transforms import build_transforms
from vfmtune.device import Shard
from vfmtune.embedding_cache import embed_images
from vfmtune.inference import eval_loader
from vfmtune.metrics import ClassMetrics
from vfmtune.precision import STUDENT_ON_CPU
from vfmtune.report import classification_report
from vfmtune.tasks.base import Setup, Task
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.classify import ClassifyTask
from vfmtune.tasks.distiller import UNLABELED, Distiller


class TeacherTargets(Dataset):
    """`(view, label, teacher embedding)`: images with the teacher's cached outputs attached."""

    def __init__(self, images: ImageDataset, embeddings: torch.Tensor) -> None:
        self.images, self.embeddings = images, embeddings

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        x, y = self.images[i]
        return x, y, self.embeddings[i]


def student_transform(model: Distiller) -> Any:
    """Eval transform of a trained student: its own input size and normalisation."""
    _, tf = build_transforms(model.data_cfg, AugmentConfig(enabled=False))
    return tf


def unlabelled_images(prepared: Prepared, data: DataConfig) -> list[str]:
    """The images of `data.unlabeled` for teacher-only targets, refused if any is a val/test image."""
    held = [p for s in ("val", "test") for p in prepared.subset(s)[0]]
    return training_only_images(str(data.unlabeled), held, data, "data.unlabeled",
                                "Teacher-labelled images may only be trained on; evaluation stays on human-labelled data.")


class DistillTask(Task):
    """Teacher (a vfmtune classifier) -> student (any timm model): Hinton KD, feature KD, unlabelled images."""

    name = "distill"
    command = "distill"
    target = "class"
    schema = DistillCommand
    sections = ("kd", "distill")
    metrics = ClassMetrics()

    def setup(self, config: DistillCommand, prepared: Prepared, out: Path, **context: Any) -> Setup:
        teacher: Classifier = context["teacher"]
        model = Distiller(config, prepared.table.classes, teacher=teacher)
        d = config.data
        # [0, 1] views: each model normalises them itself (consistent teaching)
        train_tf, eval_tf = build_transforms({**model.data_cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}, d.augment)
        train_paths, train_labels = prepared.subset("train")
        if d.unlabeled:
            extra = unlabelled_images(prepared, d)
            print(f"{len(extra)} unlabelled images added to training (teacher soft targets only)")
            train_paths, train_labels = train_paths + extra, train_labels + [UNLABELED] * len(extra)
        datasets: dict[str, Dataset] = {s: ImageDataset(*prepared.subset(s), eval_tf) for s in ("val", "test") if s in prepared.splits}
        datasets["train"] = ImageDataset(train_paths, train_labels, train_tf)
        cache_teacher = model.needs_teacher and config.distill.cache_teacher and not d.augment.enabled
        if model.needs_teacher and not cache_teacher:
            print("teacher runs on every batch (augmented views differ each epoch; set data.augment.enabled=false to cache it)")

        def build(shard: Shard) -> tuple[dict[str, Dataset], None]:
            if not cache_teacher:
                return datasets, None
            # Deterministic views + frozen teacher: its outputs never change, so the embedding cache holds them
            # (same key as `vfmtune train` for this backbone; logits are the head applied to it, microseconds).
            # Called on every process: in a DDP run each rank embeds its share.
            teacher_run = dataclasses.replace(config, backbone=teacher.config.backbone)
            outputs = embed_images(teacher_run, teacher.backbone, train_paths, label="teacher outputs", shard=shard)
            return {**datasets, "train": TeacherTargets(datasets["train"], outputs)}, None

        figures = {"teacher": str(config.teacher), "student": config.student,
                   "student_params": sum(p.numel() for p in model.student.parameters())}
        return Setup(model, SplitData(build, batch_size=d.batch_size, num_workers=d.num_workers), figures=figures,
                     fp32_training=STUDENT_ON_CPU)

    def load(self, checkpoint: dict[str, Any]) -> Distiller:
        hp = checkpoint["hyper_parameters"]
        model = Distiller(typed(hp["config"], DistillCommand, strict=False), hp["classes"], teacher_info=hp["teacher_info"],
                          load_weights=False)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def evaluation(self, config: DistillCommand, model: nn.Module, prepared: Prepared, split: str) -> tuple[nn.Module, DataLoader]:
        return model, eval_loader(ImageDataset(*prepared.subset(split), student_transform(model)), config)

    def predict(self, model: nn.Module, paths: Sequence[str], config: DistillCommand, out: Path) -> dict[str, Any]:
        return ClassifyTask.write_predictions(model, ImageDataset(paths, [0] * len(paths), student_transform(model)), config, out)

    def inference(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        return model.student.eval(), dict(model.data_cfg)

    def report(self, metrics: dict[str, Any], classes: Sequence[str], out: Path, prefixes: Sequence[str]) -> None:
        classification_report(metrics, classes, out, prefixes)
