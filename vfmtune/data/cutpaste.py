"""Cut-paste synthesis: objects cut out of annotated images with their masks, transformed, and pasted on
backgrounds, with exact masks for every scene (Dwibedi et al. 2017, https://arxiv.org/abs/1708.01642;
Ghiasi et al. 2021 "Simple Copy-Paste", https://arxiv.org/abs/2012.07177, when the backgrounds are
annotated images whose own instances are kept).

Per object: horizontal / vertical flips, a scale factor, a rotation and a brightness / contrast jitter;
placed where it hides at most ``max_occlusion`` of any instance already in the scene (the hidden part
is removed from that instance's mask); blended hard, with a Gaussian-feathered edge, or by Poisson
editing (OpenCV's ``seamlessClone``). A numpy ``Generator`` seeded once drives every choice, so the same
inputs and seed write the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vfmtune.choices import Blend, ConfigError
from vfmtune.config import SynthConfig
from vfmtune.data.images import load_image
from vfmtune.data.instances import load_instances


@dataclass
class CutObject:
    """One object: its pixels and mask cropped to its box, its class and the index of its source image."""

    rgb: np.ndarray  # [h, w, 3] uint8
    mask: np.ndarray  # [h, w] bool
    label: int
    source: int


@dataclass
class Scene:
    """An RGB canvas and its instances (disjoint masks, class ids)."""

    rgb: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)  # area when placed: occlusion is measured against it
    sources: list[int] = field(default_factory=list)


def cut_objects(paths: Sequence[str], refs: Sequence[str], num_classes: int, cfg: SynthConfig) -> list[CutObject]:
    """Every instance of every image as a :class:`CutObject` (too small or, with ``skip_truncated``, touching
    the image edge: left out)."""
    out: list[CutObject] = []
    for i, (path, ref) in enumerate(zip(paths, refs)):
        image = np.asarray(load_image(path))
        h, w = image.shape[:2]
        instances, _ = load_instances(ref, (w, h), num_classes, cfg.min_area)
        for inst in instances:
            ys, xs = np.nonzero(inst.mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            if cfg.skip_truncated and (y0 == 0 or x0 == 0 or y1 == h or x1 == w):
                continue
            out.append(CutObject(image[y0:y1, x0:x1].copy(), inst.mask[y0:y1, x0:x1].copy(), inst.class_index, i))
    return out


def scene_from(path: str, ref: str | None, num_classes: int) -> Scene:
    """A background image as a scene; with an instance reference its own instances are kept."""
    rgb = np.asarray(load_image(path)).copy()
    scene = Scene(rgb)
    if ref is not None:
        for inst in load_instances(ref, (rgb.shape[1], rgb.shape[0]), num_classes)[0]:
            scene.masks.append(inst.mask.copy())
            scene.labels.append(inst.class_index)
            scene.areas.append(int(inst.mask.sum()))
            scene.sources.append(-1)
    return scene


def transform(obj: CutObject, rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale, rotate and jitter one object: ``(rgb [h, w, 3] uint8, mask [h, w] bool)`` cropped to its mask."""
    rgb, mask = obj.rgb, obj.mask.astype(np.float32)
    if cfg.flip and rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    if cfg.flip and rng.random() < 0.5:
        rgb, mask = rgb[::-1], mask[::-1]
    scale = rng.uniform(*cfg.scale)
    angle = rng.uniform(-cfg.rotation, cfg.rotation)
    h, w = mask.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.BILINEAR).rotate(angle, Image.BILINEAR, expand=True)
    alpha = Image.fromarray(np.ascontiguousarray(mask)).resize(size, Image.BILINEAR).rotate(angle, Image.BILINEAR, expand=True)
    rgb, keep = np.asarray(image, dtype=np.float32), np.asarray(alpha) > 0.5
    if cfg.color_jitter:
        brightness, contrast = rng.uniform(1 - cfg.color_jitter, 1 + cfg.color_jitter, size=2)
        mean = rgb[keep].mean() if keep.any() else rgb.mean()
        rgb = (rgb - mean) * contrast + mean * brightness
    if not keep.any():
        return np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), bool)
    ys, xs = np.nonzero(keep)
    crop = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return np.clip(rgb[crop], 0, 255).astype(np.uint8), keep[crop]


