"""Trained models from what runs leave behind: checkpoints, run directories, adapters, cv runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vfmtune.checkpoint import load_checkpoint
from vfmtune.choices import ConfigError
from vfmtune.data.images import DataError
from vfmtune.folds import fold_checkpoints, is_cv_run
from vfmtune.tasks import TASKS, get_task
from vfmtune.tasks.classify import load_adapter_run
from vfmtune.tasks.ensemble import Ensemble


def load_model(ckpt: str | Path) -> nn.Module | Any:
    """A trained model, in eval mode, loaded with weights_only=True.

    Args:
        ckpt: a checkpoint file, a run directory (its best checkpoint), a LoRA adapter folder, or a
            `vfmtune cv` run directory (the `Ensemble` of its fold models).

    Returns:
        The task's module: a `Classifier`, a distilled student (`Distiller`), an `Ensemble`, ...;
        `model.classes`, `model.config` and `model(images)` work for each.

    Raises:
        ConfigError: the checkpoint names a task this version does not know.

    Example:
        >>> model = vfmtune.load_model("runs/train/<date>")
        >>> logits = model(images)
    """
    path = Path(ckpt).expanduser()
    if is_cv_run(path):
        return Ensemble([load_model(d) for d in fold_checkpoints(path)]).eval()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return load_adapter_run(path)
    checkpoint = load_checkpoint(path)
    return get_task(task_name(checkpoint)).load(checkpoint)


def task_name(checkpoint: dict[str, Any]) -> str:
    """The task a checkpoint was trained for (checkpoints from before the registry are classifiers)."""
    return str(checkpoint["hyper_parameters"].get("task", "classify"))


def model_task(model: nn.Module) -> str:
    """The registry name of a loaded model's task."""
    hparams = getattr(model, "hparams", None) or {}
    return str(hparams.get("task", "classify"))


def load_teacher(ckpt: str | None, classes: Sequence[str] | None = None) -> Any:
    """A frozen vfmtune model that `vfmtune distill` can teach from (a classifier or a segmenter: its task
    names a student task), checked to be over `classes`.

    Raises:
        ConfigError: no path, or the checkpoint's task teaches no student (e.g. a distilled student).
        DataError: its classes differ from the data's.
    """
    if not ckpt:
        raise ConfigError("This command needs teacher=PATH: a vfmtune classifier or segmenter checkpoint or run directory.")
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    task = str(hp.get("task", "classify"))
    if task not in TASKS or get_task(task).student is None or "classes" not in hp:
        teachers = [name for name in TASKS if get_task(name).student]
        raise ConfigError(f"teacher={ckpt} is a {task!r} checkpoint; a teacher must be a model trained by `vfmtune train` "
                          f"(tasks {', '.join(teachers)}: frozen, last-blocks, LoRA, ...).")
    if classes is not None and list(hp["classes"]) != list(classes):
        raise DataError(f"teacher={ckpt} was trained on classes {hp['classes']} but the data has {list(classes)}. "
                        "Fix: distil on data with the teacher's class set (same class folders, or classes.txt for masks).")
    return load_model(ckpt).eval().requires_grad_(False)
