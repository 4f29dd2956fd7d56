"""Training-memory figures in the run report (vfmtune.memory.PeakMemory)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from conftest import TINY
from vfmtune.api import train


class Allocates(L.Callback):
    """Holds 256 MB during one training step, as a larger batch would."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            block = torch.ones(64 * 2**20)  # float32: 256 MB, touched so it is resident
            del block


def test_peak_memory__run_report_holds_the_training_peak(imagefolder: Path, tmp_path: Path) -> None:
    quiet = train(overrides=[*TINY, f"data.root={imagefolder}", "finetune=full", "trainer.max_epochs=1"], run_dir=tmp_path / "a")
    busy = train(overrides=[*TINY, f"data.root={imagefolder}", "finetune=full", "trainer.max_epochs=1"], run_dir=tmp_path / "b",
                 callbacks=[Allocates()])
    for m in (quiet["metrics"], busy["metrics"]):
        assert m["train_peak_rss_mb"] >= m["train_start_rss_mb"] > 0
    # The peak is reset when fit starts, so the earlier run's allocations do not leak into the later figure.
    growth = [m["train_peak_rss_mb"] - m["train_start_rss_mb"] for m in (quiet["metrics"], busy["metrics"])]
    assert growth[1] - growth[0] > 200
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["train_peak_rss_mb"] == busy["metrics"]["train_peak_rss_mb"]
