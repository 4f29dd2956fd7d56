"""Strict image decoding: every image becomes the RGB picture a person would see, or a clear error.

The usual loaders (``Image.open(p).convert("RGB")``) have quiet traps: 16-bit images clip to white,
transparent pixels turn black, EXIF rotation is ignored, truncated files decode half-grey when
``LOAD_TRUNCATED_IMAGES`` is set, and a broken file surfaces as a PIL traceback mid-epoch.
:func:`load_image` handles each case, and :func:`scan_images` finds every bad file before training.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_FIX_REEXPORT = "re-export the file or delete it"
_FIX_SKIP = "set data.on_bad_image=skip to skip and count them"
# Image.open's bomb check emits a warning through the process-wide filter list, and
# warnings.catch_warnings() is not thread-safe; this lock keeps scan_images' worker threads from
# corrupting each other's filters. Only the header parse is held under it; decoding runs in parallel.
_OPEN_LOCK = threading.Lock()


class DataError(ValueError):
    """A problem with the user's data, phrased as a report: which file, what is wrong, how to fix it.

    Attributes:
        path: The offending file or folder, if there is one.
        problem: Short description of what is wrong (no path, no fix).
        fix: What the user can do about it.
    """

    def __init__(self, message: str, *, path: str | None = None, problem: str | None = None,
                 fix: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem if problem is not None else message
        self.fix = fix

    @classmethod
    def for_file(cls, path: str | os.PathLike[str], problem: str, fix: str) -> DataError:
        """Build the standard ``"<path>: <problem>. Fix: <fix>"`` error."""
        p = os.fspath(path)
        return cls(f"{p}: {problem}. Fix: {fix}", path=p, problem=problem, fix=fix)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return os.fspath(path).lower().endswith(IMG_EXTENSIONS)


def _open(path: str) -> Image.Image:
    """Open the header, with the decompression-bomb warning raised as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a 'bomb' that merely
        # warns still costs the memory, so it is refused like the ones Pillow refuses.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _scale_to_uint8(im: Image.Image) -> Image.Image:
    """Map a high-bit-depth or float single-channel image to 8-bit ``L`` by scaling, not clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF):
        # 16-bit data (PNG/TIFF decoders give I;16 or I): the top byte is the 8-bit value, the
        # same mapping Pillow uses for 16-bit RGB. Pillow's own convert("L") clips at 255 instead.
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0  # already a [0, 1] intensity image: keep its contrast
    scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB the way a viewer would show it."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # (A 16-bit tRNS colour cannot be matched after scaling; such files are vanishingly rare.)
        return _scale_to_uint8(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        # Dropping alpha exposes whatever colour hides under transparent pixels (often black);
        # compositing onto white matches how the image looks in a browser or viewer.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully into an RGB image, or raise a :class:`DataError` that says why.

    Handles EXIF orientation, 16-bit and float images (scaled to 8 bit), alpha (composited onto
    white), palette/greyscale/CMYK, and refuses truncated files and decompression bombs.

    Args:
        path: Image file.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``"RGB"``, detached from the file.

    Raises:
        DataError: ``"<path>: <problem>. Fix: <fix>"`` for missing, empty, corrupt, truncated,
            oversized or unconvertible files.

    Example:
        >>> img = load_image("cats/0001.png")  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise DataError.for_file(p, "file not found", "check the path, or remove it from the manifest")
    if os.path.getsize(p) == 0:
        raise DataError.for_file(p, "file is empty (0 bytes)", f"{_FIX_REEXPORT} (often an interrupted copy)")
    try:
        with _open(p) as raw:
            # load() decodes every byte now, so a truncated file fails here and not mid-epoch.
            # We never set ImageFile.LOAD_TRUNCATED_IMAGES: it silently pads the missing rows grey.
            raw.load()
            try:
                im = ImageOps.exif_transpose(raw)
            except Exception:  # noqa: BLE001 -- broken EXIF: the pixels are fine, keep them as stored
                im = raw
            rgb = _to_rgb(im)
            # Closing `raw` frees its pixels, so never hand back that object itself.
            return rgb.copy() if rgb is raw else rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError.for_file(
            p, f"image is too large to decode safely ({e})",
            "downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it",
        ) from None
    except Image.UnidentifiedImageError:
        raise DataError.for_file(p, "not a readable image (unknown format or corrupt header)", _FIX_REEXPORT) from None
    except MemoryError:
        raise DataError.for_file(p, "out of memory while decoding", "downscale the file") from None
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a data problem, reported as one
        text = str(e) or type(e).__name__
        problem = text if "truncated" in text else f"image data is corrupt ({text})"
        raise DataError.for_file(p, problem, _FIX_REEXPORT) from None


def _check(path: str) -> DataError | None:
    try:
        load_image(path)
    except DataError as e:
        return e
    return None


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Decode ``path`` fully; return ``None`` if it is fine, else the short problem text.

    Example:
        >>> check_image("cats/0001.png") is None  # doctest: +SKIP
        True
    """
    err = _check(os.fspath(path))
    return None if err is None else err.problem


