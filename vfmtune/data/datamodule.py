"""Datasets and the LightningDataModule: images decoded safely, or cached embeddings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from typing_extensions import override

from vfmtune.data.images import load_image
from vfmtune.device import Shard

# Builds a run's datasets (and training sampler) for this process's share of the work, e.g. a cache pass.
DatasetBuilder = Callable[[Shard], tuple[dict[str, Dataset], Sampler | None]]


class ImageDataset(Dataset):
    """`(image_tensor, label)` pairs; decoding goes through `load_image`, so a file that broke after
    the scan fails with its path and a fix, not a PIL traceback from inside a worker."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[i])), self.labels[i]


class InMemoryBatches(TensorDataset):
    """A TensorDataset whose DataLoader indexes a whole batch at once (`__getitems__`) instead of one row at a
    time plus a collate: the same batches, without ~1 ms of Python per batch of 128 cached embeddings."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _as_is(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


class EpochBatches:
    """A training loader whose one item per epoch is the list of `loader`'s batches (same sampler, shuffle and
    drop_last): a head on cached embeddings runs the whole epoch in one Lightning step, because Lightning's
    per-batch machinery (~1.4 ms a batch) cost several times the arithmetic of a linear head's step."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    @property
    def steps_per_item(self) -> int:
        """Optimizer steps in one item (one epoch): what the lr schedules count."""
        return len(self.loader)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[list[Any]]:
        yield list(self.loader)


def whole_epoch_steps(trainer: L.Trainer | None) -> bool:
    """Whether one Lightning step per epoch does the same arithmetic as one per batch: one process holds all the
    data and no Trainer setting acts between batches (clipping, accumulation, step or batch limits, mid-epoch
    validation)."""
    return (trainer is not None and trainer.world_size == 1 and not trainer.gradient_clip_val
            and trainer.accumulate_grad_batches == 1 and trainer.max_steps == -1 and trainer.limit_train_batches == 1.0
            and trainer.val_check_interval == 1.0 and not trainer.overfit_batches)


class SplitData(L.LightningDataModule):
    """Holds ready-made datasets per split; scanning and splitting happen before (`vfmtune.data.prepare`).

    Args:
        datasets: "train" / "val" / "test" / "predict" -> dataset of `(input, target)`; inputs are images or
            cached features. Or a `DatasetBuilder`, called once in `setup` on every process, after Lightning
            has started them all: in a DDP run each rank then computes its share of a cache pass (`Shard`).
        batch_size: per-process batch size.
        num_workers: loader worker processes (0 for in-memory embeddings).
        train_sampler: optional sampler for the training split (e.g. class-balanced); a builder returns its own.
        eval_batch_size: for val / test / predict when it must differ (1: images of different sizes).
        whole_epochs: training batches are cached features and the module optimises a whole epoch per step
            (`EpochBatches`) when `whole_epoch_steps` allows it.

    A "target" dataset (unlabelled images of another domain) is cycled next to the training split:
    training batches are then `{"source": (x, y), "target": (x_t, _)}`.
    """

    def __init__(
        self,
        datasets: dict[str, Dataset] | DatasetBuilder,
        batch_size: int,
        num_workers: int = 0,
        train_sampler: Sampler | None = None,
        eval_batch_size: int | None = None,
        whole_epochs: bool = False,
    ) -> None:
        super().__init__()
        self.build = None if isinstance(datasets, dict) else datasets
        self.datasets: dict[str, Dataset] = datasets if isinstance(datasets, dict) else {}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_sampler = train_sampler
        self.eval_batch_size = eval_batch_size
        self.whole_epochs = whole_epochs
        self.setup_seconds = 0.0

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.build is not None and not self.datasets:
            trainer = self.trainer
            shard = Shard() if trainer is None else Shard(trainer.global_rank, trainer.world_size,
                                                          lambda: trainer.strategy.barrier("vfmtune-datasets"))
            t0 = time.perf_counter()
            # The cache pass draws from torch's RNG (its loaders' seeds) only when the cache is cold: restoring the
            # RNG keeps training's shuffles, and so its result, the same whether the embeddings were cached or not.
            with torch.random.fork_rng(devices=[]):
                self.datasets, self.train_sampler = self.build(shard)
            self.setup_seconds = time.perf_counter() - t0  # the cache pass, when there is one: not training time

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[split]
        in_memory = isinstance(dataset, TensorDataset)
        return DataLoader(
            InMemoryBatches(*dataset.tensors) if in_memory else dataset,
            collate_fn=_as_is if in_memory else None,
            batch_size=self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size,
            shuffle=train and (self.train_sampler is None or split != "train"),
            sampler=self.train_sampler if train and split == "train" else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # A last batch of one breaks BatchNorm in the head; dropping it costs < 1 batch per epoch.
            drop_last=train and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader | EpochBatches | dict[str, DataLoader]:
        if "target" in self.datasets:  # Lightning cycles the shorter loader ("max_size_cycle")
            return {"source": self._loader("train", train=True), "target": self._loader("target", train=True)}
        loader = self._loader("train", train=True)
        return EpochBatches(loader) if self.whole_epochs and whole_epoch_steps(self.trainer) else loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
