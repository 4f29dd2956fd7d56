"""Figures for looking at data and models before trusting them: one function per figure.

Every `plot_*` function takes plain data (image paths, labels, arrays, metrics dicts) and returns a
matplotlib `Figure`; notebooks show it, `vfmtune explore` and scripts `save` it as PNG. The helpers
that compute what a figure shows (`project`, `outliers`, `leakage_pairs`, `duplicate_threshold`,
`patch_pca`, `calibration`, `foreground_iou`) are public too, so their numbers can be printed or tested. Figures are built without
pyplot (no global state; `vfmtune.report` forces the Agg backend) and show themselves in notebooks
as PNG.

Example:
    >>> e = vfmtune.embed(overrides=["data.dataset=textile"])
    >>> vfmtune.viz.plot_embedding_map(e["features"], e["labels"], e["classes"], paths=e["paths"], splits=e["splits"])
    >>> pairs = vfmtune.viz.leakage_pairs(e["features"], e["splits"])
    >>> baseline = vfmtune.viz.leakage_pairs(e["features"], e["splits"], "train", "train")
    >>> fig = vfmtune.viz.plot_leakage_pairs(e["paths"], pairs, threshold=vfmtune.viz.duplicate_threshold(baseline), baseline=baseline)
    >>> vfmtune.viz.save(fig, "plots/leakage.png")
"""

from __future__ import annotations

from vfmtune.viz._base import DPI, save, spread_over_classes, thumbnail
from vfmtune.viz.data import (
    Pair,
    duplicate_threshold,
    leakage_pairs,
    outliers,
    patch_pca,
    plot_class_grid,
    plot_embedding_map,
    plot_leakage_pairs,
    plot_patch_pca,
    project,
)
from vfmtune.viz.masks import foreground_iou, plot_instances, plot_mask_comparison
from vfmtune.viz.models import (
    calibration,
    plot_accuracy_latency,
    plot_disagreements,
    plot_misclassified,
    plot_predictions,
    plot_recall_by_method,
    plot_reliability,
    plot_resampling,
)

__all__ = [
    "DPI",
    "Pair",
    "calibration",
    "duplicate_threshold",
    "foreground_iou",
    "leakage_pairs",
    "outliers",
    "patch_pca",
    "plot_accuracy_latency",
    "plot_class_grid",
    "plot_disagreements",
    "plot_embedding_map",
    "plot_instances",
    "plot_leakage_pairs",
    "plot_mask_comparison",
    "plot_misclassified",
    "plot_patch_pca",
    "plot_predictions",
    "plot_recall_by_method",
    "plot_reliability",
    "plot_resampling",
    "project",
    "save",
    "spread_over_classes",
    "thumbnail",
]
