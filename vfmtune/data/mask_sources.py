"""Where segmentation pairs come from: an ``images/`` + ``masks/`` folder, or a CSV manifest.

Both yield a :class:`SegmentationTable` of absolute (image, mask) paths; COCO JSON lives in
:mod:`vfmtune.data.coco` and yields the same table. Classes come from an optional ``classes.txt``:
one name per line (line number = class id), or ``name r g b`` lines for colour masks. Without it,
:func:`class_names` names ``class_0 .. class_{K-1}`` once :func:`vfmtune.data.mask_scan.scan_masks`
has found the largest id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vfmtune.data.images import IMG_EXTENSIONS, DataError, is_image_file
from vfmtune.data.masks import IGNORE_INDEX
from vfmtune.data.sources import SPLIT_NAMES, _is_hidden, _rows_report, read_manifest

CLASSES_FILE = "classes.txt"


@dataclass
class SegmentationTable:
    """Image/mask pairs of a dataset, in a fixed order.

    Attributes:
        paths: Absolute image paths.
        masks: Absolute mask paths, paired with ``paths`` by position.
        classes: Class names (index = class id), or ``None`` to infer ``K`` from the masks.
        colours: ``{(r, g, b): class id}`` for colour masks, else ``None``.
        splits: ``"train"``/``"val"``/``"test"`` per pair when the source fixes them, else ``None``.
        image_ids: COCO image ids per pair (for :func:`vfmtune.data.coco.coco_instances`), else ``None``.
        ignored: Files found that are not images (hidden files are not listed), or entries skipped.
    """

    paths: list[str]
    masks: list[str]
    classes: list[str] | None = None
    colours: dict[tuple[int, int, int], int] | None = None
    splits: list[str] | None = None
    image_ids: list[int] | None = None
    ignored: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def class_names(table: SegmentationTable, num_classes: int) -> list[str]:
    """The table's classes, or ``class_0 .. class_{K-1}`` when it has none (``K`` from the scan).

    Example:
        >>> class_names(SegmentationTable([], []), 3)
        ['class_0', 'class_1', 'class_2']
    """
    return list(table.classes) if table.classes is not None else [f"class_{k}" for k in range(num_classes)]


def read_classes(path: str | os.PathLike[str]) -> tuple[list[str], dict[tuple[int, int, int], int] | None]:
    """Read ``classes.txt``: one class per line, line number (from 0) = class id.

    Lines are ``name`` or, for colour masks, ``name r g b`` (0-255 each) on every line. Trailing
    blank lines and ``#`` comment lines are dropped; a blank line between classes is an error,
    since it would shift every id after it.

    Returns:
        ``(names, colours)``; ``colours`` is ``{(r, g, b): id}`` or ``None`` for plain names.

    Raises:
        DataError: Naming the file and line for blank, duplicated or mixed lines, bad colours,
            or more than 255 classes.

    Example:
        >>> names, colours = read_classes("data/classes.txt")  # doctest: +SKIP
        >>> names[:2], colours[(0, 0, 0)]
        (['background', 'road'], 0)
    """
    src = os.path.abspath(os.fspath(path))
    with open(src, encoding="utf-8-sig") as fh:
        lines = [(n, line.strip()) for n, line in enumerate(fh, start=1) if not line.lstrip().startswith("#")]
    while lines and not lines[-1][1]:
        lines.pop()
    fix = "one class per line, 'name' or 'name r g b', line order = class id (0, 1, ...)"
    if not lines:
        raise DataError.for_file(src, "no classes listed", fix)
    names: list[str] = []
    colours: dict[tuple[int, int, int], int] = {}
    for n, text in lines:
        parts = text.split()
        if not parts:
            raise DataError.for_file(src, f"line {n} is blank, which would shift every class id after it",
                                     "name that class (e.g. unused_3) or delete the line")
        rgb = parts[-3:] if len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts[-3:]) else None
        if rgb is not None and not all(0 <= int(v) <= 255 for v in rgb):
            raise DataError.for_file(src, f"line {n}: colour {' '.join(rgb)} is outside 0-255", fix)
        if names and (rgb is not None) != bool(colours):  # the first line decides the kind
            raise DataError.for_file(src, f"line {n} mixes plain names and 'name r g b' lines", fix)
        name = " ".join(parts[:-3]) if rgb is not None else text
        if name in names:
            raise DataError.for_file(src, f"line {n}: class {name!r} is listed twice", "list each class once")
        if rgb is not None:
            colour = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
            if colour in colours:
                raise DataError.for_file(src, f"line {n}: colour {colour} already belongs to class "
                                         f"{names[colours[colour]]!r}", "give every class its own colour")
            colours[colour] = len(names)
        names.append(name)
    if len(names) >= IGNORE_INDEX:
        raise DataError.for_file(src, f"{len(names)} classes; masks are 8-bit with {IGNORE_INDEX} = ignore, "
                                 f"so at most {IGNORE_INDEX} classes fit", "merge classes")
    return names, colours or None


def _classes_near(folder: str, classes_file: str | os.PathLike[str] | None
                  ) -> tuple[list[str] | None, dict[tuple[int, int, int], int] | None]:
    path = os.fspath(classes_file) if classes_file is not None else os.path.join(folder, CLASSES_FILE)
    if classes_file is None and not os.path.isfile(path):
        return None, None
    if not os.path.isfile(path):
        raise DataError.for_file(path, "classes file not found", "fix the path, or leave it unset to use class_0..")
    return read_classes(path)


def _index(folder: str, ignored: list[str]) -> dict[str, str]:
    """``{relative path without extension: file}`` of the images below ``folder``."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for f in sorted(filenames):
            if _is_hidden(f) or f == CLASSES_FILE:
                continue
            full = os.path.join(dirpath, f)
            if not is_image_file(f):
                ignored.append(full)
                continue
            stem = os.path.splitext(os.path.relpath(full, folder))[0].replace(os.sep, "/")
            found.setdefault(stem, []).append(full)
    clashes = [files for files in found.values() if len(files) > 1]
    if clashes:
        shown = "; ".join(" and ".join(files) for files in clashes[:20])
        raise DataError.for_file(folder, f"{len(clashes)} names exist with two extensions, so the pairing is "
                                 f"ambiguous: {shown}", "keep one file per name")
    return {stem: files[0] for stem, files in found.items()}


