"""Shared pieces of the figures: a PNG-showing Figure, saving, thumbnails, colours, image axes."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vfmtune.io import atomic_path

DPI = 100
SPLIT_MARKERS = {"train": "o", "val": "s", "test": "^"}


class VizFigure(Figure):
    """A matplotlib Figure that renders itself as PNG in notebooks, whatever backend is active."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def _figure(width: float, height: float) -> VizFigure:
    return VizFigure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI) -> Path:
    """Write `fig` as PNG atomically (readers never see half a file); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def thumbnail(path: str | os.PathLike[str], size: int = 128) -> np.ndarray:
    """The image as a viewer shows it (EXIF rotation, transparency on white), at most `size` px: `[h, w, 3]` uint8."""
    from vfmtune.data.images import load_image

    im = load_image(path)
    im.thumbnail((size, size))
    return np.asarray(im)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _image_axis(ax: Any, image: np.ndarray, title: str = "", colour: str = "black") -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])


def _unit(features: ArrayLike) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centred_unit(features: ArrayLike) -> np.ndarray:
    """Unit-length embeddings after removing their mean: on a homogeneous dataset (one fabric, one organ)
    every raw embedding shares a large common direction, and raw cosine distances are all close to 0."""
    x = np.asarray(features, dtype=np.float64)
    return _unit(x - x.mean(0, keepdims=True))


def spread_over_classes(labels: Sequence[int], n: int, among: Sequence[int] | None = None) -> list[int]:
    """`n` indices (of `among`, default all) taking the classes in turn: the first image of each class,
    then the second of each, ...: a few examples that show every class.

    Example:
        >>> spread_over_classes([0, 0, 0, 1, 1, 2], 4)
        [0, 3, 5, 1]
    """
    by_class: dict[int, list[int]] = {}
    for i in range(len(labels)) if among is None else among:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    columns = [by_class[c] for c in sorted(by_class)]
    order = [col[k] for k in range(max(map(len, columns), default=0)) for col in columns if k < len(col)]
    return order[:n]
