"""Figures for looking at data and models before trusting them: one function per figure.

Every `plot_*` function takes plain data (image paths, labels, arrays, metrics dicts) and returns a
matplotlib `Figure`; notebooks show it, `vfmtune explore` and scripts `save` it as PNG. The helpers
that compute what a figure shows (`project`, `outliers`, `leakage_pairs`, `duplicate_threshold`,
`patch_pca`, `calibration`, `foreground_iou`) are public too, so their numbers can be printed or tested. Figures are built without
pyplot (no global state; `vfmtune.report` forces the Agg backend) and show themselves in notebooks
as PNG.

Example:
    >>> e = vfmtune.embed(overrides=["data.dataset=textile"])
    >>> vfmtune.viz.plot_embedding_map(e["features"], e["labels"], e["classes"], paths=e["paths"], splits=e["splits"])
    >>> pairs = vfmtune.viz.leakage_pairs(e["features"], e["splits"])
    >>> baseline = vfmtune.viz.leakage_pairs(e["features"], e["splits"], "train", "train")
    >>> fig = vfmtune.viz.plot_leakage_pairs(e["paths"], pairs, threshold=vfmtune.viz.duplicate_threshold(baseline), baseline=baseline)
    >>> vfmtune.viz.save(fig, "plots/leakage.png")
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vfmtune.io import atomic_path

DPI = 100
SPLIT_MARKERS = {"train": "o", "val": "s", "test": "^"}


class VizFigure(Figure):
    """A matplotlib Figure that renders itself as PNG in notebooks, whatever backend is active."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def _figure(width: float, height: float) -> VizFigure:
    return VizFigure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | os.PathLike[str], dpi: int = DPI) -> Path:
    """Write `fig` as PNG atomically (readers never see half a file); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def thumbnail(path: str | os.PathLike[str], size: int = 128) -> np.ndarray:
    """The image as a viewer shows it (EXIF rotation, transparency on white), at most `size` px: `[h, w, 3]` uint8."""
    from vfmtune.data.images import load_image

    im = load_image(path)
    im.thumbnail((size, size))
    return np.asarray(im)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _image_axis(ax: Any, image: np.ndarray, title: str = "", colour: str = "black") -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])


def _unit(features: ArrayLike) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centred_unit(features: ArrayLike) -> np.ndarray:
    """Unit-length embeddings after removing their mean: on a homogeneous dataset (one fabric, one organ)
    every raw embedding shares a large common direction, and raw cosine distances are all close to 0."""
    x = np.asarray(features, dtype=np.float64)
    return _unit(x - x.mean(0, keepdims=True))


def spread_over_classes(labels: Sequence[int], n: int, among: Sequence[int] | None = None) -> list[int]:
    """`n` indices (of `among`, default all) taking the classes in turn: the first image of each class,
    then the second of each, ...: a few examples that show every class.

    Example:
        >>> spread_over_classes([0, 0, 0, 1, 1, 2], 4)
        [0, 3, 5, 1]
    """
    by_class: dict[int, list[int]] = {}
    for i in range(len(labels)) if among is None else among:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    columns = [by_class[c] for c in sorted(by_class)]
    order = [col[k] for k in range(max(map(len, columns), default=0)) for col in columns if k < len(col)]
    return order[:n]


def plot_class_grid(paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], per_class: int = 8,
                    seed: int = 0) -> Figure:
    """A row of `per_class` random images per class, each row labelled with its class and image count."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fig = _figure(1.3 * per_class, 1.4 * len(classes) + 0.3)
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for c, cls in enumerate(classes):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, min(per_class, len(members)), replace=False) if len(members) else []
        for j in range(per_class):
            ax = axes[c, j]
            if j < len(chosen):
                _image_axis(ax, thumbnail(paths[chosen[j]]))
            else:
                ax.axis("off")
        axes[c, 0].set_ylabel(f"{cls}\n(n={len(members)})", fontsize=9)
    fig.suptitle(f"{len(paths)} images, {len(classes)} classes", fontsize=10)
    return fig


