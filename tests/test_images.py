"""Strict decoding: each trap of the usual loaders, on real files written under tmp_path."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vfmtune.data.images import IMG_EXTENSIONS, DataError, check_image, load_image, scan_images


def _jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_png16_rgb(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (5, 3)) -> None:
    """A real 48-bit RGB PNG, written by hand because Pillow cannot encode 16-bit RGB."""
    w, h = size
    row = b"\x00" + np.tile(np.array(rgb, dtype=">u2"), w).tobytes()  # filter byte 0 + pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h))
                     + chunk(b"IEND", b""))


# --- bad inputs: each is a DataError naming the file and a fix, never a PIL traceback ---------------

def _corrupt(p: Path) -> None:
    p.write_bytes(b"this is not a JPEG, just text with the wrong extension\n" * 20)


def _truncated(p: Path) -> None:
    data = _jpeg_bytes()
    p.write_bytes(data[: len(data) // 2])


def _zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def _truncated_png(p: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize(
    ("name", "write", "problem"),
    [
        ("corrupt.jpg", _corrupt, "not a readable image"),
        ("truncated.jpg", _truncated, "truncated"),
        ("empty.jpg", _zero_bytes, "empty"),
        ("truncated.png", _truncated_png, "truncated"),
    ],
    ids=["corrupt_bytes", "truncated_jpeg", "zero_bytes", "truncated_png"],
)
def test_load_image__bad_file_is_data_error(tmp_path: Path, name: str, write: Callable[[Path], None],
                                            problem: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "Fix:" in message
    assert problem in info.value.problem
    assert check_image(path) == info.value.problem
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on behind the user's back


def test_load_image__missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("side", [12, 20], ids=["warning_zone", "error_zone"])
def test_load_image__decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    # 144 px is between MAX and 2*MAX (Pillow only warns); 400 px is past 2*MAX (Pillow raises).
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    filters_before = list(warnings.filters)
    with pytest.raises(DataError, match="too large") as info:
        load_image(path)
    assert "MAX_IMAGE_PIXELS" in str(info.value)
    assert list(warnings.filters) == filters_before


# --- decoding: what the image should look like ------------------------------------------------------

def _rgba(p: Path) -> None:
    arr = np.zeros((2, 2, 4), dtype=np.uint8)  # black everywhere underneath
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent -> white, not black
    arr[0, 1] = (0, 0, 0, 128)  # half transparent -> mid grey
    arr[1, 0] = (255, 0, 0, 255)  # opaque red stays red
    Image.fromarray(arr, "RGBA").save(p)


def _palette_transparency(p: Path) -> None:
    im = Image.new("P", (2, 2), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), index 1 blue
    im.putpixel((1, 0), 1)
    im.save(p, transparency=0)


def _la(p: Path) -> None:
    Image.new("LA", (2, 2), (0, 0)).save(p)


def _grey16(p: Path) -> None:
    Image.fromarray(np.full((3, 3), 40000, dtype=np.uint16)).save(p)


def _rgb16(p: Path) -> None:
    _write_png16_rgb(p, (40000, 1000, 65535))


def _int32_tiff(p: Path) -> None:
    Image.fromarray(np.full((3, 3), 40000, dtype=np.int32)).save(p)


def _float_unit(p: Path) -> None:
    Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32)).save(p)


def _float_range(p: Path) -> None:
    Image.fromarray(np.array([[-5.0, 0.0, 5.0]], dtype=np.float32)).save(p)


def _grey(p: Path) -> None:
    Image.new("L", (3, 3), 77).save(p)


def _cmyk(p: Path) -> None:
    Image.new("CMYK", (3, 3), (0, 0, 0, 0)).save(p)


def _gif(p: Path) -> None:
    Image.new("RGB", (3, 3), (255, 0, 0)).save(p)


DECODE_CASES = [
    ("rgba.png", _rgba, [(0, 0), (1, 0), (0, 1)], [(255, 255, 255), (127, 127, 127), (255, 0, 0)]),
    ("palette.png", _palette_transparency, [(0, 0), (1, 0)], [(255, 255, 255), (0, 0, 255)]),
    ("la.png", _la, [(0, 0)], [(255, 255, 255)]),
    ("grey16.png", _grey16, [(1, 1)], [(156, 156, 156)]),  # 40000 >> 8; Pillow's convert gives 255
    ("rgb16.png", _rgb16, [(0, 0)], [(156, 3, 255)]),
    ("int32.tif", _int32_tiff, [(0, 0)], [(156, 156, 156)]),
    ("unit_float.tif", _float_unit, [(0, 0)], [(128, 128, 128)]),
    ("range_float.tif", _float_range, [(0, 0), (1, 0), (2, 0)], [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
    ("grey.png", _grey, [(2, 2)], [(77, 77, 77)]),
    ("cmyk.jpg", _cmyk, [(1, 1)], [(255, 255, 255)]),
    ("red.gif", _gif, [(0, 0)], [(255, 0, 0)]),
]


@pytest.mark.parametrize(("name", "write", "xy", "expected"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_load_image__converts_to_rgb(tmp_path: Path, name: str, write: Callable[[Path], None],
                                     xy: list[tuple[int, int]], expected: list[tuple[int, int, int]]) -> None:
    path = tmp_path / name
    write(path)
    img = load_image(path)
    assert img.mode == "RGB"
    got = [img.getpixel(p) for p in xy]
    assert np.abs(np.array(got, dtype=int) - np.array(expected)).max() <= 1, got


def test_load_image__exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_load_image__result_outlives_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    path.write_bytes(_jpeg_bytes())
    img = load_image(path)
    path.unlink()
    assert img.size == (64, 48) and np.asarray(img).shape == (48, 64, 3)


def test_img_extensions__lower_case_with_dot() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMG_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".tiff"} <= set(IMG_EXTENSIONS)


# --- scanning ----------------------------------------------------------------------------------------

@pytest.fixture
def mixed_files(tmp_path: Path) -> list[str]:
    good = [tmp_path / f"good{i}.JPG" for i in range(3)]  # upper-case extension still counts
    for p in good:
        p.write_bytes(_jpeg_bytes())
    bad = [tmp_path / "corrupt.jpg", tmp_path / "truncated.jpg", tmp_path / "empty.png"]
    _corrupt(bad[0])
    _truncated(bad[1])
    _zero_bytes(bad[2])
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    return [str(good[0]), str(bad[0]), str(good[1]), str(bad[1]), str(notes), str(bad[2]), str(good[2])]


def test_scan_images__error_mode_lists_every_bad_file(mixed_files: list[str]) -> None:
    filters_before = list(warnings.filters)
    with pytest.raises(DataError) as info:
        scan_images(mixed_files, on_bad="error", workers=2)
    message = str(info.value)
    for bad in (mixed_files[1], mixed_files[3], mixed_files[5]):
        assert bad in message
    assert "3 of 6 image files failed" in message
    assert "re-export the file or delete it" in message and "data.on_bad_image=skip" in message
    assert list(warnings.filters) == filters_before  # threads did not leak warning filters


def test_scan_images__skip_mode_returns_mask_and_counts(mixed_files: list[str]) -> None:
    ok, report = scan_images(mixed_files, on_bad="skip", workers=2)
    assert ok == [True, False, True, False, False, False, True]
    assert report.n_ok == 3
    assert [p for p, _ in report.bad] == [mixed_files[1], mixed_files[3], mixed_files[5]]
    assert report.ignored == [mixed_files[4]]
    summary = report.to_dict()
    assert (summary["n_ok"], summary["n_bad"], summary["n_ignored"]) == (3, 3, 1)
    assert "truncated" in report.format()


def test_scan_images__all_good_and_bad_option(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    ok, report = scan_images([str(path)])
    assert ok == [True] and report.bad == [] and report.n_ok == 1
    with pytest.raises(DataError, match="on_bad_image"):
        scan_images([str(path)], on_bad="ignore")  # type: ignore[arg-type]
