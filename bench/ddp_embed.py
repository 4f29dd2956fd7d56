"""The embedding cache pass split across DDP processes: one process (all threads) against two processes (one
thread each, `trainer=ddp_cpu`, gloo) on this machine, alternating, each into a fresh cache folder.

Run: python bench/ddp_embed.py [--images 128] [--rounds 3] [--precision auto]
Each run is `vfmtune train` (frozen DINOv2-S, 224 px, one epoch) on a seeded textile subset; the figure is the
cache pass as rank 0 reports it ("embeddings ready in S s": its share, the wait for the other rank, reading
the merged cache), not the process start-up or the head training.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import textile_subset_manifest, write_results

ROOT = Path(__file__).resolve().parents[1]


def cache_pass_seconds(manifest: Path, tmp: Path, name: str, processes: int, precision: str) -> tuple[float, list[int]]:
    """Seconds of rank 0's cache pass, and the number of rows each shard file got."""
    from safetensors.torch import load_file

    cache = tmp / f"cache_{name}"
    cmd = [sys.executable, "-m", "vfmtune.cli", "train", f"data.manifest={manifest}", "backbone.img_size=224",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", "data.num_workers=0",
           f"precision={precision}", f"cache_dir={cache}", f"hydra.run.dir={tmp / name}"]
    cmd += ["trainer=ddp_cpu"] if processes == 2 else ["trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=True)
    seconds = [float(s) for s in re.findall(r"embeddings ready in ([0-9.]+)s", out.stdout + out.stderr)]
    rows = sorted(len(load_file(f)["digests"]) for f in (cache / "embeddings").rglob("*.safetensors"))
    return max(seconds), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--results", default="ddp_embed")
    args = parser.parse_args()
    n = args.images
    times: dict[int, list[float]] = {1: [], 2: []}
    shards: dict[int, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest = textile_subset_manifest(tmp / "subset.csv", {"nominal": n // 2, "local": n // 4, "global": n // 4})
        for r in range(args.rounds):
            for p in (1, 2):
                seconds, shards[p] = cache_pass_seconds(manifest, tmp, f"r{r}_p{p}", p, args.precision)
                times[p].append(seconds)
                print(f"round {r}: {p} process(es) {seconds:.1f}s, shard rows {shards[p]}", flush=True)
    ratios = [a / b for a, b in zip(times[1], times[2])]
    write_results(args.results, {
        "images": n, "precision": args.precision, "rounds": args.rounds,
        "one_process.seconds": times[1], "two_processes.seconds": times[2],
        "one_process.images_per_s": round(n / statistics.median(times[1]), 2),
        "two_processes.images_per_s": round(n / statistics.median(times[2]), 2),
        "speedup_two_vs_one": round(statistics.median(ratios), 3),
        "two_processes.shard_rows": shards[2], "one_process.shard_rows": shards[1],
    })


if __name__ == "__main__":
    main()
