"""Adaptation strategies side by side on the textile set with the packaged DINOv2 ViT-S/14.

Run: flock /tmp/vfmtune-bench.lock python bench/strategies.py            # the CPU benchmark (~40 min, 2 cores)
     python bench/strategies.py --profile gpu [--extra ...]              # the same at full size on a CUDA GPU
     flock /tmp/vfmtune-bench.lock python bench/strategies.py --profile textile448 lora_r8 --results strategies_textile448_lora
                                                               # LP-FT at 448 px on the full split (--split-seed 1: another split)
CPU profile: 1000 textile images (500 nominal / 250 local / 250 global, seeded), stratified 65/15/20 split;
224 px input (16x16 patches: local defects are small, and at 112 px no strategy beat the frozen head);
3 epochs, seed 0, batch 16, AdamW + cosine, the same for every strategy. Each strategy runs in its own
`vfmtune train` process, so its peak RSS (wait4) and training memory (metrics.json) are its own.
`frozen_head_recipe` is the core issue's baseline (the frozen-head recipe: 300 epochs on cached
embeddings); `frozen_head_raw` is the same without the BatchNorm feature norm, and every fine-tuning
strategy starts from its head (LP-FT, `finetune.head_from`, `head.feature_norm=false`).
`frozen_head` trains a head on the cache for the same epochs as the others. The `_gc` rows add gradient
checkpointing, the `_lean` rows `lean_host_memory=true` (freed tensors go back to the OS); both stop
after 4 steps: they measure memory only. `--memory-only` runs every selected strategy that way
(results: strategies_memory.json), so LoRA and full fine-tuning are compared under each setting in one run:
     flock /tmp/vfmtune-bench.lock python bench/strategies.py --memory-only lora_r8 full lora_r8_lean full_lean lora_r8_gc full_gc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import textile_subset_manifest, write_results

SEED = 0
PROBE = "frozen_head_recipe"  # the core issue's baseline
# The fine-tuning strategies start from this probe's head (LP-FT) and keep a plain linear head: the
# baseline's BatchNorm feature norm, with fixed statistics, amplifies the few near-constant feature
# channels that augmentation and fine-tuning move (first-epoch train losses of ~30 at 224 px).
LP_PROBE = "frozen_head_raw"
# cpu: the benchmark (fits ~40 minutes on 2 cores). gpu: the same comparison at full size, for a CUDA machine.
# textile448: fine-tunes at 448 px on the packaged split of bench/linear_probe_textile.py (70/10/20 of all 2,000
# images, no manifest), the probe to beat being its 0.967 (issue 14); ~15 min per LoRA epoch on 2 cores (bf16).
PROFILES: dict[str, dict] = {
    "cpu": {"subset": {"nominal": 500, "local": 250, "global": 250}, "img_size": 224, "epochs": 3, "batch": 16,
            "val_fraction": 0.15, "extra": ["data.num_workers=1"], "results": "strategies"},
    "gpu": {"subset": None, "img_size": 224, "epochs": 15, "batch": 64, "val_fraction": 0.15,
            "extra": ["data.num_workers=8", "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"],
            "results": "strategies_gpu"},
    "textile448": {"subset": None, "packaged_split": True, "img_size": 448, "epochs": 2, "batch": 16, "val_fraction": 0.1,
                   "extra": ["data.num_workers=0"], "results": "strategies_textile448"},
}


def common(p: dict) -> list[str]:
    """Every run, the probe recipe included."""
    return [f"backbone.img_size={p['img_size']}", f"seed={SEED}", f"data.seed={p['split_seed']}", f"data.val_fraction={p['val_fraction']}", "data.test_fraction=0.2",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", *p["extra"]]


def same_budget(p: dict) -> list[str]:
    """Every run but the probe recipe (which keeps its own 300 cached epochs, batch 128, lr 3e-2)."""
    return [f"trainer.max_epochs={p['epochs']}", f"data.batch_size={p['batch']}", "early_stopping.enabled=false"]


# Backbone lr = optim.lr (1e-3, the head's) x backbone_lr_scale: 1e-4 for pretrained weights that
# change, 1e-3 for LoRA's freshly initialised low-rank matrices (LoRA usually wants a higher lr).
STRATEGIES: dict[str, list[str]] = {
    PROBE: ["recipes=dinov2_vits14_frozen_textile"],
    LP_PROBE: ["recipes=dinov2_vits14_frozen_textile", "head.feature_norm=false"],
    "frozen_head": ["finetune=frozen"],
    "last_4_blocks": ["finetune=last_blocks", "finetune.n_blocks=4"],
    "progressive": ["finetune=progressive", "finetune.every=2", "finetune.step=4"],
    "lora_r8": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0"],
    "lora_r8_llrd": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0", "optim.layer_decay=0.75"],
    "full": ["finetune=full"],
    "lora_r8_gc": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0", "finetune.grad_checkpointing=true"],
    "full_gc": ["finetune=full", "finetune.grad_checkpointing=true"],
    "lora_r8_lean": ["finetune=lora", "finetune.rank=8", "optim.backbone_lr_scale=1.0", "lean_host_memory=true"],
    "full_lean": ["finetune=full", "lean_host_memory=true"],
}
FROZEN = (PROBE, LP_PROBE, "frozen_head")
# Memory only: the peak is reached in the first steps, so these stop after 4 (their scores are not comparable).
MEMORY_ONLY = ("lora_r8_gc", "full_gc", "lora_r8_lean", "full_lean")
MEMORY_ONLY_BUDGET = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.max_epochs=1"]


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def run(name: str, overrides: list[str], manifest: Path | None, out: Path, profile: dict, memory_only: bool) -> dict:
    run_dir = out / name
    budget = [] if name in (PROBE, LP_PROBE) else same_budget(profile)
    lpft = [] if name in FROZEN else [f"finetune.head_from={out / LP_PROBE}", "head.feature_norm=false"]
    cmd = [sys.executable, "-m", "vfmtune.cli", "train", *([f"data.manifest={manifest}"] if manifest else []), *common(profile), *budget, *overrides,
           *lpft, *(MEMORY_ONLY_BUDGET if memory_only else []), f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])})
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
        f"{name}/peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # the whole process (imports, embedding pass, fit)
        # what fit itself adds: peak resident set during fit minus the resident set when fit started
        f"{name}/train_memory_mb": round(m["train_peak_rss_mb"] - m["train_start_rss_mb"], 1),
        **({f"{name}/train_peak_gpu_mb": m["train_peak_gpu_mb"]} if "train_peak_gpu_mb" in m else {}),
        f"{name}/sec_per_epoch": round(m["train_seconds"] / max(m["epochs"], 1), 2),
        f"{name}/checkpoint_mb": _size_mb(adapter if adapter.is_dir() else ckpt),
        f"{name}/full_checkpoint_mb": _size_mb(ckpt),
        f"{name}/wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="*", choices=[[], *STRATEGIES], default=[])
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run (e.g. backbone.weights=file backbone.path=...)")
    parser.add_argument("--epochs", type=int, help="override the profile's epochs")
    parser.add_argument("--split-seed", type=int, default=0, help="data.seed: which stratified split (results get a _split<N> suffix)")
    parser.add_argument("--results", help="results file name (default: the profile's)")
    parser.add_argument("--memory-only", action="store_true", help="every fine-tuning run stops after 4 steps")
    args = parser.parse_args()
    p = {**PROFILES[args.profile], **({"epochs": args.epochs} if args.epochs else {}), "split_seed": args.split_seed}
    if args.results:
        p["results"] = args.results
    if args.split_seed:
        p["results"] += f"_split{args.split_seed}"
    if args.memory_only:
        p["results"] += "_memory"
    p["extra"] = [*p["extra"], *args.extra]
    only = args.strategies or list(STRATEGIES)
    for probe in (LP_PROBE, PROBE):  # first: the baseline, and the head the fine-tuning strategies start from
        if probe not in only:
            only.insert(0, probe)
    figures: dict = {"profile": args.profile, "memory_only": args.memory_only, "resolution": p["img_size"], "subset": json.dumps(p["subset"] or "all 2000 images"),
                     "epochs": p["epochs"], "batch": p["batch"], "seed": SEED, "split_seed": args.split_seed, "extra_overrides": p["extra"]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if p["subset"]:
            figures["subset_images"] = sum(p["subset"].values())
        manifest = None if p.get("packaged_split") else textile_subset_manifest(out / "subset.csv", p["subset"] or {}, seed=SEED)
        for name in only:
            memory_only = name not in FROZEN and (args.memory_only or name in MEMORY_ONLY)
            figures.update(run(name, STRATEGIES[name], manifest, out, p, memory_only))
            print({k: v for k, v in figures.items() if k.startswith(name + "/")}, flush=True)
            write_results(p["results"], {**figures, "complete": name == only[-1]})  # partial results survive
    for lora, full in (("lora_r8", "full"), ("lora_r8_gc", "full"), ("lora_r8_gc", "full_gc"), ("lora_r8_lean", "full_lean")):
        for key in ("peak_rss_mb", "train_memory_mb", "train_peak_gpu_mb"):
            a, b = figures.get(f"{lora}/{key}"), figures.get(f"{full}/{key}")
            if a and b:
                figures[f"ratio_{key}/{lora}_vs_{full}"] = round(a / b, 3)
    if "lora_r8/checkpoint_mb" in figures and "full/checkpoint_mb" in figures and not args.memory_only:
        figures["lora_adapter_ratio_vs_full_ckpt"] = round(figures["lora_r8/checkpoint_mb"] / figures["full/checkpoint_mb"], 4)
    tuned = [] if args.memory_only else [n for n in only if n not in FROZEN and n not in MEMORY_ONLY]
    if tuned:
        best = max(tuned, key=lambda n: figures[f"{n}/test_macro_f1"])
        figures["best_strategy"] = best
    write_results(p["results"], {**figures, "complete": True})

if __name__ == "__main__":
    main()
