"""Head training on cached embeddings, like for like: an older revision of vfmtune vs today's, same cache and recipe.

Run: python bench/cached_head.py [--old-rev dc46e6f] [--rounds 3] [--also-rev REV]
`vfmtune train recipes=dinov2_vits14_frozen_textile` (the 448 px linear probe: 1,400 cached training
embeddings, a BatchNorm + linear head, 300 epochs) runs in turns, in fresh processes:
  old        the revision --old-rev (default: dc46e6f, before the cached-head work), from a git worktree
  every_1    today's code, validating every epoch (`trainer.check_val_every_n_epoch=1`, the old cadence)
  default    today's code with the frozen preset's own settings
  at_REV     with --also-rev: the revision REV with its own defaults (e.g. the previous measurement's code)
Each run's fit time is its metrics.json `train_seconds` + `data_setup_seconds` (reading the cache: older
revisions counted it as training); the speed-up is old / default per round, median over rounds, so slow drifts
of the machine's load cancel out. Test macro-F1 (400 images) of every run is kept: the speed-up counts only at
equal F1. Needs the 448 px embeddings cached (one earlier run of the recipe) and an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes=dinov2_vits14_frozen_textile"
ARMS = {"old": [], "every_1": ["trainer.check_val_every_n_epoch=1"], "default": []}


def worktree(rev: str) -> Path:
    """A detached worktree of `rev` (created once, reused)."""
    path = Path(tempfile.gettempdir()) / f"vfmtune-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return path


def run(arm: str, code: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}  # the old revision's package shadows the installed one
    cmd = [sys.executable, "-m", "vfmtune.cli", "train", RECIPE, f"hydra.run.dir={out}", "trainer.enable_progress_bar=false",
           *ARMS.get(arm, [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{arm}: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    fit = m["train_seconds"] + m.get("data_setup_seconds", 0.0)
    print(f"{arm:8s} fit {fit:6.2f} s  wall {wall:6.1f} s  test macro-F1 {m['test/macro_f1']:.4f}", flush=True)
    return {"fit_seconds": round(fit, 2), "wall_seconds": round(wall, 1), "test_macro_f1": round(m["test/macro_f1"], 4),
            "val_macro_f1": round(m["val/macro_f1"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", default="dc46e6f")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--also-rev", help="a further arm: this revision with its own defaults")
    args = parser.parse_args()
    old = worktree(args.old_rev)
    code = {"old": old, "every_1": ROOT, "default": ROOT}
    if args.also_rev:
        code[f"at_{args.also_rev}"] = worktree(args.also_rev)
    for path in {p for p in code.values() if p != ROOT}:
        check = subprocess.run([sys.executable, "-c", "import vfmtune; print(vfmtune.__file__)"], cwd=path,
                               env={**os.environ, "PYTHONPATH": str(path)}, capture_output=True, text=True, check=True)
        assert check.stdout.startswith(str(path)), f"{path}: another revision is imported: {check.stdout}"
    runs: dict[str, list[dict]] = {arm: [] for arm in code}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm, path in code.items():
                runs[arm].append(run(arm, path, Path(tmp) / f"{arm}_{r}"))
    figures: dict = {"old_rev": args.old_rev, "also_rev": args.also_rev, "rounds": args.rounds, "recipe": RECIPE,
                     "test_images": 400, "train_images": 1400}
    for arm, rs in runs.items():
        for key in rs[0]:
            figures[f"{arm}.{key}"] = [x[key] for x in rs]
        figures[f"{arm}.fit_seconds.median"] = statistics.median(x["fit_seconds"] for x in rs)
    for arm in (a for a in code if a != "old"):
        figures[f"speedup.{arm}"] = round(statistics.median(o["fit_seconds"] / n["fit_seconds"]
                                                            for o, n in zip(runs["old"], runs[arm])), 2)
    write_results("cached_head", figures)


if __name__ == "__main__":
    main()
