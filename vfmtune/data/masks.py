"""Strict mask decoding: every mask becomes an ``[H, W]`` uint8 map of class ids (255 = ignore), or a clear error.

Segmentation labels break silently in ways class labels cannot: a JPEG mask invents in-between
ids along every edge, a 16-bit export stores class 1 as 257, a binary mask saved as 0/255 turns
all foreground into "ignore", and an RGB mask read as grey mixes three channels into nonsense.
:func:`load_mask` refuses each of these with the file, the problem and the fix;
:func:`vfmtune.data.mask_scan.scan_masks` checks every pair once before training.

Decisions:
    - Palette PNGs (mode ``P``) follow the Pascal VOC convention: the palette *index* is the class
      id and any index whose colour is (224, 224, 192) is ignore (255). With a colour table the
      palette *colour* decides instead, so masks re-saved by an editor that reorders palettes work.
    - 16-bit (and 32-bit integer) masks are accepted when every value is 0-255: tools like ITK or
      OpenCV often write class ids into a wider container, and nothing is lost. Any value of 256 or
      more is refused (no guess between ``// 257``, ``>> 8`` or a real class 300); the message says
      which conversion fits the values found.
    - RGB masks whose three channels are equal everywhere are grey masks saved as RGB and read as
      class ids; other RGB masks need a colour table (``classes.txt`` lines ``name r g b``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from vfmtune.data.images import DataError, _open

IGNORE_INDEX = 255
VOC_IGNORE_COLOUR: tuple[int, int, int] = (224, 224, 192)
# Lossy formats: their compression blurs class edges into values that are not the labels drawn.
_LOSSY = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
_LOSSY_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".webp": "WebP"}
_FIX_PNG = ("export the mask again as a lossless PNG from the original labels (converting this file would keep "
            "its damaged edges)")
_FIX_SKIP = "set data.on_bad_image=skip to skip and count them"

ColourTable = Mapping[tuple[int, int, int], int]


def _values(found: np.ndarray, counts: np.ndarray, limit: int = 10) -> str:
    """``"3 (120 px), 7 (4 px)"``, most frequent first, at most ``limit`` shown."""
    order = np.argsort(-counts, kind="stable")
    shown = ", ".join(f"{found[i]} ({counts[i]} px)" for i in order[:limit])
    return shown + (f" and {len(found) - limit} more" if len(found) > limit else "")


def _code(rgb: Sequence[int]) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def _map_colours(path: str, colours: np.ndarray, table: ColourTable) -> np.ndarray:
    """``[N, 3]`` uint8 colours -> ``[N]`` class ids through ``table``; unknown colours are an error."""
    codes = (colours[:, 0].astype(np.int32) << 16) | (colours[:, 1].astype(np.int32) << 8) | colours[:, 2]
    unique, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    lut = {_code(VOC_IGNORE_COLOUR): IGNORE_INDEX} | {_code(rgb): int(k) for rgb, k in table.items()}
    ids = np.array([lut.get(int(c), -1) for c in unique], dtype=np.int32)
    unknown = ids < 0
    if unknown.any():
        names = np.array([f"({c >> 16 & 255}, {c >> 8 & 255}, {c & 255})" for c in unique[unknown].tolist()])
        hint = (" Many near-identical colours usually mean anti-aliased drawing or lossy saving: "
                "draw with anti-aliasing off and save as PNG." if unknown.sum() > 10 else "")
        raise DataError.for_file(
            path, f"{unknown.sum()} colour(s) are not in the colour table: {_values(names, counts[unknown])}",
            f"add a line 'name r g b' to classes.txt for each class colour, or repaint those pixels.{hint}")
    return ids[inverse.reshape(-1)].astype(np.uint8)


def _drop_alpha(path: str, arr: np.ndarray) -> np.ndarray:
    if arr[..., -1].min() < 255:
        raise DataError.for_file(path, "mask has transparent pixels, which carry no class",
                                 f"paint them with a class (or the ignore value {IGNORE_INDEX}) and save without alpha")
    return arr[..., :-1]


def _wide_ints(path: str, im: Image.Image) -> np.ndarray:
    """16/32-bit integer masks: fine when every value fits 0-255, else refused with the right conversion."""
    arr = np.asarray(im).astype(np.int64)
    big = (arr < 0) | (arr > 255)
    if not big.any():
        return arr.astype(np.uint8)
    found, counts = np.unique(arr[big], return_counts=True)
    values = np.unique(arr)
    if np.all(values % 257 == 0):  # 0..65535 scaling (class k stored as k * 257), e.g. 0/65535 binary
        how = "the tool scaled ids by 257: save np.asarray(Image.open(p)) // 257 as an 8-bit PNG"
    elif np.all(values % 256 == 0):
        how = "the tool scaled ids by 256: save np.asarray(Image.open(p)) >> 8 as an 8-bit PNG"
    else:
        how = ("remap the ids to 0-254 (255 = ignore) and save them as an 8-bit PNG: "
               "Image.fromarray(ids.astype(np.uint8)).save(p)")
    raise DataError.for_file(
        path, f"{im.mode} mask has values outside 0-255: {_values(found, counts)}; class ids must be 0-254 "
        f"and {IGNORE_INDEX} = ignore", how)


def _to_ids(path: str, im: Image.Image, colours: ColourTable | None) -> np.ndarray:
    """Any decoded mask mode -> ``[H, W]`` uint8 class ids (before range checks)."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)  # a binary mask: 0 background, 1 foreground
    if mode in ("L", "LA"):
        arr = np.asarray(im)
        return _drop_alpha(path, arr)[..., 0] if mode == "LA" else arr
    if mode in ("P", "PA"):
        arr = np.asarray(im)
        idx = _drop_alpha(path, arr)[..., 0] if mode == "PA" else arr
        palette = np.array(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)])
        used = np.unique(idx)
        if colours is not None:
            lut = np.zeros(256, np.uint8)
            lut[used] = _map_colours(path, palette[used], colours)
            return lut[idx]
        # VOC: the index is the class; entries painted in the VOC border colour are ignore.
        lut = np.arange(256, dtype=np.uint8)
        lut[np.all(palette == VOC_IGNORE_COLOUR, axis=1)] = IGNORE_INDEX
        return lut[idx]
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(im)
        rgb = _drop_alpha(path, rgb) if mode == "RGBA" else rgb
        if colours is not None:
            return _map_colours(path, rgb.reshape(-1, 3), colours).reshape(rgb.shape[:2])
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])  # a grey mask stored as RGB (cv2.imwrite of 3 channels)
        raise DataError.for_file(
            path, "RGB colour mask but no colour table says which colour is which class",
            "add classes.txt with one line 'name r g b' per class (line number = class id), or save the mask "
            "as a single-channel PNG of class ids")
    if mode.startswith("I;16") or mode == "I":
        return _wide_ints(path, im)
    if mode == "F":
        raise DataError.for_file(path, "float mask (soft labels or probabilities?); class ids must be integers",
                                 "threshold or argmax it and save the ids as an 8-bit PNG")
    raise DataError.for_file(path, f"unsupported mask mode {mode!r}",
                             "save the mask as a single-channel 8-bit PNG of class ids")


