"""Teacher -> student knowledge distillation: a small timm CNN learns from a vfmtune classifier.

Loss (Hinton et al. 2015, https://arxiv.org/abs/1503.02531), with optional feature distillation:

    (1 - alpha) * CE(student, hard labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)
    + feature_weight * d(projector(student pooled features), teacher embedding)

Teacher and student see the same view of each image ("consistent teaching", Beyer et al. 2022,
https://arxiv.org/abs/2106.05237): batches hold one un-normalised [0, 1] view, and each model gets
its own resize and normalisation of it. Unlabelled images carry label -1: they add only the
teacher's soft targets (and features) to the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from vfmtune.backbones import create_backbone, data_config
from vfmtune.choices import ConfigError, FeatureLoss, StudentWeights
from vfmtune.compose import to_container, typed
from vfmtune.config import DistillCommand
from vfmtune.metrics import ClassMetrics
from vfmtune.optim import build_optimizer, build_schedule, weight_decay_groups
from vfmtune.tasks.base import TaskModule
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.teacher import FrozenTeacher

# Student aliases -> timm names. Any other timm model works as "timm/<name>".
STUDENTS: dict[str, str] = {
    "mobilenetv3_small_100": "mobilenetv3_small_100",
    "mobilenetv3_large_100": "mobilenetv3_large_100",
    "efficientnet_lite0": "tf_efficientnet_lite0",  # ImageNet weights packaged offline (README, "Offline assets")
    "resnet18": "resnet18",
}
UNLABELED = -1  # label of teacher-labelled images: no CE term


def resolve_student(name: str) -> str:
    """A student alias or "timm/<name>" -> the "timm/<name>" string `create_backbone` takes.

    Example:
        >>> resolve_student("efficientnet_lite0")
        'timm/tf_efficientnet_lite0'
    """
    import timm

    if name in STUDENTS:
        return f"timm/{STUDENTS[name]}"
    if name.startswith("timm/") and timm.is_model(name.removeprefix("timm/")):
        return name
    raise ConfigError(
        f"student={name!r} is not a known student. Valid: {', '.join(STUDENTS)}, or any timm model as 'timm/<name>'."
    )


def student_weights_source(name: str, weights: StudentWeights) -> StudentWeights:
    """Resolve distill.weights=auto: packaged ImageNet weights offline, else the hub if reachable, else none."""
    from vfmtune.weights import WeightsError, check_hub_reachable, packaged_weights

    if weights != StudentWeights.auto:
        return weights
    try:
        packaged_weights(resolve_student(name).removeprefix("timm/"))
        return StudentWeights.packaged
    except WeightsError:
        pass
    try:
        check_hub_reachable(timeout=2.0)
        return StudentWeights.hub
    except WeightsError:
        print(f"student {name}: no packaged weights and no hub access -> random init (distill.weights=none)")
        return StudentWeights.none


def pre_logits_dim(model: nn.Module) -> int:
    """Size of `forward_head(..., pre_logits=True)`: MobileNetV3's head conv makes it differ from num_features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class Distiller(FrozenTeacher, TaskModule):
    """A timm student trained from a frozen vfmtune `Classifier` teacher.

    Args:
        config: the run's config (`student`, `kd`, `distill`, `optim`, ...).
        classes: class names, index = label; must equal the teacher's.
        teacher: the frozen teacher; None when loading a trained student from a checkpoint.
        teacher_info: `{"dim", "img_size", "mean", "std"}` of the teacher (stored in the checkpoint).
        load_weights: build the student with its configured weights (False: a state dict follows).

    Example:
        >>> model = Distiller(cfg, ["ok", "defect"], teacher=vfmtune.load_model("runs/teacher"))
        >>> logits = model(normalised_images)  # [B, 2], the student only: this is what gets exported
    """

    def __init__(
        self,
        config: DistillCommand | dict[str, Any],
        classes: Sequence[str],
        teacher: Classifier | None = None,
        teacher_info: dict[str, Any] | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        config = typed(config, DistillCommand)
        if teacher_info is None:
            if teacher is None:
                raise ValueError("Distiller needs a teacher or teacher_info.")
            t_cfg = data_config(teacher.backbone, teacher.config.backbone.img_size)
            teacher_info = {"dim": int(teacher.backbone.num_features), "img_size": int(t_cfg["input_size"][-1]),
                            "mean": list(t_cfg["mean"]), "std": list(t_cfg["std"])}
        self.save_hyperparameters({"task": "distill", "config": to_container(config), "classes": list(classes),
                                   "teacher_info": teacher_info})
        self.config, self.teacher_info = config, teacher_info
        kd = config.kd
        if not 0.0 <= kd.alpha <= 1.0 or kd.temperature <= 0:
            raise ConfigError("kd.alpha must lie in [0, 1] and kd.temperature be > 0.")
        weights = str(config.distill.weights) if load_weights else "none"
        self.student = create_backbone(resolve_student(config.student), weights=weights)
        self.student.reset_classifier(len(classes))
        # NHWC: depthwise convolutions train several times faster on CPU in this layout.
        self.student.to(memory_format=torch.channels_last)
        self.img_size = int(config.distill.img_size or teacher_info["img_size"])
        self.data_cfg = data_config(self.student, self.img_size)
        self.register_buffer("s_mean", torch.tensor(self.data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(self.data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(teacher_info["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(teacher_info["std"]).view(1, 3, 1, 1), persistent=False)
        self.projector = nn.Linear(pre_logits_dim(self.student), teacher_info["dim"]) if kd.feature_weight > 0 else None
        self.set_teacher(teacher)
        self.init_eval(ClassMetrics(), classes)

    @property
    def needs_teacher(self) -> bool:
        return self.config.kd.alpha > 0 or self.projector is not None

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images normalised with the student's mean/std [B, 3, H, W] -> logits [B, C] (the exported graph)."""
        return self.student(images)

    def _student(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] views -> (logits [B, C], pooled pre-logit features [B, D_s])."""
        x = ((views - self.s_mean) / self.s_std).contiguous(memory_format=torch.channels_last)
        feats = self.student.forward_head(self.student.forward_features(x), pre_logits=True)
        return self.student.get_classifier()(feats), feats

    @torch.no_grad()
    def teacher_outputs(self, views: torch.Tensor, embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], embedding [B, D_t]) of the teacher on the same views, or on cached embeddings."""
        teacher = self.frozen_teacher()
        teacher.to(views.device)
        if embeddings is None:
            size = self.teacher_info["img_size"]
            x = views if views.shape[-1] == size else F.interpolate(views, size=(size, size), mode="bilinear", antialias=True)
            embeddings = teacher.backbone((x - self.t_mean) / self.t_std)
        return teacher.head(embeddings), embeddings

    def kd_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                s_feats: torch.Tensor, t_feats: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The terms of the loss and their weighted sum under "loss"."""
        kd = self.config.kd
        labelled = labels != UNLABELED
        ce = F.cross_entropy(s_logits[labelled], labels[labelled]) if labelled.any() else s_logits.sum() * 0
        out = {"ce": ce, "loss": (1 - kd.alpha) * ce}
        if kd.alpha > 0:
            T = kd.temperature
            kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean")
            out["kl"] = kl
            out["loss"] = out["loss"] + kd.alpha * T * T * kl
        if self.projector is not None and t_feats is not None:
            p = self.projector(s_feats)
            feat = (1 - F.cosine_similarity(p, t_feats, dim=-1)).mean() if kd.feature_loss == FeatureLoss.cosine else F.mse_loss(p, t_feats)
            out["feature"] = feat
            out["loss"] = out["loss"] + kd.feature_weight * feat
        return out

    @override
    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, labels = batch[0], batch[1]
        s_logits, s_feats = self._student(views)
        t_logits = t_feats = None
        if self.needs_teacher:
            t_logits, t_feats = self.teacher_outputs(views, batch[2] if len(batch) > 2 else None)
        terms = self.kd_loss(s_logits, t_logits if t_logits is not None else s_logits.detach(), labels, s_feats, t_feats)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=name == "loss", on_epoch=True, prog_bar=name == "loss", batch_size=len(labels))
        return terms["loss"]

    @override
    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, _ = self._student(batch[0])
        return logits, batch[1], F.cross_entropy(logits, batch[1])

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._student(batch[0] if isinstance(batch, (tuple, list)) else batch)[0].softmax(-1)

    @override
    def configure_optimizers(self) -> Any:
        o = self.config.optim
        groups = weight_decay_groups(self.student, o.lr, o.weight_decay)
        if self.projector is not None:
            groups += weight_decay_groups(self.projector, o.lr, o.weight_decay)
        return build_schedule(build_optimizer(groups, o), self.config.sched, self)
