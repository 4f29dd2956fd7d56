"""From a data config to a scanned, split dataset: what every command starts from."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfmtune.cache_dir import cache_dir
from vfmtune.choices import ConfigError
from vfmtune.config import Config, DataConfig
from vfmtune.data.images import IMG_EXTENSIONS, DataError, scan_images
from vfmtune.data.mask_scan import scan_masks
from vfmtune.data.mask_sources import SegmentationTable, class_names
from vfmtune.data.mask_splits import resolve_mask_splits
from vfmtune.data.sources import SPLIT_NAMES, SampleTable, from_imagefolder, from_manifest, is_teacher_labelled, packaged_dataset
from vfmtune.data.splits import resolve_splits, save_splits
from vfmtune.io import file_digest
from vfmtune.report import split_summary


@dataclass
class Prepared:
    """A dataset after scanning and splitting: what every command works from.

    Attributes:
        table: the samples (class targets, or mask files with their stratification class).
        splits: "train" / "val" / "test" per sample.
        pixel_counts: segmentation only: ``[N, K]`` labelled pixels per class per sample.
        synthetic: how many training samples are synthetic (``data.synthetic``, appended after the real ones).
    """

    table: SampleTable
    splits: list[str]
    pixel_counts: np.ndarray | None = None
    synthetic: int = 0

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


def prepare_masks(cfg: Config, run_dir: Path, source: SegmentationTable) -> Prepared:
    """`prepare_data` for image/mask pairs: images decoded, masks checked against their images and
    counted per class (`scan_masks`), split so that every class reaches every split it can
    (`resolve_mask_splits`, persisted), and the split reported with each class's share of pixels."""
    data = cfg.data
    ok_images = scan_or_skip(source.paths, data)
    num_classes = len(source.classes) if source.classes is not None else None
    ok_masks, report = scan_masks(source.paths, source.masks, num_classes=num_classes, colours=source.colours,
                                  on_bad=str(data.on_bad_image), workers=max(data.num_workers, 1))
    if report.bad:
        print(report.format())
    keep = [i for i, (a, b) in enumerate(zip(ok_images, ok_masks)) if a and b]
    counts = report.pixel_counts[keep]
    seg = SegmentationTable([source.paths[i] for i in keep], [source.masks[i] for i in keep], source.classes, source.colours,
                            [source.splits[i] for i in keep] if source.splits is not None else None)
    classes = class_names(seg, report.num_classes)
    if not keep:
        raise DataError("No image/mask pair is usable (see the report above).")
    presence = counts > 0
    splits = resolve_mask_splits(seg, presence, data.val_fraction, data.test_fraction, data.seed, cache_dir(cfg.cache_dir), classes)
    frequency = presence.sum(axis=0)
    # The class each image is stratified by (its rarest): the "label" column of splits.csv.
    strata = [int(np.flatnonzero(row)[np.argmin(frequency[row])]) if row.any() else 0 for row in presence]
    table = SampleTable(paths=seg.paths, labels=strata, classes=classes, masks=seg.masks, colours=seg.colours)
    save_splits(run_dir / "splits.csv", table.paths, table.labels, classes, splits)
    print(f"{len(table)} images, {len(classes)} classes; split saved to {run_dir / 'splits.csv'}")
    print(pixel_summary(counts, splits, classes))
    return Prepared(table, splits, counts)


def pixel_summary(counts: np.ndarray, splits: Sequence[str], classes: Sequence[str]) -> str:
    """Images per split and each class's share of labelled pixels per split: class imbalance made visible."""
    names = [s for s in SPLIT_NAMES if s in set(splits)]
    width = max(len(c) for c in classes) + 2
    lines = [f"  {'pixels %':<{width}}" + "".join(f"{s:>8}" for s in names)]
    totals = {s: counts[[i for i, x in enumerate(splits) if x == s]].sum(axis=0) for s in names}
    for k, cls in enumerate(classes):
        lines.append(f"  {cls:<{width}}" + "".join(f"{100 * totals[s][k] / max(totals[s].sum(), 1):>8.2f}" for s in names))
    lines.append(f"  {'images':<{width}}" + "".join(f"{sum(1 for x in splits if x == s):>8}" for s in names))
    return "\n".join(lines)


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


def training_only_images(source: str, held_out: Sequence[str], data: DataConfig, key: str, why: str) -> list[str]:
    """Images of `source` (a folder, or a CSV with a `path` column such as a pseudo-label manifest),
    scanned, and refused (by content, so renamed copies count) if any is also in `held_out`.

    Args:
        source: the folder or CSV.
        held_out: images that must stay out of training (validation, test).
        data: the data section (`on_bad_image`, workers).
        key: the config key named in errors, e.g. "data.unlabeled".
        why: why those images may only be trained on, for the error message.
    """
    src = Path(source).expanduser()
    if src.suffix.lower() == ".csv" and src.is_file():
        with open(src, newline="", encoding="utf-8-sig") as f:
            paths = [str((src.parent / row["path"]).resolve()) for row in csv.DictReader(f)]
    else:
        paths = list_images(source)
    paths = [p for p, good in zip(paths, scan_or_skip(paths, data)) if good]
    held = {file_digest(p) for p in held_out}
    leaked = [p for p in paths if file_digest(p) in held]
    if leaked:
        raise DataError(f"{key}={source}: {len(leaked)} image(s) are also validation/test images (e.g. {leaked[0]}). "
                        f"{why} Fix: remove them from {source}.")
    return paths


def readable_images(images: str, data: DataConfig) -> list[str]:
    """`list_images`, then scanned: bad files stop the command or are skipped and counted (`data.on_bad_image`)."""
    paths = list_images(images)
    return [p for p, good in zip(paths, scan_or_skip(paths, data)) if good]


def align_classes(prepared: Prepared, classes: Sequence[str]) -> Prepared:
    """Re-index the data's labels to the model's classes (new data may hold a subset of them); mask
    values are class ids already, so masks only need to stay within the model's classes."""
    table = prepared.table
    if table.classes == list(classes):
        return prepared
    if table.masks is not None:
        if len(table.classes) > len(classes):
            raise DataError(f"The masks hold class ids up to {len(table.classes) - 1} but the checkpoint knows "
                            f"{len(classes)} classes {list(classes)}.")
        table.classes = list(classes)
        return prepared
    unknown = sorted(set(table.classes) - set(classes))
    if unknown:
        raise DataError(f"Classes {unknown} are not among the checkpoint's classes {list(classes)}.")
    index = {c: list(classes).index(c) for c in table.classes}
    table.labels = [index[table.classes[y]] for y in table.labels]
    table.classes = list(classes)
    return prepared
