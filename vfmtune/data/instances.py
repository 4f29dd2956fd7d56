"""Instance masks for instance-level tasks (SAM prompting, scoring auto-labels): three sources, one shape.

Sources, chosen by what the data holds (the first that applies):

1. COCO instances JSON: ``data.coco``, or ``data.root/annotations.json`` (polygons or RLE, decoded by
   :mod:`vfmtune.data.coco`; ``iscrowd`` regions are never instances).
2. Instance-id PNGs: ``data.root/instances/<stem>.png`` (8 or 16 bit; 0 = no instance, every other id
   one instance). An instance's class is the most frequent class of ``masks/<stem>.png`` under it;
   without ``masks/`` every instance is class 1 and the class maps are derived once into the cache.
3. Class maps only (``data.root/masks/`` or ``data.manifest``): each class's connected components
   (8-connected) are its instances, so touching objects of one class merge; give ids when that matters.

Every source also yields class maps (a :class:`SegmentationTable`), so images are scanned and split by
the semantic-segmentation path (``prepare_masks``: the same checks, the same stratified split for the
same data and seed). Each image's instances are named by a reference string kept beside its path
(``SampleTable.instances``) and decoded on use by :func:`load_instances`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vfmtune.choices import ConfigError
from vfmtune.config import DataConfig
from vfmtune.data.coco import Instance, coco_instances, from_coco
from vfmtune.data.images import DataError
from vfmtune.data.mask_sources import SegmentationTable, _index, from_mask_folder, from_mask_manifest
from vfmtune.data.masks import IGNORE_INDEX, load_mask

COCO_FILE = "annotations.json"
_COCO, _IDS, _COMPONENTS = "coco:", "ids:", "cc:"


def instance_source(data: DataConfig, cache_dir: str | os.PathLike[str]) -> tuple[SegmentationTable, list[str]]:
    """Image / class-map pairs of ``data`` and, per pair, the reference of its instances.

    Args:
        data: ``coco``, ``root`` or ``manifest`` (see the module docstring for the layouts).
        cache_dir: Where COCO rasterisations and derived class maps are cached.

    Returns:
        ``(table, refs)``: ``refs[i]`` names the instances of ``table.paths[i]`` for :func:`load_instances`.

    Raises:
        ConfigError: No instance data configured or found.
        DataError: Images without instance files (all listed), and the class-map sources' own errors.

    Example:
        >>> table, refs = instance_source(DataConfig(root="data/nuclei"), "~/.cache/vfmtune")  # doctest: +SKIP
        >>> len(load_instances(refs[0])[0])
        12
    """
    root = Path(os.path.abspath(os.path.expanduser(data.root))) if data.root else None
    coco = data.coco or (str(root / COCO_FILE) if root is not None and (root / COCO_FILE).is_file() else None)
    if coco:
        table = from_coco(coco, images_dir=data.root if data.coco else root, cache_dir=cache_dir, on_bad=str(data.on_bad_image))
        src = os.path.abspath(coco)
        return table, [f"{_COCO}{src}#{i}" for i in table.image_ids or []]
    if data.manifest:
        table = from_mask_manifest(data.manifest)
        return table, [_COMPONENTS + m for m in table.masks]
    if root is None:
        raise ConfigError("Instance data needed: data.root=DIR (DIR/images/ with DIR/annotations.json, DIR/instances/ or "
                          "DIR/masks/), data.coco=annotations.json, or data.manifest=CSV (image,mask).")
    if (root / "instances").is_dir():
        return _id_pngs(root, cache_dir)
    if (root / "masks").is_dir():
        table = from_mask_folder(root)
        return table, [_COMPONENTS + m for m in table.masks]
    raise DataError.for_file(root, "no annotations.json, instances/ or masks/ folder",
                             "add instance-id PNGs (instances/<stem>.png), class maps (masks/<stem>.png) or a COCO JSON")


def _id_pngs(root: Path, cache_dir: str | os.PathLike[str]) -> tuple[SegmentationTable, list[str]]:
    """``instances/`` paired with ``images/`` by stem; class maps from ``masks/``, else derived (id > 0 -> 1)."""
    ignored: list[str] = []
    images = _index(str(root / "images"), ignored)
    ids = _index(str(root / "instances"), ignored)
    lonely = sorted(images.keys() - ids.keys())
    if lonely:
        shown = "\n".join(f"  {images[k]}" for k in lonely[:50])
        raise DataError(f"{root}: {len(lonely)} images without an instance file in {root / 'instances'}:\n{shown}\n"
                        "Fix: add instances/<stem>.png for each (0 = no instance), or move those images out",
                        path=str(root), problem=f"{len(lonely)} images without instances")
    if (root / "masks").is_dir():
        table = from_mask_folder(root)
        by_path = {p: k for k, p in images.items()}
        return table, [f"{_IDS}{ids[by_path[p]]}|{m}" for p, m in zip(table.paths, table.masks)]
    keys = sorted(images)
    folder = _derived_class_maps([ids[k] for k in keys], keys, Path(cache_dir).expanduser())
    table = SegmentationTable(paths=[images[k] for k in keys], masks=[str(folder / f"{k}.png") for k in keys],
                              classes=["background", "object"], ignored=ignored)
    return table, [_IDS + ids[k] for k in keys]


def _derived_class_maps(files: list[str], keys: list[str], cache_dir: Path) -> Path:
    """Class maps (any instance -> 1) of instance-id PNGs, written once per set of files into the cache."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    folder = cache_dir / "instance_class_maps" / h.hexdigest()[:24]
    if all((folder / f"{k}.png").is_file() for k in keys):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".maps-", dir=folder.parent))
    try:
        for f, k in zip(files, keys):
            (tmp / k).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((read_ids(f) > 0).astype(np.uint8)).save(tmp / f"{k}.png")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # atomic: a crash never leaves a half-written set behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """An instance-id PNG as ``[H, W]`` int64 (0 = none), refusing colour or lossy files."""
    p = os.fspath(path)
    try:
        with Image.open(p) as im:
            if im.format in ("JPEG", "WEBP"):
                raise DataError.for_file(p, f"{im.format} instance map: lossy compression invents ids along every edge",
                                         "save instance ids as a lossless 8- or 16-bit PNG")
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError.for_file(p, f"instance map of mode {im.mode}; ids must be one integer channel",
                                         "save instance ids as a single-channel 8- or 16-bit PNG")
            return np.asarray(im).astype(np.int64)
    except OSError as e:
        raise DataError.for_file(p, f"instance map cannot be read ({e})", "export it again as PNG") from None


