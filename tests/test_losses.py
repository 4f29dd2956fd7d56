"""Class weights, focal loss and logit adjustment: golden numbers against the definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import section
from sklearn.utils.class_weight import compute_class_weight

from vfmtune.choices import ConfigError
from vfmtune.losses import FocalLoss, LogitAdjustedLoss, build_loss, class_weights

COUNTS = [700, 35, 35]
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
TARGET = torch.tensor([0, 1, 1, 2])


def test_class_weights__balanced_matches_sklearn() -> None:
    y = np.repeat(np.arange(3), COUNTS)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert torch.allclose(class_weights(COUNTS, "balanced"), torch.tensor(expected, dtype=torch.float32))


def test_class_weights__effective_number_golden() -> None:
    # Cui et al. 2019: (1 - beta) / (1 - beta^n), normalised to sum to the number of classes.
    w = class_weights(COUNTS, "effective_number", beta=0.99)
    raw = np.array([(1 - 0.99) / (1 - 0.99**n) for n in COUNTS])
    assert np.allclose(w.numpy(), raw * 3 / raw.sum(), atol=1e-6)
    assert w.sum().item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ([1.0, 2.0], "has 2 values but the data has 3 classes"),
        ([0.0, 0.0, 0.0], "not all zero"),
        ("inverse", "is not one of balanced, effective_number"),
    ],
)
def test_class_weights__bad_input__clear_error(scheme: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        class_weights(COUNTS, scheme)


def test_weighted_ce__explicit_list_is_used() -> None:
    loss = build_loss(section("loss", name="weighted_ce", class_weights=[1.0, 5.0, 5.0]), COUNTS)
    expected = F.cross_entropy(LOGITS, TARGET, weight=torch.tensor([1.0, 5.0, 5.0]))
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal__gamma_zero_is_cross_entropy(smoothing: float) -> None:
    expected = F.cross_entropy(LOGITS, TARGET, label_smoothing=smoothing)
    assert FocalLoss(gamma=0.0, label_smoothing=smoothing)(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal__alpha_at_gamma_zero_is_weighted_cross_entropy() -> None:
    alpha = torch.tensor([0.2, 3.0, 1.5])
    expected = F.cross_entropy(LOGITS, TARGET, weight=alpha)
    assert FocalLoss(gamma=0.0, alpha=alpha)(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal__down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    y = torch.tensor([0])
    ratio_ce = F.cross_entropy(easy, y) / F.cross_entropy(hard, y)
    ratio_focal = FocalLoss(gamma=2.0)(easy, y) / FocalLoss(gamma=2.0)(hard, y)
    assert ratio_focal < ratio_ce / 100


def test_logit_adjustment__adds_tau_log_prior() -> None:
    loss = build_loss(section("loss", name="ce", logit_adjust_tau=1.5), COUNTS)
    assert isinstance(loss, LogitAdjustedLoss)
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    expected = F.cross_entropy(LOGITS + 1.5 * prior.log(), TARGET)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "dice"}, r"'dice', expected one of \[ce, weighted_ce, focal\]"),
        ({"name": "focal", "gamma": -1.0}, "loss.gamma=-1.0 must be >= 0"),
        ({"name": "ce", "label_smoothing": 1.0}, "loss.label_smoothing=1.0 is out of range"),
        ({"name": "focal", "alpha": [1.0]}, "loss.alpha has 1 values but the data has 3 classes"),
    ],
)
def test_build_loss__bad_config__clear_error(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_loss(section("loss", **cfg), COUNTS)
