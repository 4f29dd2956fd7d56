"""Instance-level metrics (one mask per object): mean instance IoU and Dice, COCO mask AP, panoptic quality.

The same spec (:class:`InstanceMetrics`) scores a prompted SAM during training and `vfmtune evaluate`,
and auto-mask outputs against ground truth (`vfmtune evaluate predictions=DIR`):

- **instance IoU / Dice** (ours, per class and over all ground-truth instances): with prompts made from
  the ground truth (one per instance) each prediction is scored against its own instance ("paired");
  otherwise each ground-truth instance takes its best-overlapping prediction of the same class (0 when
  there is none), which is also how a missed object counts.
- **mask AP**: torchmetrics' ``MeanAveragePrecision(iou_type="segm")`` on the pycocotools backend (COCO's
  own matching, AP over IoU 0.50:0.95), scores = the model's predicted IoU.
- **panoptic quality** (Kirillov et al. 2019, https://arxiv.org/abs/1801.00868): torchmetrics'
  ``PanopticQuality`` on label maps painted from the instances (smaller instances on top, as
  :func:`vfmtune.data.coco.semantic_mask`), background as the one stuff class; PQ/SQ/RQ are averaged
  over the object classes present.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.detection import MeanAveragePrecision, PanopticQuality

from vfmtune.config import DataConfig
from vfmtune.data.images import DataError


class InstanceIoU(Metric):
    """Sums of IoU and Dice per class over ground-truth instances.

    ``update(pred_masks [P, H, W] bool, gt_masks [G, H, W] bool, pred_labels [P], gt_labels [G], paired)``.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        for name in ("iou", "dice", "count"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor, pred_labels: torch.Tensor, gt_labels: torch.Tensor,
               paired: bool = False) -> None:
        if len(gt_masks) == 0:
            return
        g = gt_masks.flatten(1).float()
        area_g = g.sum(1)
        if paired:
            p = pred_masks.flatten(1).float()
            inter = (g * p).sum(1)
            area_p = p.sum(1)
        elif len(pred_masks):
            p = pred_masks.flatten(1).float()
            overlap = g @ p.T  # [G, P] intersections
            union = area_g[:, None] + p.sum(1)[None] - overlap
            iou = torch.where(gt_labels[:, None] == pred_labels[None], overlap / union.clamp(min=1), -1.0)
            best = iou.argmax(1)
            rows = torch.arange(len(g), device=g.device)
            matched = iou[rows, best] >= 0
            inter = torch.where(matched, overlap[rows, best], 0.0)
            area_p = torch.where(matched, p.sum(1)[best], 0.0)
        else:
            inter = area_p = torch.zeros_like(area_g)
        union = area_g + area_p - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0).double()
        dice = torch.where(area_g + area_p > 0, 2 * inter / (area_g + area_p).clamp(min=1), 1.0).double()
        labels = gt_labels.long()
        self.iou.index_add_(0, labels, iou)
        self.dice.index_add_(0, labels, dice)
        self.count.index_add_(0, labels, torch.ones_like(iou))

    def compute(self) -> dict[str, torch.Tensor]:
        # MetricCollection flattens dict results into its own keys: these names must not clash with mAP's.
        return {"iou_sum": self.iou, "dice_sum": self.dice, "instance_count": self.count}


