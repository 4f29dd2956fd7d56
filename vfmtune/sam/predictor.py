"""Prompted mask prediction: one encoder pass per image, then many boxes/points in batches.

This is segment-anything's ``SamPredictor`` (resize the longest side to the encoder size with
``ResizeLongestSide``, normalise and pad with ``Sam.preprocess``, upscale, crop and resize the masks
back with ``Sam.postprocess_masks``), used as is. What we add: checked, batched prompts in
original-image pixels, boxes clipped to the image (and counted), best-of-three selection by
predicted IoU, and embeddings that can be computed once and cached for fine-tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamPrediction:
    """Masks for N prompts on one image.

    Attributes:
        masks: ``[N, H, W]`` bool, at the original image size.
        iou: ``[N]`` the model's predicted IoU of each returned mask.
        low_res_logits: ``[N, h, w]`` mask logits before upscaling (256x256 for the released models);
            feed one back as ``mask_input`` or use it as a training target.
        clipped: How many boxes reached outside the image and were clipped to it.
    """

    masks: torch.Tensor
    iou: torch.Tensor
    low_res_logits: torch.Tensor
    clipped: int = 0


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB from a PIL image or an ``[H, W]`` / ``[H, W, 3]`` uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image (0..255), got {array.dtype}; scale it first, e.g. "
                         "np.clip(img / img.max() * 255, 0, 255).astype(np.uint8).")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)  # grey (e.g. medical) images: SAM reads 3 channels
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an [H, W] or [H, W, 3] RGB image, got shape {array.shape}.")
    return array


def check_boxes(boxes: np.ndarray | torch.Tensor | list, height: int, width: int) -> tuple[np.ndarray, int]:
    """Validate ``[N, 4]`` x1, y1, x2, y2 boxes in pixels and clip them to the image.

    Returns:
        ``(boxes [N, 4] float64, how many were clipped)``.

    Raises:
        ValueError: Wrong shape, non-finite values, x2 < x1 or y2 < y1, or a box with no area inside the image.
    """
    array = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
        raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2) in pixels, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"boxes hold NaN or inf in rows {np.flatnonzero(~np.isfinite(array).all(1)).tolist()}.")
    flipped = np.flatnonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))
    if len(flipped):
        raise ValueError(f"boxes are x1, y1, x2, y2 with x2 >= x1 and y2 >= y1; rows {flipped.tolist()[:5]} are not "
                         f"(first: {array[flipped[0]].tolist()}).")
    clipped_boxes = array.copy()
    clipped_boxes[:, 0::2] = clipped_boxes[:, 0::2].clip(0, width)
    clipped_boxes[:, 1::2] = clipped_boxes[:, 1::2].clip(0, height)
    empty = np.flatnonzero((clipped_boxes[:, 2] <= clipped_boxes[:, 0]) | (clipped_boxes[:, 3] <= clipped_boxes[:, 1]))
    if len(empty):
        raise ValueError(f"{len(empty)} box(es) have zero area inside the {width}x{height} image (outside it, or "
                         f"x1 == x2 / y1 == y2): rows {empty.tolist()[:5]}, first {array[empty[0]].tolist()}.")
    clipped = int((clipped_boxes != array).any(axis=1).sum())
    if clipped:
        logger.warning("%d of %d boxes reach outside the %dx%d image; clipped to it.",
                       clipped, len(array), width, height)
    return clipped_boxes, clipped


def check_points(points: np.ndarray | torch.Tensor | list, labels: np.ndarray | torch.Tensor | list | None,
                 height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate point prompts: ``[P, 2]`` (shared by every prompt) or ``[N, P, 2]`` x, y pixels, labels 1/0.

    Returns:
        ``(points [N or 1, P, 2] float64, labels [N or 1, P] int64)``.

    Raises:
        ValueError: Missing/mismatched labels, labels other than 0/1, or points outside the image.
    """
    coords = np.asarray(points.cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if labels is None:
        raise ValueError("point_labels are required with points: 1 = object (positive), 0 = background (negative).")
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if coords.ndim == 2:
        coords, lab = coords[None], lab[None] if lab.ndim == 1 else lab
    if coords.ndim != 3 or coords.shape[-1] != 2 or lab.shape != coords.shape[:2]:
        raise ValueError(f"points must be [P, 2] or [N, P, 2] with labels [P] or [N, P]; got {coords.shape} "
                         f"and labels {lab.shape}.")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError(f"point_labels must be 1 (object) or 0 (background), got {np.unique(lab).tolist()}.")
    outside = ~np.isfinite(coords).all(-1) | (coords[..., 0] < 0) | (coords[..., 0] > width) | \
        (coords[..., 1] < 0) | (coords[..., 1] > height)
    if outside.any():
        first = coords[outside][0].tolist()
        raise ValueError(f"{int(outside.sum())} point(s) lie outside the {width}x{height} image (x, y order), "
                         f"first {first}.")
    return coords, lab.astype(np.int64)


class SamPromptPredictor:
    """Set an image once (one encoder pass), then predict masks for many prompts.

    Args:
        model: A segment-anything ``Sam`` (e.g. from :func:`vfmtune.sam.create_sam`).
        batch_size: Prompts decoded together; the decoder holds a copy of the image embedding per
            prompt (4 MB each at 256x64x64 fp32), so this bounds memory on long box lists.

    Example:
        >>> predictor = SamPromptPredictor(create_sam("mobile_sam"))  # doctest: +SKIP
        >>> predictor.set_image(np.asarray(Image.open("quokka.jpg")))  # doctest: +SKIP
        >>> out = predictor.predict(boxes=[[148, 50, 550, 642]])  # doctest: +SKIP
        >>> out.masks.shape, out.iou.shape  # doctest: +SKIP
        (torch.Size([1, 643, 960]), torch.Size([1]))
    """

    def __init__(self, model: Sam, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.sam = SamPredictor(model)  # the reference pre/post-processing, reused as is

    def set_image(self, image: np.ndarray | Image.Image, embedding: torch.Tensor | None = None) -> None:
        """Make ``image`` the current image; run the encoder unless its ``embedding`` is given.

        Args:
            image: ``[H, W, 3]`` or ``[H, W]`` uint8 RGB array, or a PIL image.
            embedding: ``[1, C, g, g]`` from :meth:`embed` for this same image (e.g. from a cache).
        """
        rgb = _as_rgb(image)
        if embedding is None:
            self.sam.set_image(rgb)
            return
        expected = (1, self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if tuple(embedding.shape) != expected:
            raise ValueError(f"embedding has shape {tuple(embedding.shape)}; this model makes {expected}.")
        # The same state SamPredictor.set_torch_image leaves behind, minus the encoder pass.
        self.sam.reset_image()
        self.sam.original_size = rgb.shape[:2]
        self.sam.input_size = self.sam.transform.get_preprocess_shape(*rgb.shape[:2], self.sam.transform.target_length)
        self.sam.features = embedding.to(self.sam.device)
        self.sam.is_image_set = True

    def embed(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        """Image embedding ``[1, C, g, g]`` (``[1, 256, 64, 64]`` for the released models); also sets the image."""
        self.set_image(image)
        return self.sam.get_image_embedding()

    @torch.no_grad()
    def predict(
        self,
        boxes: np.ndarray | torch.Tensor | list | None = None,
        points: np.ndarray | torch.Tensor | list | None = None,
        point_labels: np.ndarray | torch.Tensor | list | None = None,
        multimask_output: bool = False,
    ) -> SamPrediction:
        """Masks for N prompts on the current image, in original-image pixels.

        Args:
            boxes: ``[N, 4]`` (or ``[4]``) x1, y1, x2, y2; clipped to the image, zero-area boxes refused.
            points: ``[P, 2]`` shared by all N prompts, or ``[N, P, 2]``; x, y inside the image.
            point_labels: ``[P]`` or ``[N, P]``: 1 = object, 0 = background.
            multimask_output: Decode three candidates per prompt and return the one with the highest
                predicted IoU (SAM's advice for ambiguous single clicks); else the single mask.

        Returns:
            :class:`SamPrediction` with ``masks [N, H, W]`` bool, ``iou [N]``, ``low_res_logits [N, h, w]``.
        """
        if not self.sam.is_image_set:
            raise RuntimeError("No image set: call set_image(image) (or set_image(image, embedding=...)) first.")
        height, width = self.sam.original_size
        if boxes is None and points is None:
            raise ValueError("Give boxes and/or points (with point_labels).")
        box_array, clipped = check_boxes(boxes, height, width) if boxes is not None else (None, 0)
        coords, labels = check_points(points, point_labels, height, width) if points is not None else (None, None)
        n = len(box_array) if box_array is not None else len(coords)
        if coords is not None and len(coords) not in (1, n):
            raise ValueError(f"{len(coords)} point sets for {n} boxes; give [P, 2] points (shared) or [{n}, P, 2].")
        device, size = self.sam.device, self.sam.original_size
        box_t = None if box_array is None else self.sam.transform.apply_boxes_torch(
            torch.as_tensor(box_array, dtype=torch.float, device=device), size)
        if coords is not None:
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)
            coords_t = self.sam.transform.apply_coords_torch(coords_t, size)
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=device)
            coords_t, labels_t = coords_t.expand(n, -1, -1), labels_t.expand(n, -1)
        masks, ious, logits = [], [], []
        for start in range(0, n, self.batch_size):
            chunk = slice(start, start + self.batch_size)
            m, iou, low = self.sam.predict_torch(
                None if coords is None else coords_t[chunk], None if coords is None else labels_t[chunk],
                None if box_t is None else box_t[chunk], multimask_output=multimask_output)
            best = iou.argmax(dim=1)  # index 0 when there is a single mask
            rows = torch.arange(len(best), device=best.device)
            masks.append(m[rows, best])
            ious.append(iou[rows, best])
            logits.append(low[rows, best])
        return SamPrediction(torch.cat(masks), torch.cat(ious), torch.cat(logits), clipped)
