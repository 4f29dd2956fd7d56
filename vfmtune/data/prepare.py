"""From a data config to a scanned, split dataset: what every command starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vfmtune.cache import cache_dir
from vfmtune.config import Config, ConfigError, DataConfig
from vfmtune.data.images import IMG_EXTENSIONS, DataError, scan_images
from vfmtune.data.sources import SPLIT_NAMES, SampleTable, from_imagefolder, from_manifest, is_teacher_labelled, packaged_dataset
from vfmtune.data.splits import resolve_splits, save_splits
from vfmtune.report import split_summary


@dataclass
class Prepared:
    """A dataset after scanning and splitting: what every command works from."""

    table: SampleTable
    splits: list[str]

    def subset(self, split: str) -> tuple[list[str], list]:
        """`(paths, targets)` of one split ("all" for every sample); targets are class indices or mask files."""
        keep = [i for i, s in enumerate(self.splits) if split == "all" or s == split]
        targets = self.table.targets
        return [self.table.paths[i] for i in keep], [targets[i] for i in keep]

    def labels(self, split: str) -> list[int]:
        """Class index (classification) or stratification class (segmentation) of each sample of a split."""
        return [y for y, s in zip(self.table.labels, self.splits) if split == "all" or s == split]

    @property
    def present(self) -> list[str]:
        """The non-empty splits, in train, val, test order."""
        return [s for s in SPLIT_NAMES if s in self.splits]


def sample_table(data: DataConfig) -> SampleTable:
    """Samples from `data.root` (ImageFolder), `data.manifest` (CSV) or the packaged `data.dataset`."""
    if data.root:
        return from_imagefolder(data.root)
    if data.manifest:
        if Path(data.manifest).is_file() and is_teacher_labelled(data.manifest):
            raise DataError(f"data.manifest={data.manifest} is teacher-labelled (it has a confidence column): it "
                            "would put teacher labels into validation/test. Fix: pass it as data.unlabeled=CSV (training "
                            "only) and keep data.root/data.manifest for human-labelled images.")
        return from_manifest(data.manifest)
    if data.dataset:
        return from_imagefolder(packaged_dataset(data.dataset))
    raise ConfigError("No data given. Set data.root=/path/to/imagefolder, data.manifest=/path/to/list.csv or data.dataset=textile.")


def scan_or_skip(paths: list[str], data: DataConfig) -> list[bool]:
    """Decode every image once: stop with a report of the bad ones, or skip and count them (`data.on_bad_image`)."""
    ok, report = scan_images(paths, on_bad=str(data.on_bad_image), workers=max(data.num_workers, 1))
    if report.bad or report.ignored:
        print(report.format())
    return ok


def prepare_data(cfg: Config, run_dir: Path, table: SampleTable | None = None) -> Prepared:
    """List (unless `table` is given), scan (stop or skip on bad files), split (stratified, persisted)
    and report a dataset; the split is saved to `run_dir/splits.csv`."""
    data = cfg.data
    table = table if table is not None else sample_table(data)
    ok = scan_or_skip(table.paths, data)
    if not all(ok):
        table = table.select([i for i, good in enumerate(ok) if good])
    splits = resolve_splits(table, data.val_fraction, data.test_fraction, data.seed, cache_dir(cfg.cache_dir))
    save_splits(run_dir / "splits.csv", table.paths, table.labels, table.classes, splits)
    print(f"{len(table.paths)} images, {len(table.classes)} classes; split saved to {run_dir / 'splits.csv'}")
    print(split_summary(table.labels, splits, table.classes))
    return Prepared(table, splits)


def train_class_counts(prepared: Prepared) -> list[int]:
    """Training images per class; a class with none stops the run (nothing could learn it)."""
    labels = prepared.labels("train")
    counts = [labels.count(c) for c in range(len(prepared.table.classes))]
    missing = [c for c, n in zip(prepared.table.classes, counts) if n == 0]
    if missing:
        raise DataError(
            f"Class{'es' * (len(missing) > 1)} {', '.join(repr(c) for c in missing)} "
            f"{'have' if len(missing) > 1 else 'has'} no images in the training split. Fix: add training images of "
            f"{'them' if len(missing) > 1 else 'it'}, or fix the manifest's split column."
        )
    return counts


def require_splits(prepared: Prepared, *splits: str) -> None:
    """Stop before training when a split the run needs is empty."""
    for split in splits:
        if split not in prepared.splits:
            raise DataError(f"The {split} split is empty. Fix: add images or change data.val_fraction / data.test_fraction.")


def list_images(images: str) -> list[str]:
    """Image files of a folder (recursively, sorted) or the one file given."""
    root = Path(images).expanduser()
    if root.is_file():
        return [str(root.resolve())]
    if not root.is_dir():
        raise DataError(f"images={images}: no such file or folder.")
    paths = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise DataError(f"images={images}: no image files ({', '.join(IMG_EXTENSIONS)}) found.")
    return paths


def readable_images(images: str, data: DataConfig) -> list[str]:
    """`list_images`, then scanned: bad files stop the command or are skipped and counted (`data.on_bad_image`)."""
    paths = list_images(images)
    return [p for p, good in zip(paths, scan_or_skip(paths, data)) if good]
