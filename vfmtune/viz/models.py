"""Figures of models: predictions and mistakes, recall per method, calibration, accuracy vs latency, disagreements, resampling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from vfmtune.viz._base import (
    _colours,
    _figure,
    _image_axis,
    _unit,
    spread_over_classes,
    thumbnail,
)


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
