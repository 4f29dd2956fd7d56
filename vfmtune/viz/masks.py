"""Figures of masks: truth vs predictions as overlays, SAM instances with their prompt boxes and scores."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vfmtune.viz._base import (
    _colours,
    _figure,
    _image_axis,
)


def _ids(mask: str | os.PathLike[str] | ArrayLike) -> np.ndarray:
    """A class or instance map given as a PNG path (palette or grey, as `vfmtune` writes them) or an array."""
    if isinstance(mask, (str, os.PathLike)):
        from PIL import Image

        with Image.open(mask) as im:
            return np.asarray(im)
    return np.asarray(mask)


def _rgb(path: str | os.PathLike[str]) -> np.ndarray:
    from vfmtune.data.images import load_image

    return np.asarray(load_image(path).convert("RGB"))


def foreground_iou(truth: ArrayLike, prediction: ArrayLike, ignore: int = 255) -> float | None:
    """IoU of the non-background pixels of two class maps (pixels `ignore` in `truth` left out); None when both are empty."""
    t, p = _ids(truth), _ids(prediction)
    valid = t != ignore
    a, b = (t > 0) & valid, (p > 0) & valid
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def plot_mask_comparison(images: Sequence[str], truths: Sequence[Any], predictions: Mapping[str, Sequence[Any]] | None = None,
                         titles: Sequence[str] | None = None) -> Figure:
    """One column per image: the image, its true class map, then each model's predicted map (`{"linear": [...], ...}`),
    as colour overlays (the VOC palette of `vfmtune predict`'s masks), each prediction titled with its foreground IoU."""
    from vfmtune.report import overlay

    predictions = predictions or {}
    rows = 2 + len(predictions)
    fig = _figure(2.0 * len(images), 2.0 * rows + 0.3)
    axes = fig.subplots(rows, len(images), squeeze=False)
    for j, path in enumerate(images):
        image, truth = _rgb(path), _ids(truths[j])
        _image_axis(axes[0, j], image, titles[j] if titles else Path(path).stem)
        _image_axis(axes[1, j], overlay(image, truth))
        for i, masks in enumerate(predictions.values(), start=2):
            iou = foreground_iou(truth, masks[j])
            _image_axis(axes[i, j], overlay(image, _ids(masks[j])), "" if iou is None else f"foreground IoU {iou:.2f}")
    for i, name in enumerate(["image", "truth", *predictions], start=0):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("masks over their images" if not predictions else f"truth and predictions: {', '.join(predictions)}", fontsize=10)
    return fig


def plot_instances(images: Sequence[str], instances: Sequence[Any], boxes: Sequence[Sequence[Sequence[float]]] | None = None,
                   scores: Sequence[Sequence[float]] | None = None, truths: Sequence[Any] | None = None,
                   titles: Sequence[str] | None = None, columns: int = 4) -> Figure:
    """Instance maps (uint16 ids, 0 = none) over their images, one colour per instance. `boxes` (per image,
    `(x0, y0, x1, y1)` each) draws the prompt boxes, `scores` (per box) writes each box's score (SAM's
    predicted IoU) at its corner, and `truths` (instance or class maps) outlines the true objects in white."""
    rows = -(-len(images) // columns)
    fig = _figure(2.6 * columns, 2.7 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = np.array([c[:3] for c in _colours(20)]) * 255
    for k, ax in enumerate(axes.flat):
        if k >= len(images):
            ax.axis("off")
            continue
        image, ids = _rgb(images[k]).astype(np.float32), _ids(instances[k]).astype(np.int64)
        shown = np.where((ids > 0)[..., None], 0.5 * image + 0.5 * colours[(ids - 1) % len(colours)], image)
        n = len(np.unique(ids[ids > 0]))
        title = titles[k] if titles else f"{Path(images[k]).stem}: {n} instances"
        _image_axis(ax, shown.astype(np.uint8), title)
        if truths is not None:
            ax.contour(_ids(truths[k]) > 0, levels=[0.5], colors="white", linewidths=0.6)
        for b, box in enumerate(boxes[k] if boxes is not None else []):
            x0, y0, x1, y1 = box
            ax.add_patch(_rectangle(x0, y0, x1, y1))
            if scores is not None:
                ax.text(x0, y0, f"{scores[k][b]:.2f}", fontsize=5, color="yellow", va="bottom")
    return fig


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=0.6)