def _blend(canvas: np.ndarray, rgb: np.ndarray, mask: np.ndarray, y: int, x: int, cfg: SynthConfig) -> None:
    """Paste ``rgb`` under ``mask`` at ``(y, x)`` into ``canvas`` (in place)."""
    h, w = mask.shape
    region = canvas[y:y + h, x:x + w]
    if cfg.blend == Blend.poisson:
        import cv2  # checked by check_blend

        pad = 2  # seamlessClone needs a border around the mask inside the source
        src = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        m = np.pad(mask, pad).astype(np.uint8) * 255
        ys, xs = np.nonzero(m)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        # OpenCV centres the mask's bounding box on the given point.
        centre = (int(x - pad + xs.min() + bw // 2), int(y - pad + ys.min() + bh // 2))
        canvas[:] = cv2.seamlessClone(np.ascontiguousarray(src), np.ascontiguousarray(canvas), m, centre, cv2.NORMAL_CLONE)
        return
    if cfg.blend == Blend.gaussian and cfg.sigma > 0:
        from scipy.ndimage import gaussian_filter

        alpha = np.clip(gaussian_filter(mask.astype(np.float32), cfg.sigma), 0, 1)[..., None]
        region[:] = np.round(alpha * rgb + (1 - alpha) * region).astype(np.uint8)
        return
    region[mask] = rgb[mask]


def check_blend(blend: Blend) -> None:
    """Poisson blending needs OpenCV; say so before any work is done."""
    if blend == Blend.poisson:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise ConfigError("synth.blend=poisson uses OpenCV's seamlessClone: pip install opencv-python-headless, "
                              "or use synth.blend=gaussian (feathered edges) or none.") from None


def paste(scene: Scene, obj: CutObject, rng: np.random.Generator, cfg: SynthConfig, tries: int = 20) -> bool:
    """Place one transformed object where it hides at most ``max_occlusion`` of every instance; False if no place was found."""
    rgb, mask = transform(obj, rng, cfg)
    height, width = scene.rgb.shape[:2]
    margin = 3 if cfg.blend == Blend.poisson else 0  # seamlessClone's region must lie inside the canvas
    if not mask.any() or mask.shape[0] > height - 2 * margin or mask.shape[1] > width - 2 * margin:
        return False
    for _ in range(tries):
        y = int(rng.integers(margin, height - mask.shape[0] - margin + 1))
        x = int(rng.integers(margin, width - mask.shape[1] - margin + 1))
        full = np.zeros((height, width), bool)
        full[y:y + mask.shape[0], x:x + mask.shape[1]] = mask
        if all((m & ~full).sum() >= (1 - cfg.max_occlusion) * a for m, a in zip(scene.masks, scene.areas)):
            break
    else:
        return False
    _blend(scene.rgb, rgb, mask, y, x, cfg)
    for m in scene.masks:
        m &= ~full
    scene.masks.append(full)
    scene.labels.append(obj.label)
    scene.areas.append(int(full.sum()))
    scene.sources.append(obj.source)
    return True


def compose(background: Scene, objects: Sequence[CutObject], rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """One scene: ``objects_per_image`` objects drawn from ``objects`` pasted onto a copy of ``background``."""
    scene = Scene(background.rgb.copy(), [m.copy() for m in background.masks], list(background.labels),
                  list(background.areas), list(background.sources))
    lo, hi = cfg.objects_per_image
    for _ in range(int(rng.integers(lo, hi + 1))):
        paste(scene, objects[int(rng.integers(len(objects)))], rng, cfg)
    keep = [i for i, m in enumerate(scene.masks) if m.any()]  # fully hidden background instances are gone
    scene.masks, scene.labels = [scene.masks[i] for i in keep], [scene.labels[i] for i in keep]
    scene.areas, scene.sources = [scene.areas[i] for i in keep], [scene.sources[i] for i in keep]
    return scene
