"""`vfmtune train`: fine-tune a backbone + head (or train any registered task) into a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from vfmtune.choices import AdaptMethod, ConfigError
from vfmtune.config import Config
from vfmtune.fit import fit
from vfmtune.run import ConfigLike, command_config, start_run
from vfmtune.self_training import self_train
from vfmtune.tasks import get_task


def train(
    cfg: ConfigLike = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Fine-tune a backbone + head; write checkpoints, metrics.json and plots into the run directory.

    With `ckpt=RUN/checkpoints/last.ckpt` the run resumes: weights, optimizer, lr schedule, the
    unfreezing state and the RNG state all continue where they stopped. LoRA runs also write a
    peft-standard adapter folder (`adapter/`) next to the checkpoints.

    Args:
        cfg: a composed config (`load_config(...)`), or None to compose one from `overrides`.
        overrides: Hydra override strings, exactly as on the command line.
        run_dir: where the run's files go (default `runs/train/<timestamp>`).
        callbacks: extra Lightning callbacks (Python API only).

    Returns:
        `{"run_dir": ..., "metrics": {...}, "best_checkpoint": ...}`.

    Example:
        >>> result = vfmtune.train(overrides=["data.root=/data/parts", "trainer.max_epochs=5"], run_dir="runs/parts")
        >>> result["metrics"]["test/macro_f1"]
    """
    config = command_config(cfg, overrides, Config, "train")
    task = get_task(config.task)
    if task.command != "train":
        raise ConfigError(f"task={task.name} is trained by `vfmtune {task.command}`, not `vfmtune train`.")
    if config.adapt.method in (AdaptMethod.adabn, AdaptMethod.tent):
        raise ConfigError(f"adapt.method={config.adapt.method} adapts a trained model: "
                          f"vfmtune adapt ckpt=RUN data.target=DIR adapt.method={config.adapt.method}.")
    out = start_run(config, run_dir, "train")
    L.seed_everything(config.seed, workers=True, verbose=False)
    prepared = task.prepare(config, out)
    if config.adapt.method == AdaptMethod.self_training:
        return self_train(task, config, prepared, out, callbacks)
    return fit(task, config, prepared, out, callbacks)