def project(features: ArrayLike, method: str = "pca", seed: int = 0) -> np.ndarray:
    """`[N, D]` features -> `[N, 2]`, on unit-length features (the cosine geometry a linear probe sees).

    `method`: "pca", or "tsne" (scikit-learn's t-SNE on the first 50 principal components).
    """
    from sklearn.decomposition import PCA

    x = _unit(features)
    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(x)
    if method != "tsne":
        raise ValueError(f"method={method!r}: use 'pca' or 'tsne'.")
    from sklearn.manifold import TSNE

    x = PCA(min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def outliers(features: ArrayLike, labels: Sequence[int], n: int = 8) -> np.ndarray:
    """Indices of the `n` images farthest (cosine distance of the mean-centred embeddings) from their own
    class's mean embedding, farthest first: mislabelled, unusual or broken images are usually among them."""
    x, y = _centred_unit(features), np.asarray(labels)
    distance = np.zeros(len(x))
    for c in np.unique(y):
        members = y == c
        centre = _unit(x[members].mean(0, keepdims=True))[0]
        distance[members] = 1.0 - x[members] @ centre
    return np.argsort(-distance, kind="stable")[:n]


def plot_embedding_map(features: ArrayLike, labels: Sequence[int], classes: Sequence[str], paths: Sequence[str] | None = None,
                       splits: Sequence[str] | None = None, methods: Sequence[str] = ("pca", "tsne"), n_outliers: int = 8,
                       seed: int = 0) -> Figure:
    """2-D maps of the embeddings (one panel per `methods` entry), coloured by class, marked by split;
    with `paths`, the `n_outliers` images farthest from their class centre are numbered on the maps
    and shown as thumbnails below them."""
    y = np.asarray(labels)
    picked = outliers(features, y, n_outliers) if paths is not None and n_outliers else np.array([], int)
    fig = _figure(5.2 * len(methods), 5.0 + (1.8 if len(picked) else 0))
    top, bottom = fig.subfigures(2, 1, height_ratios=[5.0, 1.8]) if len(picked) else (fig, None)
    colours = _colours(len(classes))
    split_of = np.asarray(splits) if splits is not None else np.full(len(y), "all")
    for ax, method in zip(np.atleast_1d(top.subplots(1, len(methods))), methods):
        xy = project(features, method, seed)
        for c, cls in enumerate(classes):
            for split in dict.fromkeys(split_of):
                keep = (y == c) & (split_of == split)
                if keep.any():
                    ax.scatter(*xy[keep].T, s=10, alpha=0.6, color=colours[c], marker=SPLIT_MARKERS.get(split, "o"),
                               label=f"{cls} ({split})" if splits is not None else cls)
        for k, i in enumerate(picked):
            ax.annotate(str(k + 1), xy[i], fontsize=8, fontweight="bold", ha="center", va="center",
                        bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": "black", "lw": 0.8})
        ax.set_title({"pca": "PCA", "tsne": "t-SNE"}.get(method, method), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    top.axes[0].legend(fontsize=7, markerscale=1.5, loc="best")
    top.suptitle(f"embeddings of {len(y)} images, coloured by class", fontsize=10)
    if bottom is not None:
        for k, (ax, i) in enumerate(zip(np.atleast_1d(bottom.subplots(1, len(picked))), picked)):
            _image_axis(ax, thumbnail(paths[i]), f"{k + 1}: {classes[y[i]]}" + (f" ({split_of[i]})" if splits is not None else ""))
        bottom.suptitle("farthest from their class centre (outliers)", fontsize=9)
    return fig


class Pair(NamedTuple):
    """A query image, its nearest reference image and their cosine distance."""

    query: int
    reference: int
    distance: float


def leakage_pairs(features: ArrayLike, splits: Sequence[str], query: str = "test", reference: str = "train",
                  threshold: float | None = None) -> list[Pair]:
    """For every `query`-split image, its nearest `reference`-split image by cosine distance of the
    mean-centred embeddings, closest pairs first. Near-duplicates across splits make test scores optimistic.
    With `query == reference` each image's nearest *other* image: how close neighbours are anyway (the
    baseline that `duplicate_threshold` and `plot_leakage_pairs` compare with).

    Args:
        features: `[N, D]` embeddings of every image.
        splits: "train" / "val" / "test" per image.
        threshold: keep only pairs at most this far apart (None: every query image's pair).

    Returns:
        `Pair(query index, reference index, distance)` sorted by distance.
    """
    s = np.asarray(splits)
    q, r = np.flatnonzero(s == query), np.flatnonzero(s == reference)
    if not len(q) or len(r) < 1 + (query == reference):
        return []
    x = _centred_unit(features)
    distance = 1.0 - x[q] @ x[r].T
    if query == reference:
        np.fill_diagonal(distance, np.inf)
    nearest = distance.argmin(1)
    pairs = [Pair(int(i), int(r[j]), max(float(distance[k, j]), 0.0)) for k, (i, j) in enumerate(zip(q, nearest))]
    pairs.sort(key=lambda p: p.distance)
    return [p for p in pairs if threshold is None or p.distance <= threshold]


def duplicate_threshold(baseline: Sequence[Pair] | Sequence[float], fraction: float = 0.1) -> float:
    """A distance that counts as a near-duplicate: `fraction` of the median nearest-neighbour distance
    within the reference split (`baseline = leakage_pairs(features, splits, "train", "train")`), i.e. ten
    times closer than images of this dataset usually are to their nearest neighbour."""
    distances = [p.distance if isinstance(p, Pair) else float(p) for p in baseline]
    return fraction * float(np.median(distances)) if distances else 0.0


def plot_leakage_pairs(paths: Sequence[str], pairs: Sequence[Pair], labels: Sequence[int] | None = None,
                       classes: Sequence[str] | None = None, n: int = 8, threshold: float | None = None,
                       baseline: Sequence[Pair] | None = None, names: tuple[str, str] = ("test", "train")) -> Figure:
    """The histogram of every pair's distance (with `baseline`, the nearest-neighbour distances within the
    reference split for comparison), and the `n` closest pairs (query image above, its nearest reference
    image below): duplicates stand apart near 0, left of where neighbours usually are."""
    shown = list(pairs[:n])
    fig = _figure(max(1.4 * max(len(shown), 1) + 3.8, 8.0), 3.6)
    left, right = fig.subfigures(1, 2, width_ratios=[3.8, max(1.4 * len(shown), 1.0)])
    ax = left.subplots()
    distances = [p.distance for p in pairs]
    top = max([*distances, *(p.distance for p in baseline or [])], default=1.0)
    bins = np.linspace(0, top, 41)
    ax.hist(distances, bins=bins, color="grey", density=True, label=f"{names[0]} → nearest {names[1]}")
    if baseline:
        ax.hist([p.distance for p in baseline], bins=bins, density=True, histtype="step", color="black",
                label=f"{names[1]} → nearest other {names[1]}")
    title = f"{len(distances)} {names[0]} images"
    if threshold is not None:
        below = sum(d <= threshold for d in distances)
        ax.axvline(threshold, color="red", lw=1, label=f"near-duplicate: ≤ {threshold:.2g}")
        title = f"{below} of {len(distances)} {names[0]} images within {threshold:.2g} of a {names[1]} image"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.set_xlabel("cosine distance (mean-centred embeddings)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    if shown:
        axes = right.subplots(2, len(shown), squeeze=False)

        def name(i: int) -> str:
            return classes[labels[i]] if labels is not None and classes is not None else Path(paths[i]).name[:14]

        for j, p in enumerate(shown):
            _image_axis(axes[0, j], thumbnail(paths[p.query]), f"{name(p.query)}\nd={p.distance:.3g}")
            _image_axis(axes[1, j], thumbnail(paths[p.reference]), name(p.reference))
        axes[0, 0].set_ylabel(names[0], fontsize=8)
        axes[1, 0].set_ylabel(f"nearest {names[1]}", fontsize=8)
        right.suptitle(f"the {len(shown)} closest {names[0]}/{names[1]} pairs", fontsize=9)
    return fig


def patch_pca(backbone: Any, images: Sequence[str], img_size: int | None = None) -> np.ndarray:
    """DINOv2's patch-feature visualisation: the last block's patch tokens of all `images` (one PCA
    fitted over every patch of every image), first three components as RGB.

    Args:
        backbone: a timm ViT from `vfmtune.create_backbone` (built at `img_size`).
        images: image paths, preprocessed with the backbone's eval transform at `img_size`.
        img_size: input size; default the backbone's own.

    Returns:
        `[N, H / patch, W / patch, 3]` floats in [0, 1]: patches with similar features share a colour.
    """
    import torch
    from sklearn.decomposition import PCA

    from vfmtune.backbones import data_config, patch_tokens
    from vfmtune.config import AugmentConfig
    from vfmtune.data.datamodule import ImageDataset
    from vfmtune.data.transforms import build_transforms

    _, eval_tf = build_transforms(data_config(backbone, img_size), AugmentConfig(enabled=False))
    dataset = ImageDataset(list(images), [0] * len(images), eval_tf)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        tokens = patch_tokens(backbone.eval(), x, 1)[-1].float()  # [N, C, h, w]
    n, c, h, w = tokens.shape
    flat = tokens.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    components = PCA(3, random_state=0).fit_transform(flat)
    lo, hi = np.percentile(components, [1, 99], axis=0)  # robust scaling: a few extreme patches would wash out the rest
    return np.clip((components - lo) / np.maximum(hi - lo, 1e-8), 0, 1).reshape(n, h, w, 3)


def plot_patch_pca(images: Sequence[str], maps: Mapping[str, np.ndarray], titles: Sequence[str] | None = None) -> Figure:
    """One column per image: the image, then each of `maps` (e.g. `{"224 px": patch_pca(...), "448 px": ...}`)
    upsampled to the same size without smoothing, so each patch shows as a square."""
    rows = 1 + len(maps)
    fig = _figure(2.0 * len(images), 2.0 * rows + 0.3)
    axes = fig.subplots(rows, len(images), squeeze=False)
    for j, path in enumerate(images):
        _image_axis(axes[0, j], thumbnail(path, 256), titles[j] if titles else "")
        for i, grid in enumerate(maps.values(), start=1):
            _image_axis(axes[i, j], grid[j])
            axes[i, j].images[0].set_interpolation("nearest")
    for i, (name, grid) in enumerate(maps.items(), start=1):
        axes[i, 0].set_ylabel(f"{name}\n{grid.shape[1]}×{grid.shape[2]} patches", fontsize=8)
    fig.suptitle("patch features, first 3 principal components as RGB", fontsize=10)
    return fig


def _prediction_grid(paths: Sequence[str], probs: np.ndarray, classes: Sequence[str], labels: Sequence[int] | None,
                     title: str, columns: int = 6) -> Figure:
    if not len(paths):
        fig = _figure(6.0, 0.6)
        fig.suptitle(title, fontsize=10)
        return fig
    rows = -(-len(paths) // columns)
    fig = _figure(1.75 * columns, 2.05 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(paths):
            ax.axis("off")
            continue
        p = probs[k]
        top = int(p.argmax())
        text = f"{classes[top]} {p[top]:.2f}"
        colour = "black"
        if labels is not None:
            colour = "green" if top == labels[k] else "red"
            text += "" if top == labels[k] else f"\ntrue: {classes[labels[k]]} ({p[labels[k]]:.2f})"
        _image_axis(ax, thumbnail(paths[k]), text, colour)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_predictions(paths: Sequence[str], probs: ArrayLike, classes: Sequence[str], labels: Sequence[int] | None = None,
                     n: int = 12) -> Figure:
    """`n` images with the predicted class and its probability: the first `n`, or with `labels` `n`
    spread over the true classes, green when right, red with the true class (and its probability) when wrong."""
    p = np.asarray(probs)
    shown = list(range(min(n, len(p)))) if labels is None else spread_over_classes(labels, n)
    known = None if labels is None else [int(labels[i]) for i in shown]
    right = None if known is None else sum(int(p[i].argmax() == y) for i, y in zip(shown, known))
    title = "predictions" if known is None else f"predictions: {right} of {len(shown)} right"
    return _prediction_grid([paths[i] for i in shown], p[shown], classes, known, title)


def plot_misclassified(paths: Sequence[str], labels: Sequence[int], probs: ArrayLike, classes: Sequence[str], n: int = 12) -> Figure:
    """The misclassified images, most confidently wrong first, with predicted and true class probabilities."""
    p, y = np.asarray(probs), np.asarray(labels)
    wrong = np.flatnonzero(p.argmax(1) != y)
    wrong = wrong[np.argsort(-p[wrong].max(1), kind="stable")][:n]
    title = f"{int((p.argmax(1) != y).sum())} of {len(y)} images misclassified" + (" (most confident first)" if len(wrong) else "")
    return _prediction_grid([paths[i] for i in wrong], p[wrong], classes, y[wrong].tolist(), title)


def plot_recall_by_method(results: Mapping[str, Mapping[str, Any]], classes: Sequence[str], prefix: str = "test",
                          title: str = "") -> Figure:
    """Grouped bars of each class's recall per method (`results`: method -> metrics dict with
    `<prefix>/recall/<class>`); the legend gives each method's balanced accuracy."""
    methods = list(results)
    x = np.arange(len(classes))
    width = 0.8 / max(len(methods), 1)
    fig = _figure(max(6.0, 0.5 * len(methods) * len(classes) + 2), 4.2)
    ax = fig.subplots()
    for i, (method, colour) in enumerate(zip(methods, _colours(len(methods)))):
        m = results[method]
        ba = m.get(f"{prefix}/balanced_accuracy")
        ax.bar(x - 0.4 + (i + 0.5) * width, [m[f"{prefix}/recall/{c}"] for c in classes], width, color=colour,
               label=method + (f" (bal. acc {ba:.3f})" if ba is not None else ""))
    ax.set_xticks(x, list(classes))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{prefix} recall")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title or f"{prefix} recall per class and method", fontsize=10)
    return fig


def calibration(probs: ArrayLike, labels: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Top-label calibration: per confidence bin the mean confidence, the accuracy and the count, and
    the expected calibration error (ECE: count-weighted mean |accuracy - confidence|; Guo et al. 2017).

    Example:
        >>> calibration([[0.9, 0.1], [0.6, 0.4]], [0, 1], bins=5)["ece"]
        0.35
    """
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = p.max(1), (p.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_conf = np.bincount(index, confidence, bins) / np.maximum(counts, 1)
    accuracy = np.bincount(index, correct, bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(accuracy - mean_conf)) / max(len(y), 1))
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "counts": counts, "ece": round(ece, 6)}


def plot_reliability(probs: ArrayLike | Mapping[str, ArrayLike], labels: Sequence[int], bins: int = 10) -> Figure:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration),
    one line per model when `probs` maps names to `[N, C]` probabilities; the confidence histogram below."""
    models = dict(probs) if isinstance(probs, Mapping) else {"model": probs}
    fig = _figure(5.0, 5.6)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    for (name, p), colour in zip(models.items(), _colours(len(models))):
        cal = calibration(p, labels, bins)
        used = cal["counts"] > 0
        ax.plot(cal["confidence"][used], cal["accuracy"][used], marker="o", color=colour, label=f"{name} (ECE {cal['ece']:.3f})")
        hist.hist(np.asarray(p).max(1), bins=cal["edges"], color=colour, alpha=0.5)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"reliability on {len(labels)} images", fontsize=10)
    hist.set_xlabel("confidence (top-class probability)")
    hist.set_ylabel("images")
    return fig


def plot_accuracy_latency(points: Mapping[str, tuple[float, float]], metric: str = "test accuracy",
                          latency: str = "batch-1 latency (ms, onnxruntime CPU)") -> Figure:
    """One scatter of score against latency (log scale), a labelled point per model: `points` maps a
    name to `(latency_ms, score)`. A name ending in " int8" is drawn as a diamond in its fp32 model's colour,
    joined to it by a line: what quantization costs and buys."""
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    families = list(dict.fromkeys(name.removesuffix(" int8") for name in points))
    colour = dict(zip(families, _colours(len(families))))
    for name, (ms, score) in points.items():
        base = name.removesuffix(" int8")
        quantized = base != name
        ax.scatter([ms], [score], s=60, color=colour[base], marker="D" if quantized else "o", zorder=3)
        ax.annotate(name, (ms, score), textcoords="offset points", xytext=(6, -10 if quantized else 4), fontsize=8)
        if quantized and base in points:
            ax.plot([points[base][0], ms], [points[base][1], score], color=colour[base], lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(latency)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{metric} vs latency (diamonds: INT8)", fontsize=10)
    return fig


def plot_disagreements(paths: Sequence[str], labels: Sequence[int], teacher_probs: ArrayLike, student_probs: ArrayLike,
                       classes: Sequence[str], n: int = 12, names: tuple[str, str] = ("teacher", "student")) -> Figure:
    """The images where the two models' top classes differ (most confident first), with both
    predictions; the title counts who is right where they disagree."""
    t, s, y = np.asarray(teacher_probs), np.asarray(student_probs), np.asarray(labels)
    differ = np.flatnonzero(t.argmax(1) != s.argmax(1))
    order = differ[np.argsort(-np.maximum(t[differ].max(1), s[differ].max(1)), kind="stable")][:n]
    columns = 6
    rows = max(1, -(-len(order) // columns))
    fig = _figure(1.9 * columns, 2.4 * rows + 0.4)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(order):
            ax.axis("off")
            continue
        i = order[k]
        a, b = int(t[i].argmax()), int(s[i].argmax())
        winner = names[0] if a == y[i] else names[1] if b == y[i] else "neither"
        _image_axis(ax, thumbnail(paths[i]), f"true: {classes[y[i]]}\n{names[0]}: {classes[a]} {t[i, a]:.2f}\n"
                    f"{names[1]}: {classes[b]} {s[i, b]:.2f}", {names[0]: "tab:blue", names[1]: "tab:orange"}.get(winner, "red"))
    t_right, s_right = int((t[differ].argmax(1) == y[differ]).sum()), int((s[differ].argmax(1) == y[differ]).sum())
    fig.suptitle(f"{names[0]} and {names[1]} disagree on {len(differ)} of {len(y)} images: {names[0]} right on {t_right}, "
                 f"{names[1]} on {s_right}\n(title colour: blue {names[0]} right, orange {names[1]} right, red neither)", fontsize=9)
    return fig


def plot_resampling(features: ArrayLike, labels: Sequence[int], classes: Sequence[str], method: str = "smote",
                    k_neighbors: int = 5, seed: int = 0) -> Figure:
    """Training embeddings before and after an imbalanced-learn resampler (`resample=<method>`), on the
    same PCA axes (fitted before): synthetic points (crosses) lie between their class's real ones."""
    import torch
    from sklearn.decomposition import PCA

    from vfmtune.choices import ResampleMethod
    from vfmtune.config import ResampleConfig
    from vfmtune.sampling import resample_embeddings

    x, y = np.asarray(features, dtype=np.float32), np.asarray(labels)
    cfg = ResampleConfig(method=ResampleMethod.parse(method, "method"), k_neighbors=k_neighbors)
    xs, ys = resample_embeddings(torch.from_numpy(x), torch.from_numpy(y), cfg, classes, seed)
    xs, ys = xs.numpy(), ys.numpy()
    pca = PCA(2, random_state=seed).fit(_unit(x))
    fig = _figure(10.0, 4.6)
    colours = _colours(len(classes))
    for ax, (feats, labs, name) in zip(fig.subplots(1, 2, sharex=True, sharey=True), ((x, y, "before"), (xs, ys, f"after {method}"))):
        xy = pca.transform(_unit(feats))
        added = np.arange(len(labs)) >= len(y) if len(labs) > len(y) else np.zeros(len(labs), bool)
        for c, cls in enumerate(classes):
            real, new = (labs == c) & ~added, (labs == c) & added
            ax.scatter(*xy[real].T, s=10, alpha=0.6, color=colours[c], label=f"{cls} ({int(real.sum())})")
            if new.any():
                ax.scatter(*xy[new].T, s=14, alpha=0.6, color=colours[c], marker="x", label=f"{cls} added ({int(new.sum())})")
        ax.set_title(f"{name}: {len(labs)} training embeddings", fontsize=10)
        ax.legend(fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig



def _ids(mask: str | os.PathLike[str] | ArrayLike) -> np.ndarray:
    """A class or instance map given as a PNG path (palette or grey, as `vfmtune` writes them) or an array."""
    if isinstance(mask, (str, os.PathLike)):
        from PIL import Image

        with Image.open(mask) as im:
            return np.asarray(im)
    return np.asarray(mask)


def _rgb(path: str | os.PathLike[str]) -> np.ndarray:
    from vfmtune.data.images import load_image

    return np.asarray(load_image(path).convert("RGB"))


def foreground_iou(truth: ArrayLike, prediction: ArrayLike, ignore: int = 255) -> float | None:
    """IoU of the non-background pixels of two class maps (pixels `ignore` in `truth` left out); None when both are empty."""
    t, p = _ids(truth), _ids(prediction)
    valid = t != ignore
    a, b = (t > 0) & valid, (p > 0) & valid
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def plot_mask_comparison(images: Sequence[str], truths: Sequence[Any], predictions: Mapping[str, Sequence[Any]] | None = None,
                         titles: Sequence[str] | None = None) -> Figure:
    """One column per image: the image, its true class map, then each model's predicted map (`{"linear": [...], ...}`),
    as colour overlays (the VOC palette of `vfmtune predict`'s masks), each prediction titled with its foreground IoU."""
    from vfmtune.report import overlay

    predictions = predictions or {}
    rows = 2 + len(predictions)
    fig = _figure(2.0 * len(images), 2.0 * rows + 0.3)
    axes = fig.subplots(rows, len(images), squeeze=False)
    for j, path in enumerate(images):
        image, truth = _rgb(path), _ids(truths[j])
        _image_axis(axes[0, j], image, titles[j] if titles else Path(path).stem)
        _image_axis(axes[1, j], overlay(image, truth))
        for i, masks in enumerate(predictions.values(), start=2):
            iou = foreground_iou(truth, masks[j])
            _image_axis(axes[i, j], overlay(image, _ids(masks[j])), "" if iou is None else f"foreground IoU {iou:.2f}")
    for i, name in enumerate(["image", "truth", *predictions], start=0):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("masks over their images" if not predictions else f"truth and predictions: {', '.join(predictions)}", fontsize=10)
    return fig


def plot_instances(images: Sequence[str], instances: Sequence[Any], boxes: Sequence[Sequence[Sequence[float]]] | None = None,
                   scores: Sequence[Sequence[float]] | None = None, truths: Sequence[Any] | None = None,
                   titles: Sequence[str] | None = None, columns: int = 4) -> Figure:
    """Instance maps (uint16 ids, 0 = none) over their images, one colour per instance. `boxes` (per image,
    `(x0, y0, x1, y1)` each) draws the prompt boxes, `scores` (per box) writes each box's score (SAM's
    predicted IoU) at its corner, and `truths` (instance or class maps) outlines the true objects in white."""
    rows = -(-len(images) // columns)
    fig = _figure(2.6 * columns, 2.7 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = np.array([c[:3] for c in _colours(20)]) * 255
    for k, ax in enumerate(axes.flat):
        if k >= len(images):
            ax.axis("off")
            continue
        image, ids = _rgb(images[k]).astype(np.float32), _ids(instances[k]).astype(np.int64)
        shown = np.where((ids > 0)[..., None], 0.5 * image + 0.5 * colours[(ids - 1) % len(colours)], image)
        n = len(np.unique(ids[ids > 0]))
        title = titles[k] if titles else f"{Path(images[k]).stem}: {n} instances"
        _image_axis(ax, shown.astype(np.uint8), title)
        if truths is not None:
            ax.contour(_ids(truths[k]) > 0, levels=[0.5], colors="white", linewidths=0.6)
        for b, box in enumerate(boxes[k] if boxes is not None else []):
            x0, y0, x1, y1 = box
            ax.add_patch(_rectangle(x0, y0, x1, y1))
            if scores is not None:
                ax.text(x0, y0, f"{scores[k][b]:.2f}", fontsize=5, color="yellow", va="bottom")
    return fig


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=0.6)
