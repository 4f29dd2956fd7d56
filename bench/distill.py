"""Distillation benchmark: DINOv2-S teacher -> EfficientNet-Lite0 / MobileNetV3 students, CE-only vs KD vs KD
with teacher-labelled unlabelled images, each exported to ONNX fp32 and INT8 and timed with onnxruntime on this CPU.

Run (serialised with the other benchmarks): flock /tmp/vfmtune-bench.lock python bench/distill.py
     [--teacher-px 224] [--student-px 160] [--epochs 20] [--students effnet_lite0 mnv3_small]
     [--losses ce kd kd_unlabeled] [--results distill]

Budget-driven setup (2 shared CPU cores, about 40 minutes):
- data: a seeded stratified textile subset of 480 images (nominal 240, local 120, global 120), split
  70/10/20 (336/48/96) by the teacher recipe; the students use the teacher's split.
- unlabelled: the other 1520 textile images (none of them is in the subset, so none is a val/test image),
  passed as `data.unlabeled=CSV` to the "kd_unlabeled" runs: the teacher's soft targets are their only
  label. CE-only cannot use them; that is the comparison distillation is for.
- teacher: packaged DINOv2 ViT-S/14, frozen, BN + linear head on cached embeddings at --teacher-px
  (recipes/dinov2_vits14_frozen_textile.yaml), exported and timed at that size.
- students: --student-px, no augmentation (so the teacher's outputs, for the unlabelled images too, come from
  the embedding cache and KD costs no teacher forwards), --epochs epochs for every run, AdamW lr 1e-3
  (2e-3 for the random-init one), batch 16, seed 0; CE-only is kd.alpha=0, KD is KD_ALPHA / KD_T.
  EfficientNet-Lite0 starts from ImageNet (packaged offline), MobileNetV3-Small from random init.
- export: `vfmtune export quantize=int8` defaults (static QDQ INT8; dynamic fallback only for transformers).
- latency: onnxruntime CPUExecutionProvider, median of 5 runs at batch 1 and 32, fp32 and INT8 timed in
  alternation in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

from common import textile_subset_manifest, write_results

import vfmtune

QUICK = os.environ.get("BENCH_QUICK") == "1"  # pipeline check only: tiny subset, 1 epoch, results not written
KD_ALPHA, KD_T = 0.7, 4.0
COMMON = ["trainer.enable_progress_bar=false", "data.num_workers=2", "seed=0"]
STUDENT_BATCH = 16  # more optimiser steps from 336 images
SUBSET = {"nominal": 240, "local": 120, "global": 120}
STUDENTS = {  # name -> (alias, extra overrides)
    "effnet_lite0": ("efficientnet_lite0", ["distill.weights=packaged", "optim.lr=1e-3"]),
    "mnv3_small": ("mobilenetv3_small_100", ["distill.weights=none", "optim.lr=2e-3"]),
}
KD = [f"kd.alpha={KD_ALPHA}", f"kd.temperature={KD_T}"]
LOSSES = {"ce": ["kd.alpha=0"], "kd": KD, "kd_unlabeled": [*KD, "data.unlabeled={unlabeled}"]}
# Default INT8 gates (top-1 agreement >= 0.95, accuracy drop <= 2 points): static first, dynamic as fallback.
EXPORT = ["quantize=int8", "export.verify_images=0",
          "export.calibration_images=64", f"export.latency_repeats={1 if QUICK else 5}"]


def _entries(name: str, m: dict) -> dict:
    """Flat figures for the fp32 model and its INT8 variant (ONNX Runtime, test split)."""
    out = {}
    for variant, prefix in ((name, ""), (f"{name}_int8", "int8_")):
        out.update({
            f"{variant}.test_macro_f1": round(m[f"{prefix}test_macro_f1"], 4),
            f"{variant}.test_accuracy": round(m[f"{prefix}test_accuracy"], 4),
            f"{variant}.params": m["params"],
            f"{variant}.latency_ms_b1": m[f"{prefix}latency_ms_b1"],
            f"{variant}.latency_ms_b32": m[f"{prefix}latency_ms_b32"],
            # logits; fp32: export vs torch source (gate: probabilities, below); int8: INT8 vs fp32 ONNX
            f"{variant}.onnx_max_abs_diff": float(f"{m[prefix + 'max_abs_diff']:.3g}"),
        })
    out[f"{name}.onnx_max_abs_diff_probs"] = float(f"{m['max_abs_diff_probs']:.3g}")
    out[f"{name}_int8.top1_agreement_vs_fp32"] = round(m["int8_top1_agreement"], 4)
    out[f"{name}_int8.mode"] = m["int8_mode"]
    out[f"{name}_int8.gate_passed"] = m["int8_gate_passed"]
    return out


REUSED: list[str] = []


def _run_once(run: str, train) -> dict:
    """`train(run)`'s metrics and wall seconds; with BENCH_KEEP a finished run is reused (exports are always redone)."""
    done = Path(run) / "bench_run.json"
    if done.is_file():
        REUSED.append(Path(run).name)
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    metrics = train(run)["metrics"]
    r = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(r))
    return r


def _export(ckpt: str, run_dir: str) -> dict:
    """Export metrics; an INT8 model that fails its gate still reports its figures (the fp32 bundle is valid)."""
    from vfmtune.exporter import ExportError

    try:
        return vfmtune.export(overrides=[f"ckpt={ckpt}", *EXPORT, *COMMON], run_dir=run_dir)["metrics"]
    except ExportError as e:
        if "INT8 model fails its gate" not in str(e):
            raise
        return json.loads((Path(run_dir) / "metrics.json").read_text())


