"""Domain shift, measured: how far a new camera's or site's images sit from the training images.

On frozen embeddings of the source (training) images and the target images:
- MMD² with an RBF kernel at the median-distance bandwidth (Gretton et al. 2012), with a permutation
  p-value: is the difference more than sampling noise?
- a domain classifier's cross-validated ROC AUC (logistic regression): 0.5 = indistinguishable,
  1.0 = every image's domain is obvious;
- the model's predicted class distribution, mean confidence and entropy on each domain: a model
  that grows unsure, or suddenly predicts one class everywhere, is a model under shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD² between samples `x [n, d]` and `y [m, d]` with an RBF kernel; returns (MMD², bandwidth).

    The bandwidth defaults to the median pairwise distance of the pooled samples (the usual heuristic).
    """
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None] - 2 * z @ z.T, 0)
    if bandwidth is None:
        bandwidth = float(np.sqrt(np.median(d2[np.triu_indices(len(z), 1)]))) or 1.0
    k = np.exp(-d2 / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    value = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return float(value), bandwidth


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0, max_n: int = 500) -> dict[str, float]:
    """MMD² and its permutation p-value (share of label shuffles with an MMD² at least as large).

    Features are standardised over the pooled samples first, so that a few high-variance dimensions do
    not set the kernel's scale alone; samples are subsampled to `max_n` each (the kernel matrix is
    quadratic in their number).
    """
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(len(x))[:max_n]]
    y = y[rng.permutation(len(y))[:max_n]]
    pooled = np.concatenate([x, y])
    mean, std = pooled.mean(0), pooled.std(0) + 1e-8
    x, y = (x - mean) / std, (y - mean) / std
    value, bandwidth = mmd2(x, y)
    pooled, n = np.concatenate([x, y]), len(x)
    hits = 0
    for _ in range(permutations):
        order = rng.permutation(len(pooled))
        hits += mmd2(pooled[order[:n]], pooled[order[n:]], bandwidth)[0] >= value
    return {"mmd2": value, "mmd_p_value": (hits + 1) / (permutations + 1), "mmd_bandwidth": bandwidth}


def domain_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling target (`y`) from source (`x`) embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([x, y])
    domain = np.r_[np.zeros(len(x)), np.ones(len(y))]
    folds = StratifiedKFold(n_splits=min(5, len(x), len(y)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    scores = cross_val_predict(model, features, domain, cv=folds, method="predict_proba")[:, 1]
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(domain, scores))


def prediction_profile(probs: torch.Tensor, classes: Sequence[str], prefix: str) -> dict[str, Any]:
    """Mean confidence, mean entropy (nats) and the share of images predicted per class."""
    p = probs.double().clamp(min=1e-12)
    share = torch.bincount(p.argmax(1), minlength=len(classes)).double() / max(len(p), 1)
    out: dict[str, Any] = {f"{prefix}/confidence": float(p.max(1).values.mean()),
                           f"{prefix}/entropy": float(-(p * p.log()).sum(1).mean())}
    out.update({f"{prefix}/predicted_share/{c}": float(v) for c, v in zip(classes, share)})
    return out


def pca_2d(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both samples in the first two principal components of their union."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(np.concatenate([x, y]))
    return pca.transform(x), pca.transform(y)
