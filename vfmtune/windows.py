"""The sliding-window plan for segmenting images larger than the training images, in plain numpy.

`vfmtune.tiling` (torch) and the torch-free `vfmtune.runtime` both follow this plan, so an exported
model tiles an image exactly as the trained one does: which images are resized whole, how a short
side is padded, where the windows start and how their logits are weighted when blended back.
This module must import nothing but numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# An image up to this many windows on each side is resized to the model input in one piece: a tile a
# little larger than the training tiles needs no seams.
WHOLE_IMAGE_WINDOWS = 1.5


class WindowPlan(NamedTuple):
    """Windows over an image padded (reflected, at the bottom / right) to `padded` = (height, width)."""

    padded: tuple[int, int]
    origins: list[tuple[int, int]]  # (y, x) of each window's top-left corner


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` covering `length`, neighbours overlapping by >= `overlap`.

    Example:
        >>> window_starts(900, 256, 0.25)
        [0, 161, 322, 483, 644]
    """
    if length <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    n = int(np.ceil((length - window) / stride)) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def blend_weights(window: int) -> np.ndarray:
    """[window, window] weights: 1 in the centre, falling linearly to 1/window at the edges."""
    ramp = np.minimum(np.arange(1, window + 1), np.arange(window, 0, -1)) / (window / 2)
    ramp = np.clip(ramp, 1.0 / window, 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


def plan_windows(height: int, width: int, window: int, overlap: float) -> WindowPlan | None:
    """None when an image of `height` x `width` is predicted whole; else its padded size and windows.

    A side shorter than a window is padded to one window (reflection keeps texture); every window is
    `window` x `window` source pixels.

    Example:
        >>> plan_windows(60, 60, 48, 0.25) is None
        True
        >>> plan_windows(40, 100, 32, 0.25)
        WindowPlan(padded=(40, 100), origins=[(0, 0), (0, 23), (0, 45), (0, 68), (8, 0), (8, 23), (8, 45), (8, 68)])
    """
    if height <= WHOLE_IMAGE_WINDOWS * window and width <= WHOLE_IMAGE_WINDOWS * window:
        return None
    ph, pw = max(height, window), max(width, window)
    return WindowPlan((ph, pw), [(y, x) for y in window_starts(ph, window, overlap) for x in window_starts(pw, window, overlap)])
