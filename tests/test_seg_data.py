"""bench/seg_data.py and bench/seg_arrays.py on generated arrays: no package download, no network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # the benches import each other by bare name

import seg_arrays as sa


def instance_map() -> np.ndarray:
    """A 12x16 map: instances 1 and 2 touch side by side, 3 is cut by the right image border."""
    inst = np.zeros((12, 16), np.uint16)
    inst[2:8, 2:6] = 1
    inst[2:8, 6:10] = 2
    inst[4:10, 13:16] = 3
    return inst


def test_percentile_to_uint8__maps_percentiles_and_clips() -> None:
    img = np.concatenate([np.linspace(100, 200, 998), [0, 60000]]).astype(np.uint16)  # two outliers
    out = sa.percentile_to_uint8(img, 1.0, 99.0)
    assert out.dtype == np.uint8
    assert out[-1] == 255 and out[-2] == 0  # outliers clip instead of squashing the range
    assert out[:998].min() == 0 and out[:998].max() == 255  # the real range spans all 8 bits
    assert 120 <= out[499] <= 135  # the middle of the real range lands mid-grey


def test_percentile_to_uint8__percentiles_from_valid_pixels_only() -> None:
    img = np.array([[0, 0, 10], [20, 30, 40]], np.uint16)  # zeros are nodata
    out = sa.percentile_to_uint8(img, 0.0, 100.0, valid=img > 0)
    assert out.tolist() == [[0, 0, 0], [85, 170, 255]]


def test_percentile_to_uint8__constant_image_is_black() -> None:
    assert not sa.percentile_to_uint8(np.full((4, 4), 7), 1, 99).any()


def test_tile_slices__cover_the_image_once_and_drop_the_remainder() -> None:
    cover = np.zeros((100, 130), int)
    tiles = sa.tile_slices(cover.shape, 32)
    assert [(r, c) for r, c, _, _ in tiles] == [(r, c) for r in range(3) for c in range(4)]
    for _, _, ys, xs in tiles:
        cover[ys, xs] += 1
    assert cover[:96, :128].min() == cover.max() == 1  # no overlap, no gap
    assert not cover[96:].any() and not cover[:, 128:].any()


def test_tile_slices__tile_larger_than_image_raises() -> None:
    with pytest.raises(ValueError, match="larger than the image"):
        sa.tile_slices((10, 40), 16)


def test_boundary_target__splits_touching_instances() -> None:
    target = sa.boundary_target(instance_map(), width=1)
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[2:8, 5] == 2).all() and (target[2:8, 6] == 2).all()  # both sides of the contact
    assert (target[3:7, 3:5] == 1).all()  # interior of instance 1
    assert (target[instance_map() == 0] == 0).all()  # the boundary lies inside objects


def test_boundary_target__image_border_is_not_an_edge() -> None:
    target = sa.boundary_target(instance_map(), width=1)
    assert (target[5:9, 15] == 1).all()  # instance 3 continues past the border: no edge there
    assert (target[4, 13:16] == 2).all()  # but its top edge is one


def test_boundary_target__width_sets_band() -> None:
    inst = np.zeros((20, 20), np.uint16)
    inst[4:16, 4:16] = 1
    for width in (1, 2, 3):
        assert (sa.boundary_target(inst, width)[10, 4:10] == 2).sum() == width


def test_crop_instances__renumbers_and_flags_truncated() -> None:
    inst = instance_map()
    crop, info = sa.crop_instances(inst, slice(0, 12), slice(4, 12), {1: 1, 2: 1, 3: 1})
    assert crop.dtype == np.uint16 and set(np.unique(crop)) == {0, 1, 2}
    assert info[1] == {"category_id": 1, "source_instance_id": 1, "truncated": True}  # cols 2-3 are outside
    assert info[2] == {"category_id": 1, "source_instance_id": 2, "truncated": False}


def test_coco_rle__round_trip() -> None:
    mask_utils = pytest.importorskip("pycocotools.mask")
    inst = instance_map()
    anns = sa.encode_instances(inst, {1: {"category_id": 4}, 2: {"category_id": 4}, 3: {"category_id": 9}})
    anns = json.loads(json.dumps(anns))  # what annotations.json holds: counts as str
    assert [a["instance_id"] for a in anns] == [1, 2, 3]
    for a in anns:
        rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), inst == a["instance_id"])
        ys, xs = np.nonzero(inst == a["instance_id"])
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == len(ys)
    assert [a["category_id"] for a in anns] == [4, 4, 9]


def test_coco_dataset__ids_files_and_categories() -> None:
    pytest.importorskip("pycocotools")
    inst = instance_map()
    mask = (inst > 0).astype(np.uint8)
    info = {i: {"category_id": 1} for i in (1, 2, 3)}
    samples = [sa.Sample("a", mask, mask, inst, info), sa.Sample("b", mask, mask, inst, info)]
    coco = sa.coco_dataset(samples, ["background", "thing"])
    assert [im["file_name"] for im in coco["images"]] == ["images/a.png", "images/b.png"]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 7))
    assert [a["image_id"] for a in coco["annotations"]] == [1, 1, 1, 2, 2, 2]
    assert coco["categories"] == [{"id": 1, "name": "thing"}]


def test_polygon_mask__and_iou() -> None:
    square = sa.polygon_mask((10, 10), [[(2, 2), (5, 2), (5, 5), (2, 5)]])
    assert square.sum() == 16 and square[2:6, 2:6].all()  # edges included
    assert sa.iou(square, square) == 1.0 and sa.iou(square, ~square) == 0.0


def test_dataset_stats__fractions_ignore_and_instances() -> None:
    mask = np.array([[0, 1], [1, sa.IGNORE]], np.uint8)
    inst = np.array([[0, 1], [2, 0]], np.uint16)
    ds = sa.SegDataset("toy", ["background", "thing"], [
        sa.Sample("a", mask, mask, inst, {1: {"truncated": True}, 2: {}}),
        sa.Sample("b", mask, np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint16), {}),
    ])
    st = sa.dataset_stats(ds)
    assert st["class_fraction"] == {"background": 0.7143, "thing": 0.2857}  # 5 and 2 of 7 labelled pixels
    assert st["ignore_fraction"] == 0.125 and st["images_without_foreground"] == 1
    assert st["instances"] == {"total": 2, "per_image_mean": 1.0, "per_image_min": 0, "per_image_max": 2,
                               "truncated": 1}


class FakeReader:
    """Stands in for a WheelReader: the writer only needs the source, the wheel's name and the licence."""

    def __init__(self) -> None:
        import seg_data

        self.source = seg_data.SOURCES["imgaug"]
        self.path = Path("imgaug-0.4.0-py2.py3-none-any.whl")

    def read(self, member: str) -> bytes:
        return b"MIT licence\n"


