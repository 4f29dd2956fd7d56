"""Speed on this CPU: fp32 against the fast path vfmtune picks (`precision=auto`: bf16 autocast on a CPU with
native bf16), side by side, alternating in one process so machine load hits both alike.

Run: python bench/speed.py [--cases embed_224 embed_448 teacher lora_step full_step student_step cache_pass] [--threads N]
     python bench/speed.py --cases threads channels_last compile onnx --results speed_extras   # the other candidates

Every case times whole batches (batch 16, random inputs unless named) in `--rounds` rounds; each round runs every
variant once, in alternation, after one untimed warm-up block per variant. Reported: median images/s per variant
and the median over rounds of the per-round ratio (variant time / baseline time, inverted: > 1 is faster).
Training steps are forward + backward + AdamW step; the bf16 variant runs forward and loss under
`torch.autocast("cpu", torch.bfloat16)` and backward outside it, which is what Lightning's `bf16-mixed` does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import textile_subset_manifest, write_results

from vfmtune.backbones import create_backbone, data_config
from vfmtune.choices import Precision
from vfmtune.compose import typed
from vfmtune.precision import Resolved, resolve_precision
from vfmtune.tasks.classifier import Classifier

BATCH = 16
BF16 = Resolved(Precision.bf16, "cpu", "bench")
FP32 = Resolved(Precision.fp32, "cpu", "bench")


def timed(step: Callable[[], object], steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `steps` calls."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0, time.process_time() - c0


def compare(variants: dict[str, Callable[[], object]], images_per_call: int, rounds: int, steps: int) -> dict[str, float]:
    """Alternating rounds; the first variant is the baseline. Returns images/s and speed-up figures: wall clock
    (what a user waits), and per CPU-second of this process (less sensitive to other processes on a shared
    machine: time spent descheduled does not count; time spent spinning in OpenMP waits does)."""
    for step in variants.values():  # warm-up: oneDNN primitive caches, allocator, lazy init
        timed(step, 1)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            times[name].append(timed(step, steps))
    base = next(iter(variants))
    out: dict[str, float] = {}
    for name, t in times.items():
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        out[f"{name}.images_per_s"] = round(images_per_call * steps / statistics.median(wall), 2)
        out[f"{name}.images_per_cpu_s"] = round(images_per_call * steps / statistics.median(cpu), 2)
        if name != base:
            ratios = [b[0] / v[0] for b, v in zip(times[base], t)]
            out[f"{name}.speedup_vs_{base}"] = round(statistics.median(ratios), 3)
            out[f"{name}.speedup_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            out[f"{name}.cpu_speedup_vs_{base}"] = round(statistics.median([b[1] / v[1] for b, v in zip(times[base], t)]), 3)
    out["images_per_round_per_variant"] = images_per_call * steps
    return out


def dinov2(size: int) -> torch.nn.Module:
    return create_backbone("dinov2_vits14", weights="packaged", img_size=size).eval()


def forward(model: torch.nn.Module, x: torch.Tensor, precision: Resolved) -> Callable[[], object]:
    def step() -> object:
        with torch.inference_mode(), precision.autocast():
            return model(x)
    return step


def case_embed(size: int, rounds: int, steps: int) -> dict[str, float]:
    model, x = dinov2(size), torch.randn(BATCH, 3, size, size)
    return compare({"fp32": forward(model, x, FP32), "bf16": forward(model, x, BF16)}, BATCH, rounds, steps)


def case_teacher(rounds: int, steps: int) -> dict[str, float]:
    """A distillation teacher on the student's 160 px views: resize to 224, normalise, DINOv2-S + linear head."""
    teacher = Classifier(typed({"backbone": {"img_size": 224}}), ["a", "b", "c"]).eval()
    views = torch.rand(BATCH, 3, 160, 160)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def run(precision: Resolved) -> Callable[[], object]:
        def step() -> object:
            with torch.inference_mode(), precision.autocast():
                x = F.interpolate(views, size=(224, 224), mode="bilinear", antialias=True)
                return teacher((x - mean) / std)
        return step
    return compare({"fp32": run(FP32), "bf16": run(BF16)}, BATCH, rounds, steps)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Resolved) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> object:
        with precision.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def case_finetune(mode: str, rounds: int, steps: int) -> dict[str, float]:
    """One DINOv2-S classifier per variant (so optimizer states stay apart), 224 px, batch 16."""
    x, y = torch.randn(BATCH, 3, 224, 224), torch.randint(0, 3, (BATCH,))
    extra = {"rank": 8, "targets": "attn"} if mode == "lora" else {}

    def model() -> torch.nn.Module:
        m = Classifier(typed({"finetune": {"mode": mode, **extra}, "backbone": {"img_size": 224}}), ["a", "b", "c"])
        return m.train()
    out = compare({"fp32": train_step(model(), x, y, FP32), "bf16": train_step(model(), x, y, BF16)}, BATCH, rounds, steps)
    return {**out, "trainable_params": sum(p.numel() for p in model().parameters() if p.requires_grad)}


