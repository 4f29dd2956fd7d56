"""What a run leaves behind: metrics.json, plots/ and the printed results table."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import numpy as np


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2.5))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CLASS_CURVES = ("val/macro_f1", "val/balanced_accuracy", "val/accuracy")


def plot_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike, metrics: Sequence[str] = CLASS_CURVES) -> bool:
    """Training and validation loss and the validation `metrics` per epoch from Lightning's CSVLogger
    file; False if there is nothing to plot."""
    if not Path(metrics_csv).is_file():
        return False
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        for key in ("train/loss_epoch", "val/loss", *metrics):
            if row.get(key):
                series.setdefault(key, []).append((float(row["epoch"]), float(row[key])))
    if not series:
        return False
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, points in series.items():
        ax = ax_loss if key.endswith(("loss", "loss_epoch")) else ax_metric
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def results_table(metrics: dict[str, Any], classes: Sequence[str], prefix: str = "test") -> str:
    """Overall metrics and a per-class precision / recall / F1 table."""
    lines = [f"{prefix} results"]
    lines += [f"  {name:<18} {metrics[f'{prefix}/{name}']:.4f}" for name in ("accuracy", "balanced_accuracy", "macro_f1")
              if f"{prefix}/{name}" in metrics]
    width = max(len(c) for c in classes) + 2
    lines.append(f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    matrix = metrics.get(f"{prefix}/confusion_matrix")
    for i, cls in enumerate(classes):
        support = sum(matrix[i]) if matrix else 0
        p, r, f = (metrics.get(f"{prefix}/{m}/{cls}", float("nan")) for m in ("precision", "recall", "f1"))
        lines.append(f"  {cls:<{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {support:>8}")
    return "\n".join(lines)


def split_summary(labels: Sequence[int], splits: Sequence[str], classes: Sequence[str]) -> str:
    """Class distribution of each split, printed at the start of a run so imbalance is visible."""
    names = [s for s in ("train", "val", "test") if s in set(splits)]
    width = max(len(c) for c in classes) + 2
    lines = [f"  {'class':<{width}}" + "".join(f"{s:>8}" for s in names)]
    for i, cls in enumerate(classes):
        counts = [sum(1 for y, s in zip(labels, splits) if y == i and s == name) for name in names]
        lines.append(f"  {cls:<{width}}" + "".join(f"{c:>8}" for c in counts))
    lines.append(f"  {'total':<{width}}" + "".join(f"{sum(1 for s in splits if s == n):>8}" for n in names))
    return "\n".join(lines)


def plot_per_class(metrics: dict[str, Any], classes: Sequence[str], prefix: str, path: str | os.PathLike) -> bool:
    """Grouped bars of per-class precision, recall and F1 (support in the labels): where a rare
    class is being ignored, its recall bar shows it even when overall accuracy looks fine."""
    names = ("precision", "recall", "f1")
    if not all(f"{prefix}/{m}/{c}" in metrics for m in names for c in classes):
        return False
    matrix = metrics.get(f"{prefix}/confusion_matrix")
    x = np.arange(len(classes))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(classes) + 2), 4))
    for i, m in enumerate(names):
        ax.bar(x + (i - 1) * width, [metrics[f"{prefix}/{m}/{c}"] for c in classes], width, label=m)
    labels = [f"{c}\n(n={sum(matrix[i])})" if matrix else c for i, c in enumerate(classes)]
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.2)  # headroom for the legend above the bars
    ax.set_ylabel("score")
    title = f"{prefix}: per-class scores"
    if f"{prefix}/balanced_accuracy" in metrics:
        title += f" (balanced acc {metrics[f'{prefix}/balanced_accuracy']:.3f}, macro-F1 {metrics[f'{prefix}/macro_f1']:.3f})"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def classification_report(metrics: dict[str, Any], classes: Sequence[str], run_dir: Path, prefixes: Sequence[str]) -> None:
    """Confusion matrices, per-class bars and curves into `run_dir/plots`; the results table printed."""
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for prefix in prefixes:
        if f"{prefix}/confusion_matrix" in metrics:
            plot_confusion_matrix(metrics[f"{prefix}/confusion_matrix"], classes, plots / f"confusion_matrix_{prefix}.png",
                                  f"{prefix} confusion matrix")
            plot_per_class(metrics, classes, prefix, plots / f"per_class_{prefix}.png")
    plot_curves(Path(run_dir) / "logs" / "metrics.csv", plots / "curves.png")
    for prefix in prefixes:
        if f"{prefix}/accuracy" in metrics:
            print(results_table(metrics, classes, prefix))


def voc_palette(n: int = 256) -> np.ndarray:
    """`[n, 3]` uint8 colours of the PASCAL VOC palette (class 0 black, then well-separated hues), so a
    predicted mask saved as a palette PNG shows in colour and still stores class ids."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB `[H, W, 3]` uint8 with class colours blended over every non-background pixel."""
    colours = voc_palette()[ids]
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.where((ids > 0)[..., None] & (ids < 255)[..., None], blend, image).astype(np.uint8)


