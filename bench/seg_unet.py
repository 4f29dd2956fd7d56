"""Supervised CNN baseline of the segmentation benchmark: a U-Net on the packaged EfficientNet-Lite0.

Run (serialised with the other benchmarks; ~35 min on the 2 shared cores):
    flock /tmp/vfmtune-bench.lock python bench/seg_unet.py --data /tmp/seg_data --datasets nuclei buildings \
        --seeds 0 1 2 --scratch-seeds 0

Setup (choices and their checks are in BENCHMARKS.md, "Segmentation: supervised U-Net baseline"):
- split: :func:`split_tiles`, i.e. vfmtune's own ``scan_masks`` -> ``stratified_mask_split(presence, 0.2, 0.2,
  seed, classes)``. It is the single source of split truth: the VFM runs of ``bench/segment.py`` call it with
  the same fractions and seed, so both sides are tested on the very same tiles.
- model: segmentation-models-pytorch ``Unet("tu-tf_efficientnet_lite0")`` (timm ``features_only`` encoder,
  strides 2..32, default decoder 256/128/64/32/16); the encoder starts from vfmtune's packaged ImageNet
  EfficientNet-Lite0 (:func:`load_packaged_encoder`: every encoder tensor loaded, strict), or from random
  init with ``--scratch-seeds``. Input normalisation is the encoder's timm config (mean = std = 0.5).
- training: tiles resized to ``img_size`` (a multiple of 32, the encoder's stride) through vfmtune's paired
  transforms (RandomResizedCrop area 0.6-1, h/v flips); CE + Dice (smp), both ignoring 255; AdamW (no decay on
  norms and biases) with a cosine schedule after a one-epoch warm-up, fp32; the epoch with the best
  validation mIoU is kept.
- metrics: logits resized back to each mask's own size (bilinear), argmax, then torchmetrics
  ``MulticlassJaccardIndex`` / ``MulticlassF1Score`` (``average=None``, ``ignore_index=255``) over all pixels
  of the split; mIoU and Dice are means over every class, background included.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vfmtune.config import AugmentConfig
from vfmtune.data.mask_scan import MaskScanReport, scan_masks
from vfmtune.data.mask_sources import SegmentationTable, class_names, from_mask_folder
from vfmtune.data.mask_splits import stratified_mask_split
from vfmtune.data.masks import IGNORE_INDEX
from vfmtune.data.paired import SegmentationDataset, build_paired_transforms
from vfmtune.optim import cosine_with_warmup, weight_decay_groups

ENCODER = "tf_efficientnet_lite0"
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2
# Flips both ways: nuclei and nadir aerial tiles have no up or down. Crop area as vfmtune's default.
AUGMENT = AugmentConfig(hflip=0.5, vflip=0.5, scale=[0.6, 1.0])


@dataclass
class TileSplit:
    """A segmentation folder and its train/val/test split.

    Attributes:
        table: The image/mask pairs (sorted by path, as :func:`from_mask_folder` returns them).
        classes: Class names, index = id.
        splits: ``"train"``/``"val"``/``"test"`` per pair, in table order.
        report: The mask scan (pixel counts per pair and class).
    """

    table: SegmentationTable
    classes: list[str]
    splits: list[str]
    report: MaskScanReport

    def indices(self, name: str) -> list[int]:
        """Positions of the pairs in split ``name``."""
        return [i for i, s in enumerate(self.splits) if s == name]

    def dataset(self, name: str, transform: Callable) -> SegmentationDataset:
        rows = self.indices(name)
        return SegmentationDataset([self.table.paths[i] for i in rows], [self.table.masks[i] for i in rows],
                                   transform, num_classes=len(self.classes), colours=self.table.colours)


def split_tiles(dataset_dir: str | Path, seed: int, val_fraction: float = VAL_FRACTION,
                test_fraction: float = TEST_FRACTION) -> TileSplit:
    """vfmtune's split of a segmentation folder: ``scan_masks`` -> presence -> ``stratified_mask_split``.

    Every model of the segmentation benchmark takes its tiles from here, so train, val and test tiles
    are identical across models for a given ``(dataset, fractions, seed)``.

    Args:
        dataset_dir: Folder with ``images/``, ``masks/`` and optionally ``classes.txt``.
        seed: Split seed.
        val_fraction: Share of tiles for validation.
        test_fraction: Share of tiles for test.

    Example:
        >>> split = split_tiles("/tmp/seg_data/nuclei", seed=0)  # doctest: +SKIP
        >>> len(split.indices("train")), len(split.indices("val")), len(split.indices("test"))
        (8, 4, 4)
    """
    table = from_mask_folder(dataset_dir)
    _, report = scan_masks(table.paths, table.masks, colours=table.colours,
                           num_classes=len(table.classes) if table.classes else None)
    classes = class_names(table, report.num_classes)
    splits = stratified_mask_split(report.presence, val_fraction, test_fraction, seed, classes)
    return TileSplit(table, classes, splits, report)


def load_packaged_encoder(model: nn.Module) -> dict[str, Any]:
    """Load vfmtune's packaged ImageNet EfficientNet-Lite0 into an smp ``tu-tf_efficientnet_lite0`` encoder.

    The packaged file is in the key layout of timm's full classifier; smp's encoder is timm's
    ``features_only`` variant of the same network, whose keys are the same minus the classifier head
    (``conv_head``, ``bn2``, ``classifier``). Every encoder tensor is loaded (``strict=True``), and the file
    must hold exactly the encoder's keys plus that head, so a renamed or missing tensor is an error.

    Returns:
        ``{"loaded": n, "skipped": [head keys not used]}``.

    Raises:
        RuntimeError: If the file's keys are not the encoder's plus the classifier head.
    """
    import timm

    from vfmtune.weights import load_state_dict_file, packaged_weights

    state = load_state_dict_file(packaged_weights(ENCODER))
    encoder = model.encoder.model
    own = set(encoder.state_dict())
    head = set(timm.create_model(ENCODER, pretrained=False).state_dict()) - own
    if own - set(state) or set(state) - own != head:
        raise RuntimeError(f"packaged {ENCODER} does not fit smp's encoder: missing {sorted(own - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - own - head)[:5]}")
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return {"loaded": len(own), "skipped": sorted(head)}


def build_unet(num_classes: int, pretrained: bool = True) -> nn.Module:
    """smp U-Net over timm's EfficientNet-Lite0 (``tu-`` = smp's timm-universal encoder), ``[B, K, H, W]`` logits."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(f"tu-{ENCODER}", encoder_weights=None, classes=num_classes)
    if pretrained:
        load_packaged_encoder(model)
    return model


