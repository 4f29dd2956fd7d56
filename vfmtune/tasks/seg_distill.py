"""The segmentation distillation task: an edge CNN learns a frozen vfmtune segmenter's per-pixel outputs.

`vfmtune distill teacher=RUN` lands here when RUN is a `segment` model. Training batches hold one
[0, 1] view per image at the larger of the two input sizes, its mask (all 255 for the teacher-only
images of `data.unlabeled`) and, when the teacher is frozen and views are deterministic
(`data.augment.enabled=false`), the teacher's cached logits: the embedding cache, keyed by the
teacher's weights (backbone and head), its transform and the blocks its head reads. A trained student
is evaluated, predicted with (tiled) and exported like a `Segmenter`, at its own input size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vfmtune.compose import typed
from vfmtune.config import DistillCommand
from vfmtune.data.datamodule import SplitData
from vfmtune.data.images import load_image
from vfmtune.data.masks import IGNORE_INDEX, ColourTable, load_mask
from vfmtune.data.paired import PairedTransform, build_paired_transforms, image_transform
from vfmtune.data.prepare import Prepared
from vfmtune.embedding_cache import embed_images
from vfmtune.precision import STUDENT_ON_CPU
from vfmtune.tasks.base import Setup
from vfmtune.tasks.distill import unlabelled_images
from vfmtune.tasks.seg_distiller import SegDistiller
from vfmtune.tasks.segment import MaskTargets, SegmentTask, check_mask_data, training_window, uniform_eval_sizes
from vfmtune.tasks.segmenter import Segmenter


class StudentViews(Dataset):
    """`(view [3, V, V] in [0, 1], mask [V, V][, teacher logits [K, h, w]])`; images without a mask file
    (None) get an all-255 mask: the teacher's targets only.

    Args:
        paths: image files.
        masks: mask files paired by position, None for unlabelled images.
        transform: paired transform to the view size, without normalisation.
        num_classes: valid mask ids are `0..num_classes-1` and 255.
        colours: `{(r, g, b): class id}` for colour masks.
        teacher_logits: `[N, K, h, w]` cached teacher outputs, or None (the teacher runs per batch).
    """

    def __init__(self, paths: Sequence[str], masks: Sequence[str | None], transform: PairedTransform, num_classes: int,
                 colours: ColourTable | None, teacher_logits: torch.Tensor | None = None) -> None:
        self.paths, self.masks, self.transform = list(paths), list(masks), transform
        self.num_classes, self.colours, self.teacher_logits = num_classes, colours, teacher_logits

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        image = load_image(self.paths[i])
        if self.masks[i] is None:
            ids = np.full((image.height, image.width), IGNORE_INDEX, np.uint8)
        else:
            ids = load_mask(self.masks[i], num_classes=self.num_classes, colours=self.colours, image_size=image.size,
                            image_path=self.paths[i])
        view, mask = self.transform(image, ids)
        return (view, mask) if self.teacher_logits is None else (view, mask, self.teacher_logits[i])


class SegDistillTask(SegmentTask):
    """Segmenter teacher -> edge CNN student (timm features + LR-ASPP): per-pixel KD, unlabelled images, tiling."""

    name = "segment_distill"
    command = "distill"
    schema = DistillCommand
    sections = ("kd", "distill", "segment")
    student = None  # a student teaches no one

    def setup(self, config: DistillCommand, prepared: Prepared, out: Path, **context: Any) -> Setup:
        teacher: Segmenter = context["teacher"]
        check_mask_data(prepared)
        table, d = prepared.table, config.data
        train = [i for i, s in enumerate(prepared.splits) if s == "train"]
        model = SegDistiller(config, table.classes, teacher=teacher, class_pixels=prepared.pixel_counts[train].sum(0).tolist(),
                             window=training_window(prepared))
        # [0, 1] views with their masks: each model resizes and normalises them itself (consistent teaching)
        view = {"input_size": (3, model.view_size, model.view_size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                "interpolation": model.view_interpolation}
        train_tf, _ = build_paired_transforms(view, d.augment)
        paths, masks = prepared.subset("train")
        masks = list(masks)
        if d.unlabeled:
            extra = unlabelled_images(prepared, d)
            print(f"{len(extra)} unlabelled images added to training (teacher targets only)")
            paths, masks = paths + extra, masks + [None] * len(extra)
        logits = None
        if model.needs_teacher and config.distill.cache_teacher and not d.augment.enabled:
            # Deterministic views + frozen teacher: its logits never change, so the embedding cache holds them
            # (at the head's resolution: small), keyed by the teacher's weights, transform and blocks read.
            logits = embed_images(dataclasses.replace(config, backbone=teacher.config.backbone), teacher, paths,
                                  extract=lambda t, x: t.low_res(x), kind=f"segment-logits-{teacher.layers}",
                                  label="teacher logits", transform=image_transform(teacher.data_cfg))
        elif model.needs_teacher:
            print("teacher runs on every batch (augmented views differ each epoch; set data.augment.enabled=false to cache it)")
        k = len(table.classes)
        datasets: dict[str, Dataset] = {"train": StudentViews(paths, masks, train_tf, k, table.colours, logits)}
        for split in ("val", "test"):
            if split in prepared.splits:
                datasets[split] = MaskTargets(*prepared.subset(split), table.colours, k, image_transform(model.data_cfg))
        data = SplitData(datasets, batch_size=d.batch_size, num_workers=d.num_workers,
                         eval_batch_size=None if uniform_eval_sizes(prepared) else 1)
        figures = {"teacher": str(config.teacher), "student": config.student, "window": model.window,
                   "student_params": sum(p.numel() for p in model.student.parameters())}
        return Setup(model, data, figures=figures, fp32_training=STUDENT_ON_CPU)

    def load(self, checkpoint: dict[str, Any]) -> SegDistiller:
        hp = checkpoint["hyper_parameters"]
        model = SegDistiller(typed(hp["config"], DistillCommand, strict=False), hp["classes"], teacher_info=hp["teacher_info"],
                             load_weights=False, class_pixels=hp.get("class_pixels"), window=hp.get("window"))
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()
