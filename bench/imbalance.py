"""Imbalance benchmark: losses, balanced sampling and imbalanced-learn resamplers side by side.

Run: flock /tmp/vfmtune-bench.lock python bench/imbalance.py [--seeds 0 1 2] [--methods ce smote ...]
     [--ratio 20] [--extra backbone.img_size=336 ...] [--results imbalance]

Data: the textile set (nominal / local / global defects), split stratified 70/10/20 (split seed 0)
exactly as the linear-probe recipe. The TEST split is untouched (200 / 100 / 100). The training and
validation splits are made harsher: every nominal image is kept and each defect class is subsampled
to 1/ratio of the nominal count (20:1 gives train 700 : 35 : 35, val 100 : 5 : 5), a different
subsample per seed. Model: packaged DINOv2 ViT-S/14 frozen (224 px unless --extra sets
backbone.img_size), BatchNorm + linear head on the cached embeddings (finetune=frozen: 300 epochs,
early stopping on val macro-F1). Every method runs with the same seeds; the seed drives both the
subsample and the training.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_results

import vfmtune

BASE = ["backbone=dinov2_vits14", "finetune=frozen", "trainer.enable_progress_bar=false", "logger=none"]
METHODS: dict[str, list[str]] = {
    "ce": [],
    "weighted_ce": ["loss=weighted_ce"],
    "weighted_ce_effective_number": ["loss=weighted_ce", "loss.class_weights=effective_number"],
    "focal": ["loss=focal"],
    "focal_alpha_balanced": ["loss=focal", "loss.alpha=balanced"],
    "logit_adjustment": ["loss.logit_adjust_tau=1.0"],
    "balanced_sampler": ["data.sampler=balanced"],
    "smote": ["resample=smote"],
    "adasyn": ["resample=adasyn"],
    "borderline_smote": ["resample=borderline_smote"],
    "random_over": ["resample=random_over"],
    "random_under": ["resample=random_under"],
    "smote_tomek": ["resample=smote_tomek"],
}


def harsh_manifest(path: Path, seed: int, ratio: int) -> dict[str, dict[str, int]]:
    """Write a path,label,split manifest: test untouched, train and val subsampled to ratio:1."""
    return vfmtune.subsample(path, "textile", ratio=ratio, majority="nominal", val_fraction=0.1, test_fraction=0.2, seed=seed)["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=int, default=20, help="nominal : each defect class in train and val")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. the LoRA repeat: "
                        "finetune=lora trainer.max_epochs=15 early_stopping.enabled=false")
    parser.add_argument("--results", default="imbalance", help="bench/results/<name>.json")
    args = parser.parse_args()
    extra = dict(o.split("=", 1) for o in args.extra)  # --extra finetune=lora replaces BASE's finetune=frozen

    scores: dict[str, dict[str, list[float]]] = {m: {"ba": [], "f1": []} for m in args.methods}
    counts: dict = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            manifest = Path(tmp) / f"harsh_{seed}.csv"
            counts = harsh_manifest(manifest, seed, args.ratio)
            for method in args.methods:
                overrides = [*BASE, f"data.manifest={manifest}", "data.dataset=null", f"seed={seed}", *METHODS[method], *args.extra]
                overrides = [o for o in overrides if o in args.extra or o.split("=")[0] not in extra]
                t0 = time.perf_counter()
                m = vfmtune.train(overrides=overrides, run_dir=f"{tmp}/{method}_{seed}")["metrics"]
                scores[method]["ba"].append(m["test/balanced_accuracy"])
                scores[method]["f1"].append(m["test/macro_f1"])
                print(f"### {method} seed {seed}: balanced acc {m['test/balanced_accuracy']:.4f} macro-F1 "
                      f"{m['test/macro_f1']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    figures: dict = {
        "ratio": f"{args.ratio}:1 (nominal:local and nominal:global, train and val only; test untouched)",
        "seeds": args.seeds,
        "split_counts": counts,
        "backbone": f"dinov2_vits14 (packaged), {extra.get('backbone.img_size', '224')} px",
        "finetune": extra.get("finetune", "frozen: cached embeddings, BatchNorm + linear head, 300 epochs, "
                              "early stopping on val macro-F1"),
        "extra_overrides": args.extra,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(f"\n{'method':<30} {'balanced acc':>20} {'macro-F1':>20}")
    for method, s in scores.items():
        ba, f1 = np.asarray(s["ba"]), np.asarray(s["f1"])
        figures[f"{method}.test_balanced_accuracy_mean"] = round(float(ba.mean()), 4)
        figures[f"{method}.test_balanced_accuracy_std"] = round(float(ba.std()), 4)
        figures[f"{method}.test_macro_f1_mean"] = round(float(f1.mean()), 4)
        figures[f"{method}.test_macro_f1_std"] = round(float(f1.std()), 4)
        figures[f"{method}.test_balanced_accuracy_per_seed"] = [round(v, 4) for v in s["ba"]]
        figures[f"{method}.test_macro_f1_per_seed"] = [round(v, 4) for v in s["f1"]]
        print(f"{method:<30} {ba.mean():>12.4f} ± {ba.std():.4f} {f1.mean():>12.4f} ± {f1.std():.4f}")
    best = max(scores, key=lambda m: np.mean(scores[m]["ba"]))
    figures["best_method"] = best
    if "ce" in scores:
        gain = float(np.mean(scores[best]["ba"]) - np.mean(scores["ce"]["ba"]))
        figures["best_minus_ce_balanced_accuracy_points"] = round(100 * gain, 1)
        figures["target_10_points_met"] = gain >= 0.10
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
