"""Seconds per frozen-backbone epoch with the embedding cache vs without, in one run.

Run: python bench/embedding_cache.py
Data: a stratified 300-image subset of the textile set (150/75/75), 70/15/15 split, 224 px,
packaged DINOv2-S, 3 epochs, no augmentation (so both runs see identical inputs and the head
accuracies must agree). Without the cache every epoch runs the ViT on every train and val image;
with it, the ViT runs once before the first epoch (reported separately) and never again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import textile_subset_manifest, write_results

import vfmtune

EPOCHS = 3


def run(tmp: str, name: str, manifest: Path, cache: bool) -> dict:
    overrides = [
        f"data.manifest={manifest}", "data.dataset=null", f"trainer.max_epochs={EPOCHS}", "data.augment.enabled=false",
        "early_stopping.enabled=false", "trainer.enable_progress_bar=false", "data.num_workers=1",
        f"cache_dir={tmp}/cache", f"finetune.cache_embeddings={str(cache).lower()}",
    ]
    return vfmtune.train(overrides=overrides, run_dir=f"{tmp}/{name}")["metrics"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = textile_subset_manifest(Path(tmp) / "subset.csv", {"nominal": 150, "local": 75, "global": 75})
        plain = run(tmp, "no_cache", manifest, cache=False)
        import time

        t0 = time.perf_counter()
        cached = run(tmp, "cache", manifest, cache=True)  # builds the cache, then trains on it
        first_total = time.perf_counter() - t0
    no_cache_epoch = plain["train_seconds"] / EPOCHS
    cache_epoch = cached["train_seconds"] / EPOCHS  # training only: the cache pass is timed apart (data_setup_seconds)
    write_results(
        "embedding_cache",
        {
            "no_cache.sec_per_epoch": round(no_cache_epoch, 3),
            "cache.sec_per_epoch": round(cache_epoch, 3),
            "cache.first_run_total_seconds_incl_embedding": round(first_total, 1),
            "speedup": round(no_cache_epoch / cache_epoch, 1),
            "no_cache.test_macro_f1": round(plain["test/macro_f1"], 4),
            "cache.test_macro_f1": round(cached["test/macro_f1"], 4),
            "no_cache.test_accuracy": round(plain["test/accuracy"], 4),
            "cache.test_accuracy": round(cached["test/accuracy"], 4),
            "images": 300, "epochs": EPOCHS, "img_size": 224,
        },
    )


if __name__ == "__main__":
    main()
