"""Strict mask decoding and the pair scan: each trap, on real files written under tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmtune.data.images import DataError
from vfmtune.data.mask_scan import scan_masks
from vfmtune.data.masks import IGNORE_INDEX, VOC_IGNORE_COLOUR, load_mask, oriented_size

IDS = np.array([[0, 0, 1, 1, 2, 2],
                [0, 0, 1, 1, 2, 2],
                [255, 255, 0, 0, 1, 1],
                [0, 0, 0, 0, 0, 0]], dtype=np.uint8)  # 4 x 6, classes 0-2 and ignore
COLOURS = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2}


def _palette_png(path: Path, ids: np.ndarray, palette: list[tuple[int, int, int]]) -> Path:
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    flat = [v for rgb in palette for v in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    im.save(path)
    return path


def _voc_palette() -> list[tuple[int, int, int]]:
    return [(0, 0, 0), (128, 0, 0), (0, 128, 0)] + [(0, 0, 0)] * 252 + [VOC_IGNORE_COLOUR]


def _rgb(ids: np.ndarray, table: dict[tuple[int, int, int], int]) -> np.ndarray:
    by_id = {k: rgb for rgb, k in table.items()} | {IGNORE_INDEX: VOC_IGNORE_COLOUR}
    return np.array([[by_id[int(v)] for v in row] for row in ids], dtype=np.uint8)


# --- good masks: every supported encoding decodes to the same ids ---------------------------------

def _grey(p: Path) -> tuple[Path, dict]:
    Image.fromarray(IDS).save(p)
    return p, {}


def _voc(p: Path) -> tuple[Path, dict]:
    return _palette_png(p, IDS, _voc_palette()), {}


def _shuffled_palette(p: Path) -> tuple[Path, dict]:
    # An editor re-saved the mask with its palette reordered: only the colours still mean the classes.
    order = {0: 7, 1: 3, 2: 12, 255: 40}
    palette = [(9, 9, 9)] * 256
    for k, i in order.items():
        palette[i] = _voc_palette()[k] if k != 255 else VOC_IGNORE_COLOUR
    return _palette_png(p, np.vectorize(order.get)(IDS).astype(np.uint8), palette), {"colours": COLOURS}


def _rgb_colours(p: Path) -> tuple[Path, dict]:
    Image.fromarray(_rgb(IDS, COLOURS)).save(p)
    return p, {"colours": COLOURS}


def _grey_as_rgb(p: Path) -> tuple[Path, dict]:
    Image.fromarray(np.repeat(IDS[..., None], 3, axis=2)).save(p)
    return p, {}


def _sixteen_bit_small(p: Path) -> tuple[Path, dict]:
    Image.fromarray(IDS.astype(np.uint16)).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    return p, {}


def _tiff(p: Path) -> tuple[Path, dict]:
    Image.fromarray(IDS).save(p.with_suffix(".tif"))
    return p.with_suffix(".tif"), {}


def _png_named_jpg(p: Path) -> tuple[Path, dict]:
    Image.fromarray(IDS).save(p.with_suffix(".jpg"), format="PNG")  # lossless content, misleading name
    return p.with_suffix(".jpg"), {}


@pytest.mark.parametrize("write", [_grey, _voc, _shuffled_palette, _rgb_colours, _grey_as_rgb, _sixteen_bit_small,
                                   _tiff, _png_named_jpg],
                         ids=["grey_L", "voc_palette", "palette_by_colour", "rgb_colour_table", "grey_saved_as_rgb",
                              "16bit_values_below_256", "tiff", "png_named_jpg"])
def test_load_mask__encodings_decode_to_class_ids(tmp_path: Path, write: Callable) -> None:
    path, kwargs = write(tmp_path / "m.png")
    ids = load_mask(path, num_classes=3, image_size=(6, 4), **kwargs)
    assert ids.dtype == np.uint8 and ids.shape == (4, 6)
    np.testing.assert_array_equal(ids, IDS)


def test_load_mask__binary_mode_1_is_0_and_1(tmp_path: Path) -> None:
    Image.fromarray(IDS == 1).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png", num_classes=2), (IDS == 1).astype(np.uint8))


# --- bad masks: a DataError naming the file, the problem and the fix -------------------------------

def _jpeg(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(IDS * 100).save(p.with_suffix(".jpg"))
    return p.with_suffix(".jpg"), {}, "lossy compression", "lossless PNG"


def _jpeg_named_png(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(IDS * 100).save(p, format="JPEG")  # the extension lies; the format does not
    return p, {}, "JPEG mask", "lossless PNG"


def _sixteen_bit_scaled(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray((IDS.astype(np.uint32) * 257).astype(np.uint16)).save(p)  # 255 -> 65535
    return p, {}, "values outside 0-255: 257", "// 257"


def _sixteen_bit_big(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(IDS.astype(np.uint16) + 299).save(p)
    return p, {}, "values outside 0-255", "remap the ids to 0-254"


def _rgb_without_table(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(_rgb(IDS, COLOURS)).save(p)
    return p, {}, "no colour table", "name r g b"


def _unknown_colour(p: Path) -> tuple[Path, dict, str, str]:
    rgb = _rgb(IDS, COLOURS)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(p)
    return p, {"colours": COLOURS}, "(1, 2, 3) (1 px)", "add a line 'name r g b'"


def _out_of_range(p: Path) -> tuple[Path, dict, str, str]:
    bad = IDS.copy()
    bad[3, :2] = 7
    bad[3, 2] = 9
    Image.fromarray(bad).save(p)
    return p, {}, "7 (2 px), 9 (1 px); valid are 0-2 and 255", "classes.txt"


def _all_ignore(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(np.full_like(IDS, 255)).save(p)
    return p, {}, "no labelled pixel", "data.on_bad_image=skip"


def _wrong_size(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(p)
    return p, {}, "mask is 5x4 but its image img.png is 6x4", "nearest-neighbour"


def _swapped_size(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(np.zeros((6, 4), np.uint8)).save(p)
    return p, {}, "EXIF rotation", "nearest-neighbour"


def _missing(p: Path) -> tuple[Path, dict, str, str]:
    return p, {}, "not found", "add the mask"


def _transparent(p: Path) -> tuple[Path, dict, str, str]:
    rgba = np.concatenate([_rgb(IDS, COLOURS), np.full((4, 6, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(p)
    return p, {"colours": COLOURS}, "transparent", "save without alpha"


def _float(p: Path) -> tuple[Path, dict, str, str]:
    Image.fromarray(IDS.astype(np.float32) / 2).save(p.with_suffix(".tif"))
    return p.with_suffix(".tif"), {}, "float mask", "argmax"


@pytest.mark.parametrize("write", [_jpeg, _jpeg_named_png, _sixteen_bit_scaled, _sixteen_bit_big, _rgb_without_table,
                                   _unknown_colour, _out_of_range, _all_ignore, _wrong_size, _swapped_size, _missing,
                                   _transparent, _float],
                         ids=["jpeg", "jpeg_named_png", "16bit_scaled_by_257", "16bit_big", "rgb_without_table",
                              "unknown_colour", "values_not_class_ids", "all_ignore", "size_mismatch",
                              "size_swapped", "missing", "transparent", "float"])
def test_load_mask__bad_mask_is_data_error(tmp_path: Path, write: Callable) -> None:
    path, kwargs, problem, fix = write(tmp_path / "m.png")
    with pytest.raises(DataError) as info:
        load_mask(path, num_classes=3, image_size=(6, 4), image_path="img.png", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "Fix:" in message
    assert problem in info.value.problem, info.value.problem
    assert fix in info.value.fix, info.value.fix


def test_oriented_size__applies_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: load_image shows it as 4 wide, 6 high
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert oriented_size(tmp_path / "r.jpg") == (4, 6)


# --- scan: every pair once, presence and pixel counts ---------------------------------------------

def _pairs(tmp_path: Path, masks: list[np.ndarray]) -> tuple[list[str], list[str]]:
    images, paths = [], []
    for i, m in enumerate(masks):
        Image.fromarray(np.zeros((*m.shape, 3), np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray(m).save(tmp_path / f"m{i}.png")
        images.append(str(tmp_path / f"i{i}.png"))
        paths.append(str(tmp_path / f"m{i}.png"))
    return images, paths


def test_scan_masks__counts_presence_and_infers_classes(tmp_path: Path) -> None:
    second = np.zeros_like(IDS)
    second[0, 0] = 4
    images, masks = _pairs(tmp_path, [IDS, second])
    ok, report = scan_masks(images, masks)
    assert ok == [True, True] and report.num_classes == 5
    np.testing.assert_array_equal(report.pixel_counts, [[12, 6, 4, 0, 0], [23, 0, 0, 0, 1]])
    np.testing.assert_array_equal(report.presence[:, 4], [False, True])
    np.testing.assert_array_equal(report.class_pixels([0]), [12, 6, 4, 0, 0])


def test_scan_masks__reports_every_bad_pair_or_skips_them(tmp_path: Path) -> None:
    shifted = np.where(IDS < 255, IDS + 5, IDS).astype(np.uint8)
    images, masks = _pairs(tmp_path, [IDS, np.full_like(IDS, 255), shifted])
    with pytest.raises(DataError) as info:
        scan_masks(images, masks, num_classes=3)
    message = str(info.value)
    assert "2 of 3 image/mask pairs failed" in message
    assert masks[1] in message and masks[2] in message and "data.on_bad_image=skip" in message
    ok, report = scan_masks(images, masks, num_classes=3, on_bad="skip")
    assert ok == [True, False, False] and len(report.bad) == 2 and report.pixel_counts[1:].sum() == 0


def test_scan_masks__refuses_binary_masks_saved_as_0_255(tmp_path: Path) -> None:
    images, masks = _pairs(tmp_path, [(IDS == 1).astype(np.uint8) * 255, (IDS == 2).astype(np.uint8) * 255])
    with pytest.raises(DataError, match=r"binary masks saved as 0/255.*np.where\(m == 255, 1, 0\)"):
        scan_masks(images, masks)


def test_scan_masks__missing_mask_names_its_image(tmp_path: Path) -> None:
    images, masks = _pairs(tmp_path, [IDS])
    Path(masks[0]).unlink()
    with pytest.raises(DataError, match=f"{masks[0]}.*mask file not found \\(for image {images[0]}\\)"):
        scan_masks(images, masks)
