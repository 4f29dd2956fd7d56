"""The fold ensemble of a `vfmtune cv` run: averaged class probabilities of the fold classifiers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from vfmtune.adapt.freeze import is_frozen
from vfmtune.embedding_cache import weights_digest


class MeanProbabilities(nn.Module):
    """Heads on shared features -> log of their mean class probabilities [B, C] (argmax and softmax
    then behave as for one model)."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @override
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return mean_log_probs([h(features) for h in self.heads])


def mean_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([z.softmax(-1) for z in logits]).mean(0).clamp(min=1e-12).log()


class Ensemble(nn.Module):
    """Averages the class probabilities of several classifiers (the k fold models of a cv run).

    When every member has the same frozen backbone (a frozen-backbone cv run), `backbone` is that one
    backbone and `head` averages the members' heads on its features: the backbone runs once per batch,
    and evaluation can use the embedding cache. Otherwise `backbone` and `head` are None and each
    member runs on the images.

    Args:
        members: trained `Classifier`s with the same classes.

    Example:
        >>> model = vfmtune.load_model("runs/cv/<date>")  # an Ensemble of the fold models
        >>> probs = model(images).exp()  # [B, C]
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.classes = list(members[0].classes)
        self.config = members[0].config
        frozen = all(is_frozen(m.backbone) for m in members)
        shared = frozen and len({weights_digest(m.backbone) for m in members}) == 1
        self.backbone: nn.Module | None = members[0].backbone if shared else None
        self.head: nn.Module | None = MeanProbabilities([m.head for m in members]) if shared else None

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> log mean probabilities [B, C]."""
        if self.head is not None:
            return self.head(self.backbone(images))
        return mean_log_probs([m(images) for m in self.members])
