"""Segmentation sources: images/ + masks/ folders, CSV manifests and classes.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmtune.data.images import DataError
from vfmtune.data.mask_scan import scan_masks
from vfmtune.data.mask_sources import class_names, from_mask_folder, from_mask_manifest, read_classes
from vfmtune.data.masks import load_mask


def _pair(root: Path, stem: str, ids: np.ndarray, image_ext: str = ".jpg", mask_ext: str = ".png") -> None:
    for sub, ext, pixels in (("images", image_ext, np.zeros((*ids.shape[:2], 3), np.uint8)), ("masks", mask_ext, ids)):
        path = root / sub / f"{stem}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


def _ids(k: int) -> np.ndarray:
    out = np.zeros((8, 8), np.uint8)
    out[2:5, 2:5] = k
    return out


def test_from_mask_folder__pairs_by_stem_across_extensions(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1))
    _pair(tmp_path, "sub/b", _ids(3), image_ext=".tif", mask_ext=".tiff")
    _pair(tmp_path, "c", _ids(2), image_ext=".png")
    (tmp_path / "masks" / "notes.txt").write_text("labelled by Ann")
    table = from_mask_folder(tmp_path)
    assert [Path(p).name for p in table.paths] == ["a.jpg", "c.png", "b.tif"]
    assert [Path(p).name for p in table.masks] == ["a.png", "c.png", "b.tiff"]
    assert table.classes is None and table.ignored == [str(tmp_path / "masks" / "notes.txt")]
    # No classes.txt: the scan finds the largest id, and the classes are named after it.
    _, report = scan_masks(table.paths, table.masks)
    assert class_names(table, report.num_classes) == ["class_0", "class_1", "class_2", "class_3"]


def test_from_mask_folder__unpaired_files_are_listed_together(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1))
    _pair(tmp_path, "b", _ids(1))
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "b_mask.png")
    with pytest.raises(DataError) as info:
        from_mask_folder(tmp_path)
    message = str(info.value)
    assert "1 images without a mask:" in message and str(tmp_path / "images" / "b.jpg") in message
    assert "1 masks without an image:" in message and str(tmp_path / "masks" / "b_mask.png") in message
    assert "add the missing masks or images, or move the unpaired files" in info.value.fix


def test_from_mask_folder__missing_masks_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"masks: folder not found\. Fix: arrange the data as"):
        from_mask_folder(tmp_path)


def test_from_mask_folder__two_masks_for_one_name_are_ambiguous(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1))
    Image.fromarray(_ids(2)).save(tmp_path / "masks" / "a.bmp")
    with pytest.raises(DataError, match="pairing is ambiguous.*a.bmp and .*a.png. Fix: keep one file per name"):
        from_mask_folder(tmp_path)


def test_from_mask_folder__colour_classes_txt(tmp_path: Path) -> None:
    ids = _ids(2)
    palette = np.array([(0, 0, 0), (255, 0, 0), (0, 0, 255)], np.uint8)
    _pair(tmp_path, "a", palette[ids], mask_ext=".png")
    (tmp_path / "classes.txt").write_text("# name r g b\nbackground 0 0 0\nred car 255 0 0\nsky 0 0 255\n\n")
    table = from_mask_folder(tmp_path)
    assert table.classes == ["background", "red car", "sky"]
    assert table.colours == {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}
    np.testing.assert_array_equal(load_mask(table.masks[0], num_classes=3, colours=table.colours), ids)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bg\n\nroad\n", "line 2 is blank"),
        ("bg 0 0 0\nroad\n", "line 2 mixes plain names"),
        ("bg\nbg\n", "class 'bg' is listed twice"),
        ("bg 0 0 0\nroad 0 0 0\n", "colour (0, 0, 0) already belongs to class 'bg'"),
        ("bg 0 0 300\n", "colour 0 0 300 is outside 0-255"),
        ("".join(f"c{i}\n" for i in range(255)), "255 classes"),
    ],
    ids=["blank_line", "mixed", "duplicate_name", "duplicate_colour", "bad_colour", "too_many"],
)
def test_read_classes__bad_file(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(DataError) as info:
        read_classes(tmp_path / "classes.txt")
    assert str(info.value).startswith(str(tmp_path / "classes.txt")) and problem in info.value.problem
    assert info.value.fix


def test_from_mask_manifest__relative_paths_and_splits(tmp_path: Path) -> None:
    _pair(tmp_path, "a", _ids(1))
    _pair(tmp_path, "b", _ids(1))
    (tmp_path / "classes.txt").write_text("background\ndefect\n")
    (tmp_path / "pairs.csv").write_text(
        "image,mask,split\nimages/a.jpg,masks/a.png,train\nimages/b.jpg,masks/b.png,VAL\n")
    table = from_mask_manifest(tmp_path / "pairs.csv")
    assert table.paths == [str(tmp_path / "images" / "a.jpg"), str(tmp_path / "images" / "b.jpg")]
    assert table.masks[1] == str(tmp_path / "masks" / "b.png")
    assert table.splits == ["train", "val"] and table.classes == ["background", "defect"]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ("images/a.jpg,masks/zz.png\n", "1 rows point at missing files:\n  row 2: mask"),
        ("images/a.jpg,masks/a.png\nimages/a.jpg,masks/a.png\n", "row 3: "),
        ("images/a.jpg,classes.txt\n", "rows point at non-image files"),
    ],
    ids=["missing_mask", "repeated_image", "mask_not_an_image"],
)
def test_from_mask_manifest__bad_rows(tmp_path: Path, rows: str, problem: str) -> None:
    _pair(tmp_path, "a", _ids(1))
    (tmp_path / "classes.txt").write_text("background\ndefect\n")
    (tmp_path / "pairs.csv").write_text("image,mask\n" + rows)
    with pytest.raises(DataError) as info:
        from_mask_manifest(tmp_path / "pairs.csv")
    assert str(info.value).startswith(str(tmp_path / "pairs.csv")) and problem in str(info.value)
    assert "Fix:" in str(info.value)


def test_from_mask_manifest__wrong_header(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text("path,label\na.jpg,cat\n")
    with pytest.raises(DataError, match="image,mask"):
        from_mask_manifest(tmp_path / "pairs.csv")
