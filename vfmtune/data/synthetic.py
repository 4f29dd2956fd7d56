"""Synthetic (cut-paste) scenes on disk, and adding them to a training split: `data.synthetic=DIR`.

A `vfmtune synth` folder is a dataset in the mask layout (``images/``, ``masks/`` class maps,
``instances/`` 16-bit ids, ``classes.txt``, ``annotations.json`` COCO with RLE) plus ``synth.json``: the
seed, the settings and the SHA-256 of every image an object or a background came from. Training adds
its scenes to the *training split only*, and refuses the folder when any of those source images is a
validation or test image of the run's data (by content, so renamed copies are caught too): scenes made
from held-out objects would leak them into training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vfmtune.config import Config
from vfmtune.data.cutpaste import Scene
from vfmtune.data.images import DataError
from vfmtune.data.mask_scan import scan_masks
from vfmtune.data.mask_sources import from_mask_folder
from vfmtune.data.prepare import Prepared
from vfmtune.data.sources import SampleTable

SYNTH_FILE = "synth.json"


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_synthetic(out: str | os.PathLike[str], scenes: Sequence[Scene], classes: Sequence[str], info: dict[str, Any]) -> Path:
    """Write scenes as a mask dataset into ``out`` (a new folder), atomically: built in a temporary folder
    next to it and renamed into place, so an interrupted run leaves no half-written dataset.

    Args:
        out: The folder to create; an existing non-empty one is refused.
        scenes: The composed scenes.
        classes: Class names, index = class id (0 = background).
        info: What ``synth.json`` records (seed, settings, sources ...).

    Returns:
        ``out``.
    """
    from pycocotools import mask as mask_utils

    target = Path(out).expanduser().resolve()
    if target.exists() and any(target.iterdir()):
        raise DataError.for_file(target, "output folder exists and is not empty",
                                 "choose a new output=DIR (synthetic sets are never merged into an existing folder)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for sub in ("images", "masks", "instances"):
            (tmp / sub).mkdir()
        images, annotations = [], []
        for i, scene in enumerate(scenes):
            stem = f"synth_{i:05d}"
            h, w = scene.rgb.shape[:2]
            ids = np.zeros((h, w), np.uint16)
            classes_map = np.zeros((h, w), np.uint8)
            for k, (m, label) in enumerate(zip(scene.masks, scene.labels), start=1):
                ids[m], classes_map[m] = k, label
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                                    "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
            Image.fromarray(scene.rgb).save(tmp / "images" / f"{stem}.png")
            Image.fromarray(classes_map).save(tmp / "masks" / f"{stem}.png")
            Image.fromarray(ids).save(tmp / "instances" / f"{stem}.png")
            images.append({"id": i + 1, "file_name": f"images/{stem}.png", "height": h, "width": w})
        categories = [{"id": k, "name": c} for k, c in enumerate(classes) if k > 0]
        (tmp / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        (tmp / SYNTH_FILE).write_text(json.dumps({**info, "classes": list(classes), "n_images": len(scenes),
                                                  "n_instances": len(annotations)}, indent=2, sort_keys=True) + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_synthetic(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``synth.json`` of a `vfmtune synth` folder; anything else is refused with what it lacks."""
    root = Path(folder).expanduser()
    file = root / SYNTH_FILE
    if not file.is_file():
        raise DataError.for_file(root, f"not a vfmtune synth folder (no {SYNTH_FILE})",
                                 "make one with `vfmtune synth objects=RUN output=DIR`; real images belong in data.root")
    return json.loads(file.read_text())


def add_synthetic(prepared: Prepared, config: Config) -> Prepared:
    """``prepared`` with the scenes of ``config.data.synthetic`` appended to its training split.

    Raises:
        DataError: Not a synth folder, other classes than the data's, a source image that is a val/test
            image of this data (leakage), or scenes whose masks fail the usual checks.
    """
    folder = Path(str(config.data.synthetic)).expanduser().resolve()
    info = read_synthetic(folder)
    table = prepared.table
    if list(info["classes"]) != list(table.classes):
        raise DataError.for_file(folder, f"synthetic scenes have classes {info['classes']} but the data has {table.classes}",
                                 "make the scenes from this data's own training run (vfmtune synth objects=RUN)")
    held = {sha256_file(p): p for p, s in zip(table.paths, prepared.splits) if s in ("val", "test")}
    leaked = sorted({held[src["sha256"]] for src in info.get("sources", []) if src["sha256"] in held})
    if leaked:
        shown = "\n".join(f"  {p}" for p in leaked[:20])
        raise DataError(f"data.synthetic={folder}: {len(leaked)} image(s) its objects or backgrounds were cut from are "
                        f"validation/test images of this data:\n{shown}\nSynthetic scenes may only be made from training "
                        "images. Fix: `vfmtune synth objects=RUN` takes a run's training split only.",
                        path=str(folder), problem=f"{len(leaked)} held-out source images")
    synth = from_mask_folder(folder)
    _, report = scan_masks(synth.paths, synth.masks, num_classes=len(table.classes), on_bad="error")
    refs = [f"ids:{folder / 'instances' / Path(m).name}|{m}" for m in synth.masks]
    presence = report.presence
    strata = [int(np.flatnonzero(row)[-1]) if row.any() else 0 for row in presence]
    n = len(synth.paths)
    merged = SampleTable(paths=table.paths + synth.paths, labels=table.labels + strata, classes=table.classes,
                         masks=(table.masks or []) + synth.masks, colours=table.colours,
                         instances=None if table.instances is None else table.instances + refs)
    counts = prepared.pixel_counts
    if counts is not None:
        counts = np.concatenate([counts, report.pixel_counts[:, : counts.shape[1]]])
    real = prepared.splits.count("train")
    print(f"{n} synthetic training images added from {folder} (real training images: {real}; validation and test stay real)")
    return Prepared(merged, [*prepared.splits, *(["train"] * n)], counts, synthetic=prepared.synthetic + n)
