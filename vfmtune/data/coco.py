"""COCO instance JSON as a segmentation source: rasterised once into class-id PNGs, instances kept.

Rules (the same for every run, so cached masks never go stale):
    - Category ids map to contiguous class ids ``1..K`` in ascending id order; 0 is background.
    - Overlaps: larger instances are painted first, so the *smaller* one wins where two overlap
      (a cup on a table stays a cup: the small object is usually in front and would otherwise
      vanish); equal areas keep annotation order, so the later one wins. Area is the rasterised
      pixel count, not the JSON's ``area`` field, which tools fill inconsistently.
    - ``iscrowd`` regions are 255 (ignore), painted before the instances, so an instance drawn
      inside a crowd keeps its class and only the unlabelled rest of the crowd is ignored.

Masks are written to ``<cache>/coco_masks/<sha256 of the JSON bytes>/<image id>.png``; the next
run on the same JSON reuses them. :func:`coco_instances` keeps the per-instance masks available
for instance-level tasks (SAM prompting, auto-labelling).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vfmtune.data.images import DataError
from vfmtune.data.mask_sources import SegmentationTable
from vfmtune.data.masks import IGNORE_INDEX

RASTER_VERSION = 1  # part of the cache key: bump when the painting rules above change


@dataclass
class Instance:
    """One annotated object of a COCO image.

    Attributes:
        annotation_id: The annotation's ``id``.
        category_id: COCO category id.
        class_index: Contiguous class id (1..K) used in the semantic masks.
        mask: ``[H, W]`` bool.
        iscrowd: Whether the region is a crowd (ignored in semantic masks).
    """

    annotation_id: int
    category_id: int
    class_index: int
    mask: np.ndarray
    iscrowd: bool


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise DataError("COCO annotations need the pycocotools package. Fix: pip install pycocotools",
                        problem="pycocotools not installed", fix="pip install pycocotools") from None
    return mask_utils


def _polygon_area(xy: list[float]) -> float:
    x, y = np.asarray(xy[0::2], float), np.asarray(xy[1::2], float)
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@functools.lru_cache(maxsize=2)  # a big COCO JSON parses to gigabytes: keep few
def _parse(src: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """Validate a COCO JSON once per file version; returns images, class map and clean annotations."""
    try:
        with open(src, "rb") as fh:
            raw = fh.read()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise DataError.for_file(src, f"cannot read COCO JSON ({e})", "export the annotations again") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError.for_file(src, f"not a COCO instances file: no {', '.join(missing)} list",
                                 "export COCO 'instances' JSON (images, annotations, categories)")
    cats = sorted(int(c["id"]) for c in data["categories"])
    if len(cats) >= IGNORE_INDEX:
        raise DataError.for_file(src, f"{len(cats)} categories; 8-bit masks hold at most {IGNORE_INDEX - 1} "
                                 "plus background", "merge categories")
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    problems: list[str] = []
    images: dict[int, dict] = {}
    for im in data["images"]:
        if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")):
            problems.append(f"image id {im.get('id')} (file {im.get('file_name')!r}): no positive height and width")
        else:
            images[int(im["id"])] = im
    anns: dict[int, list[dict]] = {i: [] for i in images}
    for a in data["annotations"]:
        where = f"annotation {a.get('id')} (image id {a.get('image_id')}"
        image = images.get(int(a.get("image_id", -1)))
        if image is None:
            problems.append(f"{where}): no image with that id")
            continue
        where += f", file {image.get('file_name')!r})"
        if int(a.get("category_id", -1)) not in names:
            problems.append(f"{where}: category_id {a.get('category_id')} is not in categories")
            continue
        seg = a.get("segmentation")
        if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
            # A degenerate part is reported, and dropped when rasterising under on_bad=skip.
            for k, poly in enumerate(seg):
                if len(poly) < 6 or len(poly) % 2:
                    problems.append(f"{where}: polygon {k} has {len(poly) / 2:g} points, needs at least 3")
                elif _polygon_area(poly) == 0:
                    problems.append(f"{where}: polygon {k} has zero area (its points are on one line)")
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != [image["height"], image["width"]]:
                problems.append(f"{where}: RLE size {list(seg['size'])} is not the image's "
                                f"[height, width] [{image['height']}, {image['width']}]")
                continue
        else:
            problems.append(f"{where}: no polygon or RLE segmentation (boxes only?)")
            continue
        anns[int(a["image_id"])].append(a)
    return {"hash": hashlib.sha256(raw).hexdigest(), "images": images, "anns": anns, "problems": problems,
            "class_of": {cid: k for k, cid in enumerate(cats, start=1)}, "names": [names[c] for c in cats]}


def _load(json_path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    src = os.path.abspath(os.fspath(json_path))
    if not os.path.isfile(src):
        raise DataError.for_file(src, "COCO JSON not found", "set data.coco to an existing annotations file")
    st = os.stat(src)
    return src, _parse(src, st.st_mtime_ns, st.st_size)


def _decode(seg: Any, h: int, w: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> ``[H, W]`` bool. Degenerate polygons are dropped."""
    mu = _mask_utils()
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0 and _polygon_area(p) > 0]
        if not polys:
            return np.zeros((h, w), bool)
        rle = mu.merge(mu.frPyObjects(polys, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mu.frPyObjects(seg, h, w)  # uncompressed RLE
    else:
        rle = seg
    return mu.decode(rle).astype(bool)


def _instances(data: dict[str, Any], image_id: int) -> list[Instance]:
    image = data["images"][image_id]
    h, w = int(image["height"]), int(image["width"])
    return [Instance(int(a.get("id", -1)), int(a["category_id"]), data["class_of"][int(a["category_id"])],
                     _decode(a["segmentation"], h, w), bool(a.get("iscrowd", 0)))
            for a in data["anns"][image_id]]


def coco_instances(json_path: str | os.PathLike[str], image_id: int) -> list[Instance]:
    """The annotated instances of one image, with their masks, in annotation order.

    Args:
        json_path: COCO instances JSON.
        image_id: The image's COCO ``id`` (``SegmentationTable.image_ids[i]`` of :func:`from_coco`).

    Returns:
        One :class:`Instance` per annotation with a segmentation (``mask`` is ``[H, W]`` bool).

    Example:
        >>> [i.class_index for i in coco_instances("ann.json", 1)]  # doctest: +SKIP
        [1, 2]
    """
    _, data = _load(json_path)
    if int(image_id) not in data["images"]:
        raise KeyError(f"no image with id {image_id} in {json_path}")
    return _instances(data, int(image_id))


def semantic_mask(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """Paint instances into an ``[H, W]`` uint8 class-id map by the module's rules (smaller wins, crowd = 255).

    Example:
        >>> semantic_mask(coco_instances("ann.json", 1), 480, 640).shape  # doctest: +SKIP
        (480, 640)
    """
    out = np.zeros((height, width), np.uint8)
    for inst in instances:
        if inst.iscrowd:
            out[inst.mask] = IGNORE_INDEX
    solid = [i for i in instances if not i.iscrowd]
    for inst in sorted(solid, key=lambda i: -int(i.mask.sum())):  # stable: equal areas keep their order
        out[inst.mask] = inst.class_index
    return out


def _rasterise(data: dict[str, Any], folder: Path) -> None:
    """Write every image's mask once, into a temporary folder renamed into place when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".coco-", dir=folder.parent))
    try:
        for image_id, image in data["images"].items():
            ids = semantic_mask(_instances(data, image_id), int(image["height"]), int(image["width"]))
            Image.fromarray(ids).save(tmp / f"{image_id}.png")
        try:
            os.replace(tmp, folder)  # atomic: a crashed run never leaves a half-written cache behind
        except OSError:
            if not folder.is_dir():  # else another process (e.g. a DDP rank) finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def from_coco(
    json_path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None, on_bad: Literal["error", "skip"] = "error",
) -> SegmentationTable:
    """Read a COCO instances JSON as (image, class-id mask) pairs, rasterising the masks once.

    Args:
        json_path: COCO instances JSON (polygons and/or RLE).
        images_dir: Folder that ``file_name`` resolves against; default the JSON's folder.
        cache_dir: vfmtune's cache folder; default :func:`vfmtune.weights.cache_dir`.
        on_bad: ``"error"`` refuses degenerate polygons and missing images; ``"skip"`` drops them
            and lists them in ``table.ignored``.

    Returns:
        A table with ``classes = ["background", *category names]`` and ``image_ids``.

    Raises:
        DataError: Listing every annotation with a degenerate or missing segmentation and every
            image whose file is missing, with image id and file name.

    Example:
        >>> table = from_coco("data/annotations.json", images_dir="data/images")  # doctest: +SKIP
        >>> table.classes
        ['background', 'crack', 'dent']
    """
    if on_bad not in ("error", "skip"):
        raise DataError(f"data.on_bad_image={on_bad!r} is not valid. Fix: use 'error' or 'skip'")
    src, data = _load(json_path)
    root = os.path.abspath(os.fspath(images_dir)) if images_dir is not None else os.path.dirname(src)
    paths = {i: os.path.join(root, str(im.get("file_name", ""))) for i, im in data["images"].items()}
    lost = [f"image id {i} (file {data['images'][i].get('file_name')!r}): {p} not found"
            for i, p in paths.items() if not os.path.isfile(p)]
    problems = [*data["problems"], *lost]
    if problems and on_bad == "error":
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        fix = (f"redraw or delete those annotations; set images_dir to the folder holding the images (file_name "
               f"resolves against {root}); or set data.on_bad_image=skip to drop them and count them")
        raise DataError(f"{src}: {len(problems)} problems:\n{shown}{more}\nFix: {fix}", path=src,
                        problem=f"{len(problems)} bad annotations or missing images", fix=fix)
    if cache_dir is None:
        from vfmtune.weights import cache_dir as default_cache_dir  # not at import: keeps data light

        cache_dir = default_cache_dir()
    folder = Path(cache_dir).expanduser() / "coco_masks" / f"{data['hash'][:24]}-v{RASTER_VERSION}"
    if not all((folder / f"{i}.png").is_file() for i in data["images"]):
        shutil.rmtree(folder, ignore_errors=True)  # incomplete (files deleted by hand): write it again
        _rasterise(data, folder)
    keep = sorted(i for i, p in paths.items() if os.path.isfile(p))
    return SegmentationTable(paths=[paths[i] for i in keep], masks=[str(folder / f"{i}.png") for i in keep],
                             classes=["background", *data["names"]], image_ids=keep, ignored=problems)
