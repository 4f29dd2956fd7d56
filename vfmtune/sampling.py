"""Class-balanced sampling and imbalanced-learn resampling of cached embeddings.

Two different tools, both applied to the TRAINING split only:

- `BalancedSampler`: draws training samples with replacement, each class equally likely. Works on
  images (fresh augmentation per draw) or cached embeddings. Under DDP, Lightning wraps any
  non-default sampler in its `DistributedSamplerWrapper`, which gives each rank a disjoint share of
  the same draw; the draw is seeded per epoch so every rank makes the same one.
- `resample_embeddings`: imbalanced-learn (SMOTE and friends) on the cached feature vectors of a
  frozen backbone; synthetic samples only make sense in feature space, never for images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler
from typing_extensions import override

from vfmtune.choices import ConfigError, ResampleMethod, SamplerName
from vfmtune.config import Config, ResampleConfig

# resample.method -> (imblearn class path, whether it interpolates between k nearest neighbours)
RESAMPLERS: dict[str, tuple[str, bool]] = {
    "smote": ("imblearn.over_sampling.SMOTE", True),
    "adasyn": ("imblearn.over_sampling.ADASYN", True),
    "borderline_smote": ("imblearn.over_sampling.BorderlineSMOTE", True),
    "random_over": ("imblearn.over_sampling.RandomOverSampler", False),
    "random_under": ("imblearn.under_sampling.RandomUnderSampler", False),
    "smote_tomek": ("imblearn.combine.SMOTETomek", True),
}


class BalancedSampler(WeightedRandomSampler):
    """Class-balanced sampling with replacement: every class is drawn equally often on average.

    Each pass draws `num_samples` indices (default: the dataset size, so an epoch keeps its
    length) from a generator seeded with `seed + pass number`. Every DDP rank iterates the same
    number of times, hence draws the same indices, and Lightning's `DistributedSamplerWrapper`
    then hands each rank its own disjoint part of them.

    Args:
        labels: class index per training sample.
        num_samples: draws per epoch (default `len(labels)`).
        seed: base seed of the per-epoch generator.

    Example:
        >>> sampler = BalancedSampler([0] * 90 + [1] * 10, seed=0)
        >>> counts = Counter(labels[i] for i in sampler)  # about 50 / 50
    """

    def __init__(self, labels: Sequence[int], num_samples: int | None = None, seed: int = 0) -> None:
        counts = Counter(int(y) for y in labels)
        weights = torch.tensor([1.0 / counts[int(y)] for y in labels], dtype=torch.double)
        super().__init__(weights, num_samples or len(labels), replacement=True)
        self.seed = seed
        self._passes = 0

    @override
    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self._passes)
        self._passes += 1
        return super().__iter__()


def build_sampler(name: SamplerName, labels: Sequence[int], seed: int) -> BalancedSampler | None:
    """The training sampler for `data.sampler`: None (plain shuffling) or a `BalancedSampler`."""
    return BalancedSampler(labels, seed=seed) if name == SamplerName.balanced else None


def check_resample(cfg: ResampleConfig, train_counts: Sequence[int], classes: Sequence[str]) -> None:
    """Fail before training when imbalanced-learn would fail (or silently do nothing) on this data.

    SMOTE-type methods interpolate between a sample and its `k_neighbors` nearest neighbours of
    the same class, so every class they oversample needs more than `k_neighbors` samples.
    """
    method = cfg.method
    if method == ResampleMethod.none:
        return
    _, uses_knn = RESAMPLERS[method]
    k = int(cfg.k_neighbors)
    if uses_knn:
        if k < 1:
            raise ConfigError(f"resample.k_neighbors={k} must be >= 1.")
        majority = max(train_counts)
        short = [(c, n) for c, n in zip(classes, train_counts) if n < majority and n <= k]
        if short:
            listing = ", ".join(f"'{c}' has {n}" for c, n in short)
            fix_k = min(n for _, n in short) - 1
            fix = f"resample.k_neighbors={fix_k}" if fix_k >= 1 else "resample=random_over"
            raise ConfigError(
                f"resample={method} with resample.k_neighbors={k} needs more than {k} training samples in every "
                f"class it oversamples; {listing}. Fix: {fix}, or add images to {'that class' if len(short) == 1 else 'those classes'}."
            )


def check_imbalance_options(config: Config, use_cache: bool, train_counts: Sequence[int], classes: Sequence[str]) -> bool:
    """Validate `data.sampler`, `data.oversample_augment` and `resample` before training.

    Args:
        config: the whole run config.
        use_cache: whether the run would train on cached embeddings (frozen backbone + cache).
        train_counts: training images per class.
        classes: class names.

    Returns:
        Whether to train on cached embeddings: False with `data.oversample_augment=true`, where
        the frozen backbone must see every freshly augmented repeat.
    """
    data, method = config.data, config.resample.method
    if data.oversample_augment:
        if data.sampler != SamplerName.balanced:
            raise ConfigError("data.oversample_augment=true repeats minority images with fresh augmentations, "
                              "so it needs data.sampler=balanced.")
        if not data.augment.enabled:
            raise ConfigError("data.oversample_augment=true needs data.augment.enabled=true (otherwise repeats are identical).")
        if method != ResampleMethod.none:
            raise ConfigError(f"resample={method} works on cached embeddings, data.oversample_augment=true on images: pick one.")
        use_cache = False
    if method != ResampleMethod.none:
        if not use_cache:
            raise ConfigError(
                f"resample={method} resamples cached embeddings, so it needs a frozen backbone with the cache "
                "(finetune=frozen finetune.cache_embeddings=true). Fix: use data.sampler=balanced or loss=weighted_ce instead."
            )
        check_resample(config.resample, train_counts, classes)
    return use_cache


def resample_embeddings(
    features: torch.Tensor, labels: torch.Tensor, cfg: ResampleConfig, classes: Sequence[str], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample the training split's embeddings with imbalanced-learn.

    Args:
        features: [N, D] training embeddings.
        labels: [N] class indices.
        cfg: the `resample` config section (`vfmtune.config.ResampleConfig`).
        classes: class names, for messages.
        seed: `random_state` of the resampler.

    Returns:
        `(features [M, D], labels [M])`; synthetic rows (SMOTE, ADASYN) are appended after the real ones.

    Example:
        >>> x, y = resample_embeddings(feats, labels, ResampleConfig(method="smote"), classes, 0)
    """
    import importlib

    method = cfg.method
    counts = np.bincount(labels.numpy(), minlength=len(classes)).tolist()
    check_resample(cfg, counts, classes)
    if method == ResampleMethod.none:
        return features, labels
    path, uses_knn = RESAMPLERS[method]
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    strategy = cfg.sampling_strategy
    strategy = dict(strategy) if hasattr(strategy, "keys") else strategy
    kwargs: dict[str, Any] = {"sampling_strategy": strategy, "random_state": seed}
    if method == "smote_tomek":
        from imblearn.over_sampling import SMOTE

        kwargs["smote"] = SMOTE(sampling_strategy=strategy, k_neighbors=int(cfg.k_neighbors), random_state=seed)
    elif method == "adasyn":
        kwargs["n_neighbors"] = int(cfg.k_neighbors)
    elif uses_knn:
        kwargs["k_neighbors"] = int(cfg.k_neighbors)
    try:
        x, y = cls(**kwargs).fit_resample(features.double().numpy(), labels.numpy())
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"resample={method} failed on the training embeddings ({e}). Fix: change resample.k_neighbors "
                          f"or resample.sampling_strategy, or use resample=random_over.") from None
    after = np.bincount(y, minlength=len(classes)).tolist()
    print(f"resample={method}: training embeddings per class " + ", ".join(f"{c} {a}->{b}" for c, a, b in zip(classes, counts, after)))
    return torch.as_tensor(x, dtype=features.dtype), torch.as_tensor(y, dtype=torch.long)
