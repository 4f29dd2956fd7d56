"""`vfmtune export`: a trained model to a verified ONNX / TorchScript bundle, optionally INT8."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.choices import ConfigError, ExportFormat
from vfmtune.config import ExportCommand
from vfmtune.exporter import export_bundle
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks import get_task


def export(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Export `ckpt` (classifier, segmenter, distilled student, prompted SAM) to a verified bundle; `quantize=int8` adds an INT8
    model. Without `ckpt`, `task=sam_prompt` exports the configured SAM as it comes (e.g. `model=mobile_sam`).

    Returns:
        `{"run_dir", "bundle" (folder), "metrics" (verification, accuracy, latency figures)}`.

    Raises:
        ExportError: an op ONNX cannot express, or a mismatch beyond `export.atol` / the INT8 gates.

    Example:
        >>> r = vfmtune.export(overrides=["ckpt=runs/lite0", "quantize=int8"])
        >>> vfmtune.runtime.open_bundle(r["bundle"]).predict(["part.jpg"])
    """
    config = command_config(cfg, overrides, ExportCommand, "export")
    if config.quantize is not None and config.format != ExportFormat.onnx:
        raise ConfigError(f"quantize={config.quantize}: only quantize=int8 with format=onnx is supported.")
    out = make_run_dir(run_dir, "export")
    model = load_model(config.ckpt) if config.ckpt else None
    task = get_task(model_task(model) if model is not None else config.task)
    own = task.export(model, config, out)
    if own is not None:
        return {"run_dir": str(out), **own}
    if model is None:
        raise ConfigError(f"export needs ckpt=PATH (a checkpoint file or run directory) for task={task.name}.")
    # Verification and calibration images: the model's own data and split.
    trained = dataclasses.replace(model.config, cache_dir=config.cache_dir)
    return {"run_dir": str(out), **export_bundle(task, model, task.prepare(trained, out), config, out)}
