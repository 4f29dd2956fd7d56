"""Training-step throughput: vfmtune's Lightning module + Trainer vs a plain PyTorch loop, same run.

Run: python bench/loop_overhead.py
Same model (DINOv2 ViT-S/14 architecture, random init, 112 px, all layers trained), same batch
(16), same optimizer (vfmtune's AdamW param groups), same in-memory data. The two loops alternate
(plain, vfmtune, plain, vfmtune, ...) and each reports images/second over its steps after
warm-up; the ratio is the median of the per-round ratios, so slow drifts of the machine's load
cancel out. Run it on an otherwise idle machine. Target: vfmtune time / plain time <= 1.03.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import write_results
from torch.utils.data import DataLoader, TensorDataset

from vfmtune.compose import load_config, to_container, typed
from vfmtune.run import build_trainer
from vfmtune.tasks.classifier import Classifier

BATCH, STEPS, WARMUP, ROUNDS = 16, 16, 3, 9
CONFIG = to_container(
    load_config("backbone.weights=none", "backbone.img_size=112", "finetune=full", "sched=none", "optim.lr=1e-4",
                "head.feature_norm=false", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                "precision=fp32")
)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * STEPS, 3, 112, 112, generator=g)
    y = torch.randint(0, 3, (BATCH * STEPS,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(CONFIG, ["a", "b", "c"])


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t1 = time.perf_counter()


def vfmtune_images_per_second() -> float:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        config = {**CONFIG, "trainer": {**CONFIG["trainer"], "max_epochs": 1, "limit_val_batches": 0}}
        trainer = build_trainer(typed(config), Path(tmp), [timer], enable_checkpointing=False)
        trainer.fit(model(), train_dataloaders=data())
    return (STEPS - WARMUP) * BATCH / (timer.t1 - timer.t0)


def plain_images_per_second() -> float:
    net = model()
    net.train()
    optimizer = net.configure_optimizers()  # the same param groups and AdamW settings
    loss_fn = torch.nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(data()):
        if i == WARMUP:
            t0 = time.perf_counter()
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (STEPS - WARMUP) * BATCH / (time.perf_counter() - t0)


def main() -> None:
    plain, ours = [], []
    for _ in range(ROUNDS):
        plain.append(plain_images_per_second())
        ours.append(vfmtune_images_per_second())
        print(f"plain {plain[-1]:.2f} img/s   vfmtune {ours[-1]:.2f} img/s")
    p, v = statistics.median(plain), statistics.median(ours)
    ratio = statistics.median(a / b for a, b in zip(plain, ours))
    write_results(
        "loop_overhead",
        {
            "plain.images_per_second": round(p, 2),
            "vfmtune.images_per_second": round(v, 2),
            "time_ratio": round(ratio, 3),
            "plain.runs": [round(x, 2) for x in plain],
            "vfmtune.runs": [round(x, 2) for x in ours],
            "batch": BATCH, "measured_steps": STEPS - WARMUP, "img_size": 112, "model": "vit_small_patch14_dinov2 (random init)",
        },
    )


if __name__ == "__main__":
    main()
