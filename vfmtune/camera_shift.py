"""A reproducible "different camera": the same scenes seen through other optics, sensor and pipeline.

Each severity is one camera with fixed characteristics, applied in the order light meets them:
defocus blur (Gaussian, radius in source pixels), exposure (gamma on linear intensity, then a
brightness offset), contrast (scaled around the image mean), a colour cast (white-balance gains per
channel), sensor noise (Gaussian, std in [0, 1] units, drawn per image from its seed) and JPEG
compression (quality). The parameters follow the spirit of ImageNet-C's corruptions (Hendrycks and
Dietterich 2019, https://arxiv.org/abs/1903.12261) at about its levels 2 (severity 1) and 4 (severity 2),
but combined, because a camera changes all of them at once.

| severity | blur radius | gamma | brightness | contrast | cast (R, G, B)      | noise std | JPEG quality |
|----------|-------------|-------|------------|----------|---------------------|-----------|--------------|
| 1        | 0.8         | 1.2   | +0.05      | 0.85     | (1.05, 1.00, 0.92)  | 0.03      | 50           |
| 2        | 1.6         | 1.5   | +0.12      | 0.65     | (1.12, 1.00, 0.82)  | 0.08      | 20           |
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from vfmtune.data.images import load_image
from vfmtune.io import atomic_path


@dataclass(frozen=True)
class Camera:
    blur: float
    gamma: float
    brightness: float
    contrast: float
    cast: tuple[float, float, float]
    noise: float
    jpeg_quality: int


CAMERAS: dict[int, Camera] = {
    1: Camera(0.8, 1.2, 0.05, 0.85, (1.05, 1.00, 0.92), 0.03, 50),
    2: Camera(1.6, 1.5, 0.12, 0.65, (1.12, 1.00, 0.82), 0.08, 20),
}


def through_camera(image: Image.Image, severity: int, seed: int) -> Image.Image:
    """`image` (RGB) as the camera of `severity` would record it; `seed` draws this image's sensor noise.

    Example:
        >>> shifted = through_camera(Image.open("part.jpg").convert("RGB"), severity=2, seed=7)
    """
    cam = CAMERAS[severity]
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(cam.blur)), dtype=np.float64) / 255.0
    x = np.clip(x, 0, 1) ** cam.gamma + cam.brightness
    x = (x - x.mean()) * cam.contrast + x.mean()
    x = x * np.asarray(cam.cast)[None, None, :]
    x = x + np.random.default_rng(seed).normal(0.0, cam.noise, x.shape)
    out = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=cam.jpeg_quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shift_folder(paths: list[str], out: str | os.PathLike[str], severity: int, seed: int = 0, root: str | None = None) -> list[str]:
    """Write every image of `paths` through the camera of `severity` into `out` (keeping the sub-folders
    under `root`, e.g. class folders), as PNG so no second compression is added; returns the new paths."""
    written = []
    for i, p in enumerate(paths):
        rel = os.path.relpath(p, root) if root else os.path.basename(p)
        target = os.path.join(out, os.path.splitext(rel)[0] + ".png")
        with atomic_path(target) as tmp:
            through_camera(load_image(p), severity, seed * 1_000_003 + i).save(tmp, format="PNG")
        written.append(target)
    return written
