"""Paired transforms keep image and mask aligned, and masks only ever hold ids they started with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmtune.choices import ConfigError
from vfmtune.config import AugmentConfig
from vfmtune.data.images import DataError
from vfmtune.data.paired import SegmentationDataset, build_paired_transforms

# Class id -> a colour no other class has; the image *is* its mask, painted.
PALETTE = {0: (0, 0, 0), 1: (250, 0, 0), 2: (0, 250, 0), 3: (0, 0, 250), 255: (250, 250, 250)}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _blocks(seed: int = 0, h: int = 48, w: int = 64, block: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = rng.choice(list(PALETTE), size=(h // block, w // block))
    return np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)


def _paint(ids: np.ndarray) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for k, rgb in PALETTE.items():
        lut[k] = rgb
    return lut[ids]


def _unpaint(image: torch.Tensor) -> np.ndarray:
    """Normalised float [3, H, W] -> class id per pixel, by the nearest palette colour."""
    rgb = (image.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
    ids, colours = np.array(list(PALETTE)), np.array(list(PALETTE.values()), float)
    return ids[np.argmin(((rgb[:, :, None, :] - colours) ** 2).sum(-1), axis=-1)]


@pytest.mark.parametrize("seed", range(3))
def test_train_transform__image_and_mask_stay_aligned(seed: int) -> None:
    # Nearest interpolation for the image too, so every output pixel is an exact palette colour.
    config = {"input_size": (3, 32, 40), "mean": MEAN, "std": STD, "interpolation": "nearest"}
    train_tf, _ = build_paired_transforms(config, AugmentConfig(hflip=0.5, vflip=0.5, scale=[0.1, 1.0]))
    ids = _blocks(seed)
    torch.manual_seed(seed)
    flips = set()
    for _ in range(25):
        image, mask = train_tf(Image.fromarray(_paint(ids)), ids)
        assert image.dtype == torch.float32 and image.shape == (3, 32, 40)
        assert mask.dtype == torch.int64 and mask.shape == (32, 40)
        np.testing.assert_array_equal(_unpaint(image), mask.numpy())
        flips.add(tuple(mask[0, :3].tolist()))
    assert len(flips) > 1  # the crops really were random


def test_train_transform__bilinear_image_never_blends_the_mask() -> None:
    config = {"input_size": (3, 24, 24), "mean": MEAN, "std": STD}
    plain_tf, eval_tf = build_paired_transforms(config, AugmentConfig(hflip=0.5, vflip=0.5, scale=[0.05, 1.0]))
    jitter_tf, _ = build_paired_transforms(config, AugmentConfig(color_jitter=0.4, scale=[0.05, 1.0]))
    ids = _blocks(1)
    torch.manual_seed(0)
    for tf in [plain_tf] * 20 + [jitter_tf] * 10 + [eval_tf]:
        image, mask = tf(Image.fromarray(_paint(ids)), ids)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
        if tf is jitter_tf:
            continue
        # Away from block edges (3x3 neighbourhood of one class) the blended image shows the mask's class.
        m = mask.numpy()
        inner = np.ones_like(m, bool)[1:-1, 1:-1]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner &= m[1 + dy:m.shape[0] - 1 + dy, 1 + dx:m.shape[1] - 1 + dx] == m[1:-1, 1:-1]
        np.testing.assert_array_equal(_unpaint(image)[1:-1, 1:-1][inner], m[1:-1, 1:-1][inner])
    _, keep_tf = build_paired_transforms({"input_size": (3, 24, 24)}, eval_resize=False)
    image, mask = keep_tf(Image.fromarray(_paint(ids)), ids)
    assert image.shape == (3, 48, 64)
    np.testing.assert_array_equal(mask.numpy(), ids)


def test_eval_transform__normalises_with_the_given_mean_and_std() -> None:
    _, eval_tf = build_paired_transforms({"input_size": (3, 8, 8), "mean": MEAN, "std": STD})
    image, mask = eval_tf(Image.new("RGB", (16, 16), (255, 0, 128)), np.full((16, 16), 255, np.uint8))
    np.testing.assert_allclose(image[:, 4, 4].numpy(), [(1 - 0.5) / 0.25, (0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25],
                               atol=1e-5)
    assert (mask == 255).all()


def test_build_paired_transforms__refuses_auto_augment() -> None:
    with pytest.raises(ConfigError, match="auto_augment=null"):
        build_paired_transforms({"input_size": (3, 8, 8)}, AugmentConfig(auto_augment="rand-m9-mstd0.5"))


def test_segmentation_dataset__loads_pairs(tmp_path: Path) -> None:
    ids = _blocks(2)
    Image.fromarray(_paint(ids)).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(ids).save(tmp_path / "a.png")
    Image.fromarray(ids[:, :40]).save(tmp_path / "narrow.png")
    _, eval_tf = build_paired_transforms({"input_size": (3, 16, 16)})
    ds = SegmentationDataset([tmp_path / "a.jpg", tmp_path / "a.jpg"], [tmp_path / "a.png", tmp_path / "narrow.png"],
                             eval_tf, num_classes=4)
    image, mask = ds[0]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16) and mask.dtype == torch.int64
    with pytest.raises(DataError, match=r"narrow.png: mask is 40x48 but its image .*a.jpg is 64x48"):
        ds[1]


def test_pipeline__folder_scan_split_dataset_loader(tmp_path: Path) -> None:
    """The whole data path as the integrator wires it: source -> scan -> split -> dataset -> batches."""
    from torch.utils.data import DataLoader

    from vfmtune.data.mask_scan import scan_masks
    from vfmtune.data.mask_sources import class_names, from_mask_folder
    from vfmtune.data.mask_splits import resolve_mask_splits

    for i in range(24):
        ids = _blocks(i)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(_paint(ids)).save(tmp_path / "images" / f"{i:02d}.png")
        Image.fromarray(ids).save(tmp_path / "masks" / f"{i:02d}.png")
    table = from_mask_folder(tmp_path)
    ok, report = scan_masks(table.paths, table.masks)
    assert all(ok) and class_names(table, report.num_classes) == ["class_0", "class_1", "class_2", "class_3"]
    splits = resolve_mask_splits(table, report.presence, 0.2, 0.2, 0, tmp_path / "cache")
    train = [i for i, s in enumerate(splits) if s == "train"]
    assert report.class_pixels(train).shape == (4,)
    train_tf, _ = build_paired_transforms({"input_size": (3, 32, 32)}, AugmentConfig())
    ds = SegmentationDataset([table.paths[i] for i in train], [table.masks[i] for i in train], train_tf,
                             num_classes=report.num_classes)
    images, masks = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and masks.dtype == torch.int64
