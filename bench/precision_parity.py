"""Does bf16 cost accuracy when the backbone trains? One short LoRA run per precision on the same textile
subset, split, seed and augmentations; only `precision=` differs.

Run: python bench/precision_parity.py [--per-class 150 75 75] [--epochs 2] [--precisions fp32 bf16] [--seeds 0]
Setup: packaged DINOv2-S/14 at 224 px, LoRA r=8 on attention (backbone lr scale 1.0), batch 16, AdamW,
cosine, no early stopping, best epoch by val macro-F1; a seeded stratified subset (nominal / local /
global) split 70/15/15. `train_seconds` is Trainer.fit (training and per-epoch validation, data
decoding included) and the runs go one after the other, so its ratio is indicative; bench/speed.py
measures step speed side by side.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import textile_subset_manifest, write_results

import vfmtune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs=3, default=[150, 75, 75], metavar=("NOMINAL", "LOCAL", "GLOBAL"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (head init, LoRA init, batch order); the split stays")
    parser.add_argument("--results", default="precision_parity_lora")
    args = parser.parse_args()
    per_class = dict(zip(("nominal", "local", "global"), args.per_class))
    figures: dict = {"per_class": per_class, "epochs": args.epochs, "img_size": 224, "finetune": "lora r=8 attn", "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = textile_subset_manifest(Path(tmp) / "subset.csv", per_class)
        f1: dict[tuple[int, str], float] = {}  # test macro-F1 per (training seed, precision)
        for seed in args.seeds:
            for p in args.precisions:  # alternating precisions per seed, so load drifts hit both alike
                overrides = [f"data.manifest={manifest}", "backbone.img_size=224", "finetune=lora", "finetune.rank=8",
                             "optim.backbone_lr_scale=1.0", f"trainer.max_epochs={args.epochs}", "data.batch_size=16",
                             "data.val_fraction=0.15", "data.test_fraction=0.15", "early_stopping.enabled=false", f"seed={seed}",
                             "trainer.enable_progress_bar=false", f"precision={p}"]
                m = vfmtune.train(overrides=overrides, run_dir=f"{tmp}/{p}_{seed}")["metrics"]
                key = p if seed == args.seeds[0] else f"{p}.seed{seed}"
                figures.update({f"{key}.{k}": m[k] for k in ("test/macro_f1", "test/balanced_accuracy", "test/accuracy",
                                                            "val/macro_f1", "train_seconds", "precision", "trainer_precision")})
                figures["n_test"] = sum(map(sum, m["test/confusion_matrix"]))
                f1[seed, p] = m["test/macro_f1"]
    if {"fp32", "bf16"} <= set(args.precisions):
        diffs = [100 * (f1[seed, "bf16"] - f1[seed, "fp32"]) for seed in args.seeds]
        figures["bf16_minus_fp32.test_macro_f1_points"] = round(diffs[0], 2)
        figures["bf16_minus_fp32.test_macro_f1_points.per_seed"] = [round(d, 2) for d in diffs]
        figures["bf16_minus_fp32.test_macro_f1_points.mean"] = round(sum(diffs) / len(diffs), 2)
        figures["fp32_over_bf16.train_seconds"] = round(figures["fp32.train_seconds"] / figures["bf16.train_seconds"], 2)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
