"""Prompts made from instance masks, as SAM was trained (Kirillov et al. 2023, https://arxiv.org/abs/2304.02643,
appendix A "Training algorithm"): a box with noise on its corners or points inside the object first, then
correction points sampled uniformly from the error region of the last prediction (positive where the
mask missed the object, negative where it spilled over).

Everything works on ``[N, h, w]`` boolean masks at the decoder's low resolution (256 x 256 for the
released models); :func:`to_input` maps those pixel coordinates onto the encoder input, where the
prompt encoder expects them. Randomness comes from torch's global generator, which
``lightning.seed_everything`` seeds, so a run's prompts are reproducible.
"""

from __future__ import annotations

import torch


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]`` bool -> ``[N, 4]`` float x0, y0, x1, y1 in pixel edges (x1, y1 exclusive); empty masks give zeros.

    Example:
        >>> m = torch.zeros(1, 8, 8, dtype=torch.bool); m[0, 2:4, 3:7] = True
        >>> boxes_from_masks(m).tolist()
        [[3.0, 2.0, 7.0, 4.0]]
    """
    rows, cols = masks.any(2), masks.any(1)  # [N, h], [N, w]
    out = torch.zeros(len(masks), 4, device=masks.device)
    for i in range(len(masks)):
        ys, xs = rows[i].nonzero(), cols[i].nonzero()
        if len(ys):
            out[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float().flatten()
    return out


def jitter_boxes(boxes: torch.Tensor, fraction: float, max_shift: float, size: tuple[int, int]) -> torch.Tensor:
    """Move each corner coordinate by Gaussian noise with std ``fraction`` x the box side, capped at
    ``max_shift``, then clip to the ``(height, width)`` image; a box never collapses below one pixel.

    Args:
        boxes: ``[N, 4]`` x0, y0, x1, y1.
        fraction: SAM uses 0.1.
        max_shift: SAM caps the noise at 20 pixels of its 1024 px input.
        size: ``(height, width)`` the boxes live in.
    """
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(1, 2)  # w, h, w, h
    noise = (torch.randn_like(boxes) * fraction * side).clamp(-max_shift, max_shift)
    out = boxes + noise
    h, w = size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    x0 = torch.minimum(out[:, 0], out[:, 2]).clamp(max=w - 1)
    y0 = torch.minimum(out[:, 1], out[:, 3]).clamp(max=h - 1)
    x1 = torch.maximum(torch.maximum(out[:, 0], out[:, 2]), x0 + 1)
    y1 = torch.maximum(torch.maximum(out[:, 1], out[:, 3]), y0 + 1)
    return torch.stack([x0, y0, x1, y1], 1)


def sample_points(regions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pixels per row drawn uniformly (with replacement) from each ``[h, w]`` region.

    Args:
        regions: ``[N, h, w]`` bool.
        n: Points per region.

    Returns:
        ``(points [N, n, 2] x, y at pixel centres, found [N] bool)``; rows of an empty region get the
        image centre and ``found=False`` (callers mark them as padding).
    """
    num, h, w = regions.shape
    flat = regions.reshape(num, -1).float()
    found = flat.sum(1) > 0
    weights = torch.where(found[:, None], flat, torch.ones_like(flat))
    idx = torch.multinomial(weights, n, replacement=True)  # [N, n]
    points = torch.stack([idx % w, idx // w], -1).float() + 0.5
    points[~found] = torch.tensor([w / 2, h / 2], device=regions.device)
    return points, found


def initial_points(masks: torch.Tensor, boxes: torch.Tensor, positives: int, negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A point prompt: ``positives`` points inside each mask, ``negatives`` in its box outside it.

    Returns:
        ``(points [N, P, 2], labels [N, P])`` with 1 = object, 0 = background, -1 = padding (no such pixel).
    """
    points, found = sample_points(masks, positives)
    labels = torch.where(found[:, None], 1, -1).expand(-1, positives)
    if negatives:
        _, h, w = masks.shape
        ys, xs = torch.arange(h, device=masks.device), torch.arange(w, device=masks.device)
        inside = ((xs[None, None, :] >= boxes[:, 0, None, None]) & (xs[None, None, :] < boxes[:, 2, None, None])
                  & (ys[None, :, None] >= boxes[:, 1, None, None]) & (ys[None, :, None] < boxes[:, 3, None, None]))
        neg, found_neg = sample_points(inside & ~masks, negatives)
        points = torch.cat([points, neg], 1)
        labels = torch.cat([labels, torch.where(found_neg[:, None], 0, -1).expand(-1, negatives)], 1)
    return points, labels


def correction_points(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per row drawn uniformly from the error region ``predicted XOR target``.

    Returns:
        ``(points [N, 1, 2], labels [N, 1])``: 1 where the point is a missed object pixel, 0 where it is a
        false alarm, -1 (padding) where the prediction is already exact.

    Example:
        >>> gt = torch.zeros(1, 4, 4, dtype=torch.bool); gt[0, 1, 1] = True
        >>> correction_points(torch.zeros_like(gt), gt)[1].tolist()
        [[1]]
    """
    points, found = sample_points(predicted ^ target, 1)
    h, w = target.shape[-2:]
    x = points[:, 0, 0].long().clamp(0, w - 1)
    y = points[:, 0, 1].long().clamp(0, h - 1)
    hit = target[torch.arange(len(target), device=target.device), y, x]
    labels = torch.where(found, hit.long(), torch.full_like(hit, -1, dtype=torch.long))
    return points, labels[:, None]


def to_input(coords: torch.Tensor, scale: float) -> torch.Tensor:
    """Low-resolution pixel coordinates -> encoder-input pixels (``scale`` = input side / low-res side)."""
    return coords * scale
