"""The CUDA path on a GPU: training throughput and peak GPU memory, fp32 vs bf16-mixed, full fine-tuning
vs LoRA (r=8), with and without gradient checkpointing; plus the frozen path's GPU embedding pass.

Run on a machine with a CUDA GPU: python bench/gpu.py
Model: the DINOv2 ViT-S/14 architecture (random init: the arithmetic is the same as with the packaged
weights) at 224 px, batch 64, AdamW. Steps run in vfmtune's Trainer on in-memory tensors, so the figure
is the model's, not the image decoder's; 5 warm-up steps, then 30 timed steps (CUDA-synchronised).
"""

from __future__ import annotations

import tempfile
import time

import lightning as L
import torch
from common import write_results
from torch.utils.data import DataLoader, TensorDataset

from vfmtune.backbones import create_backbone
from vfmtune.compose import load_config, to_container
from vfmtune.run import build_trainer
from vfmtune.tasks.classifier import Classifier

BATCH, WARMUP, TIMED, PX = 64, 5, 30, 224
RUNS = {  # name -> overrides
    "full_fp32": ["finetune=full", "trainer.precision=32-true"],
    "full_bf16": ["finetune=full", "trainer.precision=bf16-mixed"],
    "full_bf16_gc": ["finetune=full", "trainer.precision=bf16-mixed", "finetune.grad_checkpointing=true"],
    "lora_r8_bf16": ["finetune=lora", "trainer.precision=bf16-mixed"],
    "lora_r8_bf16_gc": ["finetune=lora", "trainer.precision=bf16-mixed", "finetune.grad_checkpointing=true"],
    "last_4_blocks_bf16": ["finetune=last_blocks", "finetune.n_blocks=4", "trainer.precision=bf16-mixed"],
}


class Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == WARMUP + TIMED - 1:
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0


def train_step_figures(overrides: list[str]) -> dict:
    cfg = to_container(load_config("backbone.weights=none", f"backbone.img_size={PX}", "sched=none", "trainer.accelerator=gpu",
                                   "trainer.devices=1", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                                   "trainer.limit_val_batches=0", *overrides))
    n = BATCH * (WARMUP + TIMED)
    data = DataLoader(TensorDataset(torch.randn(n, 3, PX, PX), torch.randint(0, 3, (n,))), batch_size=BATCH, pin_memory=True)
    torch.manual_seed(0)
    model = Classifier(cfg, ["a", "b", "c"])
    timer = Timer()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        build_trainer(cfg, tmp, [timer], enable_checkpointing=False).fit(model, train_dataloaders=data)
    return {"images_per_second": round(BATCH * TIMED / timer.seconds, 1),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


@torch.inference_mode()
def embedding_figures() -> dict:
    """Images/s of the frozen backbone's embedding pass (what `vfmtune embed` and the cache run)."""
    backbone = create_backbone("dinov2_vits14", weights="none", img_size=PX).cuda().eval()
    x = torch.randn(256, 3, PX, PX, device="cuda")
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            backbone(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                backbone(x)
            torch.cuda.synchronize()
        out[f"embed_{name}.images_per_second"] = round(2560 / (time.perf_counter() - t0), 1)
    return out


def main() -> None:
    assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA GPU"
    figures: dict = {"gpu": torch.cuda.get_device_name(), "batch": BATCH, "img_size": PX, "timed_steps": TIMED,
                     "model": "vit_small_patch14_dinov2 (random init)"}
    for name, overrides in RUNS.items():
        for k, v in train_step_figures(overrides).items():
            figures[f"{name}.{k}"] = v
        print(name, {k: v for k, v in figures.items() if k.startswith(name + ".")}, flush=True)
    figures.update(embedding_figures())
    figures["bf16_speedup_vs_fp32"] = round(figures["full_bf16.images_per_second"] / figures["full_fp32.images_per_second"], 2)
    for lora, full in (("lora_r8_bf16", "full_bf16"), ("lora_r8_bf16_gc", "full_bf16"), ("lora_r8_bf16_gc", "full_bf16_gc")):
        figures[f"memory_ratio/{lora}_vs_{full}"] = round(figures[f"{lora}.peak_gpu_memory_mb"] / figures[f"{full}.peak_gpu_memory_mb"], 3)
    write_results("gpu", figures)


if __name__ == "__main__":
    main()
