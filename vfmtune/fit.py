"""The one place a Trainer is built and run: `train`, every `cv` fold and `distill` go through `fit`.

It adds what every run needs around the task's own module and data: atomic best/last checkpoints
(resume-safe), exact resume (optimizer, schedule, callbacks' state and RNG state), peak memory, early
stopping, the configured extra callbacks, the logger, validation and test with the best weights, and
the run report (`metrics.json`, plots, results table).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from vfmtune.checkpoint import resolve_checkpoint
from vfmtune.config import Config, safe_instantiate
from vfmtune.data.prepare import Prepared, require_splits
from vfmtune.io import write_json
from vfmtune.memory import PeakMemory
from vfmtune.rng import RNGState
from vfmtune.run import build_trainer
from vfmtune.tasks.base import Task


def fit(task: Task, config: Config, prepared: Prepared, out: Path, callbacks: Sequence[L.Callback] = (),
        **context: Any) -> dict[str, Any]:
    """Train `task` on an already prepared (scanned, split) dataset and report it in `out`.

    Args:
        task: the registry entry whose module and data `task.setup` builds.
        config: the run's config; `config.ckpt` resumes from a `last.ckpt`.
        prepared: the split dataset.
        out: the run directory.
        callbacks: extra Lightning callbacks (Python API).
        context: passed to `task.setup` (e.g. the distillation teacher).

    Returns:
        `{"run_dir", "metrics", "best_checkpoint"}` plus what `task.after_fit` adds (e.g. "adapter").
    """
    require_splits(prepared, "train", *(("val",) if config.data.val_fraction > 0 else ()))
    has_val = "val" in prepared.splits
    setup = task.setup(config, prepared, out, **context)
    model, data = setup.model, setup.data
    monitor = config.monitor if has_val else None
    # last.ckpt is its own checkpoint, written every epoch: Lightning's save_last only rewrites it in
    # epochs where the monitored metric improved, which would resume runs from a stale epoch.
    last_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    best_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max",
                              auto_insert_metric_name=False, enable_version_counter=False) if monitor else None
    memory = PeakMemory()
    all_callbacks: list[L.Callback] = [*([best_cb] if best_cb else []), last_cb, RNGState(), memory, *setup.callbacks]
    stop = config.early_stopping
    if stop.enabled and monitor:
        all_callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=stop.patience, min_delta=stop.min_delta))
    all_callbacks += [safe_instantiate(c, f"callbacks[{i}]") for i, c in enumerate(config.callbacks)]
    all_callbacks += list(callbacks)
    trainer = build_trainer(config, out, all_callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=str(resolve_checkpoint(config.ckpt)) if config.ckpt else None)
    train_seconds = time.perf_counter() - t0
    best = (best_cb.best_model_path if best_cb else "") or last_cb.best_model_path
    metrics: dict[str, Any] = {}
    for split, run in (("val", trainer.validate), ("test", trainer.test)):
        if split in prepared.splits:
            run(model, datamodule=data, ckpt_path=best, verbose=False)
            metrics.update(model.eval_results[split])
    metrics.update({"best_checkpoint": str(best), "epochs": trainer.current_epoch, "train_seconds": round(train_seconds, 2),
                    # every report says how much of the training data was made, not collected (data.synthetic)
                    "train_images": prepared.splits.count("train"), "train_images_synthetic": prepared.synthetic,
                    **memory.figures, **setup.figures})
    result: dict[str, Any] = {"run_dir": str(out), "metrics": metrics, "best_checkpoint": str(best)}
    if trainer.is_global_zero:
        result.update(task.after_fit(model, out, prepared))
        task.report(metrics, prepared.table.classes, out, [s for s in ("val", "test") if s in prepared.splits])
        write_json(out / "metrics.json", metrics)
        print(f"run directory: {out}")
    return result
