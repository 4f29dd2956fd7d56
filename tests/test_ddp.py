"""Multi-process training through the real CLI: `trainer.strategy=ddp trainer.devices=2` on CPU (gloo).

Lightning's DDP launcher re-executes the command line for rank 1, so this runs `python -m vfmtune.cli`
in a subprocess, as a user would. Every rank writes what it trains (vfmtune.adapt.audit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, make_imagefolder

ROOT = Path(__file__).resolve().parents[1]


# Every strategy: progressive with layer decay, LoRA with layer decay plus progressive unfreezing of the
# last block, the frozen head on cached embeddings (a TensorDataset split across ranks), and full
# fine-tuning with gradient checkpointing (last_blocks is full fine-tuning of fewer parameters).
@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, n_trainable_sets",
    [
        (["finetune=progressive", "finetune.schedule={0: head, 1: blocks.4-5}", "optim.layer_decay=0.75"], 2),
        (["finetune=lora", "finetune.schedule={1: blocks.5}", "optim.layer_decay=0.75"], 2),
        # validating every epoch: its DDP forward re-broadcasts the head's BatchNorm buffers from rank 0 before
        # the next epoch-start audit (each rank updates them from its own last batch until then)
        (["finetune=frozen", "trainer.check_val_every_n_epoch=1"], 1),
        (["finetune=full", "finetune.grad_checkpointing=true"], 1),
    ],
    ids=["progressive_llrd", "lora_progressive_llrd", "frozen_cached", "full_grad_checkpointing"],
)
def test_ddp_two_processes__same_frozen_set_and_weights_on_all_ranks(tmp_path: Path, strategy: list[str], n_trainable_sets: int) -> None:
    images = make_imagefolder(tmp_path / "images", {"cat": 10, "dog": 10, "owl": 10})
    run, audit = tmp_path / "run", tmp_path / "audit"
    cmd = [
        sys.executable, "-m", "vfmtune.cli", "train", *TINY, f"data.root={images}", *strategy,
        "trainer=ddp_cpu", "trainer.max_epochs=2", "early_stopping.enabled=false", "logger=none",
        f"callbacks=[{{_target_: vfmtune.adapt.audit.TrainableAudit, path: '{audit}'}}]", f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [[json.loads(line) for line in (audit / f"trainable_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 3  # 2 epoch starts + train end, on each rank
    for r0, r1 in zip(*rows):
        # Same trainable set and lrs after each unfreezing step, and the same weights: gradients of
        # late-unfrozen groups are averaged across ranks like the rest.
        assert (r0["trainable"], r0["lrs"], r0["weights"]) == (r1["trainable"], r1["lrs"], r1["weights"]), (r0, r1)
    assert len({r["n_trainable"] for r in rows[0]}) == n_trainable_sets

    # Metrics come from both ranks' halves of the split (torchmetrics syncs), not from rank 0's only.
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = sum(1 for line in (run / "splits.csv").read_text().splitlines()[1:] if line.rstrip().endswith(",test"))
    counted = sum(map(sum, metrics["test/confusion_matrix"]))
    assert n_test <= counted <= n_test + 1  # DistributedSampler pads odd splits by one sample


def _shard_rows(cache: Path) -> list[int]:
    """Rows per shard file of every embedding-cache folder under `cache`."""
    from safetensors.torch import load_file

    return sorted(len(load_file(f)["digests"]) for f in (cache / "embeddings").rglob("*.safetensors"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes__each_rank_embeds_half_of_the_cache(tmp_path: Path) -> None:
    images = make_imagefolder(tmp_path / "images", {"cat": 10, "dog": 10, "owl": 10})
    cache, run = tmp_path / "cache", tmp_path / "run"
    cmd = [sys.executable, "-m", "vfmtune.cli", "train", *TINY, f"data.root={images}", "finetune=frozen", "trainer=ddp_cpu",
           "trainer.max_epochs=2", "early_stopping.enabled=false", "logger=none", f"cache_dir={cache}", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One shard per rank, half of the 30 images each; after the barrier every rank read the whole cache.
    assert _shard_rows(cache) == [15, 15]
    assert "rank 1/2: embedded 15 of 30 new images" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert sum(map(sum, metrics["test/confusion_matrix"])) >= 1 and metrics["epochs"] == 2


@pytest.mark.slow
def test_ddp_two_nodes_one_process_each__localhost_gloo(tmp_path: Path) -> None:
    """`trainer.num_nodes=2`, one process per node, started the way a cluster starts them (the same command on
    every node, MASTER_ADDR / MASTER_PORT / NODE_RANK in the environment): here two processes on localhost."""
    images = make_imagefolder(tmp_path / "images", {"cat": 10, "dog": 10, "owl": 10})
    cache = tmp_path / "cache"
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "vfmtune.cli", "train", *TINY, f"data.root={images}", "finetune=frozen",
               "trainer.strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=2",
               "early_stopping.enabled=false", "logger=none", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / f'node{node}'}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NODE_RANK": str(node)}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "rank 0/2: embedded 15 of 30" in outs[0] and "rank 1/2: embedded 15 of 30" in outs[1]
    assert _shard_rows(cache) == [15, 15]
    assert (tmp_path / "node0" / "metrics.json").is_file()  # rank 0 reports
    assert not (tmp_path / "node1" / "metrics.json").exists()
