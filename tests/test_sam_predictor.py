"""SamPromptPredictor on the tiny random-init SAM: shapes, batching, best-of-three selection,
cached embeddings, and clear answers to bad prompts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.sam import SamPromptPredictor, build_sam

H, W = 90, 120


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor(image: np.ndarray) -> SamPromptPredictor:
    torch.manual_seed(0)
    predictor = SamPromptPredictor(build_sam("test_sam_tinyvit"), batch_size=2)
    predictor.set_image(image)
    return predictor


BOXES = np.array([[10, 10, 60, 50], [0, 0, 120, 90], [30.5, 20.5, 31.5, 21.5], [70, 5, 118, 88], [5, 40, 50, 85]])


def test_predict__boxes_give_one_mask_per_box_at_image_size(predictor: SamPromptPredictor) -> None:
    out = predictor.predict(boxes=BOXES)
    assert out.masks.shape == (5, H, W) and out.masks.dtype == torch.bool
    assert out.iou.shape == (5,)
    assert out.low_res_logits.shape == (5, 32, 32)  # 4x the 8x8 embedding grid of the tiny model
    assert out.clipped == 0
    # The bool masks are the thresholded, upscaled logits (segment-anything's postprocess, reused as is).
    sam = predictor.model
    up = sam.postprocess_masks(out.low_res_logits[:, None], predictor.sam.input_size, (H, W))[:, 0]
    assert torch.equal(up > sam.mask_threshold, out.masks)


def test_predict__batching_does_not_change_results(predictor: SamPromptPredictor) -> None:
    small = predictor.predict(boxes=BOXES)  # batch_size=2: three decoder calls
    predictor.batch_size = 64
    try:
        big = predictor.predict(boxes=BOXES)
    finally:
        predictor.batch_size = 2
    torch.testing.assert_close(small.low_res_logits, big.low_res_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.iou, big.iou, atol=1e-5, rtol=1e-5)


def test_predict__multimask_returns_the_candidate_with_the_best_predicted_iou(predictor: SamPromptPredictor) -> None:
    out = predictor.predict(boxes=BOXES, multimask_output=True)
    boxes = predictor.sam.transform.apply_boxes_torch(torch.as_tensor(BOXES, dtype=torch.float), (H, W))
    masks, iou, low = predictor.sam.predict_torch(None, None, boxes, multimask_output=True)
    assert masks.shape[1] == 3
    rows, best = torch.arange(len(BOXES)), iou.argmax(1)
    torch.testing.assert_close(out.iou, iou.max(1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.low_res_logits, low[rows, best], atol=1e-4, rtol=1e-4)


def test_predict__selection_follows_the_iou_ranking(
        predictor: SamPromptPredictor, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fabricated decoder output: candidate k of prompt i is filled with 10 * i + k, and the best IoU sits at a
    # different index per prompt, so the returned mask identifies which candidate was taken.
    iou = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.1, 0.3], [0.2, 0.7, 0.6]])
    low = (10 * torch.arange(3)[:, None] + torch.arange(3)).float()[:, :, None, None].expand(3, 3, 32, 32)

    done = [0]

    def fake_predict_torch(coords, labels, boxes, mask_input=None, multimask_output=True, return_logits=False):
        chunk = slice(done[0], done[0] + len(boxes))
        done[0] += len(boxes)
        return low[chunk] > 0, iou[chunk], low[chunk]

    monkeypatch.setattr(predictor.sam, "predict_torch", fake_predict_torch)
    predictor.batch_size = 2  # selection must also hold across decoder batches
    out = predictor.predict(boxes=BOXES[:3], multimask_output=True)
    assert out.low_res_logits[:, 0, 0].tolist() == [2.0, 10.0, 21.0]
    assert out.iou.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert out.masks[:, 0, 0].tolist() == [True, True, True]


def test_predict__points_alone_and_with_boxes(predictor: SamPromptPredictor) -> None:
    one = predictor.predict(points=[[30, 30], [100, 70]], point_labels=[1, 0])
    assert one.masks.shape == (1, H, W)
    shared = predictor.predict(boxes=BOXES[:3], points=[[30, 30]], point_labels=[1])
    per_box = predictor.predict(boxes=BOXES[:3], points=[[[30, 30]]] * 3, point_labels=[[1]] * 3)
    torch.testing.assert_close(shared.low_res_logits, per_box.low_res_logits)
    negative = predictor.predict(boxes=BOXES[:3], points=[[30, 30]], point_labels=[0])
    assert not torch.allclose(negative.low_res_logits, shared.low_res_logits)  # the label reaches the model


def test_embed__cached_embedding_gives_identical_predictions(image: np.ndarray) -> None:
    torch.manual_seed(0)
    predictor = SamPromptPredictor(build_sam("test_sam_tinyvit"))
    embedding = predictor.embed(image)
    assert embedding.shape == (1, 32, 8, 8)
    direct = predictor.predict(boxes=BOXES)
    fresh = SamPromptPredictor(predictor.model)
    fresh.set_image(Image.fromarray(image), embedding=embedding.clone())  # PIL input works too
    cached = fresh.predict(boxes=BOXES)
    assert torch.equal(cached.low_res_logits, direct.low_res_logits) and torch.equal(cached.masks, direct.masks)
    with pytest.raises(ValueError, match=r"embedding has shape \(1, 32, 4, 4\); this model makes \(1, 32, 8, 8\)"):
        fresh.set_image(image, embedding=torch.zeros(1, 32, 4, 4))


def test_set_image__grey_and_non_uint8_images(predictor: SamPromptPredictor, image: np.ndarray) -> None:
    grey = image[..., 0]
    predictor.set_image(grey)
    assert predictor.predict(boxes=BOXES[:1]).masks.shape == (1, H, W)
    with pytest.raises(ValueError, match="uint8.*float32"):
        predictor.set_image(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\].*\(90, 120, 4\)"):
        predictor.set_image(np.zeros((H, W, 4), np.uint8))
    predictor.set_image(image)


def test_predict__boxes_outside_the_image_are_clipped_and_counted(
        predictor: SamPromptPredictor, caplog: pytest.LogCaptureFixture) -> None:
    boxes = np.array([[-20, -5, 60, 50], [10, 10, 60, 50], [100, 80, 400, 300]])
    with caplog.at_level(logging.WARNING, logger="vfmtune.sam.predictor"):
        out = predictor.predict(boxes=boxes)
    assert out.clipped == 2 and "2 of 3 boxes reach outside the 120x90 image; clipped" in caplog.text
    inside = predictor.predict(boxes=[[0, 0, 60, 50], [10, 10, 60, 50], [100, 80, 120, 90]])
    torch.testing.assert_close(out.low_res_logits, inside.low_res_logits)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"boxes": [[130, 10, 200, 50]]}, r"zero area inside the 120x90 image.*rows \[0\]"),
    ({"boxes": [[10, 10, 10, 50]]}, "zero area"),
    ({"boxes": [[60, 10, 10, 50]]}, "x2 >= x1 and y2 >= y1; rows \\[0\\]"),
    ({"boxes": [[0, 0, np.nan, 5]]}, "NaN or inf"),
    ({"boxes": [[0, 0, 5]]}, r"\[N, 4\]"),
    ({"points": [[10, 10]]}, "point_labels are required"),
    ({"points": [[10, 10]], "point_labels": [2]}, "1 \\(object\\) or 0 \\(background\\)"),
    ({"points": [[10, 200]], "point_labels": [1]}, "outside the 120x90 image \\(x, y order\\)"),
    ({"boxes": BOXES[:2], "points": [[[1, 1]]] * 3, "point_labels": [[1]] * 3}, "3 point sets for 2 boxes"),
    ({}, "Give boxes and/or points"),
])
def test_predict__bad_prompts_are_refused_with_the_reason(
        predictor: SamPromptPredictor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_predict__needs_an_image_first() -> None:
    with pytest.raises(RuntimeError, match="call set_image"):
        SamPromptPredictor(build_sam("test_sam_tinyvit")).predict(boxes=BOXES)
