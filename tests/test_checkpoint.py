"""Checkpoints are written atomically and load with weights_only=True."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import pytest
import torch

from vfmtune.checkpoint import LastCheckpoint, load_checkpoint, resolve_checkpoint
from vfmtune.io import torch_save as atomic_torch_save


class ExplodesWhilePickled:
    """Raises after part of the checkpoint has been written, like a crash or Ctrl-C mid-save."""

    def __reduce__(self):
        raise KeyboardInterrupt("simulated interrupt during save")


def test_interrupted_save__previous_checkpoint_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    good = {"state_dict": {"w": torch.arange(1000.0)}, "hyper_parameters": {"config": {"a": 1}}}
    atomic_torch_save(good, path)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"state_dict": {"w": torch.zeros(10**6)}, "boom": ExplodesWhilePickled()}, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], good["state_dict"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_plain_torch_save_would_have_corrupted_it(tmp_path: Path) -> None:
    # The failure mode the atomic write prevents: an in-place write that dies leaves a broken file.
    path = tmp_path / "x.ckpt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(KeyboardInterrupt), open(path, "wb") as f:
        torch.save({"w": torch.zeros(10**6), "boom": ExplodesWhilePickled()}, f)
    with pytest.raises(Exception):  # noqa: B017 - torch raises one of several types for a truncated file
        torch.load(path, weights_only=True)


def test_load_checkpoint__refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"config": io.BytesIO(b"x")}}, path)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_checkpoint(path)


def test_resolve_checkpoint__run_dir_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.ckpt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "checkpoints").mkdir()
    atomic_torch_save({}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint(tmp_path).name == "last.ckpt"


class RecordedLast(LastCheckpoint):
    """LastCheckpoint that records the epochs it wrote."""

    def __init__(self, dirpath: Path, min_seconds: float) -> None:
        super().__init__(dirpath, min_seconds)
        self.epochs: list[int] = []

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.epochs.append(trainer.current_epoch)


@pytest.mark.parametrize(("min_seconds", "written"), [(0.0, [0, 1, 2, 3]), (1e9, [0, 3])])
def test_last_checkpoint__first_final_and_every_epoch_min_seconds_after_the_previous(tmp_path: Path, min_seconds: float,
                                                                                      written: list[int]) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    last = RecordedLast(tmp_path, min_seconds)
    trainer = L.Trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, callbacks=[last], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=True)
    trainer.fit(BoringModel())
    assert last.epochs == written
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3
