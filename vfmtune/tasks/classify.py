"""The classification task: image -> class, with a frozen-feature fast path through the embedding cache.

A frozen backbone's features never change, so `setup` embeds every image once (`embed_images`) and
the head trains on cached vectors; `evaluation` does the same for a frozen model or a frozen-backbone
fold ensemble. Anything that trains the backbone (or unfreezes it later) sees images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from vfmtune.adapt.freeze import is_frozen, param_table
from vfmtune.adapt.head_init import init_head_from
from vfmtune.adapt.lora import load_adapter, read_adapter_meta, save_adapter
from vfmtune.adapt.progressive import progressive_callback
from vfmtune.adapt.routed_norm import RoutedBatchNorm
from vfmtune.backbones import data_config
from vfmtune.checkpoint import FROZEN_WEIGHTS
from vfmtune.choices import AdaptMethod, ConfigError, FinetuneMode, ResampleMethod
from vfmtune.compose import to_container, typed
from vfmtune.config import AugmentConfig, Config
from vfmtune.data.datamodule import ImageDataset, SplitData
from vfmtune.data.prepare import Prepared, list_images, train_class_counts, training_only_images
from vfmtune.data.transforms import build_transforms
from vfmtune.device import Shard
from vfmtune.embedding_cache import embed_images
from vfmtune.inference import eval_loader, run_inference, write_class_predictions
from vfmtune.metrics import ClassMetrics
from vfmtune.precision import CACHED_HEAD
from vfmtune.report import classification_report
from vfmtune.sampling import build_sampler, check_imbalance_options, resample_embeddings
from vfmtune.tasks.base import Setup, Task, TaskModule
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.ensemble import Ensemble


def uses_cache(config: Config, model: Classifier) -> bool:
    """Whether training runs on cached embeddings: a backbone that unfreezes later must see images."""
    return config.finetune.cache_embeddings and is_frozen(model.backbone) and not model.progressive


def class_inputs(config: Config, model: nn.Module, prepared: Prepared, splits: Sequence[str], cached: bool,
                 shard: Shard | None = None) -> dict[str, Dataset]:
    """Per split: cached embeddings of `model.backbone` (`cached`; `shard`: this rank's share of the cache
    pass), or images with train/eval transforms."""
    if cached:
        paths, _ = prepared.subset("all")
        by_path = dict(zip(paths, embed_images(config, model.backbone, paths, shard=shard)))
        out: dict[str, Dataset] = {}
        for split in splits:
            p, y = prepared.subset(split)
            feats = torch.stack([by_path[x] for x in p]) if p else torch.empty(0, model.backbone.num_features)
            out[split] = TensorDataset(feats, torch.tensor(y, dtype=torch.long))
        return out
    train_tf, eval_tf = build_transforms(data_config(model.backbone, config.backbone.img_size), config.data.augment)
    return {split: ImageDataset(*prepared.subset(split), train_tf if split == "train" else eval_tf) for split in splits}


def target_images(config: Config, model: Classifier, prepared: Prepared, cached: bool) -> Dataset:
    """The unlabelled target images (`data.target`) that CORAL / DANN align with, augmented like the
    training images; refused when a validation or test image is among them."""
    method = config.adapt.method
    if not config.data.target:
        raise ConfigError(f"adapt.method={method} aligns features with unlabelled target images: set data.target=DIR.")
    if cached or not any(p.requires_grad for p in model.backbone.parameters()):
        raise ConfigError(f"adapt.method={method} moves the backbone's features; a frozen backbone has none to move. "
                          "Fix: finetune=lora, last_blocks or full.")
    paths = target_pool(config, prepared)
    print(f"{len(paths)} unlabelled target images for adapt.method={method}")
    train_tf, _ = build_transforms(data_config(model.backbone, config.backbone.img_size), config.data.augment)
    return ImageDataset(paths, [-1] * len(paths), train_tf)


def target_pool(config: Config, prepared: Prepared) -> list[str]:
    """`data.target`'s images, refused when one is also a validation, test or `data.target_test` image."""
    held = [p for s in ("val", "test") for p in prepared.subset(s)[0]]
    if config.data.target_test:
        held += list_images(config.data.target_test)
    return training_only_images(str(config.data.target), held, config.data, "data.target",
                                "Target images adapt the model; scoring it on them would flatter it.")