def _decode(path: str, colours: ColourTable | None) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError.for_file(path, "mask file not found", "add the mask, or remove its image from the data")
    if os.path.getsize(path) == 0:
        raise DataError.for_file(path, "mask file is empty (0 bytes)", "export the mask again")
    lossy = _LOSSY_EXT.get(os.path.splitext(path)[1].lower())
    try:
        with _open(path) as raw:
            lossy = _LOSSY.get(raw.format) if raw.format else lossy  # the content decides, not the name
            if lossy:
                raise DataError.for_file(
                    path, f"{lossy} mask: lossy compression blurs every class edge into in-between values "
                    "(an edge between classes 1 and 3 decodes as 1, 2, 3, and 0|255 edges as 37, 212, ...), "
                    "so pixels would silently get labels nobody drew", _FIX_PNG)
            raw.load()  # decode every byte now: a truncated mask fails here, not mid-epoch
            try:
                im = ImageOps.exif_transpose(raw)  # the same orientation load_image gives the image
            except Exception:  # noqa: BLE001 -- broken EXIF: keep the pixels as stored
                im = raw
            return _to_ids(path, im, colours)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError.for_file(path, f"mask is too large to decode safely ({e})",
                                 "downscale it with nearest-neighbour, or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except Image.UnidentifiedImageError:
        raise DataError.for_file(path, "not a readable image (unknown format or corrupt header)",
                                 "export the mask again as PNG") from None
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a data problem, reported as one
        raise DataError.for_file(path, f"mask data is corrupt ({e or type(e).__name__})",
                                 "export the mask again as PNG") from None


def load_mask(
    path: str | os.PathLike[str], *, num_classes: int | None = None, colours: ColourTable | None = None,
    image_size: tuple[int, int] | None = None, image_path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Decode a mask file into class ids, or raise a :class:`DataError` that says why not.

    Args:
        path: Mask file: PNG/TIFF/BMP of class ids (mode ``1``, ``L``, ``P``, 16-bit with values
            <= 255), a VOC palette PNG, or an RGB colour mask together with ``colours``.
        num_classes: Valid ids are ``0..num_classes-1`` plus 255; ``None`` accepts 0-255.
        colours: ``{(r, g, b): class id}`` for colour masks (and palette PNGs whose palette order
            is not the class order). (224, 224, 192) maps to 255 unless the table claims it.
        image_size: ``(width, height)`` of the image after EXIF rotation, as ``PIL.Image.size``.
        image_path: The image, named in size-mismatch errors.

    Returns:
        ``[H, W]`` uint8 array of class ids, 255 = ignore.

    Raises:
        DataError: ``"<path>: <problem>. Fix: <fix>"`` for a missing, lossy, corrupt, wide,
            colour-without-table, wrong-size or unlabelled (all 255) mask, or ids out of range.

    Example:
        >>> ids = load_mask("masks/0001.png", num_classes=3, image_size=(640, 480))  # doctest: +SKIP
        >>> ids.shape, ids.dtype
        ((480, 640), dtype('uint8'))
    """
    p = os.fspath(path)
    ids = _decode(p, colours)
    if not ids.flags.writeable:  # a view of Pillow's buffer: callers (torch.from_numpy) need their own
        ids = ids.copy()
    h, w = ids.shape
    if image_size is not None and tuple(image_size) != (w, h):
        iw, ih = image_size
        of = f" {os.fspath(image_path)}" if image_path is not None else ""
        swapped = " (width and height swapped: the image probably has an EXIF rotation the mask lacks)" \
            if (ih, iw) == (w, h) else ""
        raise DataError.for_file(p, f"mask is {w}x{h} but its image{of} is {iw}x{ih}{swapped}",
                                 "export the mask at the image's size (nearest-neighbour resize only, never "
                                 "smooth interpolation), or check that the mask belongs to this image")
    if num_classes is not None:
        bad = (ids >= num_classes) & (ids != IGNORE_INDEX)
        if bad.any():
            found, counts = np.unique(ids[bad], return_counts=True)
            raise DataError.for_file(
                p, f"values that are not class ids: {_values(found, counts)}; valid are 0-{num_classes - 1} "
                f"and {IGNORE_INDEX} (ignore)", "add the missing classes to classes.txt, or fix those pixels")
    if not (ids != IGNORE_INDEX).any():
        raise DataError.for_file(p, f"mask has no labelled pixel (every pixel is {IGNORE_INDEX} = ignore)",
                                 f"label the image, or remove it and its mask ({_FIX_SKIP})")
    return ids


def oriented_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`vfmtune.data.images.load_image` shows it, from the header.

    Example:
        >>> oriented_size("photos/0001.jpg")  # doctest: +SKIP
        (640, 480)
    """
    with _open(os.fspath(path)) as im:
        w, h = im.size
        # EXIF orientations 5-8 rotate by 90 degrees; load_image applies them, so the mask must match.
        return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
