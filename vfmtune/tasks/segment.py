"""The semantic segmentation task: image -> class per pixel, from a backbone's patch-token maps.

Data: `data.root` with `images/` + `masks/` (same stems, optional `classes.txt`), a CSV manifest
`image,mask[,split]`, or `data.coco=JSON`. With a frozen backbone the head trains on cached token
maps (one backbone pass per image, ever); otherwise on images with paired (mask-aware) augmentation.
Validation and test score logits upsampled to each mask's own resolution; images much larger than
the training images are predicted in overlapping windows (`vfmtune.tiling`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vfmtune.adapt.freeze import is_frozen, param_table
from vfmtune.adapt.progressive import progressive_callback
from vfmtune.checkpoint import FROZEN_WEIGHTS
from vfmtune.choices import ConfigError
from vfmtune.compose import typed
from vfmtune.config import Config, DataConfig
from vfmtune.data.coco import from_coco
from vfmtune.data.datamodule import SplitData
from vfmtune.data.images import DataError, load_image
from vfmtune.data.mask_sources import SegmentationTable, from_mask_folder, from_mask_manifest
from vfmtune.data.masks import load_mask, oriented_size
from vfmtune.data.paired import SegmentationDataset, build_paired_transforms, image_transform, normalise_transform
from vfmtune.data.prepare import Prepared, prepare_masks
from vfmtune.data.synthetic import add_synthetic
from vfmtune.device import compute_device
from vfmtune.embedding_cache import embed_images
from vfmtune.faults import fault_point
from vfmtune.inference import eval_loader
from vfmtune.io import atomic_path
from vfmtune.metrics import MaskMetrics
from vfmtune.precision import CACHED_HEAD
from vfmtune.report import overlay, plot_overlays, segmentation_report, voc_palette
from vfmtune.tasks.base import ExportGate, Setup, Task, TaskModule
from vfmtune.tasks.segmenter import LowResLogits, Segmenter, TiledSegmenter, encode


def mask_source(data: DataConfig) -> SegmentationTable:
    """Image/mask pairs from `data.coco`, `data.manifest` or `data.root` (images/ + masks/)."""
    if data.coco:
        return from_coco(data.coco, images_dir=data.root)
    if data.manifest:
        return from_mask_manifest(data.manifest)
    if data.root:
        return from_mask_folder(data.root)
    raise ConfigError("task=segment needs data: data.root=DIR (DIR/images/ and DIR/masks/ with the same file stems, "
                      "optional DIR/classes.txt), data.manifest=CSV (image,mask[,split]) or data.coco=annotations.json.")


class MaskTargets(Dataset):
    """`(input, mask)`: inputs are cached token maps (a tensor) or images through `transform`; masks are
    class ids `[H, W]` at their own size, or resized (nearest) to `size` for batched training."""

    def __init__(self, inputs: torch.Tensor | Sequence[str], masks: Sequence[str], table_colours: Any, num_classes: int,
                 transform: Any = None, size: tuple[int, int] | None = None) -> None:
        self.inputs, self.masks, self.colours, self.num_classes = inputs, list(masks), table_colours, num_classes
        self.transform, self.size = transform, size

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = load_mask(self.masks[i], num_classes=self.num_classes, colours=self.colours)
        if self.size is not None and ids.shape != self.size:
            ids = np.asarray(Image.fromarray(ids).resize(self.size[::-1], Image.NEAREST))
        x = self.inputs[i] if isinstance(self.inputs, torch.Tensor) else self.transform(load_image(self.inputs[i]))
        return x, torch.from_numpy(ids.astype(np.int64))


def native_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
    """(height, width) of each image as displayed (EXIF rotation applied), from the headers only."""
    return [oriented_size(p)[::-1] for p in paths]


def training_window(prepared: Prepared) -> int:
    """Source pixels per model input for tiled inference: the training images' median longer side."""
    return int(median(max(size) for size in native_sizes(prepared.subset("train")[0])))


def uniform_eval_sizes(prepared: Prepared) -> bool:
    """Whether the val / test images share one size (their masks batch together; else batches of 1)."""
    return len(set(native_sizes([p for p, s in zip(prepared.table.paths, prepared.splits) if s != "train"]))) <= 1