def student(channels_last: bool) -> torch.nn.Module:
    m = create_backbone("timm/tf_efficientnet_lite0", weights="packaged")
    m.reset_classifier(3)
    return m.to(memory_format=torch.channels_last).train() if channels_last else m.train()


def case_student(rounds: int, steps: int) -> dict[str, float]:
    """EfficientNet-Lite0 at 160 px, batch 16, channels-last (as vfmtune.tasks.distiller trains it)."""
    x, y = torch.rand(BATCH, 3, 160, 160).contiguous(memory_format=torch.channels_last), torch.randint(0, 3, (BATCH,))
    return compare({"fp32": train_step(student(True), x, y, FP32), "bf16": train_step(student(True), x, y, BF16)},
                   BATCH, rounds, steps)


def case_channels_last(rounds: int, steps: int) -> dict[str, float]:
    """The student step in NCHW (timm's default) against channels-last, fp32 and bf16."""
    x, y = torch.rand(BATCH, 3, 160, 160), torch.randint(0, 3, (BATCH,))
    xl = x.contiguous(memory_format=torch.channels_last)
    return compare({"nchw_fp32": train_step(student(False), x, y, FP32), "nhwc_fp32": train_step(student(True), xl, y, FP32),
                    "nchw_bf16": train_step(student(False), x, y, BF16), "nhwc_bf16": train_step(student(True), xl, y, BF16)},
                   BATCH, rounds, steps)


def case_threads(rounds: int, steps: int) -> dict[str, float]:
    """The 224 px bf16 embedding forward with 1 and with all intra-op threads."""
    model, x = dinov2(224), torch.randn(BATCH, 3, 224, 224)
    n = torch.get_num_threads()

    def with_threads(k: int) -> Callable[[], object]:
        def step() -> object:
            torch.set_num_threads(k)
            try:
                return forward(model, x, BF16)()
            finally:
                torch.set_num_threads(n)
        return step
    return {**compare({f"threads_{n}": with_threads(n), "threads_1": with_threads(1)}, BATCH, rounds, steps), "threads_default": n}


def case_compile(rounds: int, steps: int) -> dict[str, float]:
    """torch.compile (inductor) of the 224 px embedding forward, eager vs compiled, fp32 and bf16, after warm-up."""
    model, x = dinov2(224), torch.randn(BATCH, 3, 224, 224)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    for p in (FP32, BF16):
        forward(compiled, x, p)()  # compile both graphs before timing
    compile_s = time.perf_counter() - t0
    out = compare({"eager_fp32": forward(model, x, FP32), "compiled_fp32": forward(compiled, x, FP32),
                   "eager_bf16": forward(model, x, BF16), "compiled_bf16": forward(compiled, x, BF16)}, BATCH, rounds, steps)
    return {**out, "compile_seconds_both": round(compile_s, 1)}


