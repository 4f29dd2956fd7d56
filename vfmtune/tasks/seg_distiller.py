"""Segmentation teacher -> edge student: per-pixel knowledge distillation from a vfmtune `Segmenter`.

Loss of a batch (Hinton et al. 2015, https://arxiv.org/abs/1503.02531, applied at every pixel: the
pixel-wise term of Liu et al. 2019, https://arxiv.org/abs/1903.04197):

    (1 - alpha) * L_label(student, mask) + alpha * T^2 * mean over pixels KL(p_teacher^T || p_student^T)

`L_label` is `segment.loss` over labelled pixels (`ce`: cross-entropy with 255 ignored; `ce_dice`, the
default, adds soft Dice). The KL mean runs over every pixel of every image, labelled or not, so images
without masks (`data.unlabeled`, masks all 255) add the teacher's term only.

Teacher and student see the same view of each image ("consistent teaching", Beyer et al. 2022,
https://arxiv.org/abs/2106.05237): one un-normalised [0, 1] view at the larger of their input sizes
(with its mask), resized to each model's own input and normalised its own way; both logits are
compared at the view's resolution, where the mask is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import override

from vfmtune.backbones import data_config
from vfmtune.choices import ConfigError, DenseKD
from vfmtune.compose import to_container, typed
from vfmtune.config import DistillCommand
from vfmtune.metrics import MaskMetrics
from vfmtune.optim import build_optimizer, build_schedule, weight_decay_groups
from vfmtune.seg_losses import build_seg_loss
from vfmtune.tasks.base import TaskModule
from vfmtune.tasks.distiller import resolve_student
from vfmtune.tasks.seg_student import SegStudent
from vfmtune.tasks.segmenter import Segmenter
from vfmtune.tasks.teacher import FrozenTeacher
from vfmtune.tiling import sliding_window


def resize(images: torch.Tensor, size: int | Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Images `[B, C, h, w]` resized to `size` (antialiased, as the eval transforms and `vfmtune.tiling` resize)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"), align_corners=False)


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits `[B, K, h, w]` -> `[B, K, *size]` as float32 (bilinear, as `Segmenter.logits` does)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.float()
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def pixel_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over pixels of KL(softmax(teacher / T) || softmax(student / T)) over classes, logits `[B, K, H, W]`."""
    log_p_s = F.log_softmax(student / temperature, 1)
    log_p_t = F.log_softmax(teacher / temperature, 1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(1).mean()


def channel_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over images and classes of KL between each class map's distribution over the pixels (softmax over
    H x W of logits / T): channel-wise distillation (Shu et al. 2021). Every class weighs the same however
    few pixels it covers, where the per-pixel form is dominated by the commonest class."""
    log_p_s = F.log_softmax(student.flatten(2) / temperature, -1)
    log_p_t = F.log_softmax(teacher.flatten(2) / temperature, -1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1).mean()


class SegDistiller(FrozenTeacher, TaskModule):
    """A `SegStudent` (timm CNN + LR-ASPP) trained from a frozen vfmtune `Segmenter` teacher.

    Args:
        config: the run's config (`student`, `kd`, `distill`, `segment`, `optim`, ...).
        classes: class names, index = mask value; must equal the teacher's.
        teacher: the frozen teacher; None when loading a trained student from a checkpoint.
        teacher_info: `{"img_size", "mean", "std", "interpolation"}` of the teacher (stored in the checkpoint).
        load_weights: build the student with its configured weights (False: a state dict follows).
        class_pixels: labelled pixels per class in the training split (class-weighted `segment.loss`).
        window: source pixels per model input for tiled inference (the training images' median size).

    Example:
        >>> model = SegDistiller(cfg, teacher.classes, teacher=vfmtune.load_model("runs/seg-teacher"))
        >>> model(normalised_images).shape  # [B, K, S, S]: the student only
    """

    def __init__(
        self,
        config: DistillCommand | dict[str, Any],
        classes: Sequence[str],
        teacher: Segmenter | None = None,
        teacher_info: dict[str, Any] | None = None,
        load_weights: bool = True,
        class_pixels: Sequence[int] | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        config = typed(config, DistillCommand)
        if teacher_info is None:
            if teacher is None:
                raise ValueError("SegDistiller needs a teacher or teacher_info.")
            teacher_info = {"img_size": int(teacher.size), "mean": list(teacher.data_cfg["mean"]),
                            "std": list(teacher.data_cfg["std"]), "interpolation": teacher.interpolation}
        pixels = None if class_pixels is None else [int(n) for n in class_pixels]
        self.save_hyperparameters({"task": "segment_distill", "config": to_container(config), "classes": list(classes),
                                   "teacher_info": teacher_info, "class_pixels": pixels, "window": window})
        self.config, self.teacher_info, self.window = config, teacher_info, window
        kd = config.kd
        if not 0.0 <= kd.alpha <= 1.0 or kd.temperature <= 0:
            raise ConfigError("kd.alpha must lie in [0, 1] and kd.temperature be > 0.")
        if kd.feature_weight > 0:
            raise ConfigError("kd.feature_weight distils pooled features of classifiers; a segmentation student learns "
                              "its teacher's per-pixel logits. Fix: drop kd.feature_weight.")
        weights = str(config.distill.weights) if load_weights else "none"
        self.student = SegStudent(resolve_student(config.student), len(classes), weights)
        # NHWC: depthwise convolutions train several times faster on CPU in this layout.
        self.student.to(memory_format=torch.channels_last)
        self.size = int(config.distill.img_size or teacher_info["img_size"])
        self.data_cfg = data_config(self.student.encoder, self.size)
        self.interpolation = str(self.data_cfg.get("interpolation", "bilinear"))
        # The view both models are cut from: the larger input, so neither sees an upsampled image.
        self.view_size = max(self.size, int(teacher_info["img_size"]))
        self.view_interpolation = self.interpolation if self.size >= teacher_info["img_size"] else teacher_info["interpolation"]
        for name, values in (("s_mean", self.data_cfg["mean"]), ("s_std", self.data_cfg["std"]),
                             ("t_mean", teacher_info["mean"]), ("t_std", teacher_info["std"])):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.loss_fn = build_seg_loss(config.segment, pixels)
        self.set_teacher(teacher)
        self.init_eval(MaskMetrics(), classes)

    @property
    def needs_teacher(self) -> bool:
        return self.config.kd.alpha > 0

    def low_res(self, images: torch.Tensor) -> torch.Tensor:
        """Images normalised the student's way `[B, 3, S, S]` -> logits `[B, K, S/8, S/8]` (the exported graph)."""
        return self.student(images.contiguous(memory_format=torch.channels_last))

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, S, S]` -> logits `[B, K, S, S]`."""
        return upsample(self.low_res(images), images.shape[-2:])

    def predict_image(self, image: torch.Tensor) -> torch.Tensor:
        """A normalised image `[1, 3, H, W]` at its own size -> logits `[1, K, H, W]`, tiled like `Segmenter.predict_image`."""
        window = self.config.segment.window or self.window or max(image.shape[-2:])
        return sliding_window(self.low_res, image, self.size, int(window), self.config.segment.overlap, mode=self.interpolation)

    @torch.no_grad()
    def teacher_logits(self, views: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at its own resolution `[B, K, h, w]` on [0, 1] views `[B, 3, V, V]`."""
        teacher = self.frozen_teacher()
        teacher.to(views.device)
        x = resize(views, self.teacher_info["img_size"], self.teacher_info["interpolation"])
        return teacher.low_res((x - self.t_mean) / self.t_std)

    def kd_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor | None, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of the loss and their weighted sum under "loss", for logits `[B, K, H, W]` at the
        masks' resolution `[B, H, W]` (255 = ignored / unlabelled)."""
        kd = self.config.kd
        label = self.loss_fn(s_logits, masks)
        out = {"label": label, "loss": (1 - kd.alpha) * label}
        if kd.alpha > 0 and t_logits is not None:
            kl = (channel_kd if kd.dense == DenseKD.channel else pixel_kd)(s_logits, t_logits, kd.temperature)
            out["kl"] = kl
            out["loss"] = out["loss"] + kd.alpha * kd.temperature**2 * kl
        return out

    @override
    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, masks = batch[0], batch[1]
        size = masks.shape[-2:]
        s_logits = upsample(self.low_res((resize(views, self.size, self.interpolation) - self.s_mean) / self.s_std), size)
        t_logits = None
        if self.needs_teacher:  # cached logits ride in the batch when the teacher is frozen and views fixed
            t_logits = upsample(batch[2] if len(batch) > 2 else self.teacher_logits(views), size)
        terms = self.kd_loss(s_logits, t_logits, masks)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=name == "loss", on_epoch=True, prog_bar=name == "loss",
                     batch_size=len(masks), sync_dist=True)
        return terms["loss"]

    @override
    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = upsample(self.low_res(x), y.shape[-2:])
        return logits, y, self.loss_fn(logits, y)

    @override
    def configure_optimizers(self) -> Any:
        o = self.config.optim
        return build_schedule(build_optimizer(weight_decay_groups(self.student, o.lr, o.weight_decay), o), self.config.sched, self)

