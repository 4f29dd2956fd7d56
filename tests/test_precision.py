"""`precision=auto|fp32|bf16|fp16`: resolved per machine, recorded per run, part of every cache key."""

from __future__ import annotations

import ctypes.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_imagefolder

from vfmtune.backbones import create_backbone
from vfmtune.choices import ConfigError, Precision
from vfmtune.compose import typed
from vfmtune.device import NVML_CHECK, drop_unusable_nvml_check
from vfmtune.embedding_cache import EmbeddingCache, embed_images
from vfmtune.precision import CACHED_HEAD, STUDENT_ON_CPU, Resolved, choose_precision, resolve_precision, trainer_precision


@pytest.mark.parametrize(
    "requested, device, native, expected, reason_has",
    [
        ("auto", "cpu", "avx512_bf16", "bf16", "native bf16"),
        ("auto", "cpu", "amx, avx512_bf16", "bf16", "amx"),
        ("auto", "cpu", None, "fp32", "no native bf16"),
        ("auto", "cuda", "cuda bf16", "bf16", "cuda"),
        ("auto", "cuda", None, "fp32", "no native bf16"),
        ("fp32", "cpu", "avx512_bf16", "fp32", "explicitly"),
        ("bf16", "cpu", None, "bf16", "emulated"),
        ("bf16", "cpu", "avx512_bf16", "bf16", "explicitly"),
        ("fp16", "cuda", None, "fp16", "explicitly"),
    ],
)
def test_choose_precision__table(requested: str, device: str, native: str | None, expected: str, reason_has: str) -> None:
    precision, reason = choose_precision(Precision(requested), device, native)
    assert precision == expected and reason_has in reason


def test_choose_precision__fp16_on_cpu_is_an_error() -> None:
    with pytest.raises(ConfigError, match="bf16"):
        choose_precision(Precision.fp16, "cpu", "avx512_bf16")


def test_trainer_precision__explicit_trainer_setting_wins_and_cached_heads_train_in_fp32() -> None:
    bf16 = Resolved(Precision.bf16, "cpu", "test")
    assert trainer_precision(typed({}), bf16)[0] == "bf16-mixed"
    assert trainer_precision(typed({}), bf16, CACHED_HEAD) == ("32-true", CACHED_HEAD.reason)
    assert trainer_precision(typed({"precision": "bf16"}), bf16, CACHED_HEAD)[0] == "32-true"
    # a student on the CPU: fp32 under precision=auto (bf16 measured slower), bf16 when the user asks for it
    assert trainer_precision(typed({}), bf16, STUDENT_ON_CPU) == ("32-true", STUDENT_ON_CPU.reason)
    assert trainer_precision(typed({"precision": "bf16"}), bf16, STUDENT_ON_CPU)[0] == "bf16-mixed"
    assert trainer_precision(typed({"trainer": {"precision": "32-true"}}), bf16) == ("32-true", "trainer.precision set explicitly")
    assert trainer_precision(typed({}), Resolved(Precision.fp32, "cpu", "test"))[0] == "32-true"


