"""Balanced sampling (single process and under Lightning's DDP wrapper) and imblearn resampling."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import section
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from vfmtune.choices import ConfigError
from vfmtune.sampling import RESAMPLERS, BalancedSampler, check_resample, resample_embeddings

LABELS = [0] * 90 + [1] * 10
CLASSES = ["ok", "defect"]


def test_balanced_sampler__draws_classes_equally_with_replacement() -> None:
    drawn = [LABELS[i] for _ in range(20) for i in BalancedSampler(LABELS, seed=0)]
    share = Counter(drawn)[1] / len(drawn)
    assert 0.45 < share < 0.55  # 10% of the data, half of the draws
    assert len(list(BalancedSampler(LABELS))) == len(LABELS)  # epoch length unchanged


def test_balanced_sampler__fresh_draw_each_epoch_but_reproducible() -> None:
    a, b = BalancedSampler(LABELS, seed=3), BalancedSampler(LABELS, seed=3)
    first, second = list(a), list(a)
    assert first != second
    assert [first, second] == [list(b), list(b)]


def test_balanced_sampler__ddp_ranks_get_disjoint_shares_of_one_balanced_draw() -> None:
    # What Lightning does with a non-default sampler when use_distributed_sampler=True (the default).
    ranks = [DistributedSamplerWrapper(BalancedSampler(LABELS, seed=1), num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(LABELS) // 2
    full = list(BalancedSampler(LABELS, seed=1))  # the draw every rank makes
    assert Counter(shares[0] + shares[1]) == Counter(full)
    for share in shares:
        assert 0.3 < Counter(LABELS[i] for i in share)[1] / len(share) < 0.7


@pytest.mark.parametrize("method", sorted(RESAMPLERS))
def test_resample_embeddings__balances_training_classes(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 8, generator=gen), torch.randn(12, 8, generator=gen) + 1])  # overlapping: borderline samples exist
    y = torch.tensor([0] * 60 + [1] * 12)
    xr, yr = resample_embeddings(x, y, section("resample", method=method, k_neighbors=5), CLASSES, seed=0)
    counts = Counter(yr.tolist())
    assert xr.shape == (len(yr), 8) and xr.dtype == x.dtype
    if method == "random_under":
        assert counts == {0: 12, 1: 12}
    else:  # over-samplers bring the minority up to (about, for ADASYN / Tomek links) the majority
        assert counts[1] > 40 and abs(counts[0] - counts[1]) <= 12


@pytest.mark.parametrize(
    ("cfg", "counts", "message"),
    [
        ({"method": "smote", "k_neighbors": 5}, [40, 4], r"needs more than 5 training samples.*'defect' has 4. Fix: resample.k_neighbors=3"),
        ({"method": "adasyn", "k_neighbors": 5}, [40, 1], "Fix: resample=random_over"),
        ({"method": "smote", "k_neighbors": 0}, [40, 10], "resample.k_neighbors=0 must be >= 1"),
        ({"method": "mixup", "k_neighbors": 5}, [40, 10], r"'mixup', expected one of \[none, smote"),
    ],
)
def test_check_resample__bad_input__clear_error(cfg: dict, counts: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_resample(section("resample", **cfg), counts, CLASSES)
