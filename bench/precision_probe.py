"""fp32 vs bf16 embeddings on the textile probe, beyond one run: how close the features are, and the
vfmtune head over several training seeds on each (the cached head now trains in seconds).

Run: python bench/precision_probe.py [--img-size 224] [--seeds 0 1 2 3 4]
Both embedding caches must exist or are built first (`vfmtune embed`, ~3 min fp32 / ~1.3 min bf16 at 224 px on
2 idle cores). Setup as bench/linear_probe_textile.py: recipe dinov2_vits14_frozen_textile at the given size,
split seed 0 (70/10/20), so only the training seed (head init, shuffling) and the precision change.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from common import write_results

import vfmtune

RECIPE = ["recipes=dinov2_vits14_frozen_textile", "trainer.enable_progress_bar=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    s = args.img_size
    figures: dict = {"img_size": s, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        feats = {}
        for p in ("fp32", "bf16"):
            e = vfmtune.embed(overrides=[*RECIPE, f"backbone.img_size={s}", f"precision={p}"], run_dir=f"{tmp}/embed_{p}")
            feats[p] = e["features"]
        cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"])
        rel = (feats["bf16"] - feats["fp32"]).norm(dim=1) / feats["fp32"].norm(dim=1)
        figures.update({"n_images": len(cos), "feature_cosine.min": round(float(cos.min()), 6),
                        "feature_cosine.median": round(float(cos.median()), 6),
                        "feature_relative_l2.median": round(float(rel.median()), 5), "feature_relative_l2.max": round(float(rel.max()), 5)})
        for p in ("fp32", "bf16"):
            scores, seconds = [], []
            for seed in args.seeds:
                m = vfmtune.train(overrides=[*RECIPE, f"backbone.img_size={s}", f"precision={p}", f"seed={seed}"],
                                  run_dir=f"{tmp}/{p}_{seed}")["metrics"]
                scores.append(round(m["test/macro_f1"], 4))
                seconds.append(m["train_seconds"])
            figures.update({f"{p}.test_macro_f1": scores, f"{p}.test_macro_f1.mean": round(statistics.mean(scores), 4),
                            f"{p}.test_macro_f1.std": round(statistics.pstdev(scores), 4), f"{p}.fit_seconds": seconds})
            figures["n_test"] = sum(map(sum, m["test/confusion_matrix"]))
    figures["bf16_minus_fp32.mean_points"] = round(100 * (figures["bf16.test_macro_f1.mean"] - figures["fp32.test_macro_f1.mean"]), 2)
    write_results(args.results or f"precision_probe_px{s}", figures)


if __name__ == "__main__":
    main()
