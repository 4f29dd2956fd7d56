"""Loss functions for (imbalanced) classification, built from the `loss` config section.

Class weights are always computed from the TRAINING split's class counts: weights taken from
validation or test counts would leak held-out information into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from vfmtune.choices import ConfigError, LossName
from vfmtune.config import LossConfig

WEIGHT_SCHEMES = ("balanced", "effective_number")


def class_weights(counts: Sequence[int], scheme: Any, beta: float = 0.999, key: str = "loss.class_weights") -> torch.Tensor:
    """Per-class weights [C] from training counts.

    Args:
        counts: training images per class, index = label.
        scheme: "balanced" (scikit-learn's `n / (C * n_c)`), "effective_number" (Cui et al. 2019,
            https://arxiv.org/abs/1901.05555: `(1 - beta) / (1 - beta^n_c)`, rescaled to sum to C),
            or an explicit list of C numbers.
        beta: effective_number only, in [0, 1).
        key: config key named in errors.

    Example:
        >>> class_weights([90, 10], "balanced")
        tensor([0.5556, 5.0000])
    """
    n_classes = len(counts)
    if isinstance(scheme, (list, tuple)) or (hasattr(scheme, "__len__") and not isinstance(scheme, str)):
        weights = [float(w) for w in scheme]
        if len(weights) != n_classes:
            raise ConfigError(f"{key} has {len(weights)} values but the data has {n_classes} classes. "
                              "Fix: give one weight per class, in class order.")
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(f"{key}={weights}: weights must be >= 0 and not all zero.")
        return torch.tensor(weights, dtype=torch.float32)
    c = torch.tensor([float(n) for n in counts])
    if torch.any(c <= 0):
        raise ConfigError(f"{key}={scheme!r} needs every class in the training split (counts: {[int(n) for n in counts]}).")
    if scheme == "balanced":
        return c.sum() / (n_classes * c)
    if scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"loss.beta={beta} is out of range. Fix: use a value in [0, 1), e.g. 0.999.")
        w = (1.0 - beta) / (1.0 - torch.pow(beta, c))
        return w * n_classes / w.sum()
    raise ConfigError(f"{key}={scheme!r} is not one of {', '.join(WEIGHT_SCHEMES)} or a list of {n_classes} numbers.")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, https://arxiv.org/abs/1708.02002): `-alpha_y (1 - p_y)^gamma log p_y`.

    Label smoothing applies to the log-probability term, as in `nn.CrossEntropyLoss`.

    Args:
        gamma: focusing parameter; 0 gives (alpha-weighted) cross-entropy.
        alpha: optional per-class weights [C].
        label_smoothing: in [0, 1).

    Example:
        >>> FocalLoss(gamma=2.0)(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha)

    @override
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, C], target [B] -> scalar (mean over the batch, alpha-normalised like weighted CE)."""
        log_p = F.log_softmax(logits, dim=-1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        nll = -log_pt
        if self.label_smoothing > 0:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * log_p.mean(-1)
        loss = (1 - log_pt.exp()).clamp(min=0).pow(self.gamma) * nll
        if self.alpha is None:
            return loss.mean()
        a = self.alpha[target]
        return (a * loss).sum() / a.sum().clamp(min=1e-12)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al. 2021, https://arxiv.org/abs/2007.07314): the base loss on
    `logits + tau * log(prior)`. Prediction uses the raw logits, which are then balanced."""

    def __init__(self, base: nn.Module, prior: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("offset", tau * prior.clamp(min=1e-12).log())

    @override
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.base(logits + self.offset, target)


def build_loss(cfg: LossConfig, class_counts: Sequence[int] | None = None) -> nn.Module:
    """The training loss: logits [B, C] and labels [B] -> scalar.

    Args:
        cfg: the `loss` config section (`vfmtune.config.LossConfig`).
        class_counts: training images per class; required by weighted_ce, focal's alpha schemes
            and logit adjustment.

    Example:
        >>> build_loss(LossConfig(name="weighted_ce", class_weights="balanced"), [90, 10])
    """
    name = cfg.name
    smoothing = float(cfg.label_smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing={smoothing} is out of range. Fix: use a value in [0, 1).")

    def counts(what: str) -> Sequence[int]:
        if class_counts is None:
            raise ConfigError(f"{what} needs the training split's class counts.")
        return class_counts

    if name == LossName.weighted_ce:
        weights = class_weights(counts("loss=weighted_ce"), cfg.class_weights, cfg.beta)
        loss: nn.Module = nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)
    elif name == LossName.focal:
        if cfg.gamma < 0:
            raise ConfigError(f"loss.gamma={cfg.gamma} must be >= 0 (2 is the paper's choice).")
        alpha_t = None if cfg.alpha is None else class_weights(counts("loss.alpha"), cfg.alpha, cfg.beta, "loss.alpha")
        loss = FocalLoss(float(cfg.gamma), alpha_t, smoothing)
    else:
        loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    tau = float(cfg.logit_adjust_tau or 0.0)
    if tau:
        c = torch.tensor([float(n) for n in counts("loss.logit_adjust_tau")])
        loss = LogitAdjustedLoss(loss, c / c.sum(), tau)
    return loss
