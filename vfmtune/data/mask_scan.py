"""Check every (image, mask) pair once before training, and count the class pixels while at it.

One pass finds every bad pair (so the user fixes them all at once, not one per crash) and yields
what later steps need without decoding again: which classes each image contains (for stratified
splits) and how many pixels each class has (for class weights from the training pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from vfmtune.data.images import DataError
from vfmtune.data.masks import _FIX_SKIP, IGNORE_INDEX, ColourTable, load_mask, oriented_size


@dataclass
class MaskScanReport:
    """Outcome of :func:`scan_masks`.

    Attributes:
        bad: ``(path, problem)`` for every pair that failed (the mask's path, or the image's when
            the image itself cannot be opened).
        n_ok: Number of pairs that passed.
        fixes: Distinct fix hints for the problems found, in order of first appearance.
        num_classes: ``K``: the one given, else the largest id found in a good mask + 1.
        pixel_counts: ``[N, K]`` int64 pixels per class per pair (ignore not counted); rows of bad
            pairs are zero.
    """

    bad: list[tuple[str, str]] = field(default_factory=list)
    n_ok: int = 0
    fixes: list[str] = field(default_factory=list)
    num_classes: int = 0
    pixel_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    @property
    def presence(self) -> np.ndarray:
        """``[N, K]`` bool: whether class ``k`` appears in pair ``n`` (the input of stratified splits)."""
        return self.pixel_counts > 0

    def class_pixels(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[K]`` int64 pixels per class summed over ``rows`` (e.g. the training pairs), or all pairs.

        Example:
            >>> train = [i for i, s in enumerate(splits) if s == "train"]  # doctest: +SKIP
            >>> weights = 1 / np.maximum(report.class_pixels(train), 1)  # doctest: +SKIP
        """
        counts = self.pixel_counts if rows is None else self.pixel_counts[np.asarray(rows, dtype=np.int64)]
        return counts.sum(axis=0)

    def format(self) -> str:
        """A readable report: counts, one row per bad pair, and what to do about them."""
        lines = [f"{len(self.bad)} of {len(self.bad) + self.n_ok} image/mask pairs failed ({self.n_ok} ok)."]
        if self.bad:
            width = min(max(len(p) for p, _ in self.bad), 100)
            lines.append(f"  {'file':<{width}}  problem")
            lines += [f"  {p:<{width}}  {problem}" for p, problem in self.bad]
            lines.append("Fix:")
            lines += [f"  - {fix}" for fix in self.fixes]
            lines.append(f"  - or {_FIX_SKIP}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready summary (for metrics / run logs)."""
        return {"n_ok": self.n_ok, "n_bad": len(self.bad), "num_classes": self.num_classes,
                "class_pixels": self.class_pixels().tolist(),
                "bad": [{"path": p, "problem": problem} for p, problem in self.bad]}


def _check_pair(image: str, mask: str, num_classes: int | None,
                colours: ColourTable | None) -> np.ndarray | DataError:
    """``[256]`` pixel counts per id of a good pair, or the first problem found."""
    if not os.path.isfile(mask):
        return DataError.for_file(mask, f"mask file not found (for image {image})",
                                  "add the mask, or remove the image from the data")
    try:
        size = oriented_size(image)
    except Exception as e:  # noqa: BLE001 -- the image scan reports the details; here: which pair
        return DataError.for_file(image, f"image cannot be opened ({e or type(e).__name__})",
                                  "re-export the image or delete it with its mask")
    try:
        ids = load_mask(mask, num_classes=num_classes, colours=colours, image_size=size, image_path=image)
    except DataError as e:
        return e
    return np.bincount(ids.reshape(-1), minlength=256).astype(np.int64)


def scan_masks(
    images: Sequence[str], masks: Sequence[str], *, num_classes: int | None = None,
    colours: ColourTable | None = None, on_bad: Literal["error", "skip"] = "error", workers: int = 2,
) -> tuple[list[bool], MaskScanReport]:
    """Decode every mask once, check it against its image, and count pixels per class.

    Images are only opened for their size (header, EXIF rotation applied); decode them with
    :func:`vfmtune.data.images.scan_images`. Decoding runs in a thread pool, as there.

    Args:
        images: Image paths, paired with ``masks`` by position.
        masks: Mask paths.
        num_classes: Number of classes ``K`` when known (classes.txt); ``None`` infers it.
        colours: ``{(r, g, b): class id}`` for colour masks, as :func:`vfmtune.data.masks.load_mask`.
        on_bad: ``"error"`` raises if any pair is bad; ``"skip"`` masks them out and counts them.
        workers: Decoding threads.

    Returns:
        ``(ok, report)``: ``ok[i]`` is True iff pair ``i`` passed; ``report.pixel_counts`` is
        ``[N, K]`` and ``report.presence`` the ``[N, K]`` class-presence matrix.

    Raises:
        DataError: With ``on_bad="error"`` and at least one bad pair (the message is
            ``report.format()``), and always when every mask holds only 0 and 255: that is a binary
            mask saved as 0/255, whose foreground would silently become "ignore".

    Example:
        >>> ok, report = scan_masks(table.paths, table.masks, num_classes=3)  # doctest: +SKIP
        >>> report.presence.shape
        (120, 3)
    """
    if on_bad not in ("error", "skip"):
        raise DataError(f"data.on_bad_image={on_bad!r} is not valid. Fix: use 'error' or 'skip'")
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks; pairs are matched by position")
    pairs = [(os.fspath(i), os.fspath(m)) for i, m in zip(images, masks)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs) or 1))) as pool:
        results = list(pool.map(lambda p: _check_pair(*p, num_classes, colours), pairs))
    report = MaskScanReport()
    counts = np.zeros((len(pairs), 256), np.int64)
    ok = [False] * len(pairs)
    for i, res in enumerate(results):
        if isinstance(res, DataError):
            report.bad.append((res.path or pairs[i][1], res.problem))
            if res.fix and res.fix not in report.fixes:
                report.fixes.append(res.fix)
        else:
            counts[i], ok[i] = res, True
            report.n_ok += 1
    if report.bad and on_bad == "error":
        raise DataError(report.format(), problem=f"{len(report.bad)} bad image/mask pairs")
    labelled = np.flatnonzero(counts[:, :IGNORE_INDEX].sum(axis=0))
    if report.n_ok and labelled.tolist() == [0] and counts[:, IGNORE_INDEX].any():
        raise DataError(
            f"all {report.n_ok} masks hold only 0 and {IGNORE_INDEX}: this looks like binary masks saved as 0/255, "
            f"but {IGNORE_INDEX} means 'ignore', so no foreground pixel would be learnt. Fix: save foreground as "
            f"class 1 (np.where(m == 255, 1, 0).astype(np.uint8)); if {IGNORE_INDEX} really is ignore, the masks "
            "label nothing but background",
            problem="binary masks saved as 0/255", fix="save foreground as class 1")
    report.num_classes = num_classes if num_classes is not None else int(labelled.max()) + 1 if labelled.size else 0
    report.pixel_counts = counts[:, :report.num_classes]
    return ok, report
