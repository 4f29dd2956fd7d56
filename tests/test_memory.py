"""Training-memory figures in the run report (vfmtune.memory.PeakMemory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY

from vfmtune.commands.train import train


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


# Frees every other 8 MB tensor of 48 after glibc has raised its mmap threshold: the holes stay in the
# heap, resident, unless large tensors live in their own mappings (lean_host_memory).
_FRAGMENT = """
import sys, torch
from vfmtune.memory import lean_host_memory, status_mb
if sys.argv[1] == "lean":
    assert lean_host_memory()
torch.ones(2 * 2**20)  # allocated and freed at once, 8 MB: glibc's dynamic threshold rises above it
base = status_mb("VmRSS")
blocks = [torch.ones(2 * 2**20) for _ in range(48)]
del blocks[::2]
print(status_mb("VmRSS") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc: Linux")
@pytest.mark.slow
def test_lean_host_memory__freed_tensors_leave_the_resident_set() -> None:
    held = {mode: float(subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True).stdout)
            for mode in ("default", "lean")}
    # 24 live blocks = 192 MB either way; the default allocator also keeps the 24 freed ones resident.
    assert held["lean"] < 230 < 350 < held["default"], held


@pytest.mark.slow
def test_lean_host_memory__a_training_run_applies_it(imagefolder: Path, tmp_path: Path) -> None:
    """`lean_host_memory=true` in a real (tiny) run: afterwards the process returns freed tensors to the OS."""
    run = f"import sys, vfmtune; vfmtune.train(overrides=sys.argv[2:], run_dir={str(tmp_path)!r})\n" + _FRAGMENT
    overrides = [*TINY, f"data.root={imagefolder}", "finetune=full", "trainer.max_epochs=1", "lean_host_memory=true"]
    # mode "default": the fragment itself leaves the allocator alone, so only the run can have set it
    out = subprocess.run([sys.executable, "-c", run, "default", *overrides], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.splitlines()[-1]) < 230
    assert (tmp_path / "metrics.json").is_file()
