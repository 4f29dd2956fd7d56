"""vfmtune.viz: every figure from tiny generated data (seconds), and the numbers behind them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_imagefolder
from matplotlib.figure import Figure
from PIL import Image

from vfmtune import viz

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """30 images (10 per class), clustered 8-d features, a split and probabilities that get 3 test images wrong."""
    root = make_imagefolder(tmp_path_factory.mktemp("viz") / "images", {c: 10 for c in CLASSES})
    paths = sorted(str(p) for p in root.rglob("*.png"))
    labels = [CLASSES.index(Path(p).parent.name) for p in paths]
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    features = centres[labels] + rng.normal(0, 0.5, (30, 8))
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    splits = [splits[i % 10] for i in range(30)]
    probs = np.full((30, 3), 0.1)
    probs[np.arange(30), labels] = 0.8
    for i in (8, 18, 29):  # three confident mistakes
        probs[i] = np.roll(probs[i], 1)
    return {"paths": paths, "labels": labels, "features": features, "splits": splits, "probs": probs}


def check(fig: Figure, tmp_path: Path) -> Figure:
    assert isinstance(fig, Figure)
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # shows itself in a notebook
    out = viz.save(fig, tmp_path / "plots" / "fig.png")
    assert Image.open(out).size[0] > 100 and not list(out.parent.glob(".*tmp"))
    return fig


def test_plot_class_grid__one_row_per_class(data: dict, tmp_path: Path) -> None:
    fig = check(viz.plot_class_grid(data["paths"], data["labels"], CLASSES, per_class=4), tmp_path)
    assert len(fig.axes) == 12
    assert fig.axes[0].get_ylabel() == "cat\n(n=10)"


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project__two_columns(data: dict, method: str) -> None:
    assert viz.project(data["features"], method).shape == (30, 2)


def test_project__unknown_method() -> None:
    with pytest.raises(ValueError, match="pca"):
        viz.project(np.ones((4, 3)), "umap")


def test_spread_over_classes__takes_classes_in_turn() -> None:
    assert viz.spread_over_classes([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1]
    assert viz.spread_over_classes([0, 0, 0, 1, 1, 2], 9, among=[1, 2, 4]) == [1, 4, 2]


def test_outliers__farthest_from_class_centre_first(data: dict) -> None:
    features = data["features"].copy()
    features[5] = -features[5]  # a cat embedded far from the other cats
    assert viz.outliers(features, data["labels"], n=3)[0] == 5


def test_plot_embedding_map__panels_and_outlier_thumbnails(data: dict, tmp_path: Path) -> None:
    # t-SNE panels are drawn the same way (its projection is tested above; it takes seconds even on 30 points)
    fig = check(viz.plot_embedding_map(data["features"], data["labels"], CLASSES, data["paths"], data["splits"], ["pca", "pca"],
                                       n_outliers=4), tmp_path)
    maps, thumbs = fig.subfigs
    assert [ax.get_title() for ax in maps.axes] == ["PCA", "PCA"] and len(thumbs.axes) == 4
    assert len(fig.axes) == 6 and not viz.plot_embedding_map(data["features"], data["labels"], CLASSES, methods=["pca"]).subfigs


def test_leakage_pairs__finds_a_duplicate_across_splits(data: dict) -> None:
    features = data["features"].copy()
    test, train = data["splits"].index("test"), data["splits"].index("train")
    features[test] = features[train]
    pairs = viz.leakage_pairs(features, data["splits"])
    assert len(pairs) == data["splits"].count("test")
    assert (pairs[0].query, pairs[0].reference) == (test, train) and pairs[0].distance == pytest.approx(0, abs=1e-9)
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)
    assert viz.leakage_pairs(features, data["splits"], threshold=1e-6) == pairs[:1]
    assert viz.leakage_pairs(features, ["train"] * 30) == []


def test_leakage_pairs__within_a_split_is_the_baseline(data: dict) -> None:
    baseline = viz.leakage_pairs(data["features"], data["splits"], "train", "train")
    assert len(baseline) == data["splits"].count("train") and all(p.query != p.reference for p in baseline)
    assert viz.duplicate_threshold(baseline) == pytest.approx(0.1 * np.median([p.distance for p in baseline]))
    assert viz.duplicate_threshold([0.2, 0.4, 0.6], fraction=0.5) == pytest.approx(0.2)


def test_leakage_pairs__mean_centred(data: dict) -> None:
    # A large shared component (one fabric, one organ) must not squeeze every distance to ~0.
    shifted = data["features"] + 1000.0
    assert [p.distance for p in viz.leakage_pairs(shifted, data["splits"])] == pytest.approx(
        [p.distance for p in viz.leakage_pairs(data["features"], data["splits"])])


def test_plot_leakage_pairs__histogram_and_pairs(data: dict, tmp_path: Path) -> None:
    pairs = viz.leakage_pairs(data["features"], data["splits"])
    baseline = viz.leakage_pairs(data["features"], data["splits"], "train", "train")
    fig = check(viz.plot_leakage_pairs(data["paths"], pairs, data["labels"], CLASSES, n=3, threshold=0.05, baseline=baseline), tmp_path)
    assert len(fig.axes) == 1 + 2 * 3
    assert "test images within 0.05" in fig.axes[0].get_title()
    assert len(fig.axes[0].get_legend().get_texts()) == 3  # test pairs, train baseline, threshold


def test_patch_pca__rgb_patch_grid(data: dict, tmp_path: Path) -> None:
    from vfmtune.backbones import create_backbone

    maps = {f"{s} px": viz.patch_pca(create_backbone("timm/test_vit", img_size=s), data["paths"][:3], s) for s in (32, 64)}
    assert maps["32 px"].shape == (3, 2, 2, 3) and maps["64 px"].shape == (3, 4, 4, 3)
    assert maps["64 px"].min() >= 0 and maps["64 px"].max() <= 1
    fig = check(viz.plot_patch_pca(data["paths"][:3], maps, CLASSES), tmp_path)
    assert fig.axes[3].get_ylabel() == "32 px\n2×2 patches"


def test_plot_predictions_and_misclassified(data: dict, tmp_path: Path) -> None:
    fig = check(viz.plot_predictions(data["paths"], data["probs"], CLASSES, data["labels"], n=6), tmp_path)
    assert fig.get_suptitle() == "predictions: 6 of 6 right"  # two of each class, none of the three mistakes
    assert [ax.get_title()[:3] for ax in fig.axes] == ["cat", "dog", "owl"] * 2
    assert check(viz.plot_predictions(data["paths"], data["probs"], CLASSES, n=30), tmp_path).get_suptitle() == "predictions"
    fig = check(viz.plot_misclassified(data["paths"], data["labels"], data["probs"], CLASSES), tmp_path)
    assert fig.get_suptitle().startswith("3 of 30 images misclassified")
    assert sum(ax.get_visible() and bool(ax.images) for ax in fig.axes) == 3
    right = np.eye(3)[data["labels"]]
    assert check(viz.plot_misclassified(data["paths"], data["labels"], right, CLASSES), tmp_path).get_suptitle() == "0 of 30 images misclassified"


def test_plot_recall_by_method__bars_per_method(tmp_path: Path) -> None:
    results = {m: {"test/balanced_accuracy": 0.5, **{f"test/recall/{c}": r for c in CLASSES}} for m, r in (("ce", 0.4), ("focal", 0.7))}
    fig = check(viz.plot_recall_by_method(results, CLASSES), tmp_path)
    assert len(fig.axes[0].patches) == 6
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["ce (bal. acc 0.500)", "focal (bal. acc 0.500)"]


def test_calibration__golden_and_perfect() -> None:
    cal = viz.calibration([[0.9, 0.1], [0.6, 0.4]], [0, 1], bins=5)
    assert cal["ece"] == pytest.approx(0.35)
    assert cal["counts"].tolist() == [0, 0, 1, 0, 1]
    # 80% confident and right 80% of the time: calibrated
    probs, labels = np.tile([[0.8, 0.2]], (10, 1)), [0] * 8 + [1] * 2
    assert viz.calibration(probs, labels)["ece"] == pytest.approx(0.0)


def test_plot_reliability__one_line_per_model(data: dict, tmp_path: Path) -> None:
    fig = check(viz.plot_reliability({"a": data["probs"], "b": np.eye(3)[data["labels"]]}, data["labels"]), tmp_path)
    assert len(fig.axes[0].lines) == 3  # diagonal + 2 models


def test_plot_accuracy_latency__one_point_per_model(tmp_path: Path) -> None:
    fig = check(viz.plot_accuracy_latency({"teacher": (80.0, 0.8), "student": (4.0, 0.75), "student int8": (2.0, 0.74)}), tmp_path)
    assert len(fig.axes[0].collections) == 3 and fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].lines) == 1  # student -> student int8


def test_plot_disagreements__counts_who_is_right(data: dict, tmp_path: Path) -> None:
    teacher = np.eye(3)[data["labels"]] * 0.9 + 0.03
    fig = check(viz.plot_disagreements(data["paths"], data["labels"], teacher, data["probs"], CLASSES), tmp_path)
    assert "disagree on 3 of 30 images: teacher right on 3, student on 0" in fig.get_suptitle()


@pytest.mark.parametrize("method", ["smote", "random_under"])
def test_plot_resampling__before_and_after(data: dict, method: str, tmp_path: Path) -> None:
    labels = [0] * 20 + [1] * 6 + [2] * 4
    fig = check(viz.plot_resampling(data["features"], labels, CLASSES, method, k_neighbors=3), tmp_path)
    before, after = (ax.get_title() for ax in fig.axes)
    assert before == "before: 30 training embeddings"
    assert after == ("after smote: 60 training embeddings" if method == "smote" else "after random_under: 12 training embeddings")


def test_mask_figures__overlays_with_foreground_iou_and_instances_with_boxes(data: dict, tmp_path: Path) -> None:
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 4:12] = 1
    pred = np.zeros_like(truth)
    pred[4:12, 8:16] = 1
    Image.fromarray(pred).save(tmp_path / "pred.png")
    assert viz.foreground_iou(truth, tmp_path / "pred.png") == pytest.approx(32 / 96)  # a PNG path or an array
    assert viz.foreground_iou(np.zeros((4, 4)), np.zeros((4, 4))) is None
    paths = data["paths"][:2]
    size = Image.open(paths[0]).size[::-1]
    truths = [np.resize(truth, size)] * 2
    fig = check(viz.plot_mask_comparison(paths, truths, {"a": truths, "b": truths}), tmp_path)
    assert len(fig.axes) == 8 and fig.axes[4].get_title() == "foreground IoU 1.00"
    ids = np.zeros(size, np.uint16)
    ids[2:6, 2:6], ids[8:12, 8:12] = 1, 2
    fig = check(viz.plot_instances(paths, [ids, ids], [[(2, 2, 6, 6)], []], [[0.91], []], truths=[ids, ids], columns=2), tmp_path)
    assert fig.axes[0].texts[0].get_text() == "0.91" and len(fig.axes[0].patches) == 1