def test_resolve_precision__auto_follows_an_explicit_trainer_precision() -> None:
    cfg = typed({"trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}})
    resolved = resolve_precision(cfg)
    assert (resolved.precision, resolved.device, resolved.lightning) == ("bf16", "cpu", "bf16-mixed")
    assert "follows trainer.precision" in resolved.reason
    assert resolve_precision(typed({"precision": "fp32", "trainer": {"accelerator": "cpu"}})).precision == "fp32"


def test_resolved_autocast__bf16_matmul_is_bf16_and_fp32_is_untouched() -> None:
    a = torch.randn(4, 8)
    with Resolved(Precision.bf16, "cpu", "test").autocast():
        assert (a @ a.T).dtype == torch.bfloat16
    with Resolved(Precision.fp32, "cpu", "test").autocast():
        assert (a @ a.T).dtype == torch.float32


@pytest.fixture
def tiny_images(tmp_path: Path) -> list[str]:
    root = make_imagefolder(tmp_path / "img", {"cat": 6, "dog": 6})
    return sorted(str(p) for p in root.rglob("*.png"))


def test_embed_images__cache_key_differs_per_precision_and_fp32_keeps_its_old_key(tiny_images: list[str], tmp_path: Path) -> None:
    backbone = create_backbone("timm/test_vit", weights="none", img_size=64).eval()
    folders = {}
    for p in ("fp32", "bf16"):
        cfg = typed({"precision": p, "cache_dir": str(tmp_path / "cache"), "backbone": {"img_size": 64},
                     "data": {"num_workers": 0}, "trainer": {"accelerator": "cpu"}})
        embed_images(cfg, backbone, tiny_images)
        folders[p] = {f.name for f in (tmp_path / "cache" / "embeddings").iterdir()} - set().union(*folders.values())
    assert all(len(f) == 1 for f in folders.values())  # one new cache folder per precision
    # fp32 features are stored under the key they had before precision existed: old caches stay valid.
    from vfmtune.backbones import data_config
    from vfmtune.config import AugmentConfig
    from vfmtune.data.transforms import build_transforms
    from vfmtune.embedding_cache import model_key, weights_digest

    _, tf = build_transforms(data_config(backbone, 64), AugmentConfig(enabled=False))
    assert folders["fp32"] == {model_key("dinov2_vits14", weights_digest(backbone), tf)}


def test_bf16_features__close_to_fp32_on_test_vit(tiny_images: list[str], tmp_path: Path) -> None:
    from vfmtune.backbones import data_config
    from vfmtune.config import AugmentConfig
    from vfmtune.data.transforms import build_transforms

    backbone = create_backbone("timm/test_vit", weights="none", img_size=64)
    _, tf = build_transforms(data_config(backbone, 64), AugmentConfig(enabled=False))
    fp32 = EmbeddingCache(tmp_path / "fp32").embed(backbone, tiny_images, tf, progress=False)
    bf16 = EmbeddingCache(tmp_path / "bf16").embed(backbone, tiny_images, tf, progress=False,
                                                    precision=Resolved(Precision.bf16, "cpu", "test"))
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # autocast ran, stored as float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.999


@pytest.mark.parametrize("finetune, trained_in", [("full", "bf16-mixed"), ("frozen", "32-true")])
def test_cli__precision_bf16_on_cpu_trains_and_is_recorded(tmp_path: Path, finetune: str, trained_in: str) -> None:
    from vfmtune.cli import main

    images = make_imagefolder(tmp_path / "images", {"cat": 12, "dog": 12, "owl": 12})
    run = tmp_path / "run"
    main(["train", *TINY, f"data.root={images}", f"finetune={finetune}", "trainer.max_epochs=2", "precision=bf16",
          f"hydra.run.dir={run}"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["trainer_precision"] == trained_in
    assert metrics["precision_reason"] and metrics["trainer_precision_reason"]
    assert 0.0 <= metrics["test/macro_f1"] <= 1.0
    # The checkpoint holds fp32 weights whatever the autocast precision (mixed precision keeps fp32 masters).
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_nvml_cuda_check__dropped_only_where_nvml_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = torch.cuda.is_available()
    monkeypatch.setenv(NVML_CHECK, "1")  # what `import lightning` sets
    assert drop_unusable_nvml_check("libvfmtune-no-such-nvml.so.1")
    assert NVML_CHECK not in os.environ
    assert torch.cuda.is_available() == answer  # the same answer, without the failing NVML probe per call

    loadable = ctypes.util.find_library("c")  # stands in for an NVML that loads: the fork-safe check stays
    monkeypatch.setenv(NVML_CHECK, "1")
    assert not drop_unusable_nvml_check(loadable)
    assert os.environ[NVML_CHECK] == "1"
    monkeypatch.delenv(NVML_CHECK)
    assert not drop_unusable_nvml_check("libvfmtune-no-such-nvml.so.1")  # not set: nothing to undo
