"""Datasets and the LightningDataModule: images decoded safely, or cached embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vfmtune.data.images import load_image


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


class SplitData(L.LightningDataModule):
    """Holds ready-made datasets per split; scanning and splitting happen before (`vfmtune.data.prepare`).

    Args:
        datasets: "train" / "val" / "test" / "predict" -> dataset of `(input, target)`; inputs are images or cached features.
        batch_size: per-process batch size.
        num_workers: loader worker processes (0 for in-memory embeddings).
        train_sampler: optional sampler for the training split (e.g. class-balanced).
        eval_batch_size: for val / test / predict when it must differ (1: images of different sizes).
    """

    def __init__(
        self,
        datasets: dict[str, Dataset],
        batch_size: int,
        num_workers: int = 0,
        train_sampler: Sampler | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_sampler = train_sampler
        self.eval_batch_size = eval_batch_size

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size,
            shuffle=train and self.train_sampler is None,
            sampler=self.train_sampler if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # A last batch of one breaks BatchNorm in the head; dropping it costs < 1 batch per epoch.
            drop_last=train and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
