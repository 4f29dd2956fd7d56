"""Prompts made from instance masks (SAM's training recipe) and SAM's loss: pure tensor functions, exact answers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.sam.loss import SamLoss, dice_loss, mask_iou
from vfmtune.sam.prompts import boxes_from_masks, correction_points, initial_points, jitter_boxes, sample_points


def _masks() -> torch.Tensor:
    m = torch.zeros(3, 16, 20, dtype=torch.bool)
    m[0, 2:6, 3:9] = True
    m[1, 10:15, 0:4] = True  # third mask empty
    return m


def test_boxes_from_masks__pixel_edges_and_zero_for_empty() -> None:
    assert boxes_from_masks(_masks()).tolist() == [[3, 2, 9, 6], [0, 10, 4, 15], [0, 0, 0, 0]]


def test_jitter_boxes__stays_inside_and_never_collapses() -> None:
    torch.manual_seed(0)
    boxes = torch.tensor([[3.0, 2.0, 9.0, 6.0], [0.0, 10.0, 4.0, 15.0]]).repeat(200, 1)
    out = jitter_boxes(boxes, fraction=0.5, max_shift=3.0, size=(16, 20))
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= 20).all() and (out[:, 1::2] <= 16).all()
    assert ((out[:, 2] - out[:, 0]) >= 1 - 1e-5).all() and ((out[:, 3] - out[:, 1]) >= 1 - 1e-5).all()
    assert (out - boxes).abs().max() <= 3.0 + 1e-6  # the cap (before clipping can only move a corner inwards)
    assert not torch.equal(out, boxes)


def test_sample_points__inside_their_region_or_flagged() -> None:
    torch.manual_seed(0)
    masks = _masks()
    points, found = sample_points(masks, 50)
    assert found.tolist() == [True, True, False]
    for i in range(2):
        xs, ys = points[i, :, 0].long(), points[i, :, 1].long()
        assert masks[i, ys, xs].all()


def test_initial_points__positives_inside_negatives_in_box_outside_mask() -> None:
    torch.manual_seed(0)
    masks = torch.zeros(1, 16, 20, dtype=torch.bool)
    masks[0, 4:8, 4:8] = True
    boxes = torch.tensor([[2.0, 2.0, 10.0, 10.0]])
    points, labels = initial_points(masks, boxes, positives=2, negatives=3)
    assert labels.tolist() == [[1, 1, 0, 0, 0]]
    xs, ys = points[0, :, 0].long(), points[0, :, 1].long()
    assert masks[0, ys[:2], xs[:2]].all() and not masks[0, ys[2:], xs[2:]].any()
    assert ((xs[2:] >= 2) & (xs[2:] < 10) & (ys[2:] >= 2) & (ys[2:] < 10)).all()


def test_correction_points__miss_is_positive_false_alarm_negative_exact_padding() -> None:
    target = torch.zeros(3, 8, 8, dtype=torch.bool)
    target[0, 2:4, 2:4] = True  # predicted empty: a miss
    target[2, 1, 1] = True
    predicted = torch.zeros_like(target)
    predicted[1, 5:7, 5:7] = True  # target empty: a false alarm
    predicted[2, 1, 1] = True  # exact
    points, labels = correction_points(predicted, target)
    assert labels.tolist() == [[1], [0], [-1]]
    x, y = points[0, 0].long()
    assert target[0, y, x]


def test_sam_loss__backpropagates_the_best_candidate_and_trains_the_iou_head() -> None:
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    good = torch.where(target > 0, 8.0, -8.0)
    logits = torch.stack([-good, good, torch.zeros_like(good)], 1).requires_grad_(True)  # candidate 1 is right
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    loss, best = SamLoss()(logits, iou_pred, target)
    assert best.tolist() == [1, 1]
    loss.backward()
    assert logits.grad[:, 0].abs().sum() == 0 and logits.grad[:, 2].abs().sum() == 0  # only the chosen mask learns
    assert iou_pred.grad.abs().sum() > 0
    assert mask_iou(good, target).tolist() == [1.0, 1.0]
    assert dice_loss(good, target).max() < 1e-3


@pytest.mark.parametrize("weights", [(20.0, 1.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)])
def test_sam_loss__weights_combine_linearly(weights: tuple[float, float, float]) -> None:
    torch.manual_seed(0)
    logits, iou_pred, target = torch.randn(4, 1, 8, 8), torch.rand(4, 1), torch.rand(4, 8, 8).round()
    focal = SamLoss(1.0, 0.0, 0.0)(logits, iou_pred, target)[0]
    dice = SamLoss(0.0, 1.0, 0.0)(logits, iou_pred, target)[0]
    mse = SamLoss(0.0, 0.0, 1.0)(logits, iou_pred, target)[0]
    total = SamLoss(*weights)(logits, iou_pred, target)[0]
    torch.testing.assert_close(total, weights[0] * focal + weights[1] * dice + weights[2] * mse)
