"""On-disk cache of frozen-backbone embeddings.

A frozen ViT-S/14 costs ~75 ms per 224 px image on a 2-core CPU, so running it every epoch makes a
head-only fine-tune take an hour. Its output for a given image is fixed, so it is computed once.

Layout: `<cache>/embeddings/<model key>/<shard>.safetensors`, each shard holding `digests`
([N, 32] uint8 sha256 of the image files' bytes) and `features` ([N, ...]: pooled vectors [N, D] or
patch-token maps [N, C, h, w]). The model key hashes everything that changes the features: backbone
name, weights identity, input size, the eval transform and what is extracted (pooled or tokens).
Images are keyed by content, so renamed files hit the cache, edited files miss it, and adding images
only embeds the new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from vfmtune.backbones import data_config
from vfmtune.cache import cache_dir
from vfmtune.config import AugmentConfig, Config
from vfmtune.data.datamodule import ImageDataset
from vfmtune.data.transforms import build_transforms
from vfmtune.device import compute_device
from vfmtune.io import atomic_path

CACHE_VERSION = 1


def file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def weights_digest(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Identity of the actual tensors (a module's state dict, or named tensors): a cache keyed by it
    can never serve features of other weights."""
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d buffers too
    return h.hexdigest()[:20]


def model_key(backbone_name: str, weights_id: str, transform: Callable, extra: dict | None = None) -> str:
    """Hash of what determines the features; `repr(transform)` lists every eval-transform parameter."""
    spec = {"v": CACHE_VERSION, "backbone": backbone_name, "weights": weights_id, "transform": repr(transform), **(extra or {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    """Content-addressed embeddings for one model key.

    Example:
        >>> cache = EmbeddingCache(cache_dir() / "embeddings" / key)
        >>> feats = cache.embed(backbone, paths, eval_transform)  # [len(paths), D]
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _load(self) -> dict[bytes, torch.Tensor]:
        table: dict[bytes, torch.Tensor] = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            data = load_file(shard)
            for digest, row in zip(data["digests"].numpy(), data["features"]):
                table[digest.tobytes()] = row
        return table

    def _save_shard(self, digests: list[bytes], features: torch.Tensor) -> None:
        name = hashlib.sha256(b"".join(digests)).hexdigest()[:16]
        digest_t = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, 32)
        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file({"digests": digest_t, "features": features.contiguous()}, str(tmp))

    @torch.inference_mode()
    def embed(
        self,
        backbone: nn.Module,
        paths: Sequence[str],
        transform: Callable,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        device: torch.device | str = "cpu",
        extract: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Features [len(paths), ...] of `backbone` in eval mode: pooled vectors `backbone(x)`, or what
        `extract(backbone, x)` returns (e.g. patch tokens; its name belongs in the model key). Only cache
        misses are computed, on `device` (the backbone goes back where it was); stored on the CPU."""
        digests = [file_digest(p) for p in paths]
        table = self._load()
        missing_unique: dict[bytes, int] = {}  # digest -> first index: duplicate files embed once
        for i, d in enumerate(digests):
            if d not in table:
                missing_unique.setdefault(d, i)
        if missing_unique:
            idx = list(missing_unique.values())
            loader = DataLoader(
                ImageDataset([paths[i] for i in idx], [0] * len(idx), transform),
                batch_size=batch_size,
                num_workers=num_workers,
            )
            was_training = backbone.training
            home = next(backbone.parameters()).device
            backbone.eval().to(device)
            chunks = []
            iterator = loader
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(loader, desc=f"embedding {len(idx)} images (cached for later runs)", unit="batch")
            for images, _ in iterator:
                x = images.to(device, non_blocking=True)
                chunks.append((backbone(x) if extract is None else extract(backbone, x)).float().cpu())
            backbone.train(was_training).to(home)
            features = torch.cat(chunks)
            self._save_shard([digests[i] for i in idx], features)
            for j, i in enumerate(idx):
                table[digests[i]] = features[j]
        return torch.stack([table[d] for d in digests])


def embed_images(
    config: Config,
    backbone: nn.Module,
    paths: Sequence[str],
    extract: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    kind: str = "pooled",
    label: str = "embeddings",
    transform: Callable | None = None,
) -> torch.Tensor:
    """Features of `paths` through the run's embedding cache (`<cache>/embeddings/<model key>`).

    The transform is the classification eval transform of the backbone's timm data config at
    `config.backbone.img_size` unless given (segmentation resizes without cropping); the key holds the
    backbone name, its actual weights, that transform and `kind` (what `extract` returns).

    Returns:
        `[len(paths), ...]` float32 on the CPU.
    """
    eval_tf = transform or build_transforms(data_config(backbone, config.backbone.img_size), AugmentConfig(enabled=False))[1]
    key = model_key(config.backbone.name, weights_digest(backbone), eval_tf, None if kind == "pooled" else {"kind": kind})
    cache = EmbeddingCache(cache_dir(config.cache_dir) / "embeddings" / key)
    t0 = time.perf_counter()
    features = cache.embed(backbone, paths, eval_tf, config.data.batch_size, config.data.num_workers,
                           device=compute_device(config), extract=extract)
    print(f"{label} ready in {time.perf_counter() - t0:.1f}s ({cache.folder})")
    return features
