"""Export machinery behind `vfmtune export`: a trained model's inference module becomes a verified bundle.

A bundle is a folder: `model.onnx` (or `model.pt` for TorchScript), `model.int8.onnx` when quantized,
and `bundle.json` with the task, class names, input size, mean/std, the preprocessing policy, what
the task's runtime needs (a segmenter's tiling window, overlap and palette), the source checkpoint
and the verification / quality / latency figures. Every export is compared with the source model on
real images of the data (max abs difference, agreement); fp32 fails above `export.atol`, INT8 is
gated on agreement with fp32 and on the drop of the task's quality metric.

What differs between tasks comes from the model's task (`vfmtune.tasks.base.Task`): the module that
runs (`inference`), its input transform, the targets and gate (`export_gate`: top-1 agreement and
accuracy drop for classifiers, pixel agreement and mIoU drop for segmenters, both scored with the
task's metric spec) and the bundle's task entries (`export_info`). Everything here is task-agnostic.

Example:
    >>> r = vfmtune.export(overrides=["ckpt=runs/lite0", "quantize=int8"])
    >>> from vfmtune.runtime import open_bundle
    >>> open_bundle(r["bundle"]).predict(["part.jpg"])
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmtune.choices import ExportFormat, Quantize
from vfmtune.config import ExportCommand
from vfmtune.data.images import load_image
from vfmtune.data.prepare import Prepared
from vfmtune.io import write_json
from vfmtune.metrics import MetricSpec

if TYPE_CHECKING:
    from vfmtune.tasks.base import ExportGate, Task


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
        elif name not in ("ToTensor", "MaybeToTensor", "ToImage", "ToDtype"):  # to float in [0, 1]
            raise ExportError(f"eval transform step {name} has no runtime equivalent; bundle preprocessing would differ.")
    return policy


def _batches(paths: Sequence[str], transform: Callable, size: int = 32) -> Iterator[np.ndarray]:
    for i in range(0, len(paths), size):
        yield torch.stack([transform(load_image(p)) for p in paths[i : i + size]]).numpy()


class _Images:
    """Preprocessed batches `[B, 3, S, S]` of image files, decoded again on every pass: a test split at
    segmentation sizes (448 px: 2.4 MB per image) need not fit in memory."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __iter__(self) -> Iterator[np.ndarray]:
        return _batches(self.paths, self.transform)


