"""Numeric precision of the forwards vfmtune runs, resolved once per run from the `precision` setting.

`precision=auto` picks bf16 autocast where the hardware computes bf16 natively (a CPU with
AVX512_BF16 or AMX, a GPU with bf16 support) and fp32 elsewhere: on such a CPU a DINOv2-S embedding
pass is ~2.3x faster with the same probe accuracy (BENCHMARKS.md, "Speed on this CPU"). On a CPU
without native bf16 (plain AVX512 or AVX2) oneDNN emulates it, which is slower than fp32.

Outside the Trainer (embedding and teacher caches, evaluation, predict, pseudo-labels)
`Resolved.autocast()` wraps the forwards; the Trainer gets the matching Lightning string
(`bf16-mixed`, ...), unless `trainer.precision` is set explicitly, which then wins.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from typing import Any

import torch

from vfmtune.choices import ConfigError, Precision
from vfmtune.config import Config
from vfmtune.device import compute_device

LIGHTNING = {Precision.fp32: "32-true", Precision.bf16: "bf16-mixed", Precision.fp16: "16-mixed"}
DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
# Lightning's precision strings (and their aliases) -> the autocast dtype they run the forwards in.
_FROM_LIGHTNING = {"32-true": Precision.fp32, "32": Precision.fp32, "64-true": Precision.fp32, "64": Precision.fp32,
                   "bf16-mixed": Precision.bf16, "bf16-true": Precision.bf16, "bf16": Precision.bf16,
                   "16-mixed": Precision.fp16, "16-true": Precision.fp16, "16": Precision.fp16}


@dataclass(frozen=True)
class Resolved:
    """The precision a run's forwards use (never `auto`), on which device, and why."""

    precision: Precision
    device: str  # "cpu" | "cuda"
    reason: str

    @property
    def lightning(self) -> str:
        """The `lightning.Trainer(precision=...)` string of the same arithmetic."""
        return LIGHTNING[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """`torch.autocast` in this precision (a no-op for fp32): matmuls and convolutions in bf16/fp16,
        reductions and norms in fp32, as Lightning's `*-mixed` precisions do in training."""
        if self.precision == Precision.fp32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=DTYPES[self.precision])

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def choose_precision(requested: Precision, device: str, native_bf16: str | None) -> tuple[Precision, str]:
    """The precision `requested` means on `device`, and the reason; pure, so every case is testable.

    Args:
        requested: the `precision` setting.
        device: "cpu" or "cuda".
        native_bf16: what makes bf16 native on this device ("avx512_bf16", "amx", "cuda bf16", ...),
            or None when it would be emulated.

    Raises:
        ConfigError: fp16 on a CPU (fp16 autocast there is emulated and not what the setting is for).

    Example:
        >>> choose_precision(Precision.auto, "cpu", "avx512_bf16")
        (<Precision.bf16: 'bf16'>, 'auto: native bf16 on this cpu (avx512_bf16)')
    """
    if requested == Precision.auto:
        if native_bf16:
            return Precision.bf16, f"auto: native bf16 on this {device} ({native_bf16})"
        return Precision.fp32, f"auto: no native bf16 on this {device}"
    if requested == Precision.fp16 and device == "cpu":
        raise ConfigError("precision=fp16 is for GPUs; on a CPU use precision=bf16 (native with AVX512_BF16 / AMX) or fp32.")
    if requested == Precision.bf16 and not native_bf16:
        return Precision.bf16, f"set explicitly; emulated on this {device} (no native bf16), likely slower than fp32"
    return Precision(requested), "set explicitly"


def native_bf16(device: str) -> str | None:
    """What gives `device` native bf16 arithmetic, from torch's own CPU / CUDA capability checks, else None."""
    if device == "cuda":
        return "cuda bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    cpu = torch.cpu
    found = [name for name, check in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
             if getattr(cpu, check, lambda: False)()]
    if not found and platform.machine().lower() in ("aarch64", "arm64"):
        # oneDNN's bf16 check is the ISA's own on Arm (on x86 it also accepts plain AVX512, where bf16 is emulated)
        found = ["arm bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []
    return ", ".join(found) or None


def resolve_precision(config: Config) -> Resolved:
    """The run's precision on the device its non-Trainer forwards use (`vfmtune.device.compute_device`).

    With `precision=auto` and an explicit `trainer.precision`, the forwards follow the Trainer's.

    Example:
        >>> with resolve_precision(config).autocast():
        ...     features = backbone(images)
    """
    device = compute_device(config).type
    trainer = config.trainer.get("precision")
    if config.precision == Precision.auto and trainer is not None and str(trainer) in _FROM_LIGHTNING:
        return Resolved(_FROM_LIGHTNING[str(trainer)], device, f"follows trainer.precision={trainer}")
    precision, reason = choose_precision(config.precision, device, native_bf16(device))
    return Resolved(precision, device, reason)


@dataclass(frozen=True)
class Fp32Training:
    """Why a task's fit trains in fp32 whatever the run's precision: on which devices, and whether it also
    overrides an explicit `precision=` (else only `auto`)."""

    reason: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    overrides_explicit: bool = False


CACHED_HEAD = Fp32Training("the head trains on cached embeddings: no backbone forward to speed up", overrides_explicit=True)
# bench/speed.py, student_step: an EfficientNet-Lite0 training step runs 0.78x as fast under bf16 autocast as
# in fp32 on this project's CPU (avx512_bf16, no AMX): its depthwise convolutions have no fast bf16 kernel.
STUDENT_ON_CPU = Fp32Training("the student trains slower under bf16 autocast on a CPU (bench/speed.py student_step: 0.78x)",
                              devices=("cpu",))


def trainer_precision(config: Config, resolved: Resolved, fp32_training: Fp32Training | None = None) -> tuple[str, str]:
    """`(lightning precision string, reason)` for the Trainer: an explicit `trainer.precision` wins; then the
    task's `Setup.fp32_training` rule where it applies (its devices; `auto`, or any precision if it overrides
    explicit ones); otherwise training follows the run's precision."""
    trainer = config.trainer.get("precision")
    if trainer is not None:
        return str(trainer), "trainer.precision set explicitly"
    rule = fp32_training
    if rule and resolved.device in rule.devices and (rule.overrides_explicit or config.precision == Precision.auto):
        return LIGHTNING[Precision.fp32], rule.reason
    return resolved.lightning, f"precision={resolved}"
