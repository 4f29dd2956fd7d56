"""`vfmtune evaluate`: recompute a trained model's metrics on a split of its data, or on new data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vfmtune.config import Config, ConfigError, EvaluateCommand, SplitName
from vfmtune.data.images import DataError
from vfmtune.data.prepare import Prepared
from vfmtune.inference import score, write_class_predictions
from vfmtune.io import write_json
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir, quiet, with_overrides
from vfmtune.tasks import get_task


def evaluate(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Recompute metrics.json for `ckpt` on a split (`split=test` by default) of its data, or of the
    data named by `data.*` overrides (e.g. `data.root=/new/images split=all`).

    A classifier also writes `predictions.csv` (path, label, predicted class, every class's probability).

    Returns:
        `{"run_dir", "metrics"}`; for classifiers also `"predictions"` (the CSV), `"paths"`, `"labels"`,
        `"probs"` (`[N, C]` numpy array), in the split's order, and `"classes"`.

    Example:
        >>> vfmtune.evaluate(overrides=["ckpt=runs/train/<date>", "split=val"])["metrics"]["val/macro_f1"]
    """
    config = command_config(cfg, overrides, EvaluateCommand, "evaluate")
    if not config.ckpt:
        raise ConfigError("evaluate needs ckpt=PATH (a .ckpt file or a run directory).")
    out = make_run_dir(run_dir, "evaluate")
    model = load_model(config.ckpt)
    task = get_task(model_task(model))
    run_cfg = trained_run_config(model.config, config, overrides)
    prepared = align_classes(task.prepare(run_cfg, out), model.classes)
    split = str(config.split)
    if config.split != SplitName.all and split not in prepared.splits:
        raise DataError(f"The {split} split of this data is empty; use split=all to evaluate every image.")
    module, batches = task.evaluation(run_cfg, model, prepared, split)
    outputs: list[torch.Tensor] | None = [] if task.target == "class" else None  # masks would not fit in memory
    metrics = score(module, batches, task.metrics, model.classes, split, run_cfg, outputs)
    metrics["checkpoint"] = str(config.ckpt)
    task.report(metrics, model.classes, out, [split])
    write_json(out / "metrics.json", metrics)
    result: dict[str, Any] = {"run_dir": str(out), "metrics": metrics}
    if outputs is not None:
        paths, labels = prepared.subset(split)
        probs = torch.cat(outputs).softmax(-1) if outputs else torch.empty(0, len(model.classes))
        write_class_predictions(out / "predictions.csv", paths, probs, model.classes, labels)
        result.update({"predictions": str(out / "predictions.csv"), "paths": paths, "labels": labels, "probs": probs.numpy(),
                       "classes": list(model.classes)})
    print(f"run directory: {out}")
    return result


def trained_run_config(trained: Config, config: Config, overrides: Sequence[str]) -> Config:
    """The config a trained model ran with, plus this command's `data.*` overrides, cache, trainer and seed."""
    run_cfg = with_overrides(trained, overrides, "data", type(trained))
    return quiet(dataclasses.replace(run_cfg, cache_dir=config.cache_dir, trainer=config.trainer))


def align_classes(prepared: Prepared, classes: Sequence[str]) -> Prepared:
    """Re-index the data's labels to the model's classes (new data may hold a subset of them); mask
    values are class ids already, so masks only need to stay within the model's classes."""
    table = prepared.table
    if table.classes == list(classes):
        return prepared
    if table.masks is not None:
        if len(table.classes) > len(classes):
            raise DataError(f"The masks hold class ids up to {len(table.classes) - 1} but the checkpoint knows "
                            f"{len(classes)} classes {list(classes)}.")
        table.classes = list(classes)
        return prepared
    unknown = sorted(set(table.classes) - set(classes))
    if unknown:
        raise DataError(f"Classes {unknown} are not among the checkpoint's classes {list(classes)}.")
    index = {c: list(classes).index(c) for c in table.classes}
    table.labels = [index[table.classes[y]] for y in table.labels]
    table.classes = list(classes)
    return prepared