def plot_overlays(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike, title: str) -> None:
    """A grid: per image (name, RGB, true ids, predicted ids) the image, the truth and the prediction."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (name, image, truth, pred) in enumerate(rows):
        for c, (panel, label) in enumerate(((image, name), (overlay(image, truth), "truth"), (overlay(image, pred), "prediction"))):
            axes[r, c].imshow(panel)
            axes[r, c].set_title(label, fontsize=8)
            axes[r, c].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class_iou(metrics: dict[str, Any], classes: Sequence[str], prefix: str, path: str | os.PathLike) -> bool:
    """Bars of per-class IoU and Dice: where a rare class fails, its bar shows it even when mIoU looks fine."""
    if not any(metrics.get(f"{prefix}/iou/{c}") is not None for c in classes):
        return False
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(classes) + 2), 4))
    for i, name in enumerate(("iou", "dice")):
        ax.bar(x + (i - 0.5) * 0.4, [metrics.get(f"{prefix}/{name}/{c}") or 0.0 for c in classes], 0.4, label=name)
    ax.set_xticks(x, list(classes), rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{prefix}: per-class IoU / Dice (mIoU {metrics[f'{prefix}/miou']:.3f})", fontsize=9)
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def mask_results_table(metrics: dict[str, Any], classes: Sequence[str], prefix: str = "test") -> str:
    """mIoU, Dice, pixel accuracy, boundary IoU and per-class IoU / Dice / boundary IoU."""
    def fmt(v: Any) -> str:
        return f"{v:>9.4f}" if isinstance(v, float) else f"{'-':>9}"

    lines = [f"{prefix} results"]
    lines += [f"  {name:<18} {metrics[f'{prefix}/{name}']:.4f}" for name in ("miou", "dice", "pixel_accuracy", "boundary_iou")
              if isinstance(metrics.get(f"{prefix}/{name}"), float)]
    width = max(len(c) for c in classes) + 2
    lines.append(f"  {'class':<{width}} {'iou':>9} {'dice':>9} {'boundary':>9}")
    lines += [f"  {c:<{width}} {fmt(metrics.get(f'{prefix}/iou/{c}'))} {fmt(metrics.get(f'{prefix}/dice/{c}'))} "
              f"{fmt(metrics.get(f'{prefix}/boundary_iou/{c}'))}" for c in classes]
    return "\n".join(lines)


MASK_CURVES = ("val/miou", "val/dice", "val/boundary_iou")


def segmentation_report(metrics: dict[str, Any], classes: Sequence[str], run_dir: Path, prefixes: Sequence[str]) -> None:
    """Per-class IoU bars and curves into `run_dir/plots`; the results table printed."""
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for prefix in prefixes:
        plot_per_class_iou(metrics, classes, prefix, plots / f"per_class_iou_{prefix}.png")
    plot_curves(Path(run_dir) / "logs" / "metrics.csv", plots / "curves.png", MASK_CURVES)
    for prefix in prefixes:
        if f"{prefix}/miou" in metrics:
            print(mask_results_table(metrics, classes, prefix))


def plot_shift(source_2d: np.ndarray, target_2d: np.ndarray, source_conf: np.ndarray, target_conf: np.ndarray,
               metrics: dict[str, Any], folder: Path) -> None:
    """`shift_map.png`: both domains on the first two principal components of their embeddings;
    `shift_confidence.png`: the model's confidence on each domain."""
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*source_2d.T, s=6, alpha=0.5, label=f"training images (n={len(source_2d)})")
    ax.scatter(*target_2d.T, s=6, alpha=0.5, label=f"target images (n={len(target_2d)})")
    ax.set_title(f"embeddings, PCA: domain classifier AUC {metrics['domain_auc']:.3f}, MMD² {metrics['mmd2']:.4f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "shift_map.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 21)
    ax.hist(source_conf, bins=bins, alpha=0.6, density=True, label="training images")
    ax.hist(target_conf, bins=bins, alpha=0.6, density=True, label="target images")
    ax.set_xlabel("confidence (max class probability)")
    ax.set_title(f"mean confidence {metrics['source/confidence']:.3f} -> {metrics['target/confidence']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "shift_confidence.png", dpi=120)
    plt.close(fig)
