"""Linear probe on the textile set: vfmtune's frozen DINOv2-S + head vs scikit-learn's logistic
regression on the very same cached features and split (the classic linear-probe anchor).

Run: python bench/linear_probe_textile.py
Split: stratified 70/10/20 train/val/test of all 2,000 images (seed 0); 224 px; packaged weights.
The sklearn anchor picks C on the validation split, as a fair probe does; vfmtune uses its recipe as is.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import vfmtune
from common import write_results

OVERRIDES = ["recipes=dinov2_vits14_frozen_textile", "trainer.enable_progress_bar=false"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        emb = vfmtune.embed(overrides=OVERRIDES, run_dir=f"{tmp}/embed")  # cache warm-up, shared by both
        embed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = vfmtune.train(overrides=OVERRIDES, run_dir=f"{tmp}/train")["metrics"]
        ours_s = time.perf_counter() - t0

    x = emb["features"].numpy()
    y = np.array(emb["labels"])
    split = np.array(emb["splits"])
    tr, va, te = (split == s for s in ("train", "val", "test"))
    t0 = time.perf_counter()
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x[tr], y[tr])
        score = f1_score(y[va], clf.predict(x[va]), average="macro")
        if best is None or score > best[0]:
            best = (score, c, clf)
    _, c, clf = best
    pred = clf.predict(x[te])
    sk_s = time.perf_counter() - t0

    write_results(
        "linear_probe_textile",
        {
            "vfmtune.test_macro_f1": round(ours["test/macro_f1"], 4),
            "vfmtune.test_balanced_accuracy": round(ours["test/balanced_accuracy"], 4),
            "vfmtune.test_accuracy": round(ours["test/accuracy"], 4),
            "vfmtune.train_seconds": round(ours_s, 1),
            "sklearn.test_macro_f1": round(f1_score(y[te], pred, average="macro"), 4),
            "sklearn.test_balanced_accuracy": round(balanced_accuracy_score(y[te], pred), 4),
            "sklearn.test_accuracy": round(float((pred == y[te]).mean()), 4),
            "sklearn.C": c,
            "sklearn.fit_seconds": round(sk_s, 1),
            "embed_seconds_first_or_cached": round(embed_s, 1),
            "n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum()),
            "img_size": 224, "backbone": "dinov2_vits14 (packaged)", "split_seed": 0,
        },
    )


if __name__ == "__main__":
    main()