def toy_quokka() -> sa.SegDataset:
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    inst = (instance_map() == 1).astype(np.uint16)
    return sa.SegDataset("quokka", ["background", "animal"],
                         [sa.Sample("quokka", rgb, inst.astype(np.uint8), inst, {1: {"category_id": 1}})])


def test_write_dataset__layout_and_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    import seg_data

    manifest = seg_data.write_dataset(toy_quokka(), tmp_path, FakeReader())
    root = tmp_path / "quokka"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quokka"]  # no temp folder left behind
    assert (root / "classes.txt").read_text() == "background\nanimal\n"
    assert Image.open(root / "masks" / "quokka.png").mode == "L"
    assert Image.open(root / "instances" / "quokka.png").mode == "I;16"
    assert len(json.loads((root / "annotations.json").read_text())["annotations"]) == 1
    assert seg_data.up_to_date(root) == manifest == json.loads((root / "manifest.json").read_text())

    (root / "masks" / "quokka.png").write_bytes(b"tampered")
    assert seg_data.up_to_date(root) is None  # a damaged file forces a rebuild


def test_write_dataset__failure_keeps_the_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocotools")
    import seg_data

    seg_data.write_dataset(toy_quokka(), tmp_path, FakeReader())
    before = (tmp_path / "quokka" / "manifest.json").read_text()

    def broken(*args: object) -> dict:
        raise OSError("disk full")

    monkeypatch.setattr(seg_data, "coco_dataset", broken)
    with pytest.raises(OSError, match="disk full"):
        seg_data.write_dataset(toy_quokka(), tmp_path, FakeReader())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quokka"]
    assert (tmp_path / "quokka" / "manifest.json").read_text() == before


def test_write_dataset__refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    import seg_data

    (tmp_path / "quokka").mkdir()
    (tmp_path / "quokka" / "mine.png").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not written by"):
        seg_data.write_dataset(toy_quokka(), tmp_path, FakeReader())
    assert (tmp_path / "quokka" / "mine.png").read_bytes() == b"user data"


def test_recipe_hash__covers_every_dataset_and_changes_with_params(monkeypatch: pytest.MonkeyPatch) -> None:
    import seg_data

    names = [n for _, _, group in seg_data.GROUPS.values() for n in group]
    assert sorted(names) == sorted(seg_data.PARAMS)
    before = seg_data.recipe_hash("nuclei")
    monkeypatch.setitem(seg_data.PARAMS, "nuclei", {**seg_data.PARAMS["nuclei"], "tile": 64})
    assert seg_data.recipe_hash("nuclei") != before