def from_mask_folder(root: str | os.PathLike[str], classes_file: str | os.PathLike[str] | None = None
                     ) -> SegmentationTable:
    """Read ``root/images/`` and ``root/masks/``, pairing files by relative path without extension.

    ``images/a/001.jpg`` pairs with ``masks/a/001.png`` (the mask may have any image extension;
    lossy ones are refused later, by the scan, with the reason).

    Args:
        root: Dataset folder.
        classes_file: Class list; default ``root/classes.txt`` if present, else classes are inferred.

    Returns:
        The pairs, sorted by relative path.

    Raises:
        DataError: If a folder is missing or empty, a name is ambiguous, or images lack masks /
            masks lack images (all listed together, so the naming pattern is visible).

    Example:
        >>> table = from_mask_folder("data/roads")  # data/roads/{images,masks}/  # doctest: +SKIP
        >>> len(table.paths) == len(table.masks)
        True
    """
    base = os.path.abspath(os.fspath(root))
    layout = f"{base}/images/<name>.<ext> and {base}/masks/<name>.png"
    for sub in ("images", "masks"):
        if not os.path.isdir(os.path.join(base, sub)):
            raise DataError.for_file(os.path.join(base, sub), "folder not found",
                                     f"arrange the data as {layout}, or list the pairs in a CSV (image,mask)")
    ignored: list[str] = []
    images = _index(os.path.join(base, "images"), ignored)
    masks = _index(os.path.join(base, "masks"), ignored)
    if not images:
        raise DataError.for_file(os.path.join(base, "images"), "no images found",
                                 f"add images ({', '.join(IMG_EXTENSIONS)})")
    lonely_images = sorted(images.keys() - masks.keys())
    lonely_masks = sorted(masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        parts = []
        for what, keys, files in (("images without a mask", lonely_images, images),
                                  ("masks without an image", lonely_masks, masks)):
            if keys:
                shown = "\n".join(f"  {files[k]}" for k in keys[:50])
                more = f"\n  ... and {len(keys) - 50} more" if len(keys) > 50 else ""
                parts.append(f"{len(keys)} {what}:\n{shown}{more}")
        fix = ("pair files by name (images/x.jpg with masks/x.png): add the missing masks or images, or move "
               "the unpaired files out of the dataset folder")
        raise DataError(f"{base}: " + "\n".join(parts) + f"\nFix: {fix}", path=base,
                        problem=f"{len(lonely_images)} images without masks, {len(lonely_masks)} masks without images",
                        fix=fix)
    classes, colours = _classes_near(base, classes_file)
    keys = sorted(images)
    return SegmentationTable(paths=[images[k] for k in keys], masks=[masks[k] for k in keys],
                             classes=classes, colours=colours, ignored=ignored)


def from_mask_manifest(csv_path: str | os.PathLike[str], classes_file: str | os.PathLike[str] | None = None
                       ) -> SegmentationTable:
    """Read a CSV manifest with a header row and columns ``image,mask[,split]``.

    Relative paths resolve against the CSV's folder; ``split``, when present, must be ``train``,
    ``val`` or ``test`` on every row; extra columns are ignored.

    Args:
        csv_path: The manifest file.
        classes_file: Class list; default ``classes.txt`` beside the CSV if present, else inferred.

    Raises:
        DataError: For a missing file or column, rows pointing at missing images or masks (listed
            with row numbers), repeated images, or a bad split value.

    Example:
        >>> table = from_mask_manifest("data/pairs.csv")  # doctest: +SKIP
        >>> table.splits[:2]
        ['train', 'val']
    """
    src, folder, rows, has_split = read_manifest(csv_path, ("image", "mask"), "pair")
    missing, not_image, bad_split, dupes, seen = [], [], [], [], {}
    paths, masks = [], []
    for n, r in rows:
        image, mask = (os.path.abspath(os.path.join(folder, os.path.expanduser(r[k]))) for k in ("image", "mask"))
        paths.append(image)
        masks.append(mask)
        for kind, p in (("image", image), ("mask", mask)):
            if not os.path.isfile(p):
                missing.append((n, f"{kind} {p}"))
            elif not is_image_file(p):
                not_image.append((n, f"{kind} {p}"))
        if image in seen:
            dupes.append((n, f"{image} (also row {seen[image]})"))
        seen.setdefault(image, n)
        if has_split and r["split"].lower() not in SPLIT_NAMES:
            bad_split.append((n, repr(r["split"])))
    for found, problem, fix in (
        (missing, "rows point at missing files", f"fix the paths (relative paths resolve against {folder}) "
         "or delete those rows"),
        (not_image, "rows point at non-image files", f"use one of {', '.join(IMG_EXTENSIONS)} or delete those rows"),
        (dupes, "rows repeat an image", "list each image once (a repeated image can land in two splits)"),
        (bad_split, "rows have a bad split value", f"use one of {', '.join(SPLIT_NAMES)}, or drop the split column"),
    ):
        if found:
            raise _rows_report(src, problem, found, fix)
    classes, colours = _classes_near(folder, classes_file)
    return SegmentationTable(paths=paths, masks=masks, classes=classes, colours=colours,
                             splits=[r["split"].lower() for _, r in rows] if has_split else None)
