"""Running a trained model outside training: outputs over a dataset, and its metrics."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vfmtune.config import Config
from vfmtune.device import compute_device
from vfmtune.faults import fault_point
from vfmtune.io import atomic_path
from vfmtune.metrics import MetricSpec
from vfmtune.precision import resolve_precision


def eval_loader(dataset: Dataset, config: Config, batch_size: int | None = None) -> DataLoader:
    """Batches for evaluation or prediction (`batch_size=1` for images of different sizes)."""
    # In-memory features need no worker processes; images are decoded in parallel.
    workers = 0 if isinstance(dataset, TensorDataset) else config.data.num_workers
    return DataLoader(dataset, batch_size=batch_size or config.data.batch_size, num_workers=workers)


def _autocast(dataset: Dataset, config: Config) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    # Images go through a backbone in the run's precision; a head on cached features runs in fp32, as it
    # trained (the backbone already ran, in the precision the cache key records).
    return contextlib.nullcontext if isinstance(dataset, TensorDataset) else resolve_precision(config).autocast


@torch.inference_mode()
def run_inference(module: nn.Module, dataset: Dataset, config: Config) -> torch.Tensor:
    """`module(inputs)` for every `(inputs, target)` of `dataset`, concatenated on the CPU as float32, on the
    run's device and in its precision (`config.precision`)."""
    device = compute_device(config)
    module = module.eval().to(device)
    autocast, outputs = _autocast(dataset, config), []
    for x, _ in eval_loader(dataset, config):
        with autocast():
            outputs.append(module(x.to(device)).float().cpu())
        fault_point("inference_batch")
    return torch.cat(outputs) if outputs else torch.empty(0)


@torch.inference_mode()
def score(module: nn.Module, loader: DataLoader, spec: MetricSpec, classes: Sequence[str], prefix: str, config: Config,
          outputs: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The metrics of `module` on the `(inputs, targets)` batches of `loader`, keyed `<prefix>/<metric>` as in
    metrics.json (precision as in `run_inference`); each batch's outputs are appended to `outputs` (on the CPU)
    when a list is given."""
    device = compute_device(config)
    module = module.eval().to(device)
    metrics = spec.build(classes).to(device)
    autocast = _autocast(loader.dataset, config)
    for x, y in loader:
        with autocast():
            out = module(x.to(device))
        if isinstance(out, torch.Tensor):  # logits; SAM's outputs are per-image lists the spec reads as they are
            out = out.float()
        spec.update(metrics, out, y.to(device))
        if outputs is not None:
            outputs.append(out.cpu() if isinstance(out, torch.Tensor) else out)
    return spec.results(metrics.compute(), prefix, classes)


def write_class_predictions(path: str | os.PathLike[str], paths: Sequence[str], probs: torch.Tensor, classes: Sequence[str],
                            labels: Sequence[int] | None = None) -> None:
    """`predictions.csv`: path, the true label (when known), the predicted class and every class's probability."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *(["label"] if labels is not None else []), "class", *(f"p_{c}" for c in classes)])
        for k, (p, row) in enumerate(zip(paths, probs.tolist())):
            known = [classes[labels[k]]] if labels is not None else []
            writer.writerow([p, *known, classes[int(row.index(max(row)))], *(f"{v:.6f}" for v in row)])