def class_probabilities(model: nn.Module, paths: Sequence[str], config: Config) -> torch.Tensor:
    """Class probabilities `[N, C]` of a classifier on images: a frozen backbone's embeddings come
    from the cache (computed once across self-training rounds), other models run on the images."""
    if isinstance(model, Classifier) and uses_cache(model.config, model) and model.config.finetune.mode == FinetuneMode.frozen:
        feats = embed_images(dataclasses.replace(config, backbone=model.config.backbone), model.backbone, paths)
        with torch.inference_mode():
            return model.head.eval()(feats).softmax(-1)
    return run_inference(model, ImageDataset(paths, [0] * len(paths), eval_transform(model)), config).softmax(-1)


def eval_transform(model: nn.Module) -> Any:
    """The eval transform of a classifier (or the first member of an ensemble) at its trained input size."""
    first = model.members[0] if isinstance(model, Ensemble) else model
    _, tf = build_transforms(data_config(first.backbone, first.config.backbone.img_size), AugmentConfig(enabled=False))
    return tf


def load_adapter_run(folder: str | Path, backbone_overrides: dict[str, Any] | None = None) -> Classifier:
    """A classifier rebuilt from a LoRA adapter folder: its base backbone (configured weights, or with
    `backbone_overrides`), adapter and head. Another base backbone is a ConfigError.

    Example:
        >>> model = load_adapter_run("runs/train/lora/adapter")
    """
    meta = read_adapter_meta(folder)
    saved = {**meta["config"], "backbone": {**meta["config"]["backbone"], **(backbone_overrides or {})}}
    config = typed(saved, Config, strict=False)
    # Built without adapters (mode frozen); peft then injects and loads the saved ones.
    plain = typed({**saved, "finetune": {**saved["finetune"], "mode": "frozen"}}, Config, strict=False)
    model = Classifier(plain, meta["classes"])
    model.backbone = load_adapter(model.backbone, model.head, folder)
    model.config = config
    return model.eval()


