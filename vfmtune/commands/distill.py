"""`vfmtune distill`: from a trained vfmtune classifier (the teacher) to a small timm student."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from vfmtune.config import DistillCommand, load_config, typed
from vfmtune.fit import fit
from vfmtune.loading import load_teacher
from vfmtune.run import ConfigLike, start_run, with_overrides
from vfmtune.tasks import get_task
from vfmtune.tasks.distiller import resolve_student, student_weights_source


def with_student_defaults(overrides: Sequence[str]) -> list[str]:
    """`finetune=full` unless given: the default `frozen` group's 300 epochs at lr 3e-2 suit a linear head, not a CNN."""
    return list(overrides) if any(o.startswith("finetune=") for o in overrides) else ["finetune=full", *overrides]


def distill(
    cfg: ConfigLike = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Train a small timm student from a frozen vfmtune classifier; metrics are the student's own.

    Data defaults to the teacher's data and split; `data.unlabeled=DIR` adds images the teacher labels
    (training only). With `data.augment.enabled=false` the teacher's embeddings come from the
    embedding cache (computed once, shared with `vfmtune train`); with augmentation it runs on every batch.
    `ckpt=RUN/checkpoints/last.ckpt` resumes, as for `train`; `callbacks` are extra Lightning callbacks.

    Returns:
        `{"run_dir", "metrics", "best_checkpoint"}` like `train`.

    Example:
        >>> r = vfmtune.distill(overrides=["teacher=runs/teacher", "student=efficientnet_lite0"], run_dir="runs/lite0")
        >>> r["metrics"]["test/macro_f1"]
    """
    config = typed(load_config(*with_student_defaults(overrides), command="distill") if cfg is None else cfg, DistillCommand)
    resolve_student(config.student)  # bad names fail before anything loads
    teacher = load_teacher(config.teacher)
    config = student_config(config, teacher.config, overrides)
    out = start_run(config, run_dir, "distill")
    L.seed_everything(config.seed, workers=True, verbose=False)
    task = get_task("distill")
    prepared = task.prepare(config, out)
    load_teacher(config.teacher, prepared.table.classes)  # class check (cheap; weights already loaded once)
    return fit(task, config, prepared, out, callbacks, teacher=teacher)


def student_config(config: DistillCommand, teacher_config: Any, overrides: Sequence[str]) -> DistillCommand:
    """The run config: data defaults to the teacher's (same split, so test figures compare), `data.*`
    overrides apply (a new source replaces the teacher's, not adds to it); student weights resolved."""
    given = [o.split("=", 1)[0] for o in overrides if o.startswith("data.")]
    data_source = teacher_config.data
    if any(k in ("data.root", "data.manifest", "data.dataset") for k in given):
        data_source = dataclasses.replace(data_source, root=None, manifest=None, dataset=None)
    base = dataclasses.replace(config, data=data_source)
    merged = with_overrides(base, overrides, "data", DistillCommand)
    return dataclasses.replace(merged, distill=dataclasses.replace(
        merged.distill, weights=student_weights_source(merged.student, merged.distill.weights)))
