"""Adaptation strategies side by side on the textile set with the packaged DINOv2 ViT-S/14.

Run: flock /tmp/vfmtune-bench.lock python bench/strategies.py
Data: 300 textile images (150 nominal / 75 local / 75 global, seeded), stratified 65/15/20 split;
112 px input (8x8 patches of 14 px); 8 epochs, seed 0, batch 32, AdamW + cosine, same for every
strategy. Each strategy runs in its own `vfmtune train` process, so peak RSS (from wait4) is its own.
The frozen-head row trains on cached embeddings for the same 8 epochs; `frozen_head_recipe` is the
core issue's baseline recipe (300 epochs on the cache) on the same data, for reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import textile_subset_manifest, write_results

SUBSET = {"nominal": 150, "local": 75, "global": 75}
IMG_SIZE, EPOCHS, SEED = 112, 8, 0
COMMON = [
    f"backbone.img_size={IMG_SIZE}", f"trainer.max_epochs={EPOCHS}", f"seed={SEED}",
    "data.val_fraction=0.15", "data.test_fraction=0.2", "data.batch_size=32", "data.num_workers=1",
    "trainer.enable_progress_bar=false", "early_stopping.enabled=false", "trainer.log_every_n_steps=1",
]
# Backbone lr = optim.lr (1e-3, the head's) x backbone_lr_scale: 1e-4 for pretrained weights that
# change, 1e-3 for LoRA's freshly initialised low-rank matrices (LoRA usually wants a higher lr).
STRATEGIES: dict[str, list[str]] = {
    "frozen_head": ["finetune=frozen"],
    "last_4_blocks": ["finetune=last_blocks", "finetune.n_blocks=4"],
    "progressive": ["finetune=progressive", "finetune.every=2", "finetune.step=4"],
    "lora_r8": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0"],
    "lora_r8_llrd": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0", "optim.layer_decay=0.75"],
    "full": ["finetune=full"],
    "frozen_head_recipe": ["recipes=dinov2_vits14_frozen_textile", "data.val_fraction=0.15", "data.test_fraction=0.2"],
}


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def run(name: str, overrides: list[str], manifest: Path, out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "vfmtune.cli", "train", f"data.manifest={manifest}", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name} failed; see {out / f'{name}.log'}:\n" + (out / f"{name}.log").read_text()[-3000:])
    m = json.loads((run_dir / "metrics.json").read_text())
    log_text = (out / f"{name}.log").read_text()
    # The last parameter table: progressive runs print one after each unfreezing step.
    trainable = int([line.split()[1].replace(",", "") for line in log_text.splitlines() if line.startswith("all ")][-1])
    adapter = run_dir / "adapter"
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    return {
        f"{name}/test_macro_f1": round(m["test/macro_f1"], 4),
        f"{name}/test_balanced_accuracy": round(m["test/balanced_accuracy"], 4),
        f"{name}/trainable_params": trainable,
        f"{name}/peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        f"{name}/sec_per_epoch": round(m["train_seconds"] / max(m["epochs"], 1), 2),
        f"{name}/checkpoint_mb": _size_mb(adapter if adapter.is_dir() else ckpt),
        f"{name}/full_checkpoint_mb": _size_mb(ckpt),
        f"{name}/wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    only = sys.argv[1:] or list(STRATEGIES)
    figures: dict = {"resolution": IMG_SIZE, "subset": json.dumps(SUBSET), "subset_images": sum(SUBSET.values()), "epochs": EPOCHS, "seed": SEED}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        manifest = textile_subset_manifest(out / "subset.csv", SUBSET, seed=SEED)
        for name in only:
            figures.update(run(name, STRATEGIES[name], manifest, out))
            print({k: v for k, v in figures.items() if k.startswith(name + "/")}, flush=True)
            write_results("strategies", {**figures, "complete": name == only[-1]})  # partial results survive
    full, lora = figures.get("full/peak_rss_mb"), figures.get("lora_r8/peak_rss_mb")
    if full and lora:
        figures["lora_rss_ratio_vs_full"] = round(lora / full, 3)
        figures["lora_adapter_ratio_vs_full_ckpt"] = round(figures["lora_r8/checkpoint_mb"] / figures["full/checkpoint_mb"], 4)
    tuned = [n for n in only if n not in ("frozen_head", "frozen_head_recipe")]
    if tuned:
        best = max(tuned, key=lambda n: figures[f"{n}/test_macro_f1"])
        figures["best_strategy"] = best
    write_results("strategies", {**figures, "complete": True})


if __name__ == "__main__":
    main()