def components(class_map: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(class id, [H, W] bool)`` per 8-connected component of every class except 0 and 255.

    Example:
        >>> m = np.zeros((5, 5), np.uint8); m[0, 0] = m[4, 4] = 1
        >>> [(k, int(c.sum())) for k, c in components(m)]
        [(1, 1), (1, 1)]
    """
    from scipy import ndimage

    out: list[tuple[int, np.ndarray]] = []
    for k in np.unique(class_map):
        if k in (0, IGNORE_INDEX):
            continue
        labels, n = ndimage.label(class_map == k, structure=np.ones((3, 3), bool))
        out += [(int(k), labels == i) for i in range(1, n + 1)]
    return out


def load_instances(ref: str, image_size: tuple[int, int] | None = None, num_classes: int | None = None,
                   min_area: int = 1) -> tuple[list[Instance], int]:
    """Decode the instances of one image.

    Args:
        ref: A reference from :func:`instance_source` (or ``add_synthetic``).
        image_size: ``(width, height)`` the masks must have (the image's, as ``PIL.Image.size``).
        num_classes: Valid class ids are ``1..num_classes-1``.
        min_area: Instances with fewer pixels are dropped (an empty instance mask is never kept).

    Returns:
        ``(instances, dropped)``: crowd regions excluded; ``dropped`` counts masks below ``min_area``.

    Raises:
        DataError: A mask whose size differs from the image's, or an unreadable file, naming both.
    """
    if ref.startswith(_COCO):
        src, image_id = ref[len(_COCO):].rsplit("#", 1)
        found = [i for i in coco_instances(src, int(image_id)) if not i.iscrowd]
        where = f"{src} (image id {image_id})"
    elif ref.startswith(_IDS):
        ids_file, _, class_file = ref[len(_IDS):].partition("|")
        ids = read_ids(ids_file)
        classes = load_mask(class_file, num_classes=num_classes) if class_file else None
        if classes is not None and classes.shape != ids.shape:
            raise DataError.for_file(ids_file, f"instance map is {ids.shape[1]}x{ids.shape[0]} but its class map {class_file} "
                                     f"is {classes.shape[1]}x{classes.shape[0]}", "export both at the image's size")
        found = []
        for i in np.unique(ids[ids > 0]).tolist():
            mask = ids == i
            votes = np.bincount(classes[mask], minlength=256)[1:IGNORE_INDEX] if classes is not None else None
            k = int(votes.argmax()) + 1 if votes is not None and votes.any() else 1
            found.append(Instance(int(i), k, k, mask, False))
        where = ids_file
    elif ref.startswith(_COMPONENTS):
        where = ref[len(_COMPONENTS):]
        found = [Instance(n, k, k, m, False) for n, (k, m) in enumerate(components(load_mask(where, num_classes=num_classes)), 1)]
    else:
        raise ValueError(f"not an instance reference: {ref!r}")
    if image_size is not None and found and found[0].mask.shape != (image_size[1], image_size[0]):
        h, w = found[0].mask.shape
        raise DataError.for_file(where, f"instance masks are {w}x{h} but the image is {image_size[0]}x{image_size[1]}",
                                 "export the masks at the image's size (nearest-neighbour only), or check the pairing")
    kept = [i for i in found if int(i.mask.sum()) >= max(min_area, 1)]
    return kept, len(found) - len(kept)