def case_onnx(rounds: int, steps: int, tmp: Path) -> dict[str, float]:
    """onnxruntime for the frozen 224 px embedding pass: fp32 and dynamic INT8 (VNNI) against torch fp32 / bf16."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, x = dinov2(224), torch.randn(BATCH, 3, 224, 224)
    fp32_path, int8_path = tmp / "dinov2.onnx", tmp / "dinov2_int8.onnx"
    torch.onnx.export(model, (x,), str(fp32_path), input_names=["x"], output_names=["f"], dynamo=False, opset_version=17)
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in
                (("ort_fp32", fp32_path), ("ort_int8", int8_path))}
    xn = x.numpy()
    ref = forward(model, x, FP32)()
    agreement = {f"{k}.cosine_vs_torch_fp32": round(float(F.cosine_similarity(torch.from_numpy(s.run(None, {"x": xn})[0]), ref).min()), 5)
                 for k, s in sessions.items()}
    out = compare({"torch_fp32": forward(model, x, FP32), "torch_bf16": forward(model, x, BF16),
                   **{k: (lambda s=s: s.run(None, {"x": xn})) for k, s in sessions.items()}}, BATCH, rounds, steps)
    return {**out, **agreement}


def case_cache_pass(rounds: int, tmp: Path, n_images: int = 64) -> dict[str, float]:
    """The real cache pass (`EmbeddingCache.embed`: PNG decode, resize, normalise, forward) of textile images at
    224 px into a fresh cache folder each time: fp32 vs bf16, and bf16 with 2 loader workers (decode overlap)."""
    import csv

    from vfmtune.config import AugmentConfig
    from vfmtune.data.transforms import build_transforms
    from vfmtune.embedding_cache import EmbeddingCache

    per_class = {"nominal": n_images // 2, "local": n_images // 4, "global": n_images // 4}
    with open(textile_subset_manifest(tmp / "subset.csv", per_class), newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    model = dinov2(224)
    _, tf = build_transforms(data_config(model, 224), AugmentConfig(enabled=False))
    counter = iter(range(10**6))

    def run(precision: Resolved, workers: int) -> Callable[[], object]:
        def step() -> object:
            cache = EmbeddingCache(tmp / f"cache{next(counter)}")
            return cache.embed(model, paths, tf, batch_size=BATCH, num_workers=workers, progress=False, precision=precision)
        return step
    out = compare({"fp32": run(FP32, 0), "bf16": run(BF16, 0), "bf16_workers2": run(BF16, 2)}, len(paths), rounds, 1)
    return out


CASES = ("embed_224", "embed_448", "teacher", "lora_step", "full_step", "student_step", "cache_pass")
EXTRAS = ("channels_last", "threads", "compile", "onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=[*CASES, *EXTRAS])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="batches per timed block")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, all cores)")
    parser.add_argument("--results", default="speed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = resolve_precision(typed({"trainer": {"accelerator": "cpu"}}))
    figures: dict = {"precision_auto": str(auto.precision), "precision_auto_reason": auto.reason, "batch": BATCH,
                     "rounds": args.rounds, "steps_per_block": args.steps}
    r, s = args.rounds, args.steps
    with tempfile.TemporaryDirectory() as tmp:
        run = {"embed_224": lambda: case_embed(224, r, s), "embed_448": lambda: case_embed(448, r, max(1, s // 2)),
               "teacher": lambda: case_teacher(r, s), "lora_step": lambda: case_finetune("lora", r, s),
               "full_step": lambda: case_finetune("full", r, s), "student_step": lambda: case_student(r, 2 * s),
               "cache_pass": lambda: case_cache_pass(r, Path(tmp)), "channels_last": lambda: case_channels_last(r, 2 * s),
               "threads": lambda: case_threads(r, s), "compile": lambda: case_compile(r, s),
               "onnx": lambda: case_onnx(r, s, Path(tmp))}
        for name in args.cases:
            t0 = time.perf_counter()
            result = run[name]()
            figures.update({f"{name}.{k}": v for k, v in result.items()})
            figures[f"{name}.bench_seconds"] = round(time.perf_counter() - t0, 1)
            print(name, {k: v for k, v in result.items() if "speedup" in k or "images_per" in k}, flush=True)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