class SegmentTask(Task):
    """Backbone + segmentation head -> class per pixel; mIoU, Dice, boundary IoU; tiled inference."""

    name = "segment"
    target = "mask"
    schema = Config
    sections = ("segment",)
    metrics = MaskMetrics()
    student = "segment_distill"
    export_gate = ExportGate("pixel_agreement", "pixel_accuracy", "min_pixel_agreement", "miou", "max_miou_drop", (1, 8))

    def prepare(self, config: Config, out: Path) -> Prepared:
        prepared = prepare_masks(config, out, mask_source(config.data))
        return add_synthetic(prepared, config) if config.data.synthetic else prepared

    def setup(self, config: Config, prepared: Prepared, out: Path, **context: Any) -> Setup:
        check_mask_data(prepared)
        if config.finetune.head_from:
            raise ConfigError("finetune.head_from (LP-FT) is for task=classify heads; a segmentation probe is "
                              "trained as part of the run.")
        table = prepared.table
        train = [i for i, s in enumerate(prepared.splits) if s == "train"]
        window = training_window(prepared)
        model = Segmenter(config, table.classes, class_pixels=prepared.pixel_counts[train].sum(0).tolist(), window=window)
        unfreezing = progressive_callback(config, model)  # validates the schedule before any training
        cacheable = config.finetune.cache_embeddings and is_frozen(model.backbone) and not model.progressive
        if cacheable and model.reads_image:
            print(f"segment.head={config.segment.head} reads the images too: the frozen backbone runs on every batch "
                  "(no patch-token cache)")
        cached = cacheable and not model.reads_image
        print(param_table(model.backbone, model.head))
        dcfg = model.data_cfg
        square = (model.size, model.size)
        k = len(table.classes)
        if cached:
            tokens = embed_images(config, model.backbone, table.paths, extract=lambda b, x: encode(b, x, model.layers),
                                  kind=f"tokens-{model.layers}", label="patch tokens", transform=image_transform(dcfg))
            model.tokens_input = True

            def inputs(ids: list[int]) -> Any:
                return tokens[ids]
        else:
            def inputs(ids: list[int]) -> Any:
                return [table.paths[i] for i in ids]
        datasets: dict[str, Dataset] = {}
        for split in prepared.present:
            ids = [i for i, s in enumerate(prepared.splits) if s == split]
            masks = [table.masks[i] for i in ids]
            if split == "train" and not cached:
                train_tf, _ = build_paired_transforms(dcfg, config.data.augment)
                datasets[split] = SegmentationDataset(inputs(ids), masks, train_tf, num_classes=k, colours=table.colours)
            else:  # cached training views are fixed; val / test masks stay at their own size
                datasets[split] = MaskTargets(inputs(ids), masks, table.colours, k, image_transform(dcfg),
                                              size=square if split == "train" else None)
        data = SplitData(datasets, batch_size=config.data.batch_size, num_workers=0 if cached else config.data.num_workers,
                         eval_batch_size=None if uniform_eval_sizes(prepared) else 1)
        if cached and config.data.augment.enabled:
            print("frozen backbone: the head trains on cached token maps of the un-augmented images "
                  "(finetune.cache_embeddings=false trains on augmented images instead)")
        return Setup(model, data, callbacks=[unfreezing] if unfreezing else [], figures={"window": window},
                     fp32_training=CACHED_HEAD if cached else None)

    def after_fit(self, model: TaskModule, out: Path, prepared: Prepared) -> dict[str, Any]:
        split = "test" if "test" in prepared.splits else "val"
        ids = [i for i, s in enumerate(prepared.splits) if s == split][:4]
        normalise = normalise_transform(model.data_cfg)
        model = model.eval().to(compute_device(model.config))
        rows = []
        for i in ids:
            image = load_image(prepared.table.paths[i])
            truth = load_mask(prepared.table.masks[i], num_classes=len(model.classes), colours=prepared.table.colours)
            logits = model.predict_image(normalise(image)[None].to(model.device))
            rows.append((Path(prepared.table.paths[i]).name, np.asarray(image), truth, logits[0].argmax(0).cpu().numpy()))
        if rows:
            (out / "plots").mkdir(parents=True, exist_ok=True)
            plot_overlays(rows, out / "plots" / f"overlays_{split}.png", f"{split} images: truth vs prediction")
        return {}

    def load(self, checkpoint: dict[str, Any]) -> Segmenter:
        hp = checkpoint["hyper_parameters"]
        # A cached-token fit that stopped early names its frozen backbone by digest: weights from the config.
        model = Segmenter(typed(hp["config"], Config, strict=False), hp["classes"], load_weights=FROZEN_WEIGHTS in checkpoint,
                          class_pixels=hp.get("class_pixels"), window=hp.get("window"))
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def evaluation(self, config: Config, model: nn.Module, prepared: Prepared, split: str) -> tuple[nn.Module, DataLoader]:
        paths, masks = prepared.subset(split)
        normalise = normalise_transform(model.data_cfg)
        dataset = MaskTargets(paths, masks, prepared.table.colours, len(model.classes), normalise)
        return TiledSegmenter(model), eval_loader(dataset, config, batch_size=1)

    def predict(self, model: nn.Module, paths: Sequence[str], config: Any, out: Path) -> dict[str, Any]:
        """One palette PNG of class ids per image in `out/masks/` (`overlay=true`: a colour overlay in
        `out/overlays/`) and `predictions.csv` (image, mask file, each class's share of pixels). Masks a
        killed run into the same folder already wrote are kept, so a rerun completes the set."""
        normalise = normalise_transform(model.data_cfg)
        model = model.eval().to(compute_device(config))
        palette = voc_palette().reshape(-1).tolist()
        rows = []
        for p in paths:
            target = out / "masks" / f"{Path(p).stem}.png"
            if target.is_file():  # written by an earlier, interrupted run into this folder (files are atomic)
                ids = np.asarray(Image.open(target))
            else:
                image = load_image(p)
                with torch.inference_mode():
                    ids = model.predict_image(normalise(image)[None].to(model.device))[0].argmax(0).cpu().numpy().astype(np.uint8)
                with atomic_path(target) as tmp:
                    png = Image.frombytes("P", ids.shape[::-1], ids.tobytes())
                    png.putpalette(palette)
                    png.save(tmp, format="PNG")
                if getattr(config, "overlay", False):
                    with atomic_path(out / "overlays" / f"{Path(p).stem}.png") as tmp:
                        Image.fromarray(overlay(np.asarray(image), ids)).save(tmp, format="PNG")
                fault_point("predict_image")
            share = np.bincount(ids.reshape(-1), minlength=len(model.classes)) / ids.size
            rows.append([p, str(target), *(f"{v:.6f}" for v in share)])
        csv_path = out / "predictions.csv"
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "mask", *(f"share_{c}" for c in model.classes)])
            writer.writerows(rows)
        print(f"{len(rows)} masks written to {out / 'masks'}")
        return {"predictions": str(csv_path), "masks": str(out / "masks")}

    def inference(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        return LowResLogits(model).eval(), dict(model.data_cfg)

    def export_transform(self, data_cfg: dict[str, Any]) -> Any:
        return image_transform(data_cfg)  # the whole image resized to the input: no crop would cover a mask

    def export_targets(self, prepared: Prepared, split: str, classes: Sequence[str]) -> list[torch.Tensor]:
        # uint8 (the exporter scores them as int64 a batch at a time): a split's masks at full resolution
        return [torch.from_numpy(load_mask(m, num_classes=len(classes), colours=prepared.table.colours))
                for m in prepared.subset(split)[1]]

    def export_info(self, model: nn.Module) -> dict[str, Any]:
        """What the runtime needs to tile like `predict_image`: window (source pixels per model input, None:
        the whole image), overlap, the interpolation to the input, and a palette for mask PNGs."""
        seg = model.config.segment
        window = seg.window or model.window
        return {"task": "segment", "window": int(window) if window else None, "overlap": float(seg.overlap),
                "interpolation": model.interpolation, "palette": voc_palette(len(model.classes)).tolist()}

    def report(self, metrics: dict[str, Any], classes: Sequence[str], out: Path, prefixes: Sequence[str]) -> None:
        segmentation_report(metrics, classes, out, prefixes)


def check_mask_data(prepared: Prepared) -> None:
    """Stop before training when the training split has no labelled pixel (nothing to learn)."""
    train = [i for i, s in enumerate(prepared.splits) if s == "train"]
    if prepared.pixel_counts is None or not prepared.pixel_counts[train].sum():
        raise DataError("The training masks hold no labelled pixel. Fix: check the masks' class ids (255 = ignore).")
