"""A SAM model fine-tuned on prompts made from instance masks, as a LightningModule.

What trains is set by `finetune`: `frozen` (the default) trains the mask decoder and prompt encoder on
cached image embeddings; `lora` adds peft LoRA adapters to the image encoder (`finetune.targets=attn`:
`attn.qkv` and `attn.proj` of every attention block, the names timm's TinyViT and segment-anything's ViT
share); `full` trains everything. `finetune.freeze` / `unfreeze` patterns apply to the SAM's parameter
names (e.g. `finetune.freeze=[prompt_encoder.*]` trains the decoder alone, as MedSAM does).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from typing_extensions import override

from vfmtune.adapt.freeze import _match, keep_frozen_bn_eval
from vfmtune.adapt.lora import apply_lora
from vfmtune.choices import ConfigError, FinetuneMode, SamPrompt
from vfmtune.compose import to_container, typed
from vfmtune.config import Config, FinetuneConfig
from vfmtune.instance_metrics import InstanceMetrics
from vfmtune.optim import build_optimizer, build_schedule, weight_decay_groups
from vfmtune.sam.embeddings import SamImageTransform, sam_autocast
from vfmtune.sam.loss import SamLoss
from vfmtune.sam.models import build_sam, create_sam
from vfmtune.sam.prompts import boxes_from_masks, correction_points, initial_points, jitter_boxes
from vfmtune.tasks.base import TaskModule
from vfmtune.tasks.sam_batches import SamBatch


def adapt_sam(sam: Sam, ft: FinetuneConfig) -> None:
    """Set what trains (`finetune.mode` frozen | lora | full, then the freeze / unfreeze patterns); LoRA wraps
    the image encoder in peft adapters."""
    if ft.mode not in (FinetuneMode.frozen, FinetuneMode.lora, FinetuneMode.full):
        raise ConfigError(f"task=sam_prompt trains with finetune=frozen (decoder on cached embeddings), lora (adapters on the "
                          f"image encoder) or full; finetune.mode={ft.mode} has no meaning for SAM's encoder.")
    sam.requires_grad_(True)
    sam.image_encoder.requires_grad_(ft.mode == FinetuneMode.full)
    names = [n for n, _ in sam.named_parameters()]
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad} | _match(names, ft.unfreeze, "finetune.unfreeze")
    trainable -= _match(names, ft.freeze, "finetune.freeze")
    for name, p in sam.named_parameters():
        p.requires_grad_(name in trainable)
    if ft.mode == FinetuneMode.lora:
        sam.image_encoder = apply_lora(sam.image_encoder, ft)


class SamPrompter(TaskModule):
    """SAM trained with jittered boxes, points and correction points; scored with ground-truth boxes.

    Args:
        config: the run's config (`sam` section: model, weights, prompts, loss weights).
        classes: class names, index = class id (0 = background).
        load_weights: the configured SAM weights; False when a checkpoint's state dict replaces them.

    Example:
        >>> model = SamPrompter(typed({"task": "sam_prompt", "sam": {"model": "test_sam_tinyvit"}}), ["background", "cell"])
        >>> model.sam.image_encoder.img_size
        128
    """

    def __init__(self, config: Config | dict[str, Any], classes: Sequence[str], load_weights: bool = True) -> None:
        super().__init__()
        config = typed(config, Config)
        self.save_hyperparameters({"task": "sam_prompt", "config": to_container(config), "classes": list(classes)})
        self.config = config
        s = config.sam
        self.sam = create_sam(s.model, str(s.weights) if s.weights is not None else None, s.path) if load_weights else build_sam(s.model)
        adapt_sam(self.sam, config.finetune)
        self.transform = SamImageTransform(self.sam)
        self.resize = ResizeLongestSide(self.transform.size)
        self.loss_fn = SamLoss(s.focal_weight, s.dice_weight, s.iou_weight)
        # True when batches hold cached image embeddings [B, C, g, g] instead of images [B, 3, S, S].
        self.embeddings_input = False
        self.init_eval(InstanceMetrics(), classes)

    @property
    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.sam.image_encoder.parameters())

    @override
    def train(self, mode: bool = True) -> SamPrompter:
        super().train(mode)
        if mode and not self.encoder_trains:
            self.sam.image_encoder.eval()  # fixed features: TinyViT's BatchNorms keep their statistics
        elif mode:
            keep_frozen_bn_eval(self.sam.image_encoder)
        return self

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` (or, with `embeddings_input`, cached embeddings) -> ``[B, C, g, g]``."""
        if self.embeddings_input:
            return inputs
        with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
            return self.sam.image_encoder(inputs)

    def decode(self, embedding: torch.Tensor, points: torch.Tensor | None, labels: torch.Tensor | None,
               boxes: torch.Tensor | None, mask_input: torch.Tensor | None, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's embedding ``[1, C, g, g]`` and N prompts (encoder-input pixels) -> low-res logits
        ``[N, k, L, L]`` and predicted IoU ``[N, k]`` (k = 3 with `multimask`, else 1)."""
        pe = self.sam.prompt_encoder
        sparse, dense = pe(points=(points, labels) if points is not None else None, boxes=boxes, masks=mask_input)
        return self.sam.mask_decoder(image_embeddings=embedding, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=multimask)

    def prompted_loss(self, embedding: torch.Tensor, target: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """SAM's interactive training on one image: a first prompt per instance (jittered box or points),
        then `sam.correction_rounds` rounds that add a point from the error region and feed back the logits.

        Args:
            embedding: ``[1, C, g, g]``.
            target: ``[N, L, L]`` low-resolution instance masks in [0, 1].
            input_size: ``(h, w)`` of the image in the encoder input (the rest is padding).
        """
        s = self.config.sam
        gt = target[torch.randperm(len(target), device=target.device)[: s.prompts_per_image]]
        size = gt.shape[-1]
        scale = self.transform.size / size
        valid_h, valid_w = (max(1, round(v / scale)) for v in input_size)
        gt_bin = gt > 0.5
        faint = ~gt_bin.flatten(1).any(1)  # below half a low-res pixel everywhere: keep its strongest pixel
        gt_bin[faint] = gt[faint] >= gt[faint].amax((1, 2), keepdim=True)
        boxes_low = boxes_from_masks(gt_bin)
        kind = s.prompt if s.prompt != SamPrompt.mixed else (SamPrompt.box if torch.rand(()) < 0.5 else SamPrompt.point)
        points = labels = boxes = None
        if kind == SamPrompt.box:
            boxes = jitter_boxes(boxes_low * scale, s.box_jitter, s.max_jitter, input_size)
        else:
            points, labels = initial_points(gt_bin, boxes_low, s.points, s.negative_points)
            points = points * scale
        multimask = kind == SamPrompt.point and s.points + s.negative_points == 1  # one click is ambiguous: 3 candidates
        mask_input, total = None, embedding.new_zeros(())
        rows = torch.arange(len(gt), device=gt.device)
        for r in range(1 + s.correction_rounds):
            logits, iou = self.decode(embedding, points, labels, boxes, mask_input, multimask)
            loss, best = self.loss_fn(logits, iou, gt)
            total = total + loss
            if r == s.correction_rounds:
                break
            chosen = logits[rows, best].detach()
            predicted = chosen > 0
            predicted[:, valid_h:] = False  # padding is no error anyone could click on
            predicted[:, :, valid_w:] = False
            new, new_labels = correction_points(predicted, gt_bin)
            points = new * scale if points is None else torch.cat([points, new * scale], 1)
            labels = new_labels if labels is None else torch.cat([labels, new_labels], 1)
            mask_input, multimask = chosen[:, None].float(), False
        return total / (1 + s.correction_rounds)

    @override
    def training_step(self, batch: tuple[SamBatch, Any], batch_idx: int) -> torch.Tensor:
        x, targets = batch
        embeddings = self.embed(x.inputs)
        losses = [self.prompted_loss(embeddings[b:b + 1], t.low_res, x.input_sizes[b]) for b, t in enumerate(targets) if len(t.low_res)]
        loss = torch.stack(losses).mean() if losses else embeddings.sum() * 0  # an image without instances teaches nothing
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets), sync_dist=True)
        return loss

    @torch.no_grad()
    def masks_for_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor, original_size: tuple[int, int],
                        input_size: tuple[int, int], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks ``[N, H, W]`` bool and predicted IoU ``[N]`` for boxes in original-image pixels, chosen as
        :class:`vfmtune.sam.SamPromptPredictor` chooses them (`sam.multimask`)."""
        if len(boxes) == 0:
            return torch.zeros(0, *original_size, dtype=torch.bool, device=boxes.device), boxes.new_zeros(0)
        boxes_t = self.resize.apply_boxes_torch(boxes.float(), original_size)
        lows, ious = [], []
        for start in range(0, len(boxes_t), chunk):
            logits, iou = self.decode(embedding, None, None, boxes_t[start:start + chunk], None, self.config.sam.multimask)
            best = iou.argmax(1)
            rows = torch.arange(len(best), device=best.device)
            lows.append(logits[rows, best].float())
            ious.append(iou[rows, best].float())
        masks = self.sam.postprocess_masks(torch.cat(lows)[:, None], input_size, original_size)[:, 0] > self.sam.mask_threshold
        return masks, torch.cat(ious)

    @override
    def forward(self, batch: SamBatch) -> list[dict[str, Any]]:
        """Per image ``{"masks" [N, H, W] bool, "scores" [N]}`` for its ground-truth boxes (one prompt per instance)."""
        with sam_autocast(self.config):
            embeddings = self.embed(batch.inputs)
            out = []
            for b in range(len(batch)):
                masks, scores = self.masks_for_boxes(embeddings[b:b + 1], batch.boxes[b], batch.original_sizes[b], batch.input_sizes[b])
                out.append({"masks": masks, "scores": scores, "paired": True})
        return out

    @override
    def eval_outputs(self, batch: Sequence[Any]) -> tuple[list[dict[str, Any]], Any, None]:
        x, targets = batch
        outputs = self(x)
        for out, t in zip(outputs, targets):
            out["labels"] = t.labels  # one prompt per instance: the prompt carries its instance's class
        return outputs, targets, None

    @override
    def configure_optimizers(self) -> Any:
        o = self.config.optim
        groups = (weight_decay_groups(self.sam.prompt_encoder, o.lr, o.weight_decay)
                  + weight_decay_groups(self.sam.mask_decoder, o.lr, o.weight_decay)
                  + weight_decay_groups(self.sam.image_encoder, o.lr * o.backbone_lr_scale, o.weight_decay))
        return build_schedule(build_optimizer(groups, o), self.config.sched, self)

    def merged_sam(self) -> Sam:
        """A plain segment-anything ``Sam`` with the trained weights, LoRA merged (for auto-mask and export)."""
        sam = copy.deepcopy(self.sam)
        if callable(getattr(sam.image_encoder, "merge_and_unload", None)):
            sam.image_encoder = sam.image_encoder.merge_and_unload()
        return sam.eval()


def trainable_summary(sam: nn.Module) -> str:
    """One line per SAM part: trainable / total parameters."""
    lines = []
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        params = list(getattr(sam, part).parameters())
        train = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"  {part:<15} {train:>12,} trainable of {sum(p.numel() for p in params):>12,}")
    return "\n".join(lines)
