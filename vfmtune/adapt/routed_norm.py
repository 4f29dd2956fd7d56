"""One probe for two cameras: a feature BatchNorm that keeps each domain's statistics and routes every
image to the domain a linear domain classifier says it came from.

AdaBN swaps the source statistics for the target's, so the adapted probe is a target-camera model (on the
textile shift it scores the source test 0.959 -> 0.341). Domain-specific BatchNorm (Chang et al. 2019,
https://arxiv.org/abs/1906.03950) keeps one set per domain and picks it by a known domain label; here the
label comes from a logistic regression fitted on the source training and target pool embeddings (the model
`vfmtune shift` cross-validates for its domain AUC). A diagonal Gaussian per domain, the statistics
themselves, was tried first and routed a tiny model's pool by chance: class variance swamps a camera shift
that is small in most feature directions, while a discriminant finds the few that carry it. It is a matrix
product, an argmax and a gather, so it exports to ONNX as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from typing_extensions import override


class RoutedBatchNorm(nn.Module):
    """`[B, F]` features normalised with the statistics (`running_mean`, `running_var`, `[K, F]`) of the
    domain `argmax(x @ router_weight.T + router_bias)` picks for each row; no affine parameters (the
    probe's feature norm has none). Row 0 is the source.

    Example:
        >>> head[0] = RoutedBatchNorm.fit([source_bn, adabn_bn], [source_feats, pool_feats])
    """

    def __init__(self, domains: int, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(domains, num_features))
        self.register_buffer("running_var", torch.ones(domains, num_features))
        self.register_buffer("router_weight", torch.zeros(domains, num_features))
        self.register_buffer("router_bias", torch.zeros(domains))

    @classmethod
    def fit(cls, norms: Sequence[nn.BatchNorm1d], features: Sequence[torch.Tensor], seed: int = 0) -> RoutedBatchNorm:
        """Stack eval-mode `BatchNorm1d(affine=False)` statistics, one per domain, and fit the router on each
        domain's `features` (a logistic regression on standardised features, folded into one linear map)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if len(norms) != 2 or len(features) != 2:
            raise ValueError("RoutedBatchNorm.fit takes two domains: the source and the target.")
        if any(bn.affine or bn.running_mean is None or bn.running_var is None for bn in norms):
            raise ValueError("RoutedBatchNorm stacks BatchNorm1d(affine=False) statistics (a frozen probe's feature norm).")
        x = np.concatenate([f.float().cpu().numpy() for f in features])
        y = np.concatenate([np.full(len(f), k) for k, f in enumerate(features)])
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
        w = clf.coef_[0] / scaler.scale_  # the target's logit on raw features; the source's is 0
        b = clf.intercept_[0] - float(w @ scaler.mean_)
        routed = cls(len(norms), norms[0].num_features, norms[0].eps)
        with torch.no_grad():
            routed.running_mean.copy_(torch.stack([bn.running_mean for bn in norms]))  # type: ignore[misc]
            routed.running_var.copy_(torch.stack([bn.running_var for bn in norms]))  # type: ignore[misc]
            routed.router_weight[1] = torch.as_tensor(w, dtype=torch.float32)
            routed.router_bias[1] = float(b)
        return routed

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """`[B]` domain index of each row."""
        return (x.float() @ self.router_weight.T + self.router_bias).argmax(1)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.route(x)
        return ((x.float() - self.running_mean[k]) * (self.running_var[k] + self.eps).rsqrt()).to(x.dtype)
