"""SAM models: registry, tiny random-init builds, the TinyViT key mapping and clear family errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.sam import SAM_MODELS, build_sam, create_sam
from vfmtune.sam.models import MinMaxSam, detect_sam_family, load_sam_state_dict
from vfmtune.sam.tinyvit import TinyViTEncoder, tinyvit_keys_from_official, tinyvit_keys_to_official
from vfmtune.weights import WeightsError


@pytest.mark.parametrize("name", ["test_sam_tinyvit", "test_sam_vit"])
def test_build_sam__tiny_models_embed_to_the_prompt_grid(name: str) -> None:
    sam = build_sam(name)
    size = sam.image_encoder.img_size
    with torch.no_grad():
        embedding = sam.image_encoder(torch.zeros(2, 3, size, size))
    assert tuple(embedding.shape) == (2, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    assert sum(p.numel() for p in sam.parameters()) < 500_000  # tiny on purpose: tests stay fast


@pytest.mark.parametrize(("img_size", "stem_stride"), [(1024, 4), (256, 1)])
def test_tinyvit_encoder__mobile_sam_and_lite_medsam_reach_64x64(img_size: int, stem_stride: int) -> None:
    # MobileSAM: 1024 / 4 (stem) / 2 / 2 / 1 (last stage kept) = 64; LiteMedSAM: 256 / 1 / 2 / 2 / 1 = 64.
    encoder = TinyViTEncoder(img_size, stem_stride=stem_stride)
    assert encoder.embed_size == 64
    assert encoder.trunk.stages[-1].downsample.conv2.conv.stride == (1, 1)
    assert encoder.trunk.patch_embed.conv1.conv.kernel_size == ((3, 3) if stem_stride == 4 else (1, 1))
    assert not any(k.startswith("trunk.head") for k in encoder.state_dict())


def test_tinyvit_keys__official_layout_round_trips() -> None:
    ours = build_sam("test_sam_tinyvit").state_dict()
    official = tinyvit_keys_to_official(ours)
    # The names MobileSAM's own code uses: Conv2d_BN "c", downsampling at the end of the previous stage.
    assert "image_encoder.patch_embed.seq.0.c.weight" in official
    assert "image_encoder.layers.0.downsample.conv1.c.weight" in official
    assert "image_encoder.layers.1.blocks.0.local_conv.c.weight" in official
    assert not any(".trunk." in k for k in official)
    back = tinyvit_keys_from_official(official)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)


def test_tinyvit_keys__mobile_sam_imagenet_head_is_dropped() -> None:
    official = tinyvit_keys_to_official(build_sam("test_sam_tinyvit").state_dict())
    official |= {"image_encoder.norm_head.weight": torch.ones(64), "image_encoder.head.weight": torch.ones(10, 64)}
    kept = tinyvit_keys_from_official(official)
    assert not any(k.startswith(("image_encoder.norm_head", "image_encoder.head")) for k in kept)
    assert len(kept) == len(official) - 2


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_create_sam__file_in_official_layout_loads_strictly(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    trained = build_sam("test_sam_tinyvit")
    state = {k: v.contiguous() for k, v in tinyvit_keys_to_official(trained.state_dict()).items()}
    path = tmp_path / f"tiny{suffix}"
    torch.save(state, path) if suffix == ".pth" else safetensors.torch.save_file(state, path)
    loaded = create_sam("test_sam_tinyvit", weights="file", path=path)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(x), trained.image_encoder(x), rtol=0, atol=0)


def test_create_sam__vit_file_in_meta_layout_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_sam("test_sam_vit")  # segment-anything's ImageEncoderViT: Meta's key layout as is
    torch.save({"model": trained.state_dict()}, tmp_path / "vit.pth")  # a training-style wrapper is unwrapped
    loaded = create_sam("test_sam_vit", weights="file", path=tmp_path / "vit.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(x), trained.image_encoder(x), rtol=0, atol=0)


def test_create_sam__resolves_weights_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline, sam_vit_h must fail in seconds without first allocating 632M random parameters.
    monkeypatch.setattr("vfmtune.sam.models.build_sam", lambda name: pytest.fail("built before the weights"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsError, match="Cannot reach 127.0.0.1:9"):
        create_sam("sam_vit_h")


def test_create_sam__unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mobile_sam.*lite_medsam.*sam_vit_b"):
        create_sam("sam_vit_xl")


def test_create_sam__unknown_source_and_missing_path_are_clear() -> None:
    with pytest.raises(ValueError, match="packaged, hub, file, none"):
        create_sam("test_sam_tinyvit", weights="torchhub")  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="weights=file needs path="):
        create_sam("test_sam_tinyvit", weights="file")
    with pytest.raises(WeightsError, match="No packaged weights for sam_vit_b.*mobile_sam"):
        create_sam("sam_vit_b", weights="packaged")
    with pytest.raises(WeightsError, match="No hub weights for mobile_sam.*weights=packaged"):
        create_sam("mobile_sam", weights="hub")


def _official_mobile_like(stem_kernel: int) -> dict[str, torch.Tensor]:
    """A MobileSAM-sized official-layout state dict (random values) with a 3x3 or 1x1 stem."""
    state = tinyvit_keys_to_official(build_sam("mobile_sam").state_dict())
    for key in ("image_encoder.patch_embed.seq.0.c.weight", "image_encoder.patch_embed.seq.2.c.weight"):
        out_ch, in_ch = state[key].shape[:2]
        state[key] = torch.zeros(out_ch, in_ch, stem_kernel, stem_kernel)
    return state


def test_load__lite_medsam_checkpoint_as_mobile_sam_names_both() -> None:
    lite_like = _official_mobile_like(stem_kernel=1)
    assert detect_sam_family(lite_like) == "lite_medsam"
    with pytest.raises(WeightsError, match=r"lite_medsam weights, but the model is mobile_sam.*3x3 stride-2"):
        load_sam_state_dict(build_sam("mobile_sam"), lite_like, name="mobile_sam", origin="lite.pth")


def test_load__mobile_sam_checkpoint_as_lite_medsam_names_both() -> None:
    with pytest.raises(WeightsError, match=r"mobile_sam weights, but the model is lite_medsam.*1x1 stem"):
        load_sam_state_dict(build_sam("lite_medsam"), _official_mobile_like(stem_kernel=3), name="lite_medsam")


def test_load__vit_checkpoint_into_tinyvit_model_is_refused() -> None:
    vit_state = build_sam("test_sam_vit").state_dict()
    with pytest.raises(WeightsError, match=r"does not fit test_sam_tinyvit.*ViT SAM 32 wide.*missing"):
        load_sam_state_dict(build_sam("test_sam_tinyvit"), vit_state, name="test_sam_tinyvit")


def test_minmax_sam__scales_each_image_to_unit_range_then_pads() -> None:
    sam = build_sam("lite_medsam")
    assert isinstance(sam, MinMaxSam)
    image = torch.tensor([[[10, 20], [30, 110]]], dtype=torch.uint8).expand(3, 2, 2)[None]  # uint8 must not wrap
    out = sam.preprocess(image)
    assert out.shape == (1, 3, 256, 256)
    torch.testing.assert_close(out[0, 0, :2, :2], torch.tensor([[0.0, 0.1], [0.2, 1.0]]))
    assert out[..., 2:, :].abs().sum() == 0 and out[..., 2:].abs().sum() == 0


def test_registry__defaults_are_consistent() -> None:
    assert {n for n, s in SAM_MODELS.items() if s.weights == "packaged"} == {"mobile_sam", "lite_medsam"}
    assert {n for n, s in SAM_MODELS.items() if s.weights == "hub"} == {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