@dataclass
class ScanReport:
    """Outcome of :func:`scan_images`.

    Attributes:
        bad: ``(path, problem)`` for every file that failed to decode.
        ignored: Files skipped because their extension is not in :data:`IMG_EXTENSIONS`.
        n_ok: Number of files that decoded fully.
        fixes: Distinct fix hints for the problems found (in order of first appearance).
    """

    bad: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    n_ok: int = 0
    fixes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A readable report: counts, one row per bad file, and what to do about them."""
        lines = [f"{len(self.bad)} of {len(self.bad) + self.n_ok} image files failed to decode "
                 f"({self.n_ok} ok, {len(self.ignored)} non-image files ignored)."]
        if self.bad:
            width = min(max(len(p) for p, _ in self.bad), 100)
            lines.append(f"  {'file':<{width}}  problem")
            lines += [f"  {p:<{width}}  {problem}" for p, problem in self.bad]
            lines.append("Fix:")
            lines += [f"  - {fix}" for fix in self.fixes or [_FIX_REEXPORT]]
            lines.append(f"  - or {_FIX_SKIP}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready summary (for metrics / run logs)."""
        return {
            "n_ok": self.n_ok,
            "n_bad": len(self.bad),
            "n_ignored": len(self.ignored),
            "bad": [{"path": p, "problem": problem} for p, problem in self.bad],
            "ignored": list(self.ignored),
        }


def scan_images(
    paths: Sequence[str], on_bad: Literal["error", "skip"] = "error", workers: int = 2
) -> tuple[list[bool], ScanReport]:
    """Decode every file once and report the ones that fail, all at once.

    Decoding runs in a thread pool: Pillow's decoders release the GIL, so threads scale.

    Args:
        paths: Files to check. Paths without an image extension are not decoded; they are
            listed in ``report.ignored`` and masked out.
        on_bad: ``"error"`` raises if any file is bad; ``"skip"`` masks them out and counts them.
        workers: Decoding threads.

    Returns:
        ``(ok, report)``: ``ok[i]`` is True iff ``paths[i]`` is an image that decoded fully.

    Raises:
        DataError: With ``on_bad="error"`` and at least one bad file; the message is
            ``report.format()``, listing every bad file, its problem and the fix.

    Example:
        >>> ok, report = scan_images(table.paths, on_bad="skip")  # doctest: +SKIP
        >>> paths = [p for p, good in zip(table.paths, ok) if good]
    """
    if on_bad not in ("error", "skip"):
        raise DataError(f"data.on_bad_image={on_bad!r} is not valid. Fix: use 'error' or 'skip'")
    report = ScanReport()
    images = [i for i, p in enumerate(paths) if is_image_file(p)]
    report.ignored = [os.fspath(p) for p in paths if not is_image_file(p)]
    ok = [False] * len(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(images) or 1))) as pool:
        errors = list(pool.map(_check, [os.fspath(paths[i]) for i in images]))
    for i, err in zip(images, errors):
        if err is None:
            ok[i] = True
            report.n_ok += 1
            continue
        report.bad.append((os.fspath(paths[i]), err.problem))
        if err.fix and err.fix not in report.fixes:
            report.fixes.append(err.fix)
    if report.bad and on_bad == "error":
        raise DataError(report.format(), problem=f"{len(report.bad)} bad image files")
    return ok, report
