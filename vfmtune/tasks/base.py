"""What every task provides, and the evaluation shared by every task's LightningModule.

A `Task` is one registry entry (`vfmtune.tasks.TASKS`): it builds its LightningModule and data for
`vfmtune.fit`, rebuilds a trained model from a checkpoint, says how that model is evaluated,
predicts and exports, and writes its report. Commands never test a task's name; they ask its `Task`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from vfmtune.choices import ConfigError
from vfmtune.config import AugmentConfig, Config, ExportCommand
from vfmtune.data.prepare import Prepared, prepare_data, sample_table
from vfmtune.data.transforms import build_transforms
from vfmtune.faults import fault_point
from vfmtune.metrics import MetricSpec
from vfmtune.precision import Fp32Training


@dataclass
class Setup:
    """What `vfmtune.fit` trains: the module, its data, the task's own callbacks and figures for the report.
    `fp32_training` says why this fit trains in fp32 whatever `precision` asks (None: training follows the
    run's precision): a head on cached embeddings has no backbone forward to speed up, and a CNN student
    trains slower under bf16 autocast on a CPU. `tiny_head`: the fit trains a small head on cached features, so
    an epoch costs milliseconds: it runs on one intra-op thread (`vfmtune.device.OneThread`: ops too small to
    split) and writes `last.ckpt` at most every 10 s (the file's fsyncs cost more than the epoch)."""

    model: TaskModule
    data: L.LightningDataModule
    callbacks: list[L.Callback] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    fp32_training: Fp32Training | None = None
    tiny_head: bool = False


@dataclass(frozen=True)
class ExportGate:
    """How `vfmtune export` judges an exported model, in the terms of the task's metric spec.

    Agreement is the spec's `agreement_metric` scored against the reference model's predictions as
    targets: "accuracy" against the fp32 model's classes is top-1 agreement, "pixel_accuracy" against its
    masks is pixel agreement. An INT8 model must reach `export.<min_agreement>` and lose at most
    `export.<max_drop>` of the spec's `quality` metric on the test split.

    Attributes:
        agreement: the name reported in metrics.json ("top1_agreement", "pixel_agreement").
        agreement_metric: the spec's metric that measures it.
        min_agreement: the `ExportConfig` field holding its threshold.
        quality: the spec's metric whose drop is gated ("accuracy", "miou").
        max_drop: the `ExportConfig` field holding the allowed drop.
        latency_batches: batch sizes timed (batch 1 is what an edge device runs).
    """

    agreement: str
    agreement_metric: str
    min_agreement: str
    quality: str
    max_drop: str
    latency_batches: tuple[int, ...] = (1, 32)


class Task:
    """One kind of model. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the registry key, recorded in every checkpoint as `hyper_parameters["task"]`.
        target: what a sample's target is: "class" (an index) or "mask" (a mask file).
        schema: the config class its checkpoints store and are rebuilt with.
        sections: the config sections it reads besides the shared ones (documentation and checks).
        metrics: how its outputs are scored.
        command: the verb that trains it (`vfmtune train`, or e.g. `vfmtune distill` for students).
        student: the task that `vfmtune distill` trains from a model of this task (None: not a teacher).
        export_gate: how its exports are verified and its INT8 models gated.
    """

    name: ClassVar[str]
    command: ClassVar[str] = "train"
    target: ClassVar[str] = "class"
    schema: ClassVar[type[Config]] = Config
    sections: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[MetricSpec]
    student: ClassVar[str | None] = None
    export_gate: ClassVar[ExportGate] = ExportGate("top1_agreement", "accuracy", "min_top1_agreement", "accuracy",
                                                   "max_accuracy_drop")

    def prepare(self, config: Config, out: Path) -> Prepared:
        """The dataset of `config.data`, scanned and split (the split saved to `out/splits.csv`)."""
        if config.data.synthetic:
            raise ConfigError(f"data.synthetic adds image/mask scenes to a mask task's training split (sam_prompt, segment); "
                              f"task={self.name} cannot use them.")
        return prepare_data(config, out, sample_table(config.data))

    def setup(self, config: Config, prepared: Prepared, out: Path, **context: Any) -> Setup:
        """The LightningModule and data that `fit` trains (context: e.g. the distillation teacher)."""
        raise NotImplementedError

    def after_fit(self, model: TaskModule, out: Path, prepared: Prepared) -> dict[str, Any]:
        """Anything written after training besides checkpoints (rank 0, best weights loaded): adapters,
        example predictions...; entries for the result dict."""
        return {}

    def load(self, checkpoint: dict[str, Any]) -> nn.Module:
        """The trained model from a checkpoint loaded with weights_only=True, in eval mode."""
        raise NotImplementedError

    def evaluation(self, config: Config, model: nn.Module, prepared: Prepared, split: str) -> tuple[nn.Module, DataLoader]:
        """`(module, batches)`: the module's outputs on the batches' inputs are scored by `metrics`."""
        raise NotImplementedError

    def predict(self, model: nn.Module, paths: Sequence[str], config: Config, out: Path) -> dict[str, Any]:
        """Write predictions for images into `out`; entries for the result dict."""
        raise NotImplementedError(f"task {self.name!r} has no predict")

    def inference(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """`(plain nn.Module on normalised images, its timm data config)`: what export and runtime run."""
        raise NotImplementedError(f"task {self.name!r} cannot be exported")

    def export_transform(self, data_cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
        """PIL image -> the normalised model input `[3, S, S]` that export verifies and calibrates on and
        `vfmtune.runtime` re-implements (classification: the eval resize and centre crop)."""
        return build_transforms(data_cfg, AugmentConfig(enabled=False))[1]

    def export_targets(self, prepared: Prepared, split: str, classes: Sequence[str]) -> list[torch.Tensor]:
        """The targets of a split's images, one per image, as `metrics` scores them (class indices)."""
        return [torch.tensor(y) for y in prepared.subset(split)[1]]

    def export_info(self, model: nn.Module) -> dict[str, Any]:
        """Entries of bundle.json (and the ONNX metadata) that tell `vfmtune.runtime` how to use the model."""
        return {"task": "classify"}

    def export(self, model: nn.Module | None, config: ExportCommand, out: Path) -> dict[str, Any] | None:
        """`vfmtune export` for a task with its own bundle format (SAM: encoder + decoder graphs): entries for the
        result dict. None (the default): the one-graph exporter (`vfmtune.exporter`) with the hooks above."""
        return None

    def report(self, metrics: dict[str, Any], classes: Sequence[str], out: Path, prefixes: Sequence[str]) -> None:
        """Plots into `out/plots` and the printed results table."""


class TaskModule(L.LightningModule):
    """Validation and test through a task's metric spec: per-batch updates, flat scalars logged per
    epoch, and the full results (confusion matrices included) kept in `eval_results[prefix]`.

    Subclasses call `init_eval(spec, classes)` in `__init__` and implement `eval_outputs`.
    """

    def init_eval(self, spec: MetricSpec, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.metric_spec = spec
        self.val_metrics = spec.build(self.classes)
        self.test_metrics = spec.build(self.classes)
        self.eval_results: dict[str, dict[str, Any]] = {}  # last computed metrics per prefix

    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(outputs, targets, loss or None)` of an evaluation batch."""
        raise NotImplementedError

    def _eval_step(self, batch: Sequence[torch.Tensor], prefix: str) -> None:
        outputs, targets, loss = self.eval_outputs(batch)
        if loss is not None:
            self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=len(targets), sync_dist=True)
        self.metric_spec.update(self.val_metrics if prefix == "val" else self.test_metrics, outputs, targets)

    def _eval_epoch_end(self, prefix: str) -> None:
        metrics = self.val_metrics if prefix == "val" else self.test_metrics
        flat = self.metric_spec.results(metrics.compute(), prefix, self.classes)
        metrics.reset()
        # Values are already reduced across processes by torchmetrics, hence no sync_dist here.
        for key, value in flat.items():
            if isinstance(value, (int, float)):
                self.log(key, value, prog_bar=key == f"{prefix}/{self.metric_spec.headline}")
        self.eval_results[prefix] = flat

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        fault_point("train_batch")

    @override
    def on_train_epoch_start(self) -> None:
        # Lightning never calls train() when fit starts (after validation it restores the modes it captured),
        # so the subclasses' train() rules (frozen parts in eval mode) are applied here, after the callbacks'
        # own epoch-start hooks (progressive unfreezing) have run.
        self.train()

    @override
    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    @override
    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

