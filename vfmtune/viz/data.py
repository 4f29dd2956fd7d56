"""Figures of the data: images per class, embedding maps and outliers, test/train near-duplicates, patch-feature PCA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vfmtune.viz._base import (
    SPLIT_MARKERS,
    _centred_unit,
    _colours,
    _figure,
    _image_axis,
    _unit,
    thumbnail,
)


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
