"""Instance sources (COCO JSON, instance-id PNGs, class maps split into components) and instance metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_instance_data
from PIL import Image

from vfmtune.choices import ConfigError
from vfmtune.config import DataConfig
from vfmtune.data.images import DataError
from vfmtune.data.instances import components, instance_source, load_instances
from vfmtune.instance_metrics import InstanceMetrics


def _by_image(data: DataConfig, cache: Path) -> dict[str, list[tuple[int, int]]]:
    """image name -> sorted (class, area) of its instances."""
    table, refs = instance_source(data, cache)
    return {Path(p).name: sorted((i.class_index, int(i.mask.sum())) for i in load_instances(r)[0]) for p, r in zip(table.paths, refs)}


def test_sources__coco_ids_and_components_give_the_same_instances(tmp_path: Path) -> None:
    root = make_instance_data(tmp_path / "d", n=6, coco=True)
    coco = _by_image(DataConfig(coco=str(root / "annotations.json")), tmp_path / "cache")
    assert coco == _by_image(DataConfig(root=str(root)), tmp_path / "cache")  # annotations.json found in root
    (root / "annotations.json").unlink()
    assert _by_image(DataConfig(root=str(root)), tmp_path / "cache") == coco  # instances/ + masks/
    for f in (root / "instances").iterdir():
        f.unlink()
    (root / "instances").rmdir()
    assert _by_image(DataConfig(root=str(root)), tmp_path / "cache") == coco  # masks/ split into components
    assert sum(len(v) for v in coco.values()) == 12 and {c for v in coco.values() for c, _ in v} == {1, 2}


def test_sources__instance_ids_without_class_maps_are_one_class(tmp_path: Path) -> None:
    root = make_instance_data(tmp_path / "d", n=3)
    for f in (root / "masks").iterdir():
        f.unlink()
    (root / "masks").rmdir()
    table, refs = instance_source(DataConfig(root=str(root)), tmp_path / "cache")
    assert table.classes == ["background", "object"]
    assert [len(load_instances(r)[0]) for r in refs] == [1, 2, 3]
    assert all(np.asarray(Image.open(m)).max() == 1 for m in table.masks)  # derived class maps, cached


def test_load_instances__size_mismatch_and_empty_masks_are_reported(tmp_path: Path) -> None:
    root = make_instance_data(tmp_path / "d", n=2)
    _, refs = instance_source(DataConfig(root=str(root)), tmp_path / "cache")
    with pytest.raises(DataError, match=r"instance masks are 96x72 but the image is 90x72"):
        load_instances(refs[0], image_size=(90, 72))
    found, dropped = load_instances(refs[1], min_area=10_000)
    assert found == [] and dropped == 2


def test_coco__empty_instance_masks_are_dropped_and_counted(tmp_path: Path) -> None:
    root = make_instance_data(tmp_path / "d", n=2, coco=True)
    data = json.loads((root / "annotations.json").read_text())
    from pycocotools import mask as mask_utils

    empty = mask_utils.encode(np.asfortranarray(np.zeros((72, 96), np.uint8)))
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 0, 0], "area": 0,
                                "segmentation": {"size": [72, 96], "counts": empty["counts"].decode()}})
    (root / "annotations.json").write_text(json.dumps(data))
    _, refs = instance_source(DataConfig(root=str(root)), tmp_path / "cache")
    found, dropped = load_instances(refs[0])
    assert (len(found), dropped) == (1, 1)


def test_instance_source__no_instance_data_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.root=DIR"):
        instance_source(DataConfig(dataset=None), tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no annotations.json, instances/ or masks/"):
        instance_source(DataConfig(root=str(tmp_path)), tmp_path)


def test_components__each_class_split_8_connected() -> None:
    m = np.zeros((6, 6), np.uint8)
    m[0, 0] = m[1, 1] = 1  # diagonal neighbours: one component
    m[4:6, 4:6] = 2
    m[0, 5] = 255  # ignore is never an instance
    assert [(k, int(c.sum())) for k, c in components(m)] == [(1, 2), (2, 4)]


def _target(masks: torch.Tensor, labels: list[int]) -> SimpleNamespace:
    return SimpleNamespace(masks=masks, labels=torch.tensor(labels))


def test_instance_metrics__golden_numbers_paired_and_matched() -> None:
    spec, classes = InstanceMetrics(), ["background", "a", "b"]
    metrics = spec.build(classes)
    gt = torch.zeros(3, 20, 20, dtype=torch.bool)
    gt[0, 0:5, 0:5] = gt[1, 10:15, 10:15] = gt[2, 2:8, 12:18] = True
    pred = gt.clone()
    pred[0, 0:5, 0:3] = False  # IoU 0.4
    spec.update(metrics, [{"masks": pred, "scores": torch.tensor([0.9, 0.8, 0.7]), "paired": True}], [_target(gt, [1, 1, 2])])
    # unpaired: one prediction of class a; gt 0 matches it (0.4), gt 1 overlaps nothing (0), class b has none (0)
    spec.update(metrics, [{"masks": pred[:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}], [_target(gt, [1, 1, 2])])
    spec.update(metrics, [{"masks": torch.zeros(0, 20, 20, dtype=torch.bool), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}],
                [_target(torch.zeros(0, 20, 20, dtype=torch.bool), [])])
    out = spec.results(metrics.compute(), "test", classes)
    assert out["test/instances"] == 6
    assert out["test/instance_iou/a"] == pytest.approx((0.4 + 1 + 0.4 + 0) / 4)
    assert out["test/instance_iou/b"] == pytest.approx(0.5)
    assert out["test/instance_iou"] == pytest.approx((0.4 + 1 + 1 + 0.4 + 0 + 0) / 6)
    assert out["test/sq"] == pytest.approx(1.0)  # PQ matches need IoU > 0.5: only exact masks matched here
    assert 0 < out["test/mask_ap"] < 1 and 0 < out["test/pq"] < 1


def test_instance_metrics__perfect_predictions_score_one() -> None:
    spec, classes = InstanceMetrics(), ["background", "a"]
    metrics = spec.build(classes)
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, :6, :6] = gt[1, 8:, 8:] = True
    spec.update(metrics, [{"masks": gt, "scores": torch.tensor([0.9, 0.8]), "paired": True}], [_target(gt, [1, 1])])
    out = spec.results(metrics.compute(), "val", classes)
    assert out["val/instance_iou"] == out["val/instance_dice"] == out["val/mask_ap"] == out["val/pq"] == pytest.approx(1.0)
