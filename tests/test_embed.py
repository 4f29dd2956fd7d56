"""The embedding cache: computed once, keyed by content and model, invalidated when either changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_imagefolder
from PIL import Image

from vfmtune.backbones import create_backbone, data_config
from vfmtune.config import AugmentConfig
from vfmtune.data.transforms import build_transforms
from vfmtune.embedding_cache import EmbeddingCache, model_key


class CountingBackbone(torch.nn.Module):
    """Wraps a real backbone and counts the images it is run on."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.inner(x)


@pytest.fixture
def setup(tmp_path: Path):
    images = make_imagefolder(tmp_path / "img", {"cat": 6, "dog": 6})
    paths = sorted(str(p) for p in images.rglob("*.png"))
    backbone = create_backbone("timm/test_vit", weights="none", img_size=64)
    _, eval_tf = build_transforms(data_config(backbone, 64), AugmentConfig())
    return paths, CountingBackbone(backbone), eval_tf, tmp_path / "cache"


def test_second_call_is_all_hits_and_identical(setup) -> None:
    paths, backbone, tf, folder = setup
    first = EmbeddingCache(folder).embed(backbone, paths, tf, batch_size=4, progress=False)
    assert backbone.seen == 12 and first.shape == (12, backbone.inner.num_features)
    second = EmbeddingCache(folder).embed(backbone, paths, tf, batch_size=4, progress=False)
    assert backbone.seen == 12
    torch.testing.assert_close(first, second)
    # Cached features are exactly what the backbone computes (eval mode, deterministic transform).
    with torch.no_grad():
        direct = backbone.inner.eval()(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[:3]]))
    torch.testing.assert_close(first[:3], direct, atol=1e-5, rtol=1e-4)


def test_changed_or_new_images_only_are_recomputed(setup) -> None:
    paths, backbone, tf, folder = setup
    before = EmbeddingCache(folder).embed(backbone, paths, tf, progress=False)
    Image.fromarray(np.full((48, 48, 3), 7, np.uint8)).save(paths[0])  # edit one file in place
    after = EmbeddingCache(folder).embed(backbone, paths, tf, progress=False)
    assert backbone.seen == 12 + 1
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])


def test_model_key_changes_with_weights_transform_and_name(setup) -> None:
    _, _, tf, _ = setup
    _, other_tf = build_transforms({"input_size": (3, 96, 96)}, AugmentConfig())
    base = model_key("a", "w1", tf)
    assert base == model_key("a", "w1", tf)
    assert len({base, model_key("b", "w1", tf), model_key("a", "w2", tf), model_key("a", "w1", other_tf)}) == 4
