"""`vfmtune embed`: fill the embedding cache of a frozen backbone ahead of training, or for analysis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.backbones import create_backbone
from vfmtune.config import Config
from vfmtune.data.prepare import prepare_data, sample_table
from vfmtune.embedding_cache import embed_images
from vfmtune.run import ConfigLike, command_config, make_run_dir


def embed(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the embedding cache of the configured backbone, frozen, for every image.

    The cache is the one `vfmtune train` with `finetune=frozen` reads, so training afterwards costs
    no backbone pass.

    Returns:
        `{"run_dir", "features" [N, D] tensor, "labels" [N], "splits" [N] ("train"/"val"/"test"),
        "paths" [N], "classes"}`: what scikit-learn or imbalanced-learn code needs, in a notebook too.

    Example:
        >>> e = vfmtune.embed(overrides=["backbone.img_size=448"])
        >>> LogisticRegression().fit(e["features"][train], np.array(e["labels"])[train])
    """
    config = command_config(cfg, overrides, Config, "embed")
    out = make_run_dir(run_dir, "embed")
    prepared = prepare_data(config, out, sample_table(config.data))
    b = config.backbone
    backbone = create_backbone(b.name, weights=str(b.weights), path=b.path, img_size=b.img_size, global_pool=b.global_pool)
    features = embed_images(config, backbone.eval(), prepared.table.paths)
    print(f"{features.shape[0]} embeddings of size {features.shape[1]} cached")
    return {
        "run_dir": str(out),
        "features": features,
        "labels": list(prepared.table.labels),
        "splits": list(prepared.splits),
        "paths": list(prepared.table.paths),
        "classes": list(prepared.table.classes),
    }
