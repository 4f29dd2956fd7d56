"""The one place a Trainer is built and run: `train`, every `cv` fold and `distill` go through `fit`.

It adds what every run needs around the task's own module and data: the precision (`vfmtune.precision`),
atomic best/last checkpoints (resume-safe), exact resume (optimizer, schedule, callbacks' state and RNG
state), peak memory, early stopping, the configured extra callbacks, the logger, validation and test with
the best weights, and the run report (`metrics.json`, plots, results table).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from vfmtune.checkpoint import LastCheckpoint, resolve_checkpoint
from vfmtune.choices import ConfigError
from vfmtune.compose import safe_instantiate
from vfmtune.config import Config
from vfmtune.data.prepare import Prepared, align_classes, require_splits
from vfmtune.data.sources import from_imagefolder
from vfmtune.device import OneThread
from vfmtune.inference import score
from vfmtune.io import write_json
from vfmtune.memory import PeakMemory
from vfmtune.precision import resolve_precision, trainer_precision
from vfmtune.rng import RNGState
from vfmtune.run import build_trainer, quiet
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
    # last.ckpt every epoch; a tiny head's epochs take milliseconds, so it writes it at most every 10 s (a crash
    # loses less than that) plus the first and final epoch: written every epoch, its 300 epochs took 2-3 s longer.
    last_cb = LastCheckpoint(out / "checkpoints", min_seconds=10.0 if setup.tiny_head else 0.0)
    best_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max",
                              auto_insert_metric_name=False, enable_version_counter=False) if monitor else None
    memory = PeakMemory()
    all_callbacks: list[L.Callback] = [*([best_cb] if best_cb else []), last_cb, RNGState(), memory, ValidateFinalEpoch(), *setup.callbacks,
                                       *([OneThread()] if setup.tiny_head else [])]
    stop = config.early_stopping
    if stop.enabled and monitor:
        all_callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=stop.patience, min_delta=stop.min_delta))
    all_callbacks += [safe_instantiate(c, f"callbacks[{i}]") for i, c in enumerate(config.callbacks)]
    all_callbacks += list(callbacks)
    precision = resolve_precision(config)
    train_precision, why = trainer_precision(config, precision, setup.fp32_training)
    print(f"precision: {precision}; training: {train_precision} ({why})")
    trainer = build_trainer(config, out, all_callbacks, precision=train_precision)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=str(resolve_checkpoint(config.ckpt)) if config.ckpt else None)
    # Datasets built in the datamodule's setup (the embedding / teacher cache pass) are timed apart from training.
    data_seconds = float(getattr(data, "setup_seconds", 0.0))
    train_seconds = time.perf_counter() - t0 - data_seconds
    best = (best_cb.best_model_path if best_cb else "") or last_cb.best_model_path
    metrics: dict[str, Any] = {}
    for split, run in (("val", trainer.validate), ("test", trainer.test)):
        if split in prepared.splits:
            run(model, datamodule=data, ckpt_path=best, verbose=False)
            metrics.update(model.eval_results[split])
    if config.data.target_test:
        metrics.update(score_target(task, model, config))
    metrics.update({"best_checkpoint": str(best), "epochs": trainer.current_epoch, "train_seconds": round(train_seconds, 2),
                    "data_setup_seconds": round(data_seconds, 2),
                    "precision": str(precision.precision), "precision_reason": precision.reason,
                    "trainer_precision": train_precision, "trainer_precision_reason": why,
                    # every report says how much of the training data was made, not collected (data.synthetic)
                    "train_images": prepared.splits.count("train"), "train_images_synthetic": prepared.synthetic,
                    **memory.figures, **setup.figures})
    result: dict[str, Any] = {"run_dir": str(out), "metrics": metrics, "best_checkpoint": str(best)}
    if trainer.is_global_zero:
        result.update(task.after_fit(model, out, prepared))
        prefixes = [s for s in ("val", "test") if s in prepared.splits] + (["target"] if config.data.target_test else [])
        task.report(metrics, prepared.table.classes, out, prefixes)
        write_json(out / "metrics.json", metrics)
        print(f"precision: {precision.precision}, training {train_precision}; run directory: {out}")
    return result


class ValidateFinalEpoch(L.Callback):
    """Validates the final epoch whatever `trainer.check_val_every_n_epoch` says (Lightning validates only epochs
    the cadence divides): the run's best checkpoint then always weighs the fully trained model, and a run shorter
    than the cadence still has one."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == trainer.max_epochs:
            trainer.check_val_every_n_epoch = 1


def score_target(task: Task, model: L.LightningModule, config: Config) -> dict[str, Any]:
    """Metrics on `data.target_test` (labelled images of the target domain, an ImageFolder of the model's
    classes), keyed `target/<metric>`: the run's report shows source (test) and target side by side."""
    if task.target != "class":
        raise ConfigError(f"data.target_test scores classifiers; task={task.name} reads its target test set with evaluate.")
    table = align_classes(Prepared(from_imagefolder(config.data.target_test), []), model.classes).table
    target = Prepared(table, ["test"] * len(table))
    module, batches = task.evaluation(quiet(config), model.eval(), target, "test")
    return score(module, batches, task.metrics, model.classes, "target", config)
