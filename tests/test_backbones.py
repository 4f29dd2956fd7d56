"""Backbone names, weight sources (file in timm/Meta layouts, hub failure modes, none) and data config."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from vfmtune.backbones import (
    ALIASES,
    _load_hub,
    create_backbone,
    data_config,
    load_weights,
    resolve_model_name,
    weights_fingerprint,
)
from vfmtune.weights import WeightsError

TINY = "timm/test_vit"  # 0.3M params, 160 px


def _tiny_source(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(123)  # differs from create_backbone's seed 0, so a silent no-op load would show
    return timm.create_model("test_vit", num_classes=0, **kwargs).eval()


def _features(model: torch.nn.Module, size: int = 160) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize(("alias", "timm_name"), sorted(ALIASES.items()))
def test_resolve_model_name__aliases(alias: str, timm_name: str) -> None:
    assert resolve_model_name(alias) == timm_name
    assert timm_name in timm.list_models()


@pytest.mark.parametrize(("name", "expected"), [
    ("timm/test_vit", "test_vit"),
    ("timm/vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m"),
])
def test_resolve_model_name__timm_prefix(name: str, expected: str) -> None:
    assert resolve_model_name(name) == expected


def test_resolve_model_name__unknown_alias_lists_valid() -> None:
    with pytest.raises(ValueError) as info:
        resolve_model_name("dinov3_huge")
    assert all(alias in str(info.value) for alias in ALIASES)
    assert "timm/<name>" in str(info.value)


def test_resolve_model_name__bare_timm_name_suggests_prefix() -> None:
    with pytest.raises(ValueError, match="timm/vit_small_patch14_dinov2"):
        resolve_model_name("vit_small_patch14_dinov2")


def test_resolve_model_name__unknown_timm_name() -> None:
    with pytest.raises(ValueError, match="Unknown timm model 'vit_smal_patch14_dinov2'.*vit_small_patch14_dinov2"):
        resolve_model_name("timm/vit_smal_patch14_dinov2")


def test_create_backbone__none_is_deterministic_and_keeps_caller_rng() -> None:
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    a = create_backbone(TINY)
    after = torch.rand(1)
    b = create_backbone(TINY)
    assert torch.equal(after, expected_next)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.num_classes == 0 and _features(a).shape == (2, a.num_features)


@pytest.mark.parametrize("fmt", [".safetensors", ".pth", ".bin", "nested-model", "nested-state_dict"])
def test_create_backbone__file_formats_give_identical_outputs(tmp_path: Path, fmt: str) -> None:
    source = _tiny_source()
    sd = source.state_dict()
    path = tmp_path / ("ckpt.safetensors" if fmt == ".safetensors" else f"ckpt{fmt if fmt.startswith('.') else '.pt'}")
    if fmt == ".safetensors":
        safetensors.torch.save_file(sd, path)
    elif fmt.startswith("nested-"):
        torch.save({fmt.removeprefix("nested-"): sd, "epoch": 3}, path)
    else:
        torch.save(sd, path)
    loaded = create_backbone(TINY, weights="file", path=str(path))
    assert torch.equal(_features(loaded), _features(source))


def test_create_backbone__file_with_classifier_and_ddp_prefix(tmp_path: Path) -> None:
    torch.manual_seed(5)
    source = timm.create_model("test_vit", num_classes=10).eval()
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")
    loaded = create_backbone(TINY, weights="file", path=tmp_path / "ddp.pth")
    with torch.inference_mode():
        x = torch.randn(1, 3, 160, 160)
        assert torch.equal(loaded.eval()(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_create_backbone__global_pool_avg_reuses_final_norm(tmp_path: Path) -> None:
    source = _tiny_source()
    safetensors.torch.save_file(source.state_dict(), tmp_path / "tok.safetensors")
    loaded = create_backbone(TINY, weights="file", path=tmp_path / "tok.safetensors", global_pool="avg")
    assert torch.equal(loaded.fc_norm.weight, source.norm.weight)


def test_create_backbone__file_missing_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "dinov2.pth"
    with pytest.raises(WeightsError, match=str(missing)):
        create_backbone(TINY, weights="file", path=str(missing))


def test_create_backbone__file_arbitrary_pickle_refused(tmp_path: Path) -> None:
    path = tmp_path / "lightning_like.ckpt.pth"
    torch.save({"model": _tiny_source().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match=r"argparse.Namespace.*weights_only=True.*re-save") as info:
        create_backbone(TINY, weights="file", path=path)
    assert str(path) in str(info.value)


def test_create_backbone__file_for_other_architecture_lists_keys(tmp_path: Path) -> None:
    sd = _tiny_source().state_dict()
    sd.pop("blocks.0.norm1.weight")
    sd["decoder.conv.weight"] = torch.zeros(1)
    safetensors.torch.save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"missing \(1\): \['blocks.0.norm1.weight'\].*unexpected \(1\)"):
        create_backbone(TINY, weights="file", path=tmp_path / "odd.safetensors")


def test_create_backbone__file_needs_path_and_other_sources_ignore_it() -> None:
    with pytest.raises(ValueError, match="backbone.path"):
        create_backbone(TINY, weights="file")
    # A Classifier restored from its own checkpoint rebuilds with weights=none and the config's path.
    assert create_backbone(TINY, weights="none", path="/not/there.pth").num_classes == 0


def test_create_backbone__unknown_source_and_cnn_img_size() -> None:
    with pytest.raises(ValueError, match="hub.*file.*packaged.*none"):
        create_backbone(TINY, weights="imagenet")
    cnn = create_backbone("timm/resnet18", img_size=96)  # CNNs have no img_size argument: any size works
    assert _features(cnn, 96).shape == (2, 512)


@pytest.mark.slow
def test_create_backbone__meta_dinov2_layout(tmp_path: Path) -> None:
    # Meta's dinov2_vits14_pretrain.pth uses timm's key names plus a mask_token, at the 37x37 grid.
    source = timm.create_model("vit_small_patch14_dinov2", num_classes=0).eval()
    meta = {"mask_token": torch.zeros(1, 384), **source.state_dict()}
    assert meta["pos_embed"].shape == (1, 37 * 37 + 1, 384) and "blocks.0.ls1.gamma" in meta
    torch.save(meta, tmp_path / "dinov2_vits14_pretrain.pth")

    small = create_backbone("dinov2_vits14", weights="file", path=tmp_path / "dinov2_vits14_pretrain.pth", img_size=224)
    assert small.pos_embed.shape == (1, 16 * 16 + 1, 384)
    assert torch.equal(small.pos_embed[:, 0], source.pos_embed[:, 0])  # cls position is kept, grid resampled
    assert torch.isfinite(_features(small, 224)).all()

    native = create_backbone("dinov2_vits14", weights="file", path=tmp_path / "dinov2_vits14_pretrain.pth")
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        assert torch.equal(native.eval()(x), source(x))


def _small_sam(img_size: int) -> torch.nn.Module:
    # samvit_base_patch16's architecture at toy width/depth; block 1 is global, block 0 windowed.
    return timm.create_model("samvit_base_patch16", num_classes=0, img_size=img_size, embed_dim=64, depth=2,
                             num_heads=2, global_attn_indexes=[1], window_size=4, neck_chans=32).eval()


def _meta_sam_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in model.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    sd["pixel_mean"], sd["pixel_std"] = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    return sd


def test_load_weights__meta_sam_layout_at_smaller_img_size() -> None:
    torch.manual_seed(3)
    source = _small_sam(img_size=256)  # stands in for the 1024 px release: grid 16, global rel_pos 31
    meta = _meta_sam_layout(source)
    assert meta["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 32)

    target = load_weights(_small_sam(img_size=128), meta, source="sam_vit_b_01ec64.pth").eval()
    assert target.pos_embed.shape == (1, 8, 8, 64)
    assert target.blocks[1].attn.rel_pos_h.shape == (15, 32)  # global block follows the grid
    assert target.blocks[0].attn.rel_pos_h.shape == (7, 32)  # window block is size independent
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        out = target.forward_features(x)
        # timm's SAM resizes pos_embed and rel_pos on the fly for other inputs: loading must equal that.
        reference = source.forward_features(x)
    assert out.shape == (1, 32, 8, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_create_backbone__sam_vitb_file_at_224(tmp_path: Path) -> None:
    torch.manual_seed(4)
    full = timm.create_model("samvit_base_patch16", num_classes=0)  # 1024 px, like sam_vit_b_01ec64.pth
    torch.save(_meta_sam_layout(full), tmp_path / "sam_vit_b.pth")
    del full
    model = create_backbone("sam_vitb", weights="file", path=tmp_path / "sam_vit_b.pth", img_size=224)
    assert model.pos_embed.shape == (1, 14, 14, 768)
    assert model.blocks[2].attn.rel_pos_h.shape == (27, 64)
    assert _features(model, 224).shape == (2, 256)
    assert data_config(model)["input_size"] == (3, 224, 224)


def test_load_hub__adapts_like_file() -> None:
    # Offline stand-in for the download: timm's own loader takes a state dict from pretrained_cfg.
    torch.manual_seed(6)
    hub_like = timm.create_model("test_vit", num_classes=1000)  # hub checkpoints still carry the classifier
    model = timm.create_model("test_vit", num_classes=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "state_dict": hub_like.state_dict()}
    _load_hub(model, "test_vit")
    assert torch.equal(model.blocks[0].attn.qkv.weight, hub_like.blocks[0].attn.qkv.weight)


def test_create_backbone__hub_offline_env_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_backbone("dinov2_vits14", weights="hub")
    assert time.perf_counter() - start < 5
    for alternative in ("backbone.weights=packaged", "backbone.weights=file backbone.path=", "backbone.weights=none"):
        assert alternative in str(info.value)


def test_create_backbone__hub_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    try:
        create_backbone(TINY, weights="hub")
    except WeightsError as e:
        assert "backbone.weights=none" in str(e)
    elapsed = time.perf_counter() - start
    print(f"hub attempt without network took {elapsed:.3f} s")
    assert elapsed < 15  # unreachable: the 3 s check; reachable (CI with internet): a 1 MB download


def test_data_config__reports_real_img_size() -> None:
    model = create_backbone("dinov2_vits14", img_size=224)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 518, 518)  # why data_config exists
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 224, 224)
    assert set(cfg) == {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert data_config(create_backbone("timm/resnet18"), img_size=96)["input_size"] == (3, 96, 96)


def test_weights_fingerprint__file_none_hub(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(_tiny_source().state_dict(), path)
    first = weights_fingerprint(TINY, "file", path)
    assert first.startswith("file:") and len(first) == len("file:") + 64
    assert weights_fingerprint(TINY, "file", str(path)) == first
    safetensors.torch.save_file(_tiny_source(img_size=64).state_dict(), path)  # new contents, same name
    assert weights_fingerprint(TINY, "file", path) != first
    assert "random" in weights_fingerprint("sam_vitb", "none")
    assert weights_fingerprint("dinov2_vits14", "hub") == "hub:vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(WeightsError, match="not found"):
        weights_fingerprint(TINY, "file", tmp_path / "missing.pth")
