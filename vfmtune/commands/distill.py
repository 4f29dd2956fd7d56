"""`vfmtune distill`: from a trained vfmtune model (the teacher) to a small timm student.

The teacher's task names the student's (`Task.student`): a classifier teaches a `distill` student, a
segmenter a `segment_distill` one; the rest of the command is the same for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from vfmtune.choices import ConfigError
from vfmtune.compose import load_config, typed
from vfmtune.config import DistillCommand
from vfmtune.fit import fit
from vfmtune.loading import load_teacher, model_task
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
    """Train a small timm student from a frozen vfmtune classifier or segmenter; metrics are the student's own.

    Data, split and task default to the teacher's; `data.unlabeled=DIR` adds images the teacher labels
    (training only). With `data.augment.enabled=false` the teacher's outputs come from the embedding
    cache (computed once); with augmentation it runs on every batch. A segmentation teacher gets a CNN
    student with an LR-ASPP head and per-pixel KD (`vfmtune.tasks.seg_distiller`).
    `ckpt=RUN/checkpoints/last.ckpt` resumes, as for `train`; `callbacks` are extra Lightning callbacks.

    Returns:
        `{"run_dir", "metrics", "best_checkpoint"}` like `train`.

    Example:
        >>> r = vfmtune.distill(overrides=["teacher=runs/teacher", "student=efficientnet_lite0"], run_dir="runs/lite0")
        >>> r["metrics"]["test/macro_f1"]  # test/miou for a segmentation teacher
    """
    config = typed(load_config(*with_student_defaults(overrides), command="distill") if cfg is None else cfg, DistillCommand)
    resolve_student(config.student)  # bad names fail before anything loads
    teacher = load_teacher(config.teacher)
    config = student_config(config, teacher.config, overrides)
    out = start_run(config, run_dir, "distill")
    L.seed_everything(config.seed, workers=True, verbose=False)
    task = get_task(get_task(model_task(teacher)).student)
    prepared = task.prepare(config, out)
    load_teacher(config.teacher, prepared.table.classes)  # class check (cheap; weights already loaded once)
    return fit(task, config, prepared, out, callbacks, teacher=teacher)


def student_config(config: DistillCommand, teacher_config: Any, overrides: Sequence[str]) -> DistillCommand:
    """The run config: data defaults to the teacher's (same split, so test figures compare), `data.*`
    overrides apply (a new source replaces the teacher's, not adds to it); the task is the teacher's
    (with its `monitor` unless the command line sets one); student weights resolved."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    given = [k for k in keys if k.startswith("data.")]
    data_source = teacher_config.data
    if any(k in ("data.root", "data.manifest", "data.dataset", "data.coco") for k in given):
        data_source = dataclasses.replace(data_source, root=None, manifest=None, dataset=None, coco=None)
    task, monitor = config.task, config.monitor
    if task != teacher_config.task:
        if "task" in keys:
            raise ConfigError(f"task={task} but teacher={config.teacher} is a task={teacher_config.task} model. "
                              f"Fix: drop task= (the student's task follows its teacher) or pass task={teacher_config.task}.")
        task, monitor = teacher_config.task, monitor if "monitor" in keys else teacher_config.monitor
    base = dataclasses.replace(config, data=data_source, task=task, monitor=monitor)
    merged = with_overrides(base, overrides, "data", DistillCommand)
    return dataclasses.replace(merged, distill=dataclasses.replace(
        merged.distill, weights=student_weights_source(merged.student, merged.distill.weights)))
