"""From a data config to a scanned, split dataset: what every command starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfmtune.config import ConfigError
from vfmtune.data.images import IMG_EXTENSIONS, DataError, scan_images
from vfmtune.data.sources import SampleTable, from_imagefolder, from_manifest, packaged_dataset
from vfmtune.data.splits import resolve_splits, save_splits
from vfmtune.report import split_summary
from vfmtune.weights import cache_dir as default_cache_dir

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    """A dataset after scanning and splitting: what every command works from."""

    table: SampleTable
    splits: list[str]

    def subset(self, split: str) -> tuple[list[str], list[int]]:
        keep = [i for i, s in enumerate(self.splits) if split == "all" or s == split]
        return [self.table.paths[i] for i in keep], [self.table.labels[i] for i in keep]


def cache_root(cfg: dict[str, Any]) -> Path:
    return Path(cfg["cache_dir"]).expanduser() if cfg.get("cache_dir") else default_cache_dir()


def sample_table(data: dict[str, Any]) -> SampleTable:
    """Samples from `data.root` (ImageFolder), `data.manifest` (CSV) or the packaged `data.dataset`."""
    if data.get("root"):
        return from_imagefolder(data["root"])
    if data.get("manifest"):
        from vfmtune.distill_api import is_teacher_labelled

        if Path(data["manifest"]).is_file() and is_teacher_labelled(data["manifest"]):
            raise DataError(f"data.manifest={data['manifest']} is teacher-labelled (it has a confidence column): it "
                            "would put teacher labels into validation/test. Fix: pass it as data.unlabeled=CSV (training "
                            "only) and keep data.root/data.manifest for human-labelled images.")
        return from_manifest(data["manifest"])
    if data.get("dataset"):
        return from_imagefolder(packaged_dataset(data["dataset"]))
    raise ConfigError("No data given. Set data.root=/path/to/imagefolder, data.manifest=/path/to/list.csv or data.dataset=textile.")


def scan_or_skip(paths: list[str], on_bad: str, workers: int) -> list[bool]:
    if on_bad not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_image={on_bad!r} is not one of error, skip.")
    ok, report = scan_images(paths, on_bad=on_bad, workers=max(workers, 1))
    if report.bad or report.ignored:
        print(report.format())
    return ok


def prepare_data(cfg: dict[str, Any], run_dir: Path) -> Prepared:
    """List, scan (stop or skip on bad files), split (stratified, persisted) and report a dataset."""
    data = cfg["data"]
    table = sample_table(data)
    ok = scan_or_skip(table.paths, data["on_bad_image"], data["num_workers"])
    if not all(ok):
        keep = [i for i, good in enumerate(ok) if good]
        table = SampleTable(
            paths=[table.paths[i] for i in keep],
            labels=[table.labels[i] for i in keep],
            classes=table.classes,
            splits=[table.splits[i] for i in keep] if table.splits else None,
            ignored=table.ignored,
        )
    splits = resolve_splits(table, data["val_fraction"], data["test_fraction"], data["seed"], cache_root(cfg))
    save_splits(run_dir / "splits.csv", table.paths, table.labels, table.classes, splits)
    print(f"{len(table.paths)} images, {len(table.classes)} classes; split saved to {run_dir / 'splits.csv'}")
    print(split_summary(table.labels, splits, table.classes))
    return Prepared(table, splits)


def train_class_counts(prepared: Prepared) -> list[int]:
    """Training images per class; a class with none stops the run (nothing could learn it)."""
    _, labels = prepared.subset("train")
    counts = [labels.count(c) for c in range(len(prepared.table.classes))]
    missing = [c for c, n in zip(prepared.table.classes, counts) if n == 0]
    if missing:
        raise DataError(
            f"Class{'es' * (len(missing) > 1)} {', '.join(repr(c) for c in missing)} "
            f"{'have' if len(missing) > 1 else 'has'} no images in the training split. Fix: add training images of "
            f"{'them' if len(missing) > 1 else 'it'}, or fix the manifest's split column."
        )
    return counts


def list_images(images: str) -> list[str]:
    root = Path(images).expanduser()
    if root.is_file():
        return [str(root.resolve())]
    if not root.is_dir():
        raise DataError(f"images={images}: no such file or folder.")
    paths = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise DataError(f"images={images}: no image files ({', '.join(IMG_EXTENSIONS)}) found.")
    return paths