@contextlib.contextmanager
def fixed_size_tracing() -> Iterator[None]:
    """Trace for export without TracerWarnings: shape checks (timm's input-size asserts, TinyViT's padding, SAM's
    scale constants) become constants for the exported size, as intended, and every export is verified against
    torch on real images afterwards, so the warnings would only be noise in the user's console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_onnx(module: nn.Module, path: Path, size: int, opset: int) -> None:
    """torch.onnx (TorchScript-based exporter: fast, and fine for timm CNNs/ViTs) with a dynamic batch axis."""
    try:
        with fixed_size_tracing():
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


def _predictions(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A model's predictions in the shape of a task's target: the class per image, or per pixel of the mask
    (logits `[K, h, w]` resized to the mask first, as the metric spec scores them)."""
    if logits.ndim == 3 and logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits[None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[0]
    return logits.argmax(0)


class _Scores:
    """A task's metric spec fed one batch of outputs at a time (targets may differ in size, e.g. masks)."""

    def __init__(self, spec: MetricSpec, classes: Sequence[str]) -> None:
        self.spec, self.classes, self.metrics = spec, list(classes), spec.build(classes)

    def update(self, outputs: np.ndarray, targets: Sequence[torch.Tensor]) -> None:
        out = torch.from_numpy(outputs)
        if all(t.shape == targets[0].shape for t in targets):
            self.spec.update(self.metrics, out, torch.stack(list(targets)).long())
        else:
            for o, t in zip(out, targets):
                self.spec.update(self.metrics, o[None], t[None].long())

    def results(self) -> dict[str, float]:
        """The spec's scalar metrics, without a split prefix."""
        flat = self.spec.results(self.metrics.compute(), "export", self.classes)
        return {k.removeprefix("export/"): v for k, v in flat.items() if isinstance(v, float)}


def compare_models(reference: Callable[[np.ndarray], np.ndarray], other: Callable[[np.ndarray], np.ndarray],
                   batches: Iterable[np.ndarray], targets: Sequence[torch.Tensor], spec: MetricSpec, classes: Sequence[str],
                   gate: ExportGate, verify: int) -> dict[str, Any]:
    """Both models on the same real images, streamed (a split's logit maps need not fit in memory).

    Returns:
        `max_abs_diff` (logits) and `max_abs_diff_probs` over the first `verify` images; `gate.agreement`:
        the spec's `gate.agreement_metric` of `other` scored against `reference`'s predictions; and the
        spec's scalar metrics of each model against `targets` under "reference" and "other".
    """
    ref_scores, other_scores, agreement = _Scores(spec, classes), _Scores(spec, classes), _Scores(spec, classes)
    diff = diff_probs = 0.0
    seen = 0
    for x in batches:
        y = targets[seen : seen + len(x)]
        r, o = reference(x), other(x)
        k = max(0, min(len(x), verify - seen))
        if k:
            diff = max(diff, float(np.abs(r[:k] - o[:k]).max()))
            diff_probs = max(diff_probs, float(np.abs(_softmax(r[:k]) - _softmax(o[:k])).max()))
        ref_scores.update(r, y)
        other_scores.update(o, y)
        agreement.update(o, [_predictions(torch.from_numpy(ri), t) for ri, t in zip(r, y)])
        seen += len(x)
    return {"max_abs_diff": diff, "max_abs_diff_probs": diff_probs, gate.agreement: agreement.results()[gate.agreement_metric],
            "reference": ref_scores.results(), "other": other_scores.results()}


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


def export_bundle(task: Task, model: nn.Module, prepared: Prepared, config: ExportCommand, out: Path) -> dict[str, Any]:
    """Export a trained model's inference module (`task.inference`: normalised images `[B, 3, S, S]` ->
    logits) to a verified bundle in `export.output` (default `out/bundle`); `quantize=int8` adds an INT8
    model that must pass the task's gate (`task.export_gate`).

    Every export is compared with the source module on real images of `prepared` (its test split, else
    all), preprocessed by `task.export_transform`: fp32 must agree within `export.atol` on probabilities
    (per class, or per class and pixel); INT8 must keep the gate's agreement with fp32 and lose at most its
    allowed drop of the quality metric, both scored with the task's metric spec against `task.export_targets`.

    Returns:
        `{"bundle" (folder), "metrics" (verification, quality, latency figures)}`.

    Raises:
        ExportError: an op ONNX cannot express, or a mismatch beyond `export.atol` / the INT8 gate.
    """
    module, dcfg = task.inference(model)
    classes, gate, spec = list(model.classes), task.export_gate, task.metrics
    fmt, quant, ex = config.format, config.quantize, config.export
    bundle = Path(ex.output or out / "bundle")
    bundle.mkdir(parents=True, exist_ok=True)
    size = int(dcfg["input_size"][-1])
    transform = task.export_transform(dcfg)
    policy = preprocessing_policy(transform)
    split = "test" if "test" in prepared.splits else "all"
    test_paths, _ = prepared.subset(split)
    targets = task.export_targets(prepared, split, classes)
    verify = ex.verify_images or len(test_paths)
    xs = _Images(test_paths, transform)

    def source(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    quality = f"{split}_{gate.quality}"
    metrics: dict[str, Any] = {"source_checkpoint": str(config.ckpt), "format": str(fmt), "eval_split": split,
                               "n_eval_images": len(test_paths), "params": sum(p.numel() for p in module.parameters())}
    info = task.export_info(model)
    # ONNX metadata of the fp32 and INT8 models (read back with get_modelmeta().custom_metadata_map)
    onnx_meta = {"class_names": classes, "input_size": [3, size, size], "mean": policy["mean"], "std": policy["std"],
                 "preprocessing": policy, **info}
    if fmt == ExportFormat.torchscript:
        path = bundle / "model.pt"
        with torch.inference_mode(), fixed_size_tracing():
            traced = torch.jit.trace(module, torch.from_numpy(next(iter(xs))[:2]))
        traced.save(str(path))
        loaded = torch.jit.load(str(path)).eval()

        def exported(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return loaded(torch.from_numpy(x)).float().numpy()
    else:
        path = bundle / "model.onnx"
        export_onnx(static_same_padding(copy.deepcopy(module), size), path, size, ex.opset)  # verified against `module` below
        _add_metadata(path, onnx_meta)
        session = _session(path)

        def exported(x: np.ndarray) -> np.ndarray:
            return _run(session, x)
    check = compare_models(source, exported, xs, targets, spec, classes, gate, verify)
    metrics.update({"max_abs_diff": check["max_abs_diff"], "max_abs_diff_probs": check["max_abs_diff_probs"],
                    gate.agreement: check[gate.agreement], f"{quality}_source": check["reference"][gate.quality],
                    **{f"{split}_{k}": check["other"][k] for k in dict.fromkeys((gate.quality, spec.headline))}})
    print(f"{fmt} vs source on {min(verify, len(test_paths))} real images: max abs diff {check['max_abs_diff_probs']:.2e} "
          f"(probabilities), {check['max_abs_diff']:.2e} (logits), {gate.agreement.replace('_', ' ')} {check[gate.agreement]:.4f}")
    # The gate is on probabilities: they are scale-free, whereas a BN-normalised linear probe turns the
    # ~6e-6 feature differences between onnxruntime's and torch's fused ViT kernels into ~1e-4 logit noise.
    if not check["max_abs_diff_probs"] <= ex.atol:
        raise ExportError(f"The {fmt} export differs from the source model by {check['max_abs_diff_probs']:.2e} (probabilities) > "
                          f"export.atol={ex.atol:.0e} on real images: do not deploy it. Fix: report the model; try another "
                          "export.opset or format.")
    model_file = path.name
    batches = gate.latency_batches
    if fmt == ExportFormat.onnx and quant is None:
        for b in batches:
            metrics[f"latency_ms_b{b}"] = latency_ms(exported, size, b, ex.latency_repeats)
    if quant == Quantize.int8:
        q_path, passed, tried = _quantize_gated(path, prepared, transform, exported, xs, targets, task, classes, ex, split, metrics)
        q_session = _session(q_path)
        for b in batches:  # fp32 and INT8 timed in alternation: the speed-up compares like with like
            t = paired_latency_ms({"fp32": exported, "int8": lambda x: _run(q_session, x)}, size, b, ex.latency_repeats)
            metrics[f"latency_ms_b{b}"], metrics[f"int8_latency_ms_b{b}"] = t["fp32"], t["int8"]
        largest = batches[-1]
        metrics[f"int8_speedup_b{largest}"] = round(metrics[f"latency_ms_b{largest}"] / metrics[f"int8_latency_ms_b{largest}"], 2)
        metrics["int8_gate_passed"] = passed
        print(f"int8 ({metrics['int8_mode']}) b{largest} speed-up x{metrics[f'int8_speedup_b{largest}']}")
        if not passed:
            write_json(out / "metrics.json", metrics)
            raise ExportError(f"INT8 model fails its gate: {gate.agreement.replace('_', ' ')} {metrics[f'int8_{gate.agreement}']:.4f} "
                              f"(need >= export.{gate.min_agreement}={getattr(ex, gate.min_agreement)}), {split} {gate.quality} drop "
                              f"{metrics[f'int8_{gate.quality}_drop']:.4f} (allowed export.{gate.max_drop}={getattr(ex, gate.max_drop)}), "
                              f"tried: {', '.join(tried)}. The fp32 model in {bundle} is verified. Fix: deploy fp32, or loosen "
                              f"export.{gate.min_agreement} / export.{gate.max_drop} knowingly. Figures: {out / 'metrics.json'}")
        _add_metadata(q_path, onnx_meta)
        model_file = q_path.name
    bundle_info = {"model": model_file, "fp32_model": path.name, "format": str(fmt), "class_names": classes,
                   "input_size": [3, size, size], "mean": policy["mean"], "std": policy["std"], "preprocessing": policy, **info,
                   "source_checkpoint": str(Path(str(config.ckpt)).resolve()), "source_metrics": _source_metrics(str(config.ckpt)),
                   "export_metrics": metrics}
    write_json(bundle / "bundle.json", bundle_info)
    write_json(out / "metrics.json", metrics)
    print(f"bundle written to {bundle}")
    return {"bundle": str(bundle), "metrics": metrics}


def _quantize_gated(path: Path, prepared: Prepared, transform: Callable, fp32: Callable[[np.ndarray], np.ndarray],
                    xs: Iterable[np.ndarray], targets: Sequence[torch.Tensor], task: Task, classes: Sequence[str], ex: Any,
                    split: str, metrics: dict[str, Any]) -> tuple[Path, bool, tuple[str, ...]]:
    """INT8 next to the fp32 model, judged against it by the task's gate; figures go into `metrics`.

    Returns:
        `(INT8 model path, whether it passed, the modes tried)`.
    """
    gate = task.export_gate
    q_path = path.with_name("model.int8.onnx")
    calibration = list(_batches(prepared.subset("train")[0][: ex.calibration_images], transform))
    # Dynamic INT8 is the fallback when static fails or misses the gate, for transformer-like graphs only:
    # it turns a Conv into ConvInteger, which onnxruntime's CPU kernels run several times slower than fp32
    # (9x for EfficientNet-Lite0 in bench/distill.py run 1) and which collapsed that model to chance.
    attempts = ("static",) if conv_dominated(path) else ("static", "dynamic")
    min_agreement, max_drop = getattr(ex, gate.min_agreement), getattr(ex, gate.max_drop)
    for attempt in attempts:
        mode = quantize_int8(path, q_path, calibration, attempt, allow_dynamic_fallback=len(attempts) > 1,
                             keep_first_conv=ex.int8_keep_first_conv)
        check = compare_models(fp32, functools.partial(_run, _session(q_path)), xs, targets, task.metrics, classes, gate, len(targets))
        agreement = check[gate.agreement]
        drop = check["reference"][gate.quality] - check["other"][gate.quality]
        passed = agreement >= min_agreement and drop <= max_drop
        print(f"int8 ({mode}): {gate.agreement.replace('_', ' ')} {agreement:.4f}, {split} {gate.quality} drop {drop:+.4f}"
              + ("" if passed else " -> fails the gate"))
        metrics[f"int8_{mode}_{gate.agreement}"], metrics[f"int8_{mode}_{gate.quality}_drop"] = agreement, round(drop, 4)
        if passed or mode == "dynamic":
            break
    if not passed and len(attempts) == 1:
        print("no dynamic INT8 fallback for this convolutional model (ConvInteger is slower than fp32 on CPU)")
    metrics.update({"int8_mode": mode, "int8_max_abs_diff": check["max_abs_diff"], f"int8_{gate.agreement}": agreement,
                    **{f"int8_{split}_{k}": check["other"][k] for k in dict.fromkeys((gate.quality, task.metrics.headline))},
                    f"int8_{gate.quality}_drop": round(drop, 4)})
    return q_path, passed, attempts


def _source_metrics(ckpt: str) -> dict[str, Any]:
    """The source run's metrics.json (test figures) when `ckpt` sits in a vfmtune run directory."""
    path = Path(ckpt)
    run = path if path.is_dir() else path.parent.parent
    file = run / "metrics.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    return {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
