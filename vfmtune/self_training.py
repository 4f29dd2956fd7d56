"""Self-training on unlabelled target images: rounds of pseudo-labelling and retraining.

Round 0 trains on the labelled source images alone. Each later round labels the target pool
(`data.target`) with the previous round's model, keeps the predictions above `adapt.threshold`,
the same number per class (the least confident class decides, or `adapt.per_class`) so that the
pseudo-labels do not tilt the model further towards what it already predicts, and trains a fresh
model on the source images plus those. Validation and test stay source images with human labels;
`data.target_test` scores every round on labelled target images.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vfmtune.choices import ConfigError
from vfmtune.config import Config
from vfmtune.data.prepare import Prepared
from vfmtune.data.sources import SampleTable
from vfmtune.fit import fit
from vfmtune.io import atomic_path, write_json
from vfmtune.loading import load_model
from vfmtune.tasks.base import Task
from vfmtune.tasks.classify import class_probabilities, target_pool


def select_pseudo_labels(probs: torch.Tensor, threshold: float, per_class: int | None = None) -> tuple[list[int], list[int]]:
    """`(indices, labels)` of confident predictions, class-balanced: at most `per_class` per class, by
    default as many as the class with the fewest confident predictions has (classes with none get none).

    Example:
        >>> select_pseudo_labels(torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.2, 0.8], [0.05, 0.95]]), 0.85)
        ([0, 3], [0, 1])
    """
    confidence, labels = probs.max(1)
    by_class = []
    for c in range(probs.shape[1]):
        idx = torch.nonzero((labels == c) & (confidence >= threshold)).flatten()
        by_class.append(idx[confidence[idx].argsort(descending=True)].tolist())
    counts = [len(i) for i in by_class if i]
    k = per_class if per_class is not None else (min(counts) if counts else 0)
    chosen = [(i, c) for c, idx in enumerate(by_class) for i in idx[:k]]
    chosen.sort()
    return [i for i, _ in chosen], [c for _, c in chosen]


def with_pseudo_labels(prepared: Prepared, paths: Sequence[str], labels: Sequence[int]) -> Prepared:
    """The prepared data with extra training samples (target images and their pseudo-labels)."""
    t = prepared.table
    table = SampleTable(paths=[*t.paths, *paths], labels=[*t.labels, *labels], classes=t.classes)
    return Prepared(table, [*prepared.splits, *["train"] * len(paths)])


def self_train(task: Task, config: Config, prepared: Prepared, out: Path, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """`adapt.rounds` rounds of self-training after a source-only round (each a run in `out/round_<r>`);
    `out` gets the last round's checkpoint and metrics, plus `self_training/...` per-round figures."""
    if task.name != "classify":
        raise ConfigError(f"adapt.method=self_training pseudo-labels classes; task={task.name} is not supported.")
    if not config.data.target:
        raise ConfigError("adapt.method=self_training labels unlabelled target images: set data.target=DIR.")
    pool = target_pool(config, prepared)
    result = fit(task, config, prepared, out / "round_0", callbacks)
    summary: dict[str, Any] = {"self_training/rounds": config.adapt.rounds, "self_training/pool": len(pool)}
    for r in range(1, config.adapt.rounds + 1):
        model = load_model(result["best_checkpoint"])
        indices, labels = select_pseudo_labels(class_probabilities(model, pool, config), config.adapt.threshold, config.adapt.per_class)
        summary[f"self_training/round_{r}/pseudo_labels"] = len(indices)
        print(f"self-training round {r}: {len(indices)} of {len(pool)} target images pseudo-labelled "
              f"(confidence >= {config.adapt.threshold}, class-balanced)")
        L.seed_everything(config.seed, workers=True, verbose=False)
        result = fit(task, config, with_pseudo_labels(prepared, [pool[i] for i in indices], labels), out / f"round_{r}", callbacks)
        summary.update({f"self_training/round_{r}/{k}": v for k, v in result["metrics"].items()
                        if k.startswith(("test/", "target/")) and isinstance(v, float) and k.count("/") == 1})
    with atomic_path(out / "checkpoints" / "best.ckpt") as tmp:  # `out` loads as the adapted model
        shutil.copyfile(result["best_checkpoint"], tmp)
    metrics = {**result["metrics"], **summary, "best_checkpoint": str(out / "checkpoints" / "best.ckpt")}
    write_json(out / "metrics.json", metrics)
    return {**result, "run_dir": str(out), "metrics": metrics, "best_checkpoint": metrics["best_checkpoint"]}
