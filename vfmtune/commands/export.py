"""`vfmtune export`: a trained model to a verified ONNX / TorchScript bundle, optionally INT8."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.config import ConfigError, ExportCommand, ExportFormat
from vfmtune.exporter import export_bundle
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks import get_task


def export(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Export `ckpt` (classifier or distilled student) to a verified bundle; `quantize=int8` adds an INT8 model.

    Returns:
        `{"run_dir", "bundle" (folder), "metrics" (verification, accuracy, latency figures)}`.

    Raises:
        ExportError: an op ONNX cannot express, or a mismatch beyond `export.atol` / the INT8 gates.

    Example:
        >>> r = vfmtune.export(overrides=["ckpt=runs/lite0", "quantize=int8"])
        >>> vfmtune.runtime.Predictor(r["bundle"]).predict(["part.jpg"])
    """
    config = command_config(cfg, overrides, ExportCommand, "export")
    if not config.ckpt:
        raise ConfigError("export needs ckpt=PATH (a checkpoint file or run directory).")
    if config.quantize is not None and config.format != ExportFormat.onnx:
        raise ConfigError(f"quantize={config.quantize}: only quantize=int8 with format=onnx is supported.")
    out = make_run_dir(run_dir, "export")
    model = load_model(config.ckpt)
    task = get_task(model_task(model))
    module, dcfg = task.inference(model)
    # Verification and calibration images: the model's own data and split.
    trained = dataclasses.replace(model.config, cache_dir=config.cache_dir)
    prepared = task.prepare(trained, out)
    return {"run_dir": str(out), **export_bundle(module, dcfg, model.classes, prepared, config, out)}