def label_map(masks: torch.Tensor, labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Instances ``[N, H, W]`` -> ``[H, W, 2]`` (class id, instance id), larger instances painted first."""
    out = torch.zeros(*size, 2, dtype=torch.long, device=masks.device)
    order = torch.argsort(masks.flatten(1).sum(1), descending=True, stable=True) if len(masks) else []
    for i in order:
        out[masks[i]] = torch.stack([labels[i].long(), i.long() + 1])
    return out


class InstanceMetrics:
    """How instance predictions are scored: outputs are per image ``{"masks" [P, H, W] bool, "scores" [P],
    "labels" [P], "paired": bool}``, targets per image objects with ``masks [G, H, W]`` and ``labels [G]``."""

    headline = "instance_iou"

    def build(self, classes: Sequence[str]) -> MetricCollection:
        n = len(classes)
        return MetricCollection({
            "instance": InstanceIoU(n),
            "map": MeanAveragePrecision(iou_type="segm", backend="pycocotools", class_metrics=True),
            "panoptic": PanopticQuality(things=set(range(1, n)), stuffs={0}, return_sq_and_rq=True, return_per_class=True,
                                        allow_unknown_preds_category=True),
        }, compute_groups=False)

    def update(self, metrics: MetricCollection, outputs: Sequence[dict[str, Any]], targets: Sequence[Any]) -> None:
        for out, t in zip(outputs, targets):
            # Prompts made from the ground truth (paired) carry their instance's class.
            masks, labels = out["masks"].bool(), out.get("labels", t.labels).long()
            metrics["instance"].update(masks, t.masks, labels, t.labels.long(), bool(out.get("paired", False)))
            metrics["map"].update([{"masks": masks, "scores": out["scores"].float(), "labels": labels}],
                                  [{"masks": t.masks.bool(), "labels": t.labels.long()}])
            size = t.masks.shape[-2:] if len(t.masks) else masks.shape[-2:]
            metrics["panoptic"].update(label_map(masks, labels, size)[None], label_map(t.masks.bool(), t.labels, size)[None])

    def results(self, computed: dict[str, Any], prefix: str, classes: Sequence[str]) -> dict[str, Any]:
        # MetricCollection returns the metrics' dict results merged into one flat dict.
        iou, dice, count = computed["iou_sum"], computed["dice_sum"], computed["instance_count"]
        total = float(count.sum())
        out: dict[str, Any] = {
            f"{prefix}/instances": int(total),
            f"{prefix}/instance_iou": float(iou.sum() / total) if total else None,
            f"{prefix}/instance_dice": float(dice.sum() / total) if total else None,
        }
        for k, cls in enumerate(classes[1:], start=1):
            n = float(count[k])
            out[f"{prefix}/instance_iou/{cls}"] = float(iou[k] / n) if n else None
            out[f"{prefix}/instance_dice/{cls}"] = float(dice[k] / n) if n else None
        for key, name in (("map", "mask_ap"), ("map_50", "mask_ap50"), ("map_75", "mask_ap75")):
            out[f"{prefix}/{name}"] = _ap(computed[key])
        per_class = computed["map_per_class"].reshape(-1).tolist()
        ids = computed["classes"].reshape(-1).tolist()
        for k, value in zip(ids, per_class):
            if 0 < int(k) < len(classes):
                out[f"{prefix}/mask_ap/{classes[int(k)]}"] = _ap(torch.tensor(value))
        pq = computed["panoptic"].reshape(-1, 3)[: len(classes) - 1]  # things (1..K-1) first, then the background stuff
        present = count[1:] > 0
        for j, name in enumerate(("pq", "sq", "rq")):
            values = pq[: len(present)][present.to(pq.device), j]
            out[f"{prefix}/{name}"] = float(values.mean()) if len(values) else None
        for k, cls in enumerate(classes[1:]):
            out[f"{prefix}/pq/{cls}"] = float(pq[k, 0]) if count[k + 1] > 0 else None
        return out


def _ap(value: torch.Tensor) -> float | None:
    """COCO AP, or None where pycocotools reports -1 (no ground truth of that kind)."""
    v = float(value)
    return None if v < 0 else v


def score_predictions(predictions: str | Path, data: DataConfig, cache: str | Path, prefix: str = "all") -> dict[str, Any]:
    """Score an auto-mask output folder (its ``annotations.json``) against the instances of ``data``.

    Images pair by file name (stem); classes by name. Predictions of everything mode (one class, ``object``)
    are scored class-agnostically: every ground-truth instance counts as an ``object``.

    Raises:
        DataError: No annotations.json, predicted images or classes the ground truth does not have, or
            masks whose size differs from their ground truth's.
    """
    from vfmtune.data.coco import _decode
    from vfmtune.data.instances import instance_source, load_instances

    folder = Path(predictions).expanduser()
    file = folder / "annotations.json" if folder.is_dir() else folder
    if not file.is_file():
        raise DataError.for_file(file, "no auto-mask annotations.json here", "pass the output folder of a finished `vfmtune auto-mask`")
    pred = json.loads(file.read_text())
    table, refs = instance_source(data, cache)
    gt_classes = table.classes or ["background", *sorted({str(i) for i in range(1, 256)})]
    names = {int(c["id"]): str(c["name"]) for c in pred.get("categories", [])}
    agnostic = sorted(set(names.values())) == ["object"]
    classes = ["background", "object"] if agnostic else list(gt_classes)
    unknown = sorted(set(names.values()) - set(classes))
    if unknown:
        raise DataError.for_file(file, f"predicted classes {unknown} are not among the ground truth's {classes[1:]}",
                                 "label with the ground truth's class names")
    by_stem = {Path(p).stem: r for p, r in zip(table.paths, refs)}
    spec = InstanceMetrics()
    metrics = spec.build(classes)
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in pred.get("annotations", []):
        anns.setdefault(int(a["image_id"]), []).append(a)
    missing = [im["file_name"] for im in pred.get("images", []) if Path(im["file_name"]).stem not in by_stem]
    if missing:
        raise DataError.for_file(file, f"{len(missing)} predicted images have no ground truth (e.g. {missing[:3]})",
                                 "point data.* at the ground truth of the same images")
    for im in pred.get("images", []):
        ref = by_stem[Path(im["file_name"]).stem]
        h, w = int(im["height"]), int(im["width"])
        truth = load_instances(ref, (w, h), len(gt_classes))[0]
        masks = [torch.from_numpy(_decode(a["segmentation"], h, w)) for a in anns.get(int(im["id"]), [])]
        labels = [1 if agnostic else classes.index(names[int(a["category_id"])]) for a in anns.get(int(im["id"]), [])]
        scores = [float(a.get("score", 1.0)) for a in anns.get(int(im["id"]), [])]
        out = {"masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool),
               "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.long)}
        gt_masks = torch.from_numpy(np.stack([i.mask for i in truth])) if truth else torch.zeros(0, h, w, dtype=torch.bool)
        gt_labels = torch.tensor([1 if agnostic else i.class_index for i in truth], dtype=torch.long)
        spec.update(metrics, [out], [SimpleNamespace(masks=gt_masks, labels=gt_labels)])
    results = spec.results(metrics.compute(), prefix, classes)
    return {**results, "predictions": str(file), "images_scored": len(pred.get("images", [])), "class_agnostic": agnostic}
