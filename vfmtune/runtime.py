"""Run an exported vfmtune bundle with numpy + Pillow + onnxruntime only (no torch, no timm).

The preprocessing re-implements the eval transform recorded in `bundle.json` (torchvision's
shorter-side `Resize`, `CenterCrop`, `ToTensor`, `Normalize`), so predictions match the source
model's top-1. This module must never import torch or a vfmtune module that does: edge devices
ship only the bundle and these three packages.

Example:
    >>> from vfmtune.runtime import Predictor
    >>> predictor = Predictor("runs/export/bundle")
    >>> predictor.predict(["part_001.jpg"])[0]
    {'path': 'part_001.jpg', 'label': 'nominal', 'confidence': 0.97, 'probs': {...}}

    From a shell: `python -m vfmtune.runtime runs/export/bundle images/*.jpg`
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

ImageLike = str | Path | Image.Image
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
             "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def load_rgb(image: ImageLike) -> Image.Image:
    """RGB image as a viewer shows it: EXIF rotation applied, transparency composited onto white."""
    im = image if isinstance(image, Image.Image) else Image.open(image)
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(image: ImageLike, policy: dict[str, Any]) -> np.ndarray:
    """One image -> float32 [3, H, W], as the bundle's eval transform makes it."""
    im = load_rgb(image)
    resample = _RESAMPLE[policy.get("interpolation", "bilinear")]
    if "resize" in policy:
        size = policy["resize"]
        if isinstance(size, int) or len(size) == 1:  # torchvision: shorter side -> size, keep the aspect ratio
            short = size if isinstance(size, int) else size[0]
            w, h = im.size
            if w <= h:
                new = (short, int(short * h / w))
            else:
                new = (int(short * w / h), short)
            im = im.resize(new, resample)
        else:
            im = im.resize((size[1], size[0]), resample)
    if "crop" in policy:
        th, tw = policy["crop"]
        w, h = im.size
        top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
        im = im.crop((left, top, left + tw, top + th))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(policy["mean"], np.float32)) / np.asarray(policy["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """A bundle's model in an onnxruntime session, with its preprocessing and class names.

    Args:
        bundle: the bundle folder (holding bundle.json).
        variant: "default" (the bundle's chosen model: INT8 when it was quantized), "fp32" or "int8".
    """

    def __init__(self, bundle: str | Path, variant: str = "default") -> None:
        self.folder = Path(bundle)
        info_file = self.folder / "bundle.json"
        if not info_file.is_file():
            raise FileNotFoundError(f"{self.folder}: no bundle.json; pass the folder written by `vfmtune export`.")
        self.info = json.loads(info_file.read_text())
        name = {"default": self.info["model"], "fp32": self.info["fp32_model"], "int8": "model.int8.onnx"}.get(variant)
        if name is None or not (self.folder / name).is_file() or not name.endswith(".onnx"):
            raise ValueError(f"variant={variant!r} has no ONNX model in {self.folder}.")
        self.session = ort.InferenceSession(str(self.folder / name), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.classes: list[str] = list(self.info["class_names"])

    def logits(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Logits [N, C] for images (paths or PIL images)."""
        out = []
        for i in range(0, len(images), batch_size):
            x = np.stack([preprocess(im, self.info["preprocessing"]) for im in images[i : i + batch_size]])
            out.append(self.session.run(None, {self.input_name: x})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per image: label, confidence and every class's probability."""
        probs = _softmax(self.logits(images, batch_size))
        return [
            {"path": str(im) if not isinstance(im, Image.Image) else None, "label": self.classes[int(p.argmax())],
             "confidence": float(p.max()), "probs": dict(zip(self.classes, map(float, p)))}
            for im, p in zip(images, probs)
        ]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m vfmtune.runtime BUNDLE_DIR IMAGE [IMAGE ...]", file=sys.stderr)
        raise SystemExit(2)
    predictor = Predictor(args[0])
    for row in predictor.predict(args[1:]):
        print(f"{row['path']},{row['label']},{row['confidence']:.4f}")


if __name__ == "__main__":
    main()
