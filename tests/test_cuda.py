"""The CUDA path: mixed-precision training, GPU embedding caches and distillation, and checkpoints that
come back to a CPU. CI has no GPU, so these run where one is (`python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_STUDENT, make_imagefolder

from vfmtune.backbones import create_backbone, data_config
from vfmtune.commands.evaluate import evaluate
from vfmtune.commands.train import train
from vfmtune.config import AugmentConfig
from vfmtune.data.transforms import build_transforms
from vfmtune.embedding_cache import EmbeddingCache
from vfmtune.loading import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = [o for o in TINY if not o.startswith("trainer.accelerator")] + ["trainer.accelerator=gpu", "trainer.devices=1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("cuda") / "images", {"cat": 24, "dog": 24, "owl": 24})


@pytest.mark.parametrize("mode", ["full", "lora", "progressive"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cuda__mixed_precision_training_then_cpu_evaluation(images: Path, tmp_path: Path, mode: str, precision: str) -> None:
    schedule = ["finetune.every=1", "finetune.step=1"] if mode == "progressive" else []  # unfreezes during the run
    run = train(overrides=[*GPU, f"data.root={images}", f"finetune={mode}", f"trainer.precision={precision}",
                           "trainer.max_epochs=3", *schedule], run_dir=tmp_path / "run")
    assert run["metrics"]["test/accuracy"] > 0.5  # three colour classes: learnable in 3 epochs
    assert run["metrics"]["train_peak_gpu_mb"] > 0
    model = load_model(run["best_checkpoint"])  # a GPU checkpoint loads on a CPU-only consumer
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    again = evaluate(overrides=[f"ckpt={run['best_checkpoint']}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                                "data.num_workers=0"], run_dir=tmp_path / "eval")
    # bf16/fp16 autocast on the GPU vs fp32 on the CPU: predictions may differ on borderline images only.
    assert abs(again["metrics"]["test/accuracy"] - run["metrics"]["test/accuracy"]) <= 0.1


def test_cuda__embedding_cache_on_gpu_matches_cpu(images: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in images.rglob("*.png"))[:20]
    backbone = create_backbone("timm/test_vit", weights="none", img_size=64)
    _, eval_tf = build_transforms(data_config(backbone, 64), AugmentConfig())
    cpu = EmbeddingCache(tmp_path / "cpu").embed(backbone, paths, eval_tf, progress=False)
    gpu = EmbeddingCache(tmp_path / "gpu").embed(backbone, paths, eval_tf, progress=False, device="cuda")
    assert gpu.device.type == "cpu" and next(backbone.parameters()).device.type == "cpu"  # stored on, and handed back to, the CPU
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_cuda__frozen_run_embeds_on_gpu_and_distils(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vfmtune.commands.distill import distill
    from vfmtune.commands.export import export

    teacher = train(overrides=[*GPU, f"data.root={images}", "trainer.precision=bf16-mixed"], run_dir=tmp_path / "teacher")
    student = distill(overrides=[*GPU, *TINY_STUDENT, f"teacher={teacher['run_dir']}", "trainer.precision=bf16-mixed",
                                 "kd.feature_weight=0.5"], run_dir=tmp_path / "student")
    assert "teacher outputs ready" in capsys.readouterr().out
    bundle = export(overrides=[f"ckpt={student['run_dir']}", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "export")
    assert bundle["metrics"]["top1_agreement"] == 1.0  # the ONNX export of a GPU-trained student, verified on the CPU