class ClassifyTask(Task):
    """Backbone + head -> class; cross-entropy family losses, imbalance remedies, LoRA adapters."""

    name = "classify"
    target = "class"
    schema = Config
    sections = ("head", "loss", "resample")
    metrics = ClassMetrics()
    student = "distill"

    def setup(self, config: Config, prepared: Prepared, out: Path, **context: Any) -> Setup:
        counts = train_class_counts(prepared)
        classes = prepared.table.classes
        model = Classifier(config, classes, class_counts=counts)
        if config.finetune.head_from and not config.ckpt:  # a resumed run restores its own head
            print(f"Head initialised from {init_head_from(model, config.finetune.head_from)} (LP-FT)")
        unfreezing = progressive_callback(config, model)  # validates the schedule before any training
        cached = check_imbalance_options(config, uses_cache(config, model), counts, classes)
        print(param_table(model.backbone, model.head))
        model.embeddings_input = cached

        def build(shard: Shard) -> tuple[dict[str, Dataset], Sampler | None]:
            # Called on every process once Lightning has started them: a DDP run shares the cache pass.
            datasets = class_inputs(config, model, prepared, prepared.present, cached, shard)
            if config.resample.method != ResampleMethod.none:
                x, y = datasets["train"].tensors
                datasets["train"] = TensorDataset(*resample_embeddings(x, y, config.resample, classes, config.seed))
            if config.adapt.method in (AdaptMethod.coral, AdaptMethod.dann):
                datasets["target"] = target_images(config, model, prepared, cached)
            train_labels = datasets["train"].tensors[1].tolist() if cached else prepared.labels("train")
            return datasets, build_sampler(config.data.sampler, train_labels, config.seed)

        data = SplitData(build, batch_size=config.data.batch_size, num_workers=0 if cached else config.data.num_workers,
                         whole_epochs=cached)
        return Setup(model, data, callbacks=[unfreezing] if unfreezing else [], fp32_training=CACHED_HEAD if cached else None,
                     tiny_head=cached)  # a BatchNorm + linear head: ~10x faster unsplit (BENCHMARKS.md)

    def after_fit(self, model: TaskModule, out: Path, prepared: Prepared) -> dict[str, Any]:
        if model.config.finetune.mode != FinetuneMode.lora:
            return {}
        # The best weights are loaded by validate/test in fit; ship them as a small adapter.
        folder = save_adapter(model.backbone, model.head, {"classes": model.classes, "config": to_container(model.config)},
                              out / "adapter")
        print(f"LoRA adapter (peft format) + head: {folder}")
        return {"adapter": str(folder)}

    def load(self, checkpoint: dict[str, Any]) -> Classifier:
        hp = checkpoint["hyper_parameters"]
        # A checkpoint of a cached-embedding fit that stopped early names its frozen backbone by digest:
        # its weights come from the config (checked against the digest).
        incomplete = FROZEN_WEIGHTS in checkpoint
        model = Classifier(typed(hp["config"], Config, strict=False), hp["classes"], load_weights=incomplete,
                           class_counts=hp.get("class_counts"))
        model.on_load_checkpoint(checkpoint)
        domains = hp.get("adapted", {}).get("domains")
        if domains:  # `vfmtune adapt adapt.keep_source=true`: the feature norm keeps one statistics row per domain
            model.head[0] = RoutedBatchNorm(len(domains), model.head[0].num_features, model.head[0].eps)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    def evaluation(self, config: Config, model: nn.Module, prepared: Prepared, split: str) -> tuple[nn.Module, DataLoader]:
        if isinstance(model, Ensemble):
            cached = model.head is not None and config.finetune.cache_embeddings
        else:
            cached = uses_cache(model.config, model) and model.config.finetune.mode == FinetuneMode.frozen
        if cached:
            return model.head, eval_loader(class_inputs(config, model, prepared, [split], cached=True)[split], config)
        return model, eval_loader(ImageDataset(*prepared.subset(split), eval_transform(model)), config)

    def predict(self, model: nn.Module, paths: Sequence[str], config: Config, out: Path) -> dict[str, Any]:
        return self.write_predictions(model, ImageDataset(paths, [0] * len(paths), eval_transform(model)), config, out)

    @staticmethod
    def write_predictions(model: nn.Module, images: Dataset, config: Config, out: Path) -> dict[str, Any]:
        """`predictions.csv`: path, predicted class and every class's probability."""
        probs = run_inference(model, images, config).softmax(-1)
        path = out / "predictions.csv"
        write_class_predictions(path, images.paths, probs, model.classes)
        print(f"{len(images.paths)} predictions written to {path}")
        return {"predictions": str(path)}

    def inference(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        cfg = data_config(model.backbone, model.config.backbone.img_size)
        return nn.Sequential(model.backbone, fold_feature_norm(model.head)).eval(), cfg

    def report(self, metrics: dict[str, Any], classes: Sequence[str], out: Path, prefixes: Sequence[str]) -> None:
        classification_report(metrics, classes, out, prefixes)


def fold_feature_norm(head: nn.Sequential) -> nn.Sequential:
    """Fold the head's leading eval-mode BatchNorm1d into the first Linear: the same function, one op fewer,
    and the ONNX exporter cannot place a BatchNorm after a ViT's token pooling (unknown channel size)."""
    layers = list(head)
    if not layers or not isinstance(layers[0], nn.BatchNorm1d):
        return head
    bn, rest = layers[0], layers[1:]
    i = next(j for j, m in enumerate(rest) if isinstance(m, nn.Linear))
    lin = rest[i]
    scale = (bn.running_var + bn.eps).rsqrt() * (bn.weight if bn.affine else 1.0)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    fused = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        fused.weight.copy_(lin.weight * scale)
        fused.bias.copy_(lin.bias + lin.weight @ shift)
    rest[i] = fused
    return nn.Sequential(*rest).eval()

