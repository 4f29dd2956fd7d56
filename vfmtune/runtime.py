"""Run an exported vfmtune bundle with numpy + Pillow + onnxruntime only (no torch, no timm).

Classifier bundles: the preprocessing re-implements the eval transform recorded in `bundle.json`
(torchvision's shorter-side `Resize`, `CenterCrop`, `ToTensor`, `Normalize`), so predictions match the
source model's top-1. Segmentation bundles (`"task": "segment"`): a mask at each image's own
resolution, by the plan `vfmtune.tiling` follows (`vfmtune.windows`): the image is normalised at its
own size, resized whole or per window to the model input (in float, antialiased, as torch resizes it),
and the logits are resized bilinearly (torch's `align_corners=False` grid) to the pixels they cover
and blended with the windows' weights. SAM bundles (`SamPredictor`): SAM's resize of the longest side,
normalisation and padding, then box / click prompts -> masks, as `vfmtune auto-mask` makes them. This
module must never import torch or a vfmtune module that does: edge devices ship only the bundle and
these three packages.

Example:
    >>> from vfmtune.runtime import open_bundle
    >>> open_bundle("runs/export/bundle").predict(["part_001.jpg"])[0]
    {'path': 'part_001.jpg', 'label': 'nominal', 'confidence': 0.97, 'probs': {...}}
    >>> masks = open_bundle("runs/seg-export/bundle").predict(["tile.png"])  # [H, W] uint8 class ids each

    From a shell: `python -m vfmtune.runtime runs/export/bundle images/*.jpg [--out masks/]`, or for a SAM
    bundle `python -m vfmtune.runtime runs/export/bundle photo.jpg 148,50,550,642` (writes photo.masks.png).
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

from vfmtune.windows import blend_weights, plan_windows

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


def normalise(image: ImageLike, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """One image at its own size -> float32 `[3, H, W]`, scaled to [0, 1] and normalised."""
    x = np.asarray(load_rgb(image), dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_image(x: np.ndarray, size: int, resample: int) -> np.ndarray:
    """`[C, H, W]` float32 -> `[C, size, size]`, each channel resized by Pillow in float: the same antialiased
    filters as torch's `F.interpolate(..., antialias=True)` (to ~1e-6), with no rounding to 8 bits."""
    if x.shape[1:] == (size, size):
        return x
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), resample), dtype=np.float32) for c in x])


