"""On-disk cache of frozen-backbone embeddings.

A frozen ViT-S/14 costs ~75 ms per 224 px image on a 2-core CPU, so running it every epoch makes a
head-only fine-tune take an hour. Its output for a given image is fixed, so it is computed once.

Layout: `<cache>/embeddings/<model key>/<shard>.safetensors`, each shard holding `digests`
([N, 32] uint8 sha256 of the image files' bytes) and `features` ([N, ...]: pooled vectors [N, D] or
patch-token maps [N, C, h, w]). The model key hashes everything that changes the features: backbone
name, weights identity, input size, the eval transform, what is extracted (pooled or tokens) and the
precision the backbone ran in (`vfmtune.precision`: bf16 and fp32 features never mix). Images are
keyed by content, so renamed files hit the cache, edited files miss it, and adding images only
embeds the new ones. In a multi-process run (DDP) each rank embeds its share of the missing images
into its own shard, and after a barrier every rank reads the whole cache (`Shard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from vfmtune.backbones import data_config
from vfmtune.cache_dir import cache_dir
from vfmtune.choices import Precision
from vfmtune.config import AugmentConfig, Config
from vfmtune.data.datamodule import ImageDataset
from vfmtune.data.transforms import build_transforms
from vfmtune.device import Shard, compute_device
from vfmtune.faults import fault_point
from vfmtune.io import atomic_path, file_digest, write_json
from vfmtune.precision import Resolved, resolve_precision

CACHE_VERSION = 1


def weights_digest(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Identity of the actual tensors (a module's state dict, or named tensors): a cache keyed by it
    can never serve features of other weights."""
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        # reshape(-1): 0-d tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes; same bytes otherwise
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def model_key(backbone_name: str, weights_id: str, transform: Callable, extra: dict | None = None) -> str:
    """Hash of what determines the features; `repr(transform)` lists every eval-transform parameter."""
    spec = {"v": CACHE_VERSION, "backbone": backbone_name, "weights": weights_id, "transform": repr(transform), **(extra or {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    """Content-addressed embeddings for one model key.

    Shards are written atomically every `shard_every` batches, so a killed embedding pass keeps what
    it finished and a rerun embeds only the rest. A shard that cannot be read (truncated by a full
    disk, an interrupted copy) is reported once, deleted, and its rows are recomputed. Processes that
    embed into the same folder at once take turns through a file lock, so no image is embedded twice.

    Example:
        >>> cache = EmbeddingCache(cache_dir() / "embeddings" / key, meta={"backbone": "dinov2_vits14"})
        >>> feats = cache.embed(backbone, paths, eval_transform)  # [len(paths), D]
    """

    shard_every = 16  # batches per shard: at most this much work is lost to a crash

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.meta = meta

    def _load(self) -> dict[bytes, torch.Tensor]:
        table: dict[bytes, torch.Tensor] = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            try:
                data = load_file(shard)
                if data["digests"].shape[0] != data["features"].shape[0]:
                    raise ValueError(f"{data['digests'].shape[0]} digests for {data['features'].shape[0]} rows")
            except Exception as e:  # noqa: BLE001 - any unreadable shard is derived data: drop it, recompute its rows
                warnings.warn(f"embedding cache file {shard} is unreadable ({type(e).__name__}: {e}); deleted, "
                              "its images are embedded again.", stacklevel=3)
                shard.unlink(missing_ok=True)
                continue
            for digest, row in zip(data["digests"].numpy(), data["features"]):
                table[digest.tobytes()] = row
        return table

    def missing(self, paths: Sequence[str]) -> list[str]:
        """The paths whose content is not cached yet, one per distinct content, in order."""
        cached = set(self._load())
        todo: dict[bytes, str] = {}
        for p in paths:
            d = file_digest(p)
            if d not in cached:
                todo.setdefault(d, p)
        return list(todo.values())

    def _save_shard(self, digests: list[bytes], features: torch.Tensor) -> None:
        name = hashlib.sha256(b"".join(digests)).hexdigest()[:16]
        digest_t = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, 32)
        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file({"digests": digest_t, "features": features.contiguous()}, str(tmp))
        if self.meta is not None and not (self.folder / "meta.json").is_file():
            write_json(self.folder / "meta.json", self.meta)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive use of the folder while misses are computed (POSIX advisory lock; elsewhere none)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: atomic shards still keep every file whole
            yield
            return
        with open(self.folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        precision: Resolved | None = None,
        lock: bool = True,
    ) -> torch.Tensor:
        """Features [len(paths), ...] of `backbone` in eval mode: pooled vectors `backbone(x)`, or what
        `extract(backbone, x)` returns (e.g. patch tokens; its name belongs in the model key). Only cache
        misses are computed, on `device` (the backbone goes back where it was), under `precision`'s
        autocast (fp32 if None; it belongs in the model key too); stored on the CPU as float32."""
        digests = [file_digest(p) for p in paths]
        table = self._load()
        if any(d not in table for d in digests):
            # DDP ranks embed disjoint shares at once (lock=False); other writers take turns
            with self._locked() if lock else contextlib.nullcontext():
                table = self._load()  # another process may have embedded them while we waited
                self._embed_missing(table, digests, paths, backbone, transform, batch_size, num_workers, progress, device,
                                    extract, precision)
        return torch.stack([table[d] for d in digests])

    def _embed_missing(self, table: dict[bytes, torch.Tensor], digests: list[bytes], paths: Sequence[str], backbone: nn.Module,
                       transform: Callable, batch_size: int, num_workers: int, progress: bool, device: torch.device | str,
                       extract: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None, precision: Resolved | None) -> None:
        missing_unique: dict[bytes, int] = {}  # digest -> first index: duplicate files embed once
        for i, d in enumerate(digests):
            if d not in table:
                missing_unique.setdefault(d, i)
        if not missing_unique:
            return
        idx = list(missing_unique.values())
        loader = DataLoader(ImageDataset([paths[i] for i in idx], [0] * len(idx), transform), batch_size=batch_size,
                            num_workers=num_workers)
        was_training = backbone.training
        home = next(backbone.parameters()).device
        backbone.eval().to(device)
        iterator: Any = loader
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc=f"embedding {len(idx)} images (cached for later runs)", unit="batch")
        done, chunks = 0, []
        for b, (images, _) in enumerate(iterator, start=1):
            x = images.to(device, non_blocking=True)
            with precision.autocast() if precision else contextlib.nullcontext():
                out = backbone(x) if extract is None else extract(backbone, x)
            chunks.append(out.float().cpu())
            fault_point("embed_batch")
            if b % self.shard_every == 0 or b == len(loader):
                features = torch.cat(chunks)
                part = [digests[i] for i in idx[done : done + len(features)]]
                self._save_shard(part, features)
                table.update(zip(part, features))
                done, chunks = done + len(features), []
        backbone.train(was_training).to(home)


def embed_images(
    config: Config,
    backbone: nn.Module,
    paths: Sequence[str],
    extract: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    kind: str = "pooled",
    label: str = "embeddings",
    transform: Callable | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Features of `paths` through the run's embedding cache (`<cache>/embeddings/<model key>`).

    The transform is the classification eval transform of the backbone's timm data config at
    `config.backbone.img_size` unless given (segmentation resizes without cropping); the key holds the
    backbone name, its actual weights, that transform, `kind` (what `extract` returns) and the run's
    precision (`config.precision`, resolved for the compute device).

    Args:
        shard: in a multi-process run, this rank's share: it embeds 1/world of the missing images,
            waits for the others, then reads everyone's from the cache. If `cache_dir` is not shared
            between the ranks (node-local disks), the rest is embedded here too: correct, not faster.

    Returns:
        `[len(paths), ...]` float32 on the CPU.
    """
    eval_tf = transform or build_transforms(data_config(backbone, config.backbone.img_size), AugmentConfig(enabled=False))[1]
    precision = resolve_precision(config)
    extra = {} if kind == "pooled" else {"kind": kind}
    if precision.precision != Precision.fp32:  # fp32 keys stay as before: existing caches remain valid
        extra["precision"] = str(precision.precision)
    digest = weights_digest(backbone)
    key = model_key(config.backbone.name, digest, eval_tf, extra or None)
    meta = {"backbone": config.backbone.name, "weights": str(config.backbone.weights), "img_size": config.backbone.img_size,
            "kind": kind, "weights_digest": digest, "precision": str(precision.precision)}
    cache = EmbeddingCache(cache_dir(config.cache_dir) / "embeddings" / key, meta=meta)
    device = compute_device(config)
    t0 = time.perf_counter()
    if shard is not None and shard.world > 1:
        todo = cache.missing(paths)
        mine = todo[shard.rank::shard.world]
        cache.embed(backbone, mine, eval_tf, config.data.batch_size, config.data.num_workers, progress=shard.rank == 0,
                    device=device, extract=extract, precision=precision, lock=False)
        print(f"rank {shard.rank}/{shard.world}: embedded {len(mine)} of {len(todo)} new images in "
              f"{time.perf_counter() - t0:.1f}s; waiting for the other ranks")
        shard.barrier()
        left = len(cache.missing(paths))
        if left:
            print(f"rank {shard.rank}: {left} images embedded by other ranks are not in {cache.folder}: cache_dir is not "
                  "shared between ranks, so this rank embeds them too (put cache_dir on a shared filesystem)")
    features = cache.embed(backbone, paths, eval_tf, config.data.batch_size, config.data.num_workers,
                           device=device, extract=extract, precision=precision)
    print(f"{label} ready in {time.perf_counter() - t0:.1f}s, {precision.precision} ({cache.folder})")
    return features
