"""Sliding-window inference for images larger than what a segmentation model was trained on.

A model trained on 128 px tiles resized to a 448 px input sees each source pixel at 3.5x. Resizing a
900x900 aerial image to 448 would show it at 0.5x, far from what the model learnt; instead the image
is cut into overlapping windows of the training size, each predicted at the model's input size, and
the logits blended back with weights that fall off towards each window's edge (where context is
missing), so seams disappear. The plan (whole or tiled, padding, window grid, weights) is plain numpy
in `vfmtune.windows`, which the torch-free `vfmtune.runtime` follows too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vfmtune.windows import blend_weights, plan_windows


@torch.inference_mode()
def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, size: int, window: int,
                   overlap: float = 0.25, batch_size: int = 8, mode: str = "bilinear") -> torch.Tensor:
    """Logits `[1, K, H, W]` of a normalised image `[1, 3, H, W]` at its own resolution.

    Images no larger than 1.5 x `window` on both sides are resized to the model input in one piece (a
    tile a little larger than the training tiles needs no seams); larger ones are tiled
    (`vfmtune.windows.plan_windows`).

    Args:
        predict: model inputs `[B, 3, size, size]` -> logits `[B, K, h, w]` at any resolution (a head's
            own: they are resized once, to where they are used).
        image: the normalised image at its native size.
        size: the model's input size.
        window: window side in source pixels (typically the training images' size).
        overlap: share of a window its neighbour overlaps.
        batch_size: windows per model call.
        mode: interpolation of the image to the model input (the backbone's, e.g. bicubic for DINOv2).
    """
    _, _, h, w = image.shape
    plan = plan_windows(h, w, window, overlap)
    if plan is None:
        return F.interpolate(predict(F.interpolate(image, size=(size, size), mode=mode, antialias=True,
                                                   align_corners=False)).float(), size=(h, w), mode="bilinear", align_corners=False)
    ph, pw = plan.padded
    if (ph, pw) != (h, w):  # one side shorter than a window: pad it (reflection keeps texture)
        image = F.pad(image, (0, pw - w, 0, ph - h), mode="reflect")
    boxes = plan.origins
    weight = torch.from_numpy(blend_weights(window)).to(image.device)
    total, norm = None, torch.zeros(1, 1, ph, pw, device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.cat([image[..., y : y + window, x : x + window] for y, x in chunk])
        logits = predict(F.interpolate(crops, size=(size, size), mode=mode, antialias=True, align_corners=False)).float()
        logits = F.interpolate(logits, size=(window, window), mode="bilinear", align_corners=False)
        if total is None:
            total = torch.zeros(1, logits.shape[1], ph, pw, device=image.device)
        for (y, x), piece in zip(chunk, logits):
            total[0, :, y : y + window, x : x + window] += piece * weight
            norm[0, 0, y : y + window, x : x + window] += weight
    return (total / norm)[..., :h, :w]
