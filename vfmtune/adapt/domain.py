"""Domain adaptation to unlabelled target images: feature alignment while training, and norm-layer
adaptation of a trained model.

- CORAL (Sun & Saenko 2016, https://arxiv.org/abs/1607.01719): match the covariance of source and
  target features of each batch.
- DANN (Ganin et al. 2016, https://arxiv.org/abs/1505.07818): a domain classifier learns to tell the
  domains apart from the features while gradient reversal makes the backbone defeat it.
- AdaBN (Li et al. 2016, https://arxiv.org/abs/1603.04779): BatchNorm statistics re-estimated on target
  data; the weights stay.
- TENT (Wang et al. 2021, https://arxiv.org/abs/2006.10726): minimise the entropy of the predictions on
  target data through the norm layers' affine parameters only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`||C_s - C_t||_F^2 / (4 d^2)` for features `[B, d]` of each domain."""
    d = source.shape[1]

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x.float() - x.float().mean(0, keepdim=True)
        return x.T @ x / max(len(x) - 1, 1)

    return (cov(source) - cov(target)).pow(2).sum() / (4 * d * d)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class DomainClassifier(nn.Module):
    """Features `[B, d]` -> domain logit `[B]`, behind a gradient reversal layer whose strength ramps up
    from 0 to 1 over training (Ganin et al.'s `2 / (1 + exp(-10 p)) - 1`, `p` = progress in [0, 1])."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.progress = 0.0

    @override
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scale = 2.0 / (1.0 + math.exp(-10.0 * self.progress)) - 1.0
        return self.net(_Reverse.apply(features, scale)).squeeze(1)

    def loss(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of telling target (1) from source (0) features."""
        logits = self(torch.cat([source, target]).float())
        labels = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, labels)


def _norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))]


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` of target inputs: the exact mean and
    (unbiased) variance of each BatchNorm's input over all of them, accumulated in float64, so the result does
    not depend on how the images fall into batches (an average of per-batch variances misses the variance
    between batches: a folder sorted by class gave a linear probe's feature norm 1/100 of the true variance).
    BatchNorms normalise with batch statistics meanwhile, as in AdaBN, so deeper ones see target-normalised
    inputs; everything else stays in eval mode. `autocast` is the run's precision context
    (`Resolved.autocast`). Returns how many BatchNorms moved.

    Example:
        >>> adapt_batchnorm(student, (x for x, _ in target_loader))
    """
    module.eval().to(device)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    moments: dict[nn.Module, list[Any]] = {m: [0, 0.0, 0.0] for m in norms}

    def accumulate(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # [C, N * spatial]
        acc = moments[m]
        acc[0] += x.shape[1]
        acc[1] = acc[1] + x.sum(1)
        acc[2] = acc[2] + (x * x).sum(1)

    hooks = [m.register_forward_pre_hook(accumulate) for m in norms]
    for m in norms:
        m.train()
    try:
        for x in batches:
            with autocast():
                module(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    module.eval()
    for m in norms:
        n, total, squares = moments[m]
        if n < 2 or m.running_mean is None or m.running_var is None:
            continue
        mean = total / n
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(((squares / n - mean * mean) * n / (n - 1)).clamp(min=0).to(m.running_var))
    return len(norms)


def tent(module: nn.Module, batches: Iterable[torch.Tensor], steps: int = 1, lr: float = 1e-4,
         device: torch.device | str = "cpu",
         autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> int:
    """Minimise the mean prediction entropy on target `batches` (`steps` passes) through the affine
    parameters of the norm layers; BatchNorms use batch statistics meanwhile, as in TENT, and keep the
    target's statistics afterwards (so the adapted model is an ordinary one to save and deploy).
    `autocast` is the run's precision context (bf16 where the hardware computes it natively: the forward and
    backward in bf16, the norm parameters and the optimiser in fp32). Returns how many parameters were adapted.

    Raises:
        ValueError: the model has no norm layer with affine parameters (nothing TENT may change).
    """
    module.to(device).eval().requires_grad_(False)
    params = []
    for m in _norm_layers(module):
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
                params.append(p)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    if not params:
        raise ValueError("adapt.method=tent: this model has no norm layer with affine parameters to adapt.")
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = list(batches)
    for _ in range(steps):
        for x in batches:
            with autocast():
                logits = module(x.to(device))
            probs = logits.float().softmax(-1)
            loss = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    adapt_batchnorm(module, batches, device, autocast)
    module.requires_grad_(False)
    return sum(p.numel() for p in params)
