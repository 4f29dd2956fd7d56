"""What `lean_host_memory=true` buys and costs on a CPU: training steps of DINOv2-S at 224 px, batch 16,
for LoRA r=8 (attn) and full fine-tuning, with glibc's default heap and with `lean_host_memory`.

Run (CPU otherwise idle): flock /tmp/vfmtune-bench.lock python bench/host_memory.py

Each (strategy, allocator) pair runs in its own process (the allocator setting is process-wide and its
effect depends on what the heap already holds, so two settings cannot share a process), twice, in
alternation: heap, lean, heap, lean. A process builds the model, resets its peak resident set, takes one
warm-up step and times STEPS more: step time is the median of the timed steps, training memory the peak
resident set over all steps minus the resident set before them (as `metrics.json` reports it). The full Lightning runs are in
`bench/strategies.py --memory-only`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results

STEPS, BATCH, PX, ROUNDS = 4, 16, 224, 2
STRATEGIES = ("lora_r8", "full")
MODES = ("heap", "lean")


def child(strategy: str, mode: str) -> dict:
    """One process: the figures of `STEPS` training steps."""
    from vfmtune.adapt.lora import apply_lora
    from vfmtune.backbones import create_backbone
    from vfmtune.memory import lean_host_memory, reset_peak_rss, status_mb

    if mode == "lean":
        assert lean_host_memory()
    torch.manual_seed(0)
    backbone = create_backbone("dinov2_vits14", weights="packaged", img_size=PX)
    if strategy == "lora_r8":
        backbone.requires_grad_(False)
        backbone = apply_lora(backbone, {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": "attn"})
    model = torch.nn.Sequential(backbone, torch.nn.Linear(384, 3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(BATCH, 3, PX, PX), torch.randint(0, 3, (BATCH,))

    def step() -> float:
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    assert reset_peak_rss()  # Linux
    start = status_mb("VmRSS")
    step()  # warm-up (optimizer state), not timed; its memory counts: it is the first training step
    times = [step() for _ in range(STEPS)]
    peak = status_mb("VmHWM")
    return {"step_s": statistics.median(times), "train_memory_mb": peak - start, "peak_rss_mb": peak}


def main() -> None:
    if len(sys.argv) == 3:  # child process
        print(json.dumps(child(sys.argv[1], sys.argv[2])))
        return
    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in STRATEGIES for m in MODES}
    for _ in range(ROUNDS):
        for strategy in STRATEGIES:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, strategy, mode], capture_output=True, text=True, check=True)
                runs[(strategy, mode)].append(json.loads(out.stdout.splitlines()[-1]))
    figures: dict = {"backbone": "dinov2_vits14 (packaged)", "img_size": PX, "batch": BATCH, "steps": STEPS, "rounds": ROUNDS}
    for (strategy, mode), rs in runs.items():
        for key in ("step_s", "train_memory_mb", "peak_rss_mb"):
            figures[f"{strategy}/{mode}/{key}"] = round(statistics.median(r[key] for r in rs), 3 if key == "step_s" else 1)
    for strategy in STRATEGIES:
        figures[f"{strategy}/lean_step_time_ratio"] = round(figures[f"{strategy}/lean/step_s"] / figures[f"{strategy}/heap/step_s"], 3)
    for mode in MODES:
        for key in ("train_memory_mb", "peak_rss_mb"):
            figures[f"ratio_{key}/lora_r8_vs_full/{mode}"] = round(figures[f"lora_r8/{mode}/{key}"] / figures[f"full/{mode}/{key}"], 3)
    write_results("host_memory", figures)


if __name__ == "__main__":
    main()
