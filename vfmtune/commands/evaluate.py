"""`vfmtune evaluate`: recompute a trained model's metrics on a split of its data, or on new data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vfmtune.choices import ConfigError, SplitName
from vfmtune.config import Config, EvaluateCommand
from vfmtune.data.images import DataError
from vfmtune.data.prepare import align_classes
from vfmtune.inference import score, write_class_predictions
from vfmtune.io import write_json
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir, quiet, with_overrides
from vfmtune.tasks import get_task


def evaluate(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Recompute metrics.json for `ckpt` on a split (`split=test` by default) of its data, or of the
    data named by `data.*` overrides (e.g. `data.root=/new/images split=all`). With `predictions=DIR` instead
    of a ckpt, score a `vfmtune auto-mask` output against the instances of `data.*` (instance IoU, Dice,
    mask AP, panoptic quality).

    A classifier also writes `predictions.csv` (path, label, predicted class, every class's probability).

    Returns:
        `{"run_dir", "metrics"}`; for classifiers also `"predictions"` (the CSV), `"paths"`, `"labels"`,
        `"probs"` (`[N, C]` numpy array), in the split's order, and `"classes"`.

    Example:
        >>> vfmtune.evaluate(overrides=["ckpt=runs/train/<date>", "split=val"])["metrics"]["val/macro_f1"]
        >>> vfmtune.evaluate(overrides=["predictions=runs/labels", "data.root=data/nuclei"])["metrics"]["all/mask_ap"]
    """
    config = command_config(cfg, overrides, EvaluateCommand, "evaluate")
    if config.predictions:
        from vfmtune.cache_dir import cache_dir
        from vfmtune.instance_metrics import score_predictions

        out = make_run_dir(run_dir, "evaluate")
        metrics = score_predictions(config.predictions, config.data, cache_dir(config.cache_dir))
        write_json(out / "metrics.json", metrics)
        print("  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.count("/") == 1 and isinstance(v, float)))
        print(f"run directory: {out}")
        return {"run_dir": str(out), "metrics": metrics}
    if not config.ckpt:
        raise ConfigError("evaluate needs ckpt=PATH (a .ckpt file or a run directory), or predictions=DIR (an auto-mask output).")
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
