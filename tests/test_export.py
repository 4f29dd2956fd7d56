"""Export bundles (ONNX, TorchScript, INT8) verified on real images, and the torch-free runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vfmtune.cli import main
from vfmtune.commands.export import export
from vfmtune.exporter import ExportError, conv_dominated, export_onnx, paired_latency_ms, static_same_padding
from vfmtune.loading import load_model
from vfmtune.tasks.classify import fold_feature_norm


@pytest.fixture(scope="module")
def bundles(distill_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 bundle of the ViT teacher and INT8 bundle of the CNN student, through the CLI."""
    base = tmp_path_factory.mktemp("export")
    main(["export", f"ckpt={distill_runs['teacher']}", "format=onnx", f"hydra.run.dir={base / 'teacher'}"])
    main(["export", f"ckpt={distill_runs['student']}", "quantize=int8", "export.min_top1_agreement=0.5",
          "export.max_accuracy_drop=0.5", f"hydra.run.dir={base / 'student'}"])
    return {"teacher": base / "teacher" / "bundle", "student": base / "student" / "bundle"}


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export__bundle_verified_with_metadata_and_dynamic_batch(bundles: dict[str, Path], which: str) -> None:
    info = json.loads((bundles[which] / "bundle.json").read_text())
    m = info["export_metrics"]
    assert m["max_abs_diff"] <= 1e-4 and m["top1_agreement"] == 1.0 and m["latency_ms_b1"] > 0 and m["latency_ms_b32"] > 0
    assert info["class_names"] == ["cat", "dog", "owl"] and info["input_size"] == [3, 64, 64]
    assert set(info["preprocessing"]) >= {"resize", "crop", "interpolation", "mean", "std"} and info["source_checkpoint"]
    session = ort.InferenceSession(str(bundles[which] / info["fp32_model"]))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == ["cat", "dog", "owl"] and json.loads(meta["input_size"]) == [3, 64, 64]
    assert json.loads(meta["mean"]) == info["mean"] and json.loads(meta["std"]) == info["std"]
    assert session.run(None, {"image": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 3)  # batch is dynamic


def test_export__int8_reports_accuracy_drop_and_latency(bundles: dict[str, Path]) -> None:
    info = json.loads((bundles["student"] / "bundle.json").read_text())
    m = info["export_metrics"]
    assert info["model"] == "model.int8.onnx" and (bundles["student"] / "model.onnx").is_file()
    assert m["int8_mode"] in ("static", "dynamic") and m["int8_gate_passed"]
    for key in ("int8_accuracy_drop", "int8_top1_agreement", "int8_test_macro_f1", "int8_latency_ms_b1", "int8_speedup_b32"):
        assert key in m


def test_export__int8_keeps_first_conv_fp32(bundles: dict[str, Path]) -> None:
    import onnx

    graph = onnx.load(str(bundles["student"] / "model.int8.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert not any(producer.get(i) == "DequantizeLinear" for i in convs[0].input)  # raw pixels, fp32 weights
    assert all(producer.get(n.input[1]) == "DequantizeLinear" for n in convs[1:])  # every other conv is INT8


@pytest.mark.parametrize(("which", "tried"), [("teacher", ["static", "dynamic"]), ("student", ["static"])])
def test_export__int8_gate_refuses_unsafe_model(distill_runs: dict[str, Path], tmp_path: Path, which: str, tried: list[str]) -> None:
    """Static first; the dynamic fallback only for a transformer (a CNN's ConvInteger is slower than its fp32)."""
    with pytest.raises(ExportError, match=f"fails its gate.*tried: {', '.join(tried)}\\."):
        export(overrides=[f"ckpt={distill_runs[which]}", "quantize=int8", "export.min_top1_agreement=1.01"], run_dir=tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [mode for mode in ("static", "dynamic") if f"int8_{mode}_top1_agreement" in m] == tried
    assert m["int8_latency_ms_b32"] > 0 and m["latency_ms_b32"] > 0  # figures are reported even for a refused model


@pytest.mark.parametrize(("which", "expected"), [("teacher", False), ("student", True)])
def test_conv_dominated__cnn_not_vit(bundles: dict[str, Path], which: str, expected: bool) -> None:
    assert conv_dominated(bundles[which] / "model.onnx") is expected


@pytest.mark.parametrize("size", [32, 33])
def test_static_same_padding__same_function_and_no_runtime_pad_in_onnx(tmp_path: Path, size: int) -> None:
    """TF-"same" stride-2 convs (EfficientNet-Lite) get constant padding: same outputs, no Shape-driven Pad in the graph."""
    import copy

    import onnx
    from timm.layers.conv2d_same import Conv2dSame

    model = torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU6(), Conv2dSame(8, 8, 3, stride=2, groups=8)).eval()
    static = static_same_padding(copy.deepcopy(model), size)
    x = torch.randn(2, 3, size, size)
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    assert torch.allclose(static(x), model(x), atol=1e-6)
    export_onnx(static, tmp_path / "m.onnx", size=size, opset=18)
    assert "Shape" not in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}


def test_paired_latency__each_model_timed_in_turn() -> None:
    calls: list[str] = []
    t = paired_latency_ms({"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}, size=4, batch=2, repeats=3)
    assert set(t) == {"a", "b"} and calls == ["a", "b"] * 4  # one warm-up each, then alternating rounds


def test_export__torchscript_verified(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    r = export(overrides=[f"ckpt={distill_runs['student']}", "format=torchscript"], run_dir=tmp_path)
    assert r["metrics"]["max_abs_diff"] <= 1e-4 and (Path(r["bundle"]) / "model.pt").is_file()
    loaded = torch.jit.load(str(Path(r["bundle"]) / "model.pt"))
    assert loaded(torch.randn(5, 3, 64, 64)).shape == (5, 3)


def test_export__torchscript_of_a_vit_prints_no_tracer_warnings(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = export(overrides=[f"ckpt={distill_runs['teacher']}", "format=torchscript"], run_dir=tmp_path)
    assert r["metrics"]["max_abs_diff"] <= 1e-4
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


class _Eigen(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0, :3, :3]
        return torch.linalg.eigvalsh(m @ m.transpose(-1, -2))


def test_export__op_onnx_cannot_express__clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ONNX cannot express.*linalg_eigvalsh.*format=torchscript"):
        export_onnx(_Eigen(), tmp_path / "m.onnx", size=8, opset=18)


def test_export_onnx__vit_size_asserts_stay_off_the_console(tmp_path: Path) -> None:
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(vit, tmp_path / "m.onnx", size=vit.pretrained_cfg["input_size"][-1], opset=18)
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


@pytest.mark.parametrize(("args", "message"), [(["format=tflite"], "'tflite'.*onnx, torchscript"), (["format=torchscript", "quantize=int8"], "quantize")])
def test_export__bad_options(distill_runs: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export(overrides=[f"ckpt={distill_runs['student']}", *args], run_dir=tmp_path)


def test_fold_feature_norm__same_function() -> None:
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(6, affine=False), torch.nn.Dropout(0.0), torch.nn.Linear(6, 3))
    head.train()(torch.randn(64, 6) * 3 + 1)  # non-trivial running statistics
    head.eval()
    x = torch.randn(4, 6)
    assert torch.allclose(fold_feature_norm(head)(x), head(x), atol=1e-5)


RUNTIME_SCRIPT = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from vfmtune.runtime import Predictor
rows = Predictor(sys.argv[1]).predict(sys.argv[2:])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print(json.dumps([r["label"] for r in rows]))
"""


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_runtime__torch_blocked_matches_source_top1(bundles: dict[str, Path], distill_runs: dict[str, Path], which: str) -> None:
    from vfmtune.data.images import load_image
    from vfmtune.data.transforms import build_transforms
    from vfmtune.loading import model_task
    from vfmtune.tasks import get_task

    images = sorted(str(p) for p in distill_runs["images"].rglob("*.png"))[::6]
    out = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT, str(bundles[which]), *images], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    labels = json.loads(out.stdout.strip().splitlines()[-1])
    model = load_model(distill_runs[which])
    module, dcfg = get_task(model_task(model)).inference(model)
    _, eval_tf = build_transforms(dcfg, {"enabled": False})
    with torch.inference_mode():
        source = module(torch.stack([eval_tf(load_image(p)) for p in images])).argmax(-1).tolist()
    agree = np.mean([model.classes[s] == label for s, label in zip(source, labels)])
    assert agree >= (1.0 if which == "teacher" else 0.9)  # fp32 must agree; the student bundle runs INT8


# --- segmentation: the Segmenter teacher and the LR-ASPP student --------------------------------------

@pytest.fixture(scope="module")
def seg_bundles(seg_distill_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 bundle of the ViT segmenter and INT8 bundle of the CNN student, through the CLI."""
    base = tmp_path_factory.mktemp("seg_export")
    main(["export", f"ckpt={seg_distill_runs['teacher']}", f"hydra.run.dir={base / 'teacher'}"])
    main(["export", f"ckpt={seg_distill_runs['student']}", "quantize=int8", "export.min_pixel_agreement=0.8",
          "export.max_miou_drop=0.2", f"hydra.run.dir={base / 'student'}"])
    return {"teacher": base / "teacher" / "bundle", "student": base / "student" / "bundle"}


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_seg_export__bundle_verified_with_tiling_metadata(seg_bundles: dict[str, Path], which: str) -> None:
    info = json.loads((seg_bundles[which] / "bundle.json").read_text())
    m = info["export_metrics"]
    assert m["max_abs_diff_probs"] <= 1e-4 and m["pixel_agreement"] == 1.0 and m["test_miou"] == pytest.approx(m["test_miou_source"])
    assert m["latency_ms_b1"] > 0 and m["latency_ms_b8"] > 0
    assert info["task"] == "segment" and info["class_names"] == ["background", "disc", "square"] and info["input_size"] == [3, 64, 64]
    assert info["window"] == 48 and info["overlap"] == 0.25 and info["interpolation"] and len(info["palette"]) == 3
    session = ort.InferenceSession(str(seg_bundles[which] / info["fp32_model"]))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["task"]) == "segment" and json.loads(meta["window"]) == 48
    stride = 16 if which == "teacher" else 8  # logits at the model's own resolution: the runtime resizes them once
    assert session.run(None, {"image": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 3, 64 // stride, 64 // stride)


def test_seg_export__int8_gated_on_pixel_agreement_and_miou_drop(seg_bundles: dict[str, Path], seg_distill_runs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    m = json.loads((seg_bundles["student"] / "bundle.json").read_text())["export_metrics"]
    assert m["int8_mode"] == "static" and m["int8_gate_passed"]
    for key in ("int8_pixel_agreement", "int8_miou_drop", "int8_test_miou", "int8_latency_ms_b1", "int8_speedup_b8"):
        assert key in m, key
    with pytest.raises(ExportError, match=r"fails its gate: pixel agreement .*export\.min_pixel_agreement=1\.01.*tried: static\."):
        export(overrides=[f"ckpt={seg_distill_runs['student']}", "quantize=int8", "export.min_pixel_agreement=1.01"], run_dir=tmp_path)
    refused = json.loads((tmp_path / "metrics.json").read_text())
    assert refused["int8_gate_passed"] is False and refused["int8_latency_ms_b8"] > 0


SEG_RUNTIME_SCRIPT = """
import sys
from pathlib import Path
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from vfmtune.runtime import main, open_bundle
bundle, variant, out, images = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
if variant == "cli":
    main([bundle, *images, "--out", str(out)])
else:
    predictor = open_bundle(bundle, variant)
    for image, mask in zip(images, predictor.predict(images)):
        predictor.save(mask, out / (Path(image).stem + ".png"))
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""


@pytest.mark.parametrize(("which", "variant", "min_agreement"), [("teacher", "cli", 0.999), ("student", "fp32", 0.999),
                                                                 ("student", "cli", 0.95)], ids=["teacher", "student_fp32", "student_int8"])
def test_seg_runtime__torch_blocked_masks_match_torch_tiled(seg_bundles: dict[str, Path], seg_distill_runs: dict[str, Path],
                                                            tmp_path: Path, which: str, variant: str, min_agreement: float) -> None:
    from PIL import Image

    from vfmtune.data.images import load_image
    from vfmtune.data.paired import normalise_transform

    tiles = [np.asarray(Image.open(p)) for p in sorted((seg_distill_runs["data"] / "images").glob("*.png"))[:12]]
    mosaic = np.concatenate([np.concatenate(tiles[r * 4 : r * 4 + 4], 1) for r in range(3)], 0)  # 144x192: tiled
    (tmp_path / "in").mkdir()
    Image.fromarray(mosaic).save(tmp_path / "in" / "mosaic.png")
    Image.fromarray(mosaic[:40, :150]).save(tmp_path / "in" / "strip.png")  # tiled, the short side reflect-padded
    Image.fromarray(tiles[0]).save(tmp_path / "in" / "tile.png")  # resized whole
    images = sorted(str(p) for p in (tmp_path / "in").glob("*.png"))
    out = subprocess.run([sys.executable, "-c", SEG_RUNTIME_SCRIPT, str(seg_bundles[which]), variant, str(tmp_path / "out"), *images],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    if variant == "cli":
        assert out.stdout.splitlines()[0] == "path,mask,share_background,share_disc,share_square"
    model = load_model(seg_distill_runs[which])
    normalise = normalise_transform(model.data_cfg)
    for image in images:
        mask = Image.open(tmp_path / "out" / Path(image).name)
        assert mask.mode == "P" and mask.size == Image.open(image).size
        with torch.inference_mode():
            source = model.predict_image(normalise(load_image(image))[None])[0].argmax(0).numpy()
        assert np.mean(np.asarray(mask) == source) >= min_agreement, image
