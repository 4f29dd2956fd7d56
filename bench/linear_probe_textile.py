"""Linear probe on the textile set: vfmtune's frozen DINOv2-S + head vs scikit-learn's logistic
regression on the very same cached features and split (the classic linear-probe anchor), at each
input resolution.

Run: python bench/linear_probe_textile.py [--img-sizes 224 336 448] [--precisions fp32 bf16] [--results NAME]
Split: stratified 70/10/20 train/val/test of all 2,000 images (seed 0); packaged weights.
The sklearn anchor picks C on the validation split, as a fair probe does; vfmtune uses its recipe as is.
The backbone's forward time per image is measured at every size (and precision) in one loop, so the ratios
compare. With --precisions every figure is keyed `px<size>.<precision>.*`: each precision embeds the images
(its own cache key), trains the head and fits the anchor on its own features.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import write_results
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import vfmtune
from vfmtune.backbones import create_backbone
from vfmtune.compose import typed
from vfmtune.precision import resolve_precision

RECIPE = ["recipes=dinov2_vits14_frozen_textile", "trainer.enable_progress_bar=false"]


@torch.inference_mode()
def forward_ms_per_image(sizes: list[int], precisions: list[str], batch: int = 16, rounds: int = 3) -> dict[tuple[int, str], float]:
    """Median batch-16 forward time per image, sizes and precisions interleaved so machine load hits all alike."""
    models = {s: create_backbone("dinov2_vits14", weights="packaged", img_size=s).eval() for s in sizes}
    autocasts = {p: resolve_precision(typed({"precision": p, "trainer": {"accelerator": "cpu"}})).autocast for p in precisions}
    times: dict[tuple[int, str], list[float]] = {(s, p): [] for s in sizes for p in precisions}
    for _ in range(rounds + 1):  # the first round warms up
        for (s, p), t in times.items():
            x = torch.randn(batch, 3, s, s)
            t0 = time.perf_counter()
            with autocasts[p]():
                models[s](x)
            t.append((time.perf_counter() - t0) * 1000 / batch)
    return {k: float(np.median(t[1:])) for k, t in times.items()}


def probe(img_size: int, tmp: str, precision: str) -> dict[str, float]:
    overrides = [*RECIPE, f"backbone.img_size={img_size}", f"precision={precision}"]
    t0 = time.perf_counter()
    emb = vfmtune.embed(overrides=overrides, run_dir=f"{tmp}/embed_{img_size}_{precision}")  # cache warm-up, shared by both
    embed_s = time.perf_counter() - t0  # seconds when this run filled the cache; a cache hit takes ~1 s
    t0 = time.perf_counter()
    ours = vfmtune.train(overrides=overrides, run_dir=f"{tmp}/train_{img_size}_{precision}")["metrics"]
    ours_s = time.perf_counter() - t0

    x = emb["features"].numpy()
    y = np.array(emb["labels"])
    split = np.array(emb["splits"])
    tr, va, te = (split == s for s in ("train", "val", "test"))
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x[tr], y[tr])
        score = f1_score(y[va], clf.predict(x[va]), average="macro")
        if best is None or score > best[0]:
            best = (score, c, clf)
    _, c, clf = best
    pred = clf.predict(x[te])
    return {
        "vfmtune.test_macro_f1": round(ours["test/macro_f1"], 4),
        "vfmtune.test_balanced_accuracy": round(ours["test/balanced_accuracy"], 4),
        "vfmtune.test_accuracy": round(ours["test/accuracy"], 4),
        "vfmtune.train_seconds": round(ours_s, 1),  # the whole `vfmtune train` call (cache hit, fit, val/test, report)
        "vfmtune.fit_seconds": ours["train_seconds"],  # Trainer.fit alone
        "embed_seconds": round(embed_s, 1),
        "sklearn.test_macro_f1": round(f1_score(y[te], pred, average="macro"), 4),
        "sklearn.test_balanced_accuracy": round(balanced_accuracy_score(y[te], pred), 4),
        "sklearn.test_accuracy": round(float((pred == y[te]).mean()), 4),
        "sklearn.C": c,
        "n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[224, 336, 448])
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "auto"],
                        help="default: the run's default (precision=auto), figures keyed without it")
    parser.add_argument("--results", default="linear_probe_textile", help="results file name under bench/results/")
    args = parser.parse_args()
    precisions = args.precisions or ["auto"]
    key = (lambda s, p: f"px{s}.{p}") if args.precisions else (lambda s, p: f"px{s}")
    figures: dict = {"backbone": "dinov2_vits14 (packaged)", "split_seed": 0, "img_sizes": args.img_sizes, "precisions": precisions}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.img_sizes:
            for p in precisions:
                figures.update({f"{key(size, p)}.{k}": v for k, v in probe(size, tmp, p).items()})
    ms = forward_ms_per_image(args.img_sizes, precisions)
    first = (args.img_sizes[0], precisions[0])
    for (size, p), value in ms.items():
        figures[f"{key(size, p)}.forward_ms_per_image"] = round(value, 1)
        figures[f"{key(size, p)}.forward_time_vs_{key(*first)}"] = round(value / ms[first], 3)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
