"""Auto-labelling a folder with SAM: box / click prompts (or everything) -> masks, resumable and atomic.

Per image, one encoder pass however many objects it has; then every prompt is decoded in batches.
Outputs (``out/``), mirroring the images' relative paths:

- ``masks/<rel>.png``: uint8 class ids (0 = background); where objects overlap the smaller one wins
  (:func:`vfmtune.data.coco.semantic_mask`'s rule).
- ``instances/<rel>.png``: uint16 instance ids (0 = none), the same painting order.
- ``records/<rel>.json``: the image's annotations (COCO RLE, box, predicted IoU, flags) and the key of
  what produced them; written last, so it marks the image as done.
- when every image is done: ``annotations.json`` (COCO instances with RLE and ``score`` = predicted IoU),
  ``review.csv`` (one row per object, low predicted IoU / empty / clipped / skipped flagged),
  ``classes.txt`` and ``summary.json``.

Every file is written atomically. A rerun skips images whose record holds the same key (same prompts,
classes, model weights and settings), so an interrupted run resumes where it stopped; the folder-wide
files exist only once the whole folder is done, so they never describe half a folder.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from vfmtune.config import AutoMaskConfig
from vfmtune.data.boxes import ObjectPrompt, Prompts
from vfmtune.data.coco import Instance, semantic_mask
from vfmtune.data.images import load_image
from vfmtune.io import atomic_path, write_json, write_text
from vfmtune.sam.predictor import SamPromptPredictor

EVERYTHING = "object"  # the class of every mask in everything mode


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _paint(masks: Sequence[np.ndarray], values: Sequence[int], shape: tuple[int, int], dtype: type) -> np.ndarray:
    """Paint masks larger first, so a small object on top of a large one stays visible."""
    out = np.zeros(shape, dtype)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        out[masks[i]] = values[i]
    return out


class AutoLabeller:
    """Label images with one SAM model; see the module docstring for the outputs.

    Args:
        sam: A segment-anything ``Sam`` (packaged weights, or a fine-tuned run's, LoRA merged).
        cfg: The ``auto_mask`` settings.
        multimask: ``sam.multimask``: decode three candidates per prompt and keep the best by predicted IoU.
        classes: Class names, index = id (0 = background).
        out: The output folder.
        identity: What identifies the model (name, weights digest): part of every record's key.
        autocast: The precision context for SAM's forwards (bf16 where the run's precision says so).
    """

    def __init__(self, sam: Sam, cfg: AutoMaskConfig, multimask: bool, classes: Sequence[str], out: Path,
                 identity: dict[str, Any], autocast: contextlib.AbstractContextManager | None = None) -> None:
        self.sam, self.cfg, self.multimask, self.classes, self.out = sam, cfg, multimask, list(classes), Path(out)
        self.identity = identity
        self.autocast = autocast or contextlib.nullcontext()
        self.predictor = SamPromptPredictor(sam, batch_size=cfg.batch_size)
        self.encoder_passes = 0

    def key(self, prompts: Sequence[ObjectPrompt] | None) -> str:
        """What an image's outputs depend on; a record with another key is recomputed."""
        spec = {"prompts": [[p.object_id, p.label, p.box, p.points] for p in prompts] if prompts is not None else "everything",
                "classes": self.classes, "model": self.identity, "multimask": self.multimask,
                "everything": [self.cfg.points_per_side, self.cfg.pred_iou_thresh, self.cfg.stability_score_thresh,
                               self.cfg.min_region_area] if prompts is None else None}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def done(self, rel: str, key: str) -> bool:
        record = self.out / "records" / f"{rel}.json"
        if not record.is_file() or not (self.out / "masks" / f"{rel}.png").is_file():
            return False
        try:
            return json.loads(record.read_text()).get("key") == key
        except ValueError:  # a damaged record is redone
            return False

    def segment(self, rgb: np.ndarray, prompts: Sequence[ObjectPrompt] | None) -> list[dict[str, Any]]:
        """Masks for one image: ``[{"mask", "label", "score", "object", "flags"}]``."""
        if prompts is None:
            generator = SamAutomaticMaskGenerator(
                self.sam, points_per_side=self.cfg.points_per_side, points_per_batch=self.cfg.batch_size,
                pred_iou_thresh=self.cfg.pred_iou_thresh, stability_score_thresh=self.cfg.stability_score_thresh,
                min_mask_region_area=self.cfg.min_region_area)
            self.encoder_passes += 1
            with self.autocast:
                found = generator.generate(rgb)
            found.sort(key=lambda m: -m["area"])
            return [{"mask": m["segmentation"], "label": EVERYTHING, "score": float(m["predicted_iou"]), "object": str(i),
                     "flags": []} for i, m in enumerate(found)]
        with self.autocast:
            self.predictor.set_image(rgb)
        self.encoder_passes += 1
        results: list[dict[str, Any] | None] = [None] * len(prompts)
        groups: dict[tuple[bool, int], list[int]] = {}  # prompts decode together when their shapes agree
        for i, p in enumerate(prompts):
            groups.setdefault((p.box is not None, len(p.points)), []).append(i)
        for (has_box, n_points), members in groups.items():
            boxes = [prompts[i].box for i in members] if has_box else None
            points = [[pt[:2] for pt in prompts[i].points] for i in members] if n_points else None
            labels = [[pt[2] for pt in prompts[i].points] for i in members] if n_points else None
            with self.autocast:
                pred = self.predictor.predict(boxes=boxes, points=points, point_labels=labels, multimask_output=self.multimask)
            for j, i in enumerate(members):
                p = prompts[i]
                results[i] = {"mask": pred.masks[j].cpu().numpy(), "label": p.label, "score": float(pred.iou[j]),
                              "object": p.object_id, "flags": list(p.flags)}
        return [r for r in results if r is not None]

    def label(self, path: str, rel: str, prompts: Sequence[ObjectPrompt] | None) -> dict[str, Any]:
        """Segment one image and write its outputs (record last); returns the record."""
        rgb = np.asarray(load_image(path))
        objects = self.segment(rgb, prompts)
        shape = rgb.shape[:2]
        ids = [self.classes.index(o["label"]) for o in objects]
        instances = [Instance(k + 1, c, c, o["mask"], False) for k, (o, c) in enumerate(zip(objects, ids))]
        annotations = []
        for k, (o, c) in enumerate(zip(objects, ids)):
            area = int(o["mask"].sum())
            flags = o["flags"] + (["empty"] if area == 0 else []) + (["low_iou"] if o["score"] < self.cfg.review_iou else [])
            ys, xs = np.nonzero(o["mask"])
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] if area else [0.0] * 4
            annotations.append({"object": o["object"], "instance_id": k + 1, "label": o["label"], "category_id": c,
                                "score": round(o["score"], 5), "area": area, "bbox": bbox, "flags": flags,
                                "segmentation": _rle(o["mask"])})
        for sub, array in (("masks", semantic_mask(instances, *shape)),
                           ("instances", _paint([o["mask"] for o in objects], list(range(1, len(objects) + 1)), shape, np.uint16))):
            with atomic_path(self.out / sub / f"{rel}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        record = {"key": self.key(prompts), "image": path, "file_name": rel_image(path, rel), "height": shape[0], "width": shape[1],
                  "annotations": annotations}
        write_json(self.out / "records" / f"{rel}.json", record)
        return record

    def run(self, images: Sequence[str], root: Path, prompts: Prompts | None, progress: bool = True) -> dict[str, Any]:
        """Label every image (skipping done ones), then write the folder-wide files.

        Args:
            images: Image paths under ``root``.
            root: The images folder: outputs mirror paths relative to it.
            prompts: Checked prompts, or None for everything mode (every image, a point grid).
            progress: Show a progress bar.
        """
        from tqdm.auto import tqdm

        for stale in ("annotations.json", "review.csv", "summary.json"):  # they describe a finished folder only
            (self.out / stale).unlink(missing_ok=True)
        todo = images if prompts is None else [p for p in images if p in prompts.by_image]
        resumed, masks, start = 0, 0, time.perf_counter()
        bar = tqdm(todo, desc="auto-mask", unit="image", disable=not progress)
        for path in bar:
            rel = Path(path).relative_to(root).with_suffix("").as_posix()
            objects = None if prompts is None else prompts.by_image[path]
            if self.done(rel, self.key(objects)):
                resumed += 1
                continue
            masks += len(self.label(path, rel, objects)["annotations"])
            bar.set_postfix(masks=masks)
        seconds = time.perf_counter() - start
        return self.finish(todo, root, prompts, {"images": len(todo), "images_resumed": resumed, "masks_new": masks,
                                                  "seconds": round(seconds, 2), "encoder_passes": self.encoder_passes,
                                                  "masks_per_second": round(masks / seconds, 3) if masks and seconds else None})

    def finish(self, images: Sequence[str], root: Path, prompts: Prompts | None, figures: dict[str, Any]) -> dict[str, Any]:
        """``annotations.json``, ``review.csv``, ``classes.txt`` and ``summary.json`` from the records."""
        coco_images, annotations, review = [], [], []
        for i, path in enumerate(images, start=1):
            rel = Path(path).relative_to(root).with_suffix("").as_posix()
            record = json.loads((self.out / "records" / f"{rel}.json").read_text())
            coco_images.append({"id": i, "file_name": record["file_name"], "height": record["height"], "width": record["width"]})
            for a in record["annotations"]:
                review.append([record["file_name"], a["object"], a["label"], a["score"], a["area"], ";".join(a["flags"])])
                if a["area"] == 0:
                    continue  # listed for review, not an annotation
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": a["category_id"],
                                    "segmentation": a["segmentation"], "area": a["area"], "bbox": a["bbox"], "iscrowd": 0,
                                    "score": a["score"], "attributes": {"object": a["object"], "flags": a["flags"]}})
        for image, obj, why in prompts.skipped if prompts is not None else []:
            review.append([Path(image).relative_to(root).as_posix(), obj.object_id, obj.label, "", 0, f"skipped: {why}"])
        categories = [{"id": k, "name": c} for k, c in enumerate(self.classes) if k > 0]
        write_json(self.out / "annotations.json", {"images": coco_images, "annotations": annotations, "categories": categories,
                                                   "info": {"images_root": str(root), "model": self.identity}})
        with atomic_path(self.out / "review.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "object", "label", "predicted_iou", "area", "flags"])
            writer.writerows(review)
        write_text(self.out / "classes.txt", "".join(f"{c}\n" for c in self.classes))
        flagged = sum(1 for r in review if r[5])
        summary = {**figures, "masks": len(annotations), "flagged_for_review": flagged,
                   "boxes_clipped": prompts.clipped if prompts is not None else 0,
                   "prompts_skipped": len(prompts.skipped) if prompts is not None else 0, "review_iou": self.cfg.review_iou}
        write_json(self.out / "summary.json", summary)
        print(f"{len(annotations)} masks for {len(images)} images in {self.out} ({figures['images_resumed']} images already done; "
              f"{flagged} flagged in review.csv)")
        return summary


def rel_image(path: str, rel: str) -> str:
    """The image's COCO ``file_name``: its path relative to the images folder, extension kept."""
    return f"{rel}{Path(path).suffix}"


def weights_identity(sam: Sam) -> str:
    """A digest of a model's weights (what a record's key holds)."""
    from vfmtune.embedding_cache import weights_digest

    return weights_digest(sam)