def unlabelled_manifest(path: Path, subset: Path) -> Path:
    """A CSV (`path` column) of the textile images that are not in `subset`: teacher-labelled training data."""
    from vfmtune.data.sources import from_imagefolder, packaged_dataset

    with open(subset, newline="") as f:
        used = {row["path"] for row in csv.DictReader(f)}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([p] for p in from_imagefolder(packaged_dataset("textile")).paths if p not in used)
    return path


@contextlib.contextmanager
def _folder(path: str):
    Path(path).mkdir(parents=True, exist_ok=True)
    yield path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-px", type=int, default=224, help="the teacher's input size (224: runs 1-4; run 5 used 448)")
    parser.add_argument("--student-px", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--results", default="distill")
    args = parser.parse_args()
    epochs = 1 if QUICK else args.epochs
    t_start = time.perf_counter()
    figures: dict = {}
    keep = os.environ.get("BENCH_KEEP")  # a folder to keep the runs and bundles in (e.g. for INT8 experiments)
    with (tempfile.TemporaryDirectory() if not keep else _folder(keep)) as tmp:
        manifest = textile_subset_manifest(Path(tmp) / "subset.csv", SUBSET if not QUICK else {"nominal": 20, "local": 10, "global": 10})
        unlabeled = unlabelled_manifest(Path(tmp) / "unlabeled.csv", manifest)
        if QUICK:  # 60 unlabelled images are enough to check the pipeline
            unlabeled.write_text("\n".join(unlabeled.read_text().splitlines()[:61]) + "\n")
        teacher = _run_once(f"{tmp}/teacher", lambda run: vfmtune.train(
            overrides=["recipes=dinov2_vits14_frozen_textile", f"backbone.img_size={args.teacher_px}", f"data.manifest={manifest}", *COMMON],
            run_dir=run))
        figures["teacher.torch_test_macro_f1"] = round(teacher["metrics"]["test/macro_f1"], 4)
        figures["teacher.val_macro_f1"] = round(teacher["metrics"]["val/macro_f1"], 4)
        figures.update(_entries("teacher", _export(f"{tmp}/teacher", f"{tmp}/teacher_export")))
        for name in args.students:
            alias, extra = STUDENTS[name]
            for loss in args.losses:
                run = f"{tmp}/{name}_{loss}"
                overrides = [f"teacher={tmp}/teacher", f"student={alias}", f"distill.img_size={args.student_px}", "data.augment.enabled=false",
                             f"trainer.max_epochs={epochs}", "early_stopping.enabled=false", f"data.batch_size={STUDENT_BATCH}", *extra,
                             *(o.format(unlabeled=unlabeled) for o in LOSSES[loss]), *COMMON]
                r = _run_once(run, lambda run, overrides=overrides: vfmtune.distill(overrides=overrides, run_dir=run))
                figures[f"{name}_{loss}.train_seconds"] = r["seconds"]
                figures[f"{name}_{loss}.torch_test_macro_f1"] = round(r["metrics"]["test/macro_f1"], 4)
                figures[f"{name}_{loss}.val_macro_f1"] = round(r["metrics"]["val/macro_f1"], 4)
                figures.update(_entries(f"{name}_{loss}", _export(run, f"{run}_export")))
                print({k: v for k, v in figures.items() if k.startswith(f"{name}_{loss}")}, flush=True)
        figures["runs_reused"] = REUSED

    t = figures
    # The best student is chosen on the validation split (ties: fewer parameters), then scored on test.
    students = [f"{n}_{loss}" for n in args.students for loss in args.losses]
    best = max(students, key=lambda m: (t[f"{m}.val_macro_f1"], -t[f"{m}.params"]))
    figures["target.best_student"] = best
    figures["target.best_student_f1_ratio"] = round(t[f"{best}.test_macro_f1"] / t["teacher.test_macro_f1"], 3)
    figures["target.best_student_latency_ratio_b1"] = round(t[f"{best}.latency_ms_b1"] / t["teacher.latency_ms_b1"], 3)
    for name in args.students:
        for loss in ("kd", "kd_unlabeled"):
            if "ce" in args.losses and loss in args.losses:
                figures[f"target.{name}_{loss}_minus_ce_f1"] = round(t[f"{name}_{loss}.test_macro_f1"] - t[f"{name}_ce.test_macro_f1"], 4)
    for model in ["teacher", *students]:
        figures[f"target.{model}_int8_f1_drop_points"] = round(100 * (t[f"{model}.test_macro_f1"] - t[f"{model}_int8.test_macro_f1"]), 2)
        figures[f"target.{model}_int8_speedup_b32"] = round(t[f"{model}.latency_ms_b32"] / t[f"{model}_int8.latency_ms_b32"], 2)
    figures.update({"subset": "textile nominal 240 / local 120 / global 120, split 70/10/20 (seed 0)",
                    "unlabeled": "the other 1520 textile images (kd_unlabeled runs only)", "kd_alpha": KD_ALPHA, "kd_temperature": KD_T,
                    "teacher_px": args.teacher_px, "student_px": args.student_px, "epochs": epochs, "augmentation": False,
                    "total_seconds": round(time.perf_counter() - t_start, 1)})
    write_results(args.results if not QUICK else "distill_quick_check", figures)


if __name__ == "__main__":
    main()