def _linear_weights(out: int, size: int) -> np.ndarray:
    """`[out, size]` matrix of torch's bilinear resize along one axis (`align_corners=False`, no antialias)."""
    src = np.maximum((np.arange(out, dtype=np.float64) + 0.5) * (size / out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size - 1)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    m = np.zeros((out, size), np.float64)
    np.add.at(m, (np.arange(out), lo), 1 - frac)
    np.add.at(m, (np.arange(out), hi), frac)
    return m.astype(np.float32)


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Logits `[K, h, w]` -> `[K, *size]`, bilinear as torch's `F.interpolate(align_corners=False)`."""
    if logits.shape[1:] == tuple(size):
        return logits
    return np.einsum("hi,kij,wj->khw", _linear_weights(size[0], logits.shape[1]), logits, _linear_weights(size[1], logits.shape[2]),
                     optimize=True)


class _Bundle:
    """A bundle folder: `bundle.json` and one of its ONNX models in an onnxruntime session.

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

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's logits for a batch of preprocessed inputs `[B, 3, S, S]`."""
        return self.session.run(None, {self.input_name: x})[0]


class Predictor(_Bundle):
    """A classification bundle: images -> class, confidence and every class's probability."""

    def logits(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Logits [N, C] for images (paths or PIL images)."""
        out = [self.run(np.stack([preprocess(im, self.info["preprocessing"]) for im in images[i : i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 32) -> list[dict[str, Any]]:
        """Per image: label, confidence and every class's probability."""
        probs = _softmax(self.logits(images, batch_size))
        return [
            {"path": str(im) if not isinstance(im, Image.Image) else None, "label": self.classes[int(p.argmax())],
             "confidence": float(p.max()), "probs": dict(zip(self.classes, map(float, p)))}
            for im, p in zip(images, probs)
        ]


class SegmentPredictor(_Bundle):
    """A segmentation bundle: images -> class-id masks at their own resolution, tiled like the trained model.

    Args:
        bundle: the bundle folder.
        variant: "default", "fp32" or "int8".
        batch_size: windows per model call.
    """

    def __init__(self, bundle: str | Path, variant: str = "default", batch_size: int = 8) -> None:
        super().__init__(bundle, variant)
        info = self.info
        if info.get("task") != "segment":
            raise ValueError(f"{self.folder} holds a {info.get('task', 'classify')!r} model, not a segmentation model.")
        self.size, self.window, self.overlap = int(info["input_size"][-1]), info.get("window"), float(info.get("overlap", 0.25))
        self.resample = _RESAMPLE[info.get("interpolation", "bilinear")]
        self.batch_size = batch_size
        self.palette = [v for rgb in info.get("palette", []) for v in rgb]

    def logits(self, image: ImageLike) -> np.ndarray:
        """Logits `[K, H, W]` of one image at its own resolution (whole, or in blended windows)."""
        x = normalise(image, self.info["mean"], self.info["std"])
        h, w = x.shape[1:]
        window = int(self.window or max(h, w))
        plan = plan_windows(h, w, window, self.overlap)
        if plan is None:
            return resize_logits(self.run(resize_image(x, self.size, self.resample)[None])[0], (h, w))
        ph, pw = plan.padded
        if (ph, pw) != (h, w):  # reflection, as torch's F.pad(mode="reflect")
            x = np.pad(x, ((0, 0), (0, ph - h), (0, pw - w)), mode="reflect")
        weight = blend_weights(window)
        total, norm = np.zeros((len(self.classes), ph, pw), np.float32), np.zeros((ph, pw), np.float32)
        for i in range(0, len(plan.origins), self.batch_size):
            chunk = plan.origins[i : i + self.batch_size]
            crops = np.stack([resize_image(x[:, y : y + window, c : c + window], self.size, self.resample) for y, c in chunk])
            for (y, c), piece in zip(chunk, self.run(crops)):
                total[:, y : y + window, c : c + window] += resize_logits(piece, (window, window)) * weight
                norm[y : y + window, c : c + window] += weight
        return (total / norm)[:, :h, :w]

    def predict(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """One `[H, W]` uint8 mask of class ids per image."""
        return [self.logits(im).argmax(0).astype(np.uint8) for im in images]

    def save(self, mask: np.ndarray, path: str | Path) -> Path:
        """A mask as a palette PNG: class ids as pixel values, shown in the bundle's colours."""
        png = Image.fromarray(mask, mode="P")
        png.putpalette(self.palette)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        png.save(path, format="PNG")
        return Path(path)


def open_bundle(bundle: str | Path, variant: str = "default") -> Predictor | SegmentPredictor:
    """The predictor for a bundle's task: `SegmentPredictor` for segmentation, else `Predictor`."""
    info_file = Path(bundle) / "bundle.json"
    task = json.loads(info_file.read_text()).get("task", "classify") if info_file.is_file() else "classify"
    return (SegmentPredictor if task == "segment" else Predictor)(bundle, variant)


def _read_info(bundle: str | Path) -> dict[str, Any]:
    file = Path(bundle) / "bundle.json"
    if not file.is_file():
        raise FileNotFoundError(f"{bundle}: no bundle.json; pass the folder written by `vfmtune export`.")
    return json.loads(file.read_text())


class SamPredictor:
    """A SAM bundle (`vfmtune export` of a `task=sam_prompt` run or a packaged SAM): prompts -> masks.

    Args:
        bundle: the bundle folder (bundle.json, encoder.onnx, decoder.onnx).

    Example:
        >>> sam = SamPredictor("runs/export/bundle")
        >>> out = sam.predict("photo.jpg", boxes=[[148, 50, 550, 642]])
        >>> out["masks"].shape, out["scores"]
        ((1, 643, 960), array([0.97], dtype=float32))
    """

    def __init__(self, bundle: str | Path) -> None:
        self.folder = Path(bundle)
        self.info = _read_info(bundle)
        if self.info.get("kind") != "sam":
            raise ValueError(f"{bundle} is not a SAM bundle; use Predictor for classifiers.")
        options = ort.SessionOptions()
        self.encoder = ort.InferenceSession(str(self.folder / self.info["encoder"]), options, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(self.folder / self.info["decoder"]), options, providers=["CPUExecutionProvider"])
        self.size = int(self.info["img_size"])

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """``([1, 3, S, S] float32, (height, width))``: the longest side resized to S (bilinear, as SAM's
        ``ResizeLongestSide`` does on a PIL image), normalised (SAM's mean/std, or min-max), zero-padded."""
        im = load_rgb(image)
        w, h = im.size
        scale = self.size / max(h, w)
        new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
        x = np.asarray(im.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
        if self.info["normalize"] == "minmax":
            x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        else:
            x = (x - np.asarray(self.info["pixel_mean"], np.float32)) / np.asarray(self.info["pixel_std"], np.float32)
        padded = np.zeros((self.size, self.size, 3), np.float32)
        padded[:new_h, :new_w] = x
        return np.ascontiguousarray(padded.transpose(2, 0, 1)[None]), (h, w)

    def embed(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """``(image embedding [1, C, g, g], (height, width))``: the encoder's one pass, reusable for any number of prompts."""
        x, size = self.preprocess(image)
        return self.encoder.run(None, {"image": x})[0], size

    def predict(self, image: ImageLike | tuple[np.ndarray, tuple[int, int]], boxes: Sequence[Sequence[float]] | None = None,
                points: Sequence[Sequence[Sequence[float]]] | None = None,
                point_labels: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
        """Masks for N prompts: boxes ``[N, 4]`` x0, y0, x1, y1 and/or clicks ``[N, P, 2]`` with labels ``[N, P]``
        (1 = object, 0 = background), in original-image pixels.

        Args:
            image: an image, or what `embed` returned for it (no second encoder pass).

        Returns:
            ``{"masks": [N, H, W] bool, "logits": [N, H, W], "scores": [N] predicted IoU, "low_res_logits": [N, L, L]}``.
        """
        embedding, (h, w) = image if isinstance(image, tuple) else self.embed(image)
        scale = np.array([int(w * self.size / max(h, w) + 0.5) / w, int(h * self.size / max(h, w) + 0.5) / h], np.float32)
        n = len(boxes) if boxes is not None else len(points or [])
        coords = np.zeros((n, 0, 2), np.float32)
        labels = np.zeros((n, 0), np.float32)
        if points is not None:
            coords = np.asarray(points, np.float32).reshape(n, -1, 2)
            labels = np.asarray(point_labels, np.float32).reshape(n, -1)
        if boxes is not None:  # SAM's box prompt: its two corners as points labelled 2 and 3
            corners = np.asarray(boxes, np.float32).reshape(n, 2, 2)
            coords = np.concatenate([coords, corners], 1)
            labels = np.concatenate([labels, np.tile(np.array([[2, 3]], np.float32), (n, 1))], 1)
        else:  # points alone get SAM's padding point, as its prompt encoder adds one
            coords = np.concatenate([coords, np.zeros((n, 1, 2), np.float32)], 1)
            labels = np.concatenate([labels, -np.ones((n, 1), np.float32)], 1)
        low = int(self.info["low_res"])
        fixed = {"image_embeddings": embedding, "mask_input": np.zeros((1, 1, low, low), np.float32),
                 "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([h, w], np.float32)}
        outs = [self.decoder.run(None, {**fixed, "point_coords": coords[i:i + 1] * scale, "point_labels": labels[i:i + 1]})
                for i in range(n)]  # one prompt per decoder run (the graph's prompt axis is fixed at 1)
        if not outs:
            empty = np.zeros((0, h, w), np.float32)
            return {"masks": empty > 0, "logits": empty, "scores": np.zeros(0, np.float32),
                    "low_res_logits": np.zeros((0, low, low), np.float32)}
        logits, scores, low_res = (np.concatenate(parts) for parts in zip(*outs))
        return {"masks": logits[:, 0] > self.info["mask_threshold"], "logits": logits[:, 0], "scores": scores[:, 0],
                "low_res_logits": low_res[:, 0]}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path("masks")
    if "--out" in args:
        i = args.index("--out")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2 :]
    if len(args) < 2:
        print("usage: python -m vfmtune.runtime BUNDLE_DIR IMAGE [IMAGE ...] [--out DIR (masks of a segmentation bundle)]\n"
              "       python -m vfmtune.runtime SAM_BUNDLE_DIR IMAGE X0,Y0,X1,Y1 [X0,Y0,X1,Y1 ...]", file=sys.stderr)
        raise SystemExit(2)
    if _read_info(args[0]).get("kind") == "sam":
        boxes = [[float(v) for v in b.split(",")] for b in args[2:]]
        result = SamPredictor(args[0]).predict(args[1], boxes=boxes)
        ids = np.zeros(result["masks"].shape[1:], np.uint8)
        for k in np.argsort([-m.sum() for m in result["masks"]]):  # smaller objects on top
            ids[result["masks"][k]] = k + 1
        target = Path(args[1]).with_suffix(".masks.png")
        Image.fromarray(ids).save(target)
        for box, score, mask in zip(boxes, result["scores"], result["masks"]):
            print(f"{','.join(f'{v:g}' for v in box)},{float(score):.4f},{int(mask.sum())}")
        print(f"masks (box k -> value k) written to {target}")
        return
    predictor = open_bundle(args[0])
    if isinstance(predictor, SegmentPredictor):
        print(",".join(["path", "mask", *(f"share_{c}" for c in predictor.classes)]))
        for path in args[1:]:
            mask = predictor.predict([path])[0]
            share = np.bincount(mask.reshape(-1), minlength=len(predictor.classes)) / mask.size
            saved = predictor.save(mask, out / f"{Path(path).stem}.png")
            print(",".join([path, str(saved), *(f"{v:.6f}" for v in share)]))
        return
    for row in predictor.predict(args[1:]):
        print(f"{row['path']},{row['label']},{row['confidence']:.4f}")


if __name__ == "__main__":
    main()
