"""Stratified k-fold cross-validation: persisted folds, mean ± std of metrics, and the fold ensemble.

`vfmtune cv folds=5` pools the train and val splits, cuts them into k stratified folds
(scikit-learn `StratifiedKFold`), trains one model per fold (that fold validates, the others
train) and keeps the test split held out for every fold. The run directory holds `folds.csv`,
`cv.json` (which marks it as a cv run), `fold_<i>/` (a full training run each) and `metrics.json`
with `<metric>/mean` and `<metric>/std` over folds plus `ensemble/test/...`: the fold models'
averaged probabilities scored on the test split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from typing_extensions import override

from vfmtune.config import ConfigError
from vfmtune.data.images import DataError
from vfmtune.metrics import classification_metrics, flatten

CV_MARKER = "cv.json"


def make_folds(labels: Sequence[int], splits: Sequence[str], k: int, seed: int, classes: Sequence[str]) -> list[int]:
    """Fold index (0..k-1) per sample of train+val, -1 for test samples (held out of every fold).

    Raises:
        DataError: when k is larger than the smallest class of train+val (a fold would lack it).

    Example:
        >>> make_folds([0, 0, 1, 1], ["train"] * 4, k=2, seed=0, classes=["a", "b"])
        [1, 0, 0, 1]
    """
    if k < 2:
        raise ConfigError(f"folds={k}: cross-validation needs at least 2 folds, e.g. folds=5.")
    pool = [i for i, s in enumerate(splits) if s != "test"]
    y = np.asarray([labels[i] for i in pool])
    counts = np.bincount(y, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        raise DataError(
            f"folds={k} is larger than the smallest class: '{classes[smallest]}' has {counts[smallest]} train+val "
            f"images, so some folds would have none of it. Fix: folds={max(int(counts[smallest]), 2)} or fewer, or add images."
        )
    folds = [-1] * len(labels)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(skf.split(np.zeros(len(y)), y)):
        for j in held:
            folds[pool[j]] = fold
    return folds


def fold_splits(splits: Sequence[str], folds: Sequence[int], fold: int) -> list[str]:
    """The train/val/test assignment of one fold: that fold validates, the other folds train."""
    return ["test" if s == "test" else ("val" if f == fold else "train") for s, f in zip(splits, folds)]


def save_folds(path: str | os.PathLike, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], folds: Sequence[int]) -> None:
    """`path,label,fold` rows (fold = test for the held-out split), so the folds can be audited and reused."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "fold"])
        writer.writerows((p, classes[y], "test" if k < 0 else k) for p, y, k in zip(paths, labels, folds))
    os.replace(tmp, path)


def aggregate(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`<key>/mean` and `<key>/std` (population std over folds) of every scalar metric."""
    out: dict[str, float] = {}
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k]
    for key in keys:
        values = np.asarray([m[key] for m in fold_metrics if key in m], dtype=float)
        out[f"{key}/mean"] = float(values.mean())
        out[f"{key}/std"] = float(values.std())
    return out


def is_cv_run(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / CV_MARKER).is_file()


def fold_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The fold run directories of a cv run, from its `cv.json`."""
    root = Path(run_dir).expanduser()
    info = json.loads((root / CV_MARKER).read_text())
    return [root / d for d in info["fold_runs"]]


class Ensemble(L.LightningModule):
    """Averages the class probabilities of several classifiers (e.g. the k fold models of a cv run).

    `forward` returns log of the mean probabilities [B, C], so argmax and softmax behave as for one
    model. When every member has the same frozen backbone (a frozen-backbone cv run), the backbone
    runs once per batch and only the heads differ.

    Args:
        members: trained `Classifier`s with the same classes.
        shared_backbone: all members' backbones are frozen and identical.

    Example:
        >>> model = vfmtune.load_model("runs/cv/<date>")  # an Ensemble of the fold models
        >>> probs = model(images).exp()  # [B, C]
    """

    def __init__(self, members: Sequence[nn.Module], shared_backbone: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.classes = list(members[0].classes)
        self.config = members[0].config
        self.shared_backbone = shared_backbone
        self.test_metrics = classification_metrics(len(self.classes))
        self.eval_results: dict[str, dict[str, Any]] = {}

    @property
    def backbone(self) -> nn.Module:
        return self.members[0].backbone

    @property
    def progressive(self) -> bool:
        return bool(self.members[0].progressive)

    @property
    def embeddings_input(self) -> bool:
        return bool(self.members[0].embeddings_input)

    @embeddings_input.setter
    def embeddings_input(self, value: bool) -> None:
        for m in self.members:
            m.embeddings_input = value

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.shared_backbone and not self.embeddings_input:
            feats = self.backbone(inputs)
            probs = torch.stack([m.head(feats).softmax(-1) for m in self.members])
        else:
            probs = torch.stack([m.logits(inputs).softmax(-1) for m in self.members])
        return probs.mean(0).clamp(min=1e-12).log()

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> log mean probabilities [B, C]."""
        return self.logits(images)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_metrics.update(self.logits(x).argmax(-1), y)

    @override
    def on_test_epoch_end(self) -> None:
        self.eval_results["test"] = flatten(self.test_metrics.compute(), "test", self.classes)
        self.test_metrics.reset()

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.logits(x).exp()