class CEDiceLoss(nn.Module):
    """Cross-entropy + multiclass soft Dice (smp), both skipping ``ignore_index`` pixels; logits ``[B, K, H, W]``,
    targets ``[B, H, W]``."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss

        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.dice = DiceLoss("multiclass", ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, targets) + self.dice(logits, targets)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, images: torch.Tensor,
               masks: torch.Tensor, precision: str = "fp32") -> float:
    """One optimiser step on ``images [B, 3, H, W]`` / ``masks [B, H, W]``; returns the loss before the step."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(images.contiguous(memory_format=torch.channels_last))
    loss = loss_fn(logits.float(), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: SegmentationDataset, num_classes: int, img_size: int,
             precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Per-class IoU and Dice over every pixel of ``dataset``, scored at each mask's own resolution.

    The dataset yields images and masks at their own size; each image is resized to ``img_size`` (bilinear,
    antialiased, as training saw it), and the logits are resized back before the argmax.

    Returns:
        ``{"iou": [K], "dice": [K]}``.
    """
    from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

    iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average=None)
    dice = MulticlassF1Score(num_classes, ignore_index=IGNORE_INDEX, average=None)
    model.eval()
    for image, mask in DataLoader(dataset, batch_size=1):  # batch 1: tiles may differ in size
        x = F.interpolate(image, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)
        iou.update(pred, mask)
        dice.update(pred, mask)
    return {"iou": iou.compute(), "dice": dice.compute()}


def _summary(scores: dict[str, torch.Tensor], classes: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"miou": float(scores["iou"].mean()), "dice": float(scores["dice"].mean())}
    for name, values in scores.items():
        out.update({f"{name}.{c}": float(v) for c, v in zip(classes, values)})
    return out


def train_unet(dataset_dir: str | Path, seed: int, val_fraction: float = VAL_FRACTION,
               test_fraction: float = TEST_FRACTION, img_size: int = 256, epochs: int = 40, batch_size: int = 4,
               lr: float = 1e-3, weight_decay: float = 1e-4, pretrained: bool = True, precision: str = "fp32",
               log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train the U-Net baseline on one split and score the best-validation epoch on the test tiles.

    Args:
        dataset_dir: Segmentation folder (``images/``, ``masks/``, ``classes.txt``).
        seed: Split seed (:func:`split_tiles`) and training seed (init, augmentation, batch order).
        val_fraction: Share of tiles for validation.
        test_fraction: Share of tiles for test.
        img_size: Square training size, a multiple of 32.
        epochs: Passes over the training tiles.
        batch_size: Tiles per step.
        lr: Peak AdamW learning rate, encoder and decoder alike.
        weight_decay: AdamW weight decay (not on norms and biases).
        pretrained: Start the encoder from the packaged ImageNet weights, else random init.
        precision: ``"fp32"`` or ``"bf16"`` (CPU autocast).
        log: Progress lines (``None``: quiet).

    Returns:
        Flat figures: ``test.miou``, ``test.dice``, ``test.iou.<class>``, ``test.dice.<class>``, the same for
        ``val``, ``best_epoch``, ``n_train``/``n_val``/``n_test``, ``train_seconds``,
        ``seconds_per_epoch`` (training pass only) and ``val_miou_curve``.

    Example:
        >>> figures = train_unet("/tmp/seg_data/nuclei", seed=0)  # doctest: +SKIP
        >>> round(figures["test.miou"], 3)  # doctest: +SKIP
    """
    if img_size % 32:
        raise ValueError(f"img_size={img_size} must be a multiple of 32 (the encoder's output stride)")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")
    say = log or (lambda _: None)
    split = split_tiles(dataset_dir, seed, val_fraction, test_fraction)
    k = len(split.classes)
    torch.manual_seed(seed)
    # channels_last: oneDNN's depthwise and 3x3 convolutions run ~1.25x faster per step on this CPU, same maths
    model = build_unet(k, pretrained=pretrained).to(memory_format=torch.channels_last)
    cfg = {**model.encoder.model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    train_tf, eval_tf = build_paired_transforms(cfg, AUGMENT, eval_resize=False)
    train_set = split.dataset("train", train_tf)
    val_set, test_set = split.dataset("val", eval_tf), split.dataset("test", eval_tf)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    steps = epochs * len(loader)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, lr, weight_decay), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(len(loader), steps, 0.0))
    loss_fn = CEDiceLoss()
    best, best_state, best_epoch, curve, train_time = -1.0, None, -1, [], 0.0
    start = time.perf_counter()
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for images, masks in loader:
            losses.append(train_step(model, optimizer, loss_fn, images, masks, precision))
            schedule.step()
        train_time += time.perf_counter() - t0
        val_miou = float(evaluate(model, val_set, k, img_size, precision)["iou"].mean())
        curve.append(round(val_miou, 4))
        if val_miou > best:  # the earliest of equal epochs
            best, best_epoch, best_state = val_miou, epoch, copy.deepcopy(model.state_dict())
        say(f"epoch {epoch:3d} loss {np.mean(losses):.4f} val mIoU {val_miou:.4f} (best {best:.4f} @ {best_epoch})")
    total = time.perf_counter() - start
    model.load_state_dict(best_state)
    out: dict[str, Any] = {"best_epoch": best_epoch, "epochs": epochs, "train_seconds": round(total, 1),
                           "seconds_per_epoch": round(train_time / epochs, 3), "val_miou_curve": curve}
    out.update({f"n_{name}": len(split.indices(name)) for name in ("train", "val", "test")})
    for name, dataset in (("val", val_set), ("test", test_set)):
        out.update({f"{name}.{key}": round(v, 4) for key, v in _summary(evaluate(model, dataset, k, img_size, precision),
                                                                         split.classes).items()})
    out["classes"] = split.classes
    return out


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder holding one segmentation folder per dataset")
    parser.add_argument("--datasets", nargs="+", default=["nuclei", "buildings"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scratch-seeds", nargs="*", type=int, default=[0],
                        help="seeds to repeat with a randomly initialised encoder (what the packaged weights buy)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 on shared cores, where two OpenMP threads stall each other")
    parser.add_argument("--results", default="seg_unet", help="bench/results/<name>.json")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from common import write_results

    figures: dict[str, Any] = {"model": f"smp.Unet(tu-{ENCODER})", "encoder_weights": "packaged ImageNet",
                               "img_size": args.img_size, "epochs": args.epochs, "batch_size": args.batch_size,
                               "lr": args.lr, "precision": args.precision, "val_fraction": VAL_FRACTION,
                               "test_fraction": TEST_FRACTION, "seeds": args.seeds}
    runs = [(seed, True) for seed in args.seeds] + [(seed, False) for seed in args.scratch_seeds]
    for name in args.datasets:
        per_seed: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for seed, pretrained in runs:
            print(f"== {name} seed {seed} {'packaged' if pretrained else 'scratch'} encoder", flush=True)
            r = train_unet(Path(args.data) / name, seed, img_size=args.img_size, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, pretrained=pretrained, precision=args.precision,
                           log=lambda line: print(line, flush=True))
            per_seed[pretrained].append(r)
            tag = f"{name}.{'seed' if pretrained else 'scratch_seed'}{seed}"
            figures.update({f"{tag}.{key}": v for key, v in r.items() if key != "classes"})
        fg = per_seed[True][0]["classes"][1:]
        for pretrained, prefix in ((True, name), (False, f"{name}.scratch")):
            rs = per_seed[pretrained]
            if not rs:
                continue
            for key in ("val.miou", "test.miou", "test.dice", *(f"test.iou.{c}" for c in fg), *(f"test.dice.{c}" for c in fg),
                        "train_seconds", "seconds_per_epoch"):
                figures.update({f"{prefix}.{key}.{s}": v for s, v in _mean_std([r[key] for r in rs]).items()})
        figures.update({f"{name}.{key}": per_seed[True][0][key] for key in ("n_train", "n_val", "n_test")})
    figures["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)  # the 2 cores are shared: context for the seconds
    write_results(args.results, figures)
    return figures


if __name__ == "__main__":
    main()
