"""`vfmtune cv`: stratified k-fold cross-validation over train+val, and the fold ensemble on test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from vfmtune.choices import ConfigError
from vfmtune.config import CVCommand
from vfmtune.data.prepare import Prepared
from vfmtune.data.splits import save_splits
from vfmtune.fit import fit
from vfmtune.folds import CV_MARKER, aggregate, fold_splits, make_folds, save_folds
from vfmtune.inference import score
from vfmtune.io import write_json
from vfmtune.loading import load_model
from vfmtune.run import ConfigLike, command_config, quiet, start_run
from vfmtune.tasks import get_task


def cv(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Stratified k-fold cross-validation (`folds=5`) over train+val; the test split stays held out.

    One model per fold in `<run_dir>/fold_<i>/`; `metrics.json` holds `<metric>/mean` and
    `<metric>/std` over the folds and `ensemble/test/<metric>` for the fold models' averaged
    probabilities on the test split. The run directory can be passed as `ckpt=` to `evaluate` and
    `predict`, which then use the ensemble.

    Example:
        >>> result = vfmtune.cv(overrides=["folds=5", "loss=weighted_ce"], run_dir="runs/cv5")
        >>> result["metrics"]["test/balanced_accuracy/mean"], result["metrics"]["test/balanced_accuracy/std"]
    """
    config = command_config(cfg, overrides, CVCommand, "cv")
    task = get_task(config.task)
    if task.name != "classify":
        raise ConfigError(f"cv supports task=classify (stratified folds and a probability ensemble), not task={task.name}.")
    out = start_run(config, run_dir, "cv")
    prepared = task.prepare(config, out)
    table = prepared.table
    folds = make_folds(table.labels, prepared.splits, config.folds, config.data.seed, table.classes)
    save_folds(out / "folds.csv", table.paths, table.labels, table.classes, folds)
    results = []
    for k in range(config.folds):
        print(f"\n=== fold {k + 1}/{config.folds} ===")
        fold_dir = out / f"fold_{k}"
        fold = Prepared(table, fold_splits(prepared.splits, folds, k))
        save_splits(fold_dir / "splits.csv", table.paths, table.labels, table.classes, fold.splits)
        L.seed_everything(config.seed, workers=True, verbose=False)
        results.append(fit(task, config, fold, fold_dir))
    # Written before the ensemble is loaded: cv.json is what marks this directory as a cv run.
    write_json(out / CV_MARKER, {"folds": config.folds, "fold_runs": [f"fold_{k}" for k in range(config.folds)]})
    metrics: dict[str, Any] = {**aggregate([r["metrics"] for r in results]), "folds": config.folds}
    if "test" in prepared.splits:
        ensemble = load_model(out)
        module, batches = task.evaluation(quiet(config), ensemble, prepared, "test")
        scored = score(module, batches, task.metrics, table.classes, "test", config)
        metrics.update({f"ensemble/{k}": v for k, v in scored.items()})
        task.report(scored, table.classes, out, ("test",))
    write_json(out / "metrics.json", metrics)
    for name in ("balanced_accuracy", "macro_f1", "accuracy"):
        if f"test/{name}/mean" in metrics:
            line = f"  test {name:<18} {metrics[f'test/{name}/mean']:.4f} ± {metrics[f'test/{name}/std']:.4f} over {config.folds} folds"
            if f"ensemble/test/{name}" in metrics:
                line += f"; ensemble {metrics[f'ensemble/test/{name}']:.4f}"
            print(line)
    return {"run_dir": str(out), "metrics": metrics, "fold_runs": [r["run_dir"] for r in results]}
