"""Segmentation to the edge: a DINOv2-S segmenter distilled into EfficientNet-Lite0 + LR-ASPP, exported, INT8.

Run: python bench/seg_distill.py [--datasets nuclei buildings] [--seeds 0 1 2] [--teacher decoder_448]
     [--student-size 224] [--epochs 60] [--results seg_distill]

Per dataset and split seed (the split of bench/segment.py and bench/seg_unet.py: val 0.2 / test 0.2 by tile,
stratified on class presence): the teacher is bench/segment.py's `--teacher` configuration trained with
`vfmtune.train`; the student is `vfmtune distill task=segment student=efficientnet_lite0` from it (packaged
ImageNet encoder, per-pixel KD + CE/Dice, teacher logits cached: no augmentation); both are exported with
`vfmtune export` (the student with `quantize=int8`, gated on pixel agreement and mIoU drop). Reported: test
mIoU of teacher, student (torch) and the student's fp32 / INT8 ONNX as the exporter scores them on the
test tiles at full resolution; batch-1 latency of the teacher's and the student's ONNX models (fp32, INT8),
timed alternately in this process (median of `--repeats` rounds) so load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_results
from seg_data import build, cache_root
from segment import CONFIGS

import vfmtune
from vfmtune.exporter import ExportError


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch1_latency_ms(models: dict[str, Path], repeats: int) -> dict[str, float]:
    """Median batch-1 latency of each ONNX model at its own input size, the models timed in alternation."""
    sessions = {k: _session(p) for k, p in models.items()}
    inputs = {}
    for k, s in sessions.items():
        shape = s.get_inputs()[0].shape
        size = int(shape[-1])
        inputs[k] = (s.get_inputs()[0].name, np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32))
    for k, s in sessions.items():  # warm-up
        s.run(None, {inputs[k][0]: inputs[k][1]})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {inputs[k][0]: inputs[k][1]})
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def one(data: Path, seed: int, args: argparse.Namespace, tmp: Path, cache: str) -> dict[str, float]:
    common = [f"data.root={data}", "data.val_fraction=0.2", "data.test_fraction=0.2", f"data.seed={seed}", "data.num_workers=1",
              "trainer.enable_progress_bar=false", f"cache_dir={cache}", "precision=bf16"]
    teacher = tmp / f"{data.name}_teacher_{seed}"
    t = vfmtune.train(overrides=["task=segment", *common, *CONFIGS[args.teacher]], run_dir=teacher)["metrics"]
    student = tmp / f"{data.name}_student_{seed}"
    s = vfmtune.distill(overrides=["task=segment", f"teacher={teacher}", "student=efficientnet_lite0", f"distill.img_size={args.student_size}",
                                   "data.augment.enabled=false", f"trainer.max_epochs={args.epochs}", "early_stopping.enabled=false",
                                   "optim.lr=3e-3", f"cache_dir={cache}", "trainer.enable_progress_bar=false"],
                        run_dir=student)["metrics"]
    te = vfmtune.export(overrides=[f"ckpt={teacher}", f"cache_dir={cache}"], run_dir=tmp / f"{data.name}_teacher_export_{seed}")
    try:
        se = vfmtune.export(overrides=[f"ckpt={student}", "quantize=int8", f"cache_dir={cache}"], run_dir=tmp / f"{data.name}_student_export_{seed}")
    except ExportError as e:  # the INT8 gate refused: record why, keep the fp32 bundle's figures
        print(f"INT8 refused: {e}")
        se = vfmtune.export(overrides=[f"ckpt={student}", f"cache_dir={cache}"], run_dir=tmp / f"{data.name}_student_export_fp32_{seed}")
        se["metrics"]["int8_gate_passed"] = False
    tm, sm = te["metrics"], se["metrics"]
    bundle_t, bundle_s = Path(te["bundle"]), Path(se["bundle"])
    models = {"teacher_fp32": bundle_t / "model.onnx", "student_fp32": bundle_s / "model.onnx"}
    int8 = sorted(bundle_s.glob("*int8*.onnx"))
    if int8:
        models["student_int8"] = int8[0]
    ms = batch1_latency_ms(models, args.repeats)
    row = {"teacher_test_miou": round(t["test/miou"], 4), "student_test_miou": round(s["test/miou"], 4),
           "teacher_onnx_test_miou": tm.get("test_miou"), "student_onnx_test_miou": sm.get("test_miou"),
           "student_int8_test_miou": sm.get("int8_test_miou"), "student_int8_pixel_agreement": sm.get("int8_pixel_agreement"),
           "int8_gate_passed": sm.get("int8_gate_passed"), "teacher_params": tm["params"], "student_params": sm["params"],
           **{f"{k}_ms_b1": v for k, v in ms.items()}}
    row["student_vs_teacher_miou"] = round(row["student_test_miou"] / row["teacher_test_miou"], 4)
    row["student_fp32_vs_teacher_latency"] = round(ms["student_fp32"] / ms["teacher_fp32"], 4)
    if "student_int8" in ms:
        row["student_int8_vs_teacher_latency"] = round(ms["student_int8"] / ms["teacher_fp32"], 4)
    print(f"{data.name} seed {seed}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["nuclei", "buildings"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", default="decoder_448", choices=[c for c in CONFIGS if not c.startswith("nocache")])
    parser.add_argument("--student-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", default="seg_distill")
    args = parser.parse_args()
    root = cache_root() / "seg"
    build(root, sorted(set(args.datasets)))
    figures: dict = {"seeds": args.seeds, "teacher": args.teacher, "student": f"efficientnet_lite0 + LR-ASPP at {args.student_size} px",
                     "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            rows = [one(root / dataset, seed, args, Path(tmp), f"{tmp}/cache") for seed in args.seeds]
            for key in rows[0]:
                values = [r.get(key) for r in rows]
                figures[f"{dataset}.{key}"] = values
                if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    figures[f"{dataset}.{key}.mean"] = round(statistics.mean(values), 4)
                    figures[f"{dataset}.{key}.std"] = round(statistics.pstdev(values), 4)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
