"""INT8 quantizer settings on trained students: top-1 agreement with fp32, test macro-F1 drop, speed-up.

Run (after bench/distill.py with BENCH_KEEP=DIR, serialised with the other benchmarks):
    flock /tmp/vfmtune-bench.lock python bench/distill_int8.py DIR/effnet_lite0_kd_unlabeled [DIR/...]

Each setting quantizes the student's verified fp32 ONNX (the `vfmtune export` bundle next to the run,
RUN_export/bundle/model.onnx) with onnxruntime's quantize_static, calibrated on the first N training
images, and scores it on the test split. fp32 and INT8 are timed in alternation (median of 7 runs, batch
32 and 1) so load from other processes hits both alike. The exporter's default is the "minmax64" row.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results

from vfmtune.data.prepare import prepare_data
from vfmtune.data.transforms import build_transforms
from vfmtune.exporter import _accuracy, _batches, _Calibration, _macro_f1, _run, _session, inference_module, paired_latency_ms
from vfmtune.loading import load_model


def settings(graph) -> dict[str, dict]:
    """name -> quantize_static options (on top of QDQ, per-channel INT8 weights, UINT8 activations)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    gemms = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    depthwise = [n.name for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return {
        "minmax64": {"n": 64},
        "minmax256": {"n": 256},
        "minmax64_moving_average": {"n": 64, "extra_options": {"CalibMovingAverage": True}},
        "minmax64_activation_symmetric": {"n": 64, "extra_options": {"ActivationSymmetric": True}},
        "percentile99.999_128": {"n": 128, "calibrate_method": CalibrationMethod.Percentile, "extra_options": {"CalibPercentile": 99.999}},
        "entropy128": {"n": 128, "calibrate_method": CalibrationMethod.Entropy},
        "minmax64_exclude_classifier": {"n": 64, "nodes_to_exclude": gemms},
        "minmax64_exclude_stem_conv": {"n": 64, "nodes_to_exclude": convs[:1]},
        "minmax64_exclude_depthwise": {"n": 64, "nodes_to_exclude": depthwise},
        "minmax64_conv_only": {"n": 64, "op_types_to_quantize": ["Conv"]},
        "minmax64_int8_activations": {"n": 64, "activation_type": QuantType.QInt8},
        "minmax64_per_tensor": {"n": 64, "per_channel": False},
    }


def evaluate(run: Path, work: Path) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = run.parent / f"{run.name}_export" / "bundle" / "model.onnx"
    model = load_model(str(run))
    _, dcfg = inference_module(model)
    size = int(dcfg["input_size"][-1])
    _, tf = build_transforms(dcfg, {"enabled": False})
    prepared = prepare_data({**model.config, "cache_dir": None}, work / "prepare")
    test_paths, labels = prepared.subset("test")
    xs = list(_batches(test_paths, tf))
    train = np.concatenate(list(_batches(prepared.subset("train")[0][:256], tf)))
    f_sess = _session(fp32)
    ref = np.concatenate([_run(f_sess, x) for x in xs])
    f1 = _macro_f1(ref, labels, len(model.classes))
    out = {f"{run.name}.fp32.test_macro_f1": round(f1, 4), f"{run.name}.fp32.test_accuracy": round(_accuracy(ref, labels), 4)}
    pre = work / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    for name, opts in settings(onnx.load(str(pre)).graph).items():
        opts = dict(opts)
        n = opts.pop("n")
        kw = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, **opts}
        dst = work / "int8.onnx"
        quantize_static(str(pre), str(dst), _Calibration("image", [train[:n]]), **kw)
        gc.collect()  # the calibration session's threads must not share the cores with the timed sessions
        q_sess = _session(dst)
        q = np.concatenate([_run(q_sess, x) for x in xs])
        row = {"top1_agreement": float((q.argmax(1) == ref.argmax(1)).mean()), "f1_drop_points": 100 * (f1 - _macro_f1(q, labels, len(model.classes)))}
        for b in (32, 1):
            t = paired_latency_ms({"fp32": lambda x: _run(f_sess, x), "int8": lambda x, s=q_sess: _run(s, x)}, size, b, 7)
            row[f"speedup_b{b}"] = t["fp32"] / t["int8"]
        print(run.name, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        out.update({f"{run.name}.{name}.{k}": round(v, 4 if k == "top1_agreement" else 2) for k, v in row.items()})
    return out


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs one warning per 1-D weight
    import tempfile

    figures: dict = {}
    for run in map(Path, sys.argv[1:]):
        with tempfile.TemporaryDirectory() as tmp:
            figures.update(evaluate(run, Path(tmp)))
    write_results("distill_int8", figures)


if __name__ == "__main__":
    main()
