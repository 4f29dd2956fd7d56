"""Export machinery behind `vfmtune export`: a trained model's inference module becomes a verified bundle.

A bundle is a folder: `model.onnx` (or `model.pt` for TorchScript), `model.int8.onnx` when quantized,
and `bundle.json` with class names, input size, mean/std, the resize/crop policy, the source
checkpoint and the verification / accuracy / latency figures. Every export is compared with the
source model on real images of the data (max abs logit difference, top-1 agreement); fp32 fails
above `export.atol`, INT8 is gated on top-1 agreement and the test-accuracy drop.

The model-specific part (which module runs, at which input size) comes from the model's task
(`Task.inference`); everything here works on that plain `nn.Module`.

Example:
    >>> r = vfmtune.export(overrides=["ckpt=runs/lite0", "quantize=int8"])
    >>> from vfmtune.runtime import Predictor
    >>> Predictor(r["bundle"]).predict(["part.jpg"])
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vfmtune.config import AugmentConfig, ExportCommand, ExportFormat, Quantize
from vfmtune.data.images import load_image
from vfmtune.data.prepare import Prepared
from vfmtune.data.transforms import build_transforms
from vfmtune.io import write_json


class ExportError(ValueError):
    """The model cannot be exported, or the export does not match the source model."""


def static_same_padding(module: nn.Module, size: int) -> nn.Module:
    """`module` with each timm `Conv2dSame` replaced by `ZeroPad2d` + `Conv2d` padded for a `size` px input.

    TF-"same" convolutions (EfficientNet-Lite0 and timm's other tf_* models) compute their padding from
    the input size at run time, which ONNX records as a Shape/Ceil/Pad subgraph. onnxruntime's static
    quantizer puts that Pad between Dequantize and Quantize nodes with its pad value quantized on its own
    (EfficientNet-Lite0's INT8 top-1 agreement with fp32: 0.57; with constant padding: 0.94, BENCHMARKS.md).
    A bundle's input size is fixed, so the padding is a constant: the same function, and the quantizer's
    pre-processing folds a constant zero Pad into the Conv. Changes `module` in place (pass a copy).
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
             for name, m in module.named_modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return module
    with torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, (h, w) in sizes.items():
        conv = module.get_submodule(name)
        ph, pw = (get_same_padding(x, k, s, d) for x, k, s, d in zip((h, w), conv.kernel_size, conv.stride, conv.dilation))
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups,
                          conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        module.set_submodule(name, nn.Sequential(nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), plain))
    return module.eval()


def preprocessing_policy(transform: Callable) -> dict[str, Any]:
    """What torchvision's eval transform does, as plain values `vfmtune.runtime` re-implements in numpy."""
    policy: dict[str, Any] = {}
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        if name == "Resize":
            policy["resize"] = t.size if isinstance(t.size, int) else list(t.size)
            policy["interpolation"] = t.interpolation.value
        elif name == "CenterCrop":
            policy["crop"] = list(t.size)
        elif name == "Normalize":
            policy["mean"], policy["std"] = [float(v) for v in t.mean], [float(v) for v in t.std]
        elif name not in ("ToTensor", "MaybeToTensor"):
            raise ExportError(f"eval transform step {name} has no runtime equivalent; bundle preprocessing would differ.")
    return policy


def _batches(paths: Sequence[str], transform: Callable, size: int = 32):
    for i in range(0, len(paths), size):
        yield torch.stack([transform(load_image(p)) for p in paths[i : i + size]]).numpy()


def export_onnx(module: nn.Module, path: Path, size: int, opset: int) -> None:
    """torch.onnx (TorchScript-based exporter: fast, and fine for timm CNNs/ViTs) with a dynamic batch axis."""
    try:
        torch.onnx.export(module, (torch.randn(2, 3, size, size),), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX cannot express this model ({type(e).__name__}: {first}). Fix: try export.opset=<higher>, "
                          "or format=torchscript, or replace that op in the model.") from e


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # No busy-waiting between ops: with two sessions timed in turn on few cores, one session's spinning
    # threads would steal the cores of the other and skew the comparison.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def latency_ms(fn: Callable[[np.ndarray], Any], size: int, batch: int, repeats: int) -> float:
    """Median wall time of `fn` on a random batch, after one warm-up run."""
    return paired_latency_ms({"model": fn}, size, batch, repeats)["model"]


def paired_latency_ms(fns: dict[str, Callable[[np.ndarray], Any]], size: int, batch: int, repeats: int) -> dict[str, float]:
    """Median wall time of each `fn` on the same random batch, timed in alternation (one warm-up run each).

    Alternating rounds expose every model to the same background load, so a speed-up measured on a
    shared CPU compares like with like (timing fp32 first and INT8 minutes later once gave 0.6x-1.8x
    for one and the same INT8 model).
    """
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(x)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max abs difference of the logits and of the class probabilities, and top-1 agreement."""
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "max_abs_diff_probs": float(np.abs(_softmax(reference) - _softmax(other)).max()),
            "top1_agreement": float((reference.argmax(1) == other.argmax(1)).mean())}


def _accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def _macro_f1(logits: np.ndarray, labels: Sequence[int], num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, logits.argmax(1), labels=list(range(num_classes)), average="macro", zero_division=0))


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.feeds = iter([{name: b[i : i + 1]} for b in batches for i in range(len(b))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def conv_dominated(path: Path) -> bool:
    """Whether the ONNX graph has more Conv than MatMul/Gemm nodes (a CNN, not a transformer)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return ops.count("Conv") > ops.count("MatMul") + ops.count("Gemm")


def first_conv(path: Path) -> list[str]:
    """Name of the graph's first Conv node (ONNX nodes are stored in topological order), as a 0/1-item list."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"][:1]


def quantize_int8(src: Path, dst: Path, calibration: list[np.ndarray], mode: str = "static",
                  allow_dynamic_fallback: bool = True, keep_first_conv: bool = True) -> str:
    """Static QDQ INT8 (per-channel weights, calibrated activations; the first Conv left fp32 when
    `keep_first_conv`), or dynamic INT8 (weights only, activation ranges per batch) when asked, or when
    static fails and `allow_dynamic_fallback`. Returns the mode used."""
    import logging

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs one warning per 1-D weight on the root logger
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            return "dynamic"
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), _Calibration("image", calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=first_conv(pre) if keep_first_conv else [])
        return "static"
    except Exception as e:
        if not allow_dynamic_fallback:
            raise ExportError(f"static INT8 quantization failed ({type(e).__name__}: {e}). Fix: deploy the fp32 model.") from e
        print(f"static INT8 quantization failed ({type(e).__name__}: {e}); using dynamic quantization")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return "dynamic"
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)


def _add_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def export_bundle(module: nn.Module, dcfg: dict[str, Any], classes: Sequence[str], prepared: Prepared, config: ExportCommand,
                  out: Path) -> dict[str, Any]:
    """Export `module` (normalised images [B, 3, H, W] -> logits [B, C]) to a verified bundle in
    `export.output` (default `out/bundle`); `quantize=int8` adds an INT8 model that must pass its gate.

    Every export is compared with `module` on real images of `prepared` (its test split, else all):
    fp32 must agree within `export.atol` on class probabilities; INT8 must keep top-1 agreement and
    test accuracy.

    Returns:
        `{"bundle" (folder), "metrics" (verification, accuracy, latency figures)}`.

    Raises:
        ExportError: an op ONNX cannot express, or a mismatch beyond `export.atol` / the INT8 gates.
    """
    fmt, quant, ex = config.format, config.quantize, config.export
    bundle = Path(ex.output or out / "bundle")
    bundle.mkdir(parents=True, exist_ok=True)
    size = int(dcfg["input_size"][-1])
    _, eval_tf = build_transforms(dcfg, AugmentConfig(enabled=False))
    policy = preprocessing_policy(eval_tf)
    split = "test" if "test" in prepared.splits else "all"
    test_paths, test_labels = prepared.subset(split)
    n = ex.verify_images or len(test_paths)
    xs = list(_batches(test_paths, eval_tf))
    with torch.inference_mode():
        ref = np.concatenate([module(torch.from_numpy(x)).numpy() for x in xs])
    metrics: dict[str, Any] = {"source_checkpoint": str(config.ckpt), "format": str(fmt), "eval_split": split,
                               "n_eval_images": len(test_paths), "params": sum(p.numel() for p in module.parameters()),
                               f"{split}_accuracy_source": _accuracy(ref, test_labels)}
    repeats = ex.latency_repeats
    # ONNX metadata of the fp32 and INT8 models (read back with get_modelmeta().custom_metadata_map)
    onnx_meta = {"class_names": list(classes), "input_size": [3, size, size], "mean": policy["mean"], "std": policy["std"],
                 "preprocessing": policy}
    if fmt == ExportFormat.torchscript:
        path = bundle / "model.pt"
        with torch.inference_mode():
            traced = torch.jit.trace(module, torch.from_numpy(xs[0][:2]))
        traced.save(str(path))
        loaded = torch.jit.load(str(path)).eval()
        with torch.inference_mode():
            got = np.concatenate([loaded(torch.from_numpy(x)).numpy() for x in xs])
    else:
        path = bundle / "model.onnx"
        export_onnx(static_same_padding(copy.deepcopy(module), size), path, size, ex.opset)  # verified against `module` below
        _add_metadata(path, onnx_meta)
        session = _session(path)
        got = np.concatenate([_run(session, x) for x in xs])
    check = _compare(ref[:n], got[:n])
    metrics.update({**check, f"{split}_accuracy": _accuracy(got, test_labels),
                    f"{split}_macro_f1": _macro_f1(got, test_labels, len(classes))})
    print(f"{fmt} vs source on {min(n, len(ref))} real images: max abs diff {check['max_abs_diff_probs']:.2e} (probabilities), "
          f"{check['max_abs_diff']:.2e} (logits), top-1 agreement {check['top1_agreement']:.3f}")
    # The gate is on probabilities: they are scale-free, whereas a BN-normalised linear probe turns the
    # ~6e-6 feature differences between onnxruntime's and torch's fused ViT kernels into ~1e-4 logit noise.
    if not check["max_abs_diff_probs"] <= ex.atol:
        raise ExportError(f"The {fmt} export differs from the source model by {check['max_abs_diff_probs']:.2e} (probabilities) > "
                          f"export.atol={ex['atol']:.0e} on real images: do not deploy it. Fix: report the model; try another "
                          "export.opset or format.")
    model_file = path.name
    if fmt == ExportFormat.onnx and quant is None:
        for b in (1, 32):
            metrics[f"latency_ms_b{b}"] = latency_ms(lambda x: _run(session, x), size, b, repeats)
    if quant == Quantize.int8:
        train_paths = prepared.subset("train")[0][: ex.calibration_images]
        q_path = bundle / "model.int8.onnx"
        calibration = list(_batches(train_paths, eval_tf))
        # Dynamic INT8 is the fallback when static fails or misses the gate, for transformer-like graphs only:
        # it turns a Conv into ConvInteger, which onnxruntime's CPU kernels run several times slower than fp32
        # (9x for EfficientNet-Lite0 in bench/distill.py run 1) and which collapsed that model to chance.
        attempts = ("static",) if conv_dominated(path) else ("static", "dynamic")
        for attempt in attempts:
            mode = quantize_int8(path, q_path, calibration, attempt, allow_dynamic_fallback=len(attempts) > 1,
                                 keep_first_conv=ex.int8_keep_first_conv)
            q_session = _session(q_path)
            q = np.concatenate([_run(q_session, x) for x in xs])
            q_check = _compare(got, q)
            drop = metrics[f"{split}_accuracy"] - _accuracy(q, test_labels)
            passed = q_check["top1_agreement"] >= ex.min_top1_agreement and drop <= ex.max_accuracy_drop
            print(f"int8 ({mode}): top-1 agreement {q_check['top1_agreement']:.3f}, {split} accuracy drop {drop:+.4f}"
                  + ("" if passed else " -> fails the gate"))
            metrics[f"int8_{mode}_top1_agreement"], metrics[f"int8_{mode}_accuracy_drop"] = q_check["top1_agreement"], round(drop, 4)
            if passed or mode == "dynamic":
                break
        if not passed and len(attempts) == 1:
            print("no dynamic INT8 fallback for this convolutional model (ConvInteger is slower than fp32 on CPU)")
        _add_metadata(q_path, onnx_meta)
        metrics.update({"int8_mode": mode, "int8_max_abs_diff": q_check["max_abs_diff"], "int8_top1_agreement": q_check["top1_agreement"],
                        f"int8_{split}_accuracy": _accuracy(q, test_labels), "int8_accuracy_drop": round(drop, 4),
                        f"int8_{split}_macro_f1": _macro_f1(q, test_labels, len(classes))})
        for b in (1, 32):  # fp32 and INT8 timed in alternation: the speed-up compares like with like
            t = paired_latency_ms({"fp32": lambda x: _run(session, x), "int8": lambda x: _run(q_session, x)}, size, b, repeats)
            metrics[f"latency_ms_b{b}"], metrics[f"int8_latency_ms_b{b}"] = t["fp32"], t["int8"]
        metrics["int8_speedup_b32"] = round(metrics["latency_ms_b32"] / metrics["int8_latency_ms_b32"], 2)
        metrics["int8_gate_passed"] = passed
        print(f"int8 ({mode}) b32 speed-up x{metrics['int8_speedup_b32']}")
        if not passed:
            write_json(out / "metrics.json", metrics)
            raise ExportError(f"INT8 model fails its gate: top-1 agreement {q_check['top1_agreement']:.3f} (need >= "
                              f"{ex.min_top1_agreement}), {split} accuracy drop {drop:.4f} (allowed {ex.max_accuracy_drop}), "
                              f"tried: {', '.join(attempts)}. The fp32 model in {bundle} is verified. Fix: deploy fp32, or loosen "
                              f"export.min_top1_agreement / export.max_accuracy_drop knowingly. Figures: {out / 'metrics.json'}")
        model_file = q_path.name
    run_metrics = _source_metrics(str(config.ckpt))
    info = {"model": model_file, "fp32_model": path.name, "format": str(fmt), "class_names": list(classes), "input_size": [3, size, size],
            "mean": policy["mean"], "std": policy["std"], "preprocessing": policy,
            "source_checkpoint": str(Path(str(config.ckpt)).resolve()), "source_metrics": run_metrics, "export_metrics": metrics}
    write_json(bundle / "bundle.json", info)
    write_json(out / "metrics.json", metrics)
    print(f"bundle written to {bundle}")
    return {"bundle": str(bundle), "metrics": metrics}


def _source_metrics(ckpt: str) -> dict[str, Any]:
    """The source run's metrics.json (test figures) when `ckpt` sits in a vfmtune run directory."""
    path = Path(ckpt)
    run = path if path.is_dir() else path.parent.parent
    file = run / "metrics.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    return {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
