"""COCO instances JSON: polygons and RLE rasterised to class ids, the overlap rule, crowds, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vfmtune.data import coco
from vfmtune.data.coco import coco_instances, from_coco
from vfmtune.data.images import DataError
from vfmtune.data.masks import load_mask

mask_utils = pytest.importorskip("pycocotools.mask")
H, W = 16, 20


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A polygon whose rasterisation is rows y0..y1-1, cols x0..x1-1 (pycocotools' pixel convention)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.flatten(order="F").astype(np.uint8)  # COCO RLE runs go down columns, starting with zeros
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return {"size": [H, W], "counts": [*counts, run]}


def _write_coco(tmp_path: Path, extra_annotations: list[dict] | None = None) -> Path:
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / name)
    bottom = np.zeros((H, W), np.uint8)
    bottom[13:16, 0:5] = 1
    crowd = np.zeros((H, W), np.uint8)
    crowd[0:6, 15:20] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()  # compressed RLE as it appears in JSON
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": _rect(5, 4, 9, 8), "iscrowd": 0},  # cup
        {"id": 2, "image_id": 1, "category_id": 7, "segmentation": _rect(2, 2, 14, 12), "iscrowd": 0},  # table
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": _uncompressed_rle(bottom), "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "segmentation": crowd_rle, "iscrowd": 1},
        {"id": 5, "image_id": 1, "category_id": 3, "segmentation": _rect(16, 2, 18, 4), "iscrowd": 0},  # in crowd
        *(extra_annotations or []),
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "categories": [{"id": 7, "name": "table"}, {"id": 3, "name": "cup"}],
            "annotations": anns}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _expected() -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    out[0:6, 15:20] = 255  # crowd: ignore ...
    out[2:12, 2:14] = 2  # table (category 7 -> class 2)
    out[4:8, 5:9] = 1  # the smaller cup wins although it comes first in the JSON
    out[13:16, 0:5] = 1  # uncompressed RLE
    out[2:4, 16:18] = 1  # ... except where an instance is drawn inside the crowd
    return out


def test_from_coco__rasterises_polygons_and_rle(tmp_path: Path) -> None:
    table = from_coco(_write_coco(tmp_path), cache_dir=tmp_path / "cache")
    assert table.classes == ["background", "cup", "table"] and table.image_ids == [1, 2]
    assert table.paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    np.testing.assert_array_equal(load_mask(table.masks[0], num_classes=3), _expected())
    np.testing.assert_array_equal(load_mask(table.masks[1], num_classes=3), np.zeros((H, W)))


def test_from_coco__reuses_cached_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_coco(tmp_path)
    first = from_coco(path, cache_dir=tmp_path / "cache")
    stamp = Path(first.masks[0]).stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("masks were rasterised again")

    monkeypatch.setattr(coco, "_rasterise", fail)
    assert from_coco(path, cache_dir=tmp_path / "cache").masks == first.masks
    assert Path(first.masks[0]).stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # Changed annotations are new content: a new cache folder, never the stale masks.
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    changed = from_coco(path, cache_dir=tmp_path / "cache")
    assert Path(changed.masks[0]).parent != Path(first.masks[0]).parent
    assert load_mask(changed.masks[0])[5, 6] == 2  # without the cup the table shows


def test_coco_instances__keeps_every_instance(tmp_path: Path) -> None:
    instances = coco_instances(_write_coco(tmp_path), 1)
    assert [(i.annotation_id, i.class_index, i.iscrowd) for i in instances] == [
        (1, 1, False), (2, 2, False), (3, 1, False), (4, 2, True), (5, 1, False)]
    assert instances[0].mask.shape == (H, W) and instances[0].mask.sum() == 16
    assert coco_instances(tmp_path / "ann.json", 2) == []


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        ({"id": 9, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 5, 5]]},
         "annotation 9 (image id 1, file 'a.png'): polygon 0 has 2 points, needs at least 3"),
        ({"id": 9, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 3, 3, 5, 5]]},
         "annotation 9 (image id 1, file 'a.png'): polygon 0 has zero area"),
        ({"id": 9, "image_id": 42, "category_id": 3, "segmentation": _rect(0, 0, 2, 2)},
         "annotation 9 (image id 42): no image with that id"),
        ({"id": 9, "image_id": 1, "category_id": 5, "segmentation": _rect(0, 0, 2, 2)},
         "category_id 5 is not in categories"),
        ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]}, "no polygon or RLE segmentation"),
    ],
    ids=["two_points", "zero_area", "unknown_image", "unknown_category", "bbox_only"],
)
def test_from_coco__bad_annotation_is_reported(tmp_path: Path, annotation: dict, problem: str) -> None:
    path = _write_coco(tmp_path, [annotation])
    with pytest.raises(DataError) as info:
        from_coco(path, cache_dir=tmp_path / "cache")
    assert str(info.value).startswith(f"{path}: 1 problems:") and problem in str(info.value)
    assert "redraw or delete those annotations" in info.value.fix
    # skip: dropped and listed; the rest of the image rasterises as without it.
    table = from_coco(path, cache_dir=tmp_path / "cache", on_bad="skip")
    assert any(problem in line for line in table.ignored)
    np.testing.assert_array_equal(load_mask(table.masks[0]), _expected())


def test_from_coco__missing_image_is_named_with_its_id(tmp_path: Path) -> None:
    path = _write_coco(tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError, match=r"image id 2 \(file 'b.png'\): .*b.png not found") as info:
        from_coco(path, cache_dir=tmp_path / "cache")
    assert "set images_dir" in info.value.fix
    table = from_coco(path, cache_dir=tmp_path / "cache", on_bad="skip")
    assert table.image_ids == [1] and len(table.masks) == 1
