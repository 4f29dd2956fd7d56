"""`vfmtune adapt ckpt=RUN data.target=DIR adapt.method=adabn|tent`: a trained model adapted to a new
camera or site with its unlabelled images, scored on the source test split and (`data.target_test`)
on labelled target images, before and after, side by side."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfmtune.adapt.domain import adapt_batchnorm, tent
from vfmtune.adapt.routed_norm import RoutedBatchNorm
from vfmtune.checkpoint import load_checkpoint, resolve_checkpoint
from vfmtune.choices import AdaptMethod, ConfigError, FinetuneMode
from vfmtune.commands.evaluate import trained_run_config
from vfmtune.config import AdaptCommand
from vfmtune.data.datamodule import ImageDataset
from vfmtune.device import compute_device
from vfmtune.embedding_cache import embed_images
from vfmtune.fit import score_target
from vfmtune.inference import eval_loader, score
from vfmtune.io import torch_save, write_json
from vfmtune.loading import load_model, model_task
from vfmtune.precision import resolve_precision
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks import get_task
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.classify import eval_transform, target_pool, uses_cache
from vfmtune.tasks.distill import student_transform


def _inputs(model: Any, paths: Sequence[str], config: Any) -> Any:
    transform = student_transform(model) if model_task(model) == "distill" else eval_transform(model)
    return [x for x, _ in eval_loader(ImageDataset(paths, [0] * len(paths), transform), config)]


def _module(model: Any, task: Any) -> Any:
    """What runs on normalised images: a student's timm model, or the classifier itself."""
    return task.inference(model)[0] if task.name == "distill" else model


def _frozen_probe(model: Any) -> bool:
    """A classifier whose backbone never trained: its BatchNorms are all in the head, which reads cached embeddings."""
    return isinstance(model, Classifier) and uses_cache(model.config, model) and model.config.finetune.mode == FinetuneMode.frozen


def _routing(norm: RoutedBatchNorm, pool: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    """How often the routed feature norm picks the right domain on the images it was fitted on (the source and
    target test scores are the held-out check)."""
    with torch.inference_mode():
        to_target, to_source = (norm.route(pool) == 1).float().mean().item(), (norm.route(source) == 0).float().mean().item()
    print(f"routing: {to_target:.1%} of the target pool to the target statistics, {to_source:.1%} of the source "
          "training images to the source's (a low figure: the embedding cannot tell the cameras apart; deploy two runs)")
    return {"routing/target_pool_as_target": to_target, "routing/source_train_as_source": to_source}


def adapt_model(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """AdaBN (BatchNorm statistics of the target images) or TENT (entropy minimisation through the norm
    layers' affine parameters) on a trained classifier or distilled student; writes `checkpoints/best.ckpt`
    (loads like any checkpoint) and metrics.json with `before/...` and after (`test/...`, `target/...`).

    Example:
        >>> vfmtune.adapt_model(overrides=["ckpt=runs/lite0", "data.target=/data/camera2", "adapt.method=adabn",
        ...                          "data.target_test=/data/camera2_labelled"])["metrics"]["target/macro_f1"]
    """
    config = command_config(cfg, overrides, AdaptCommand, "adapt")
    method = config.adapt.method
    if not config.ckpt or not config.data.target or method not in (AdaptMethod.adabn, AdaptMethod.tent):
        raise ConfigError("adapt needs ckpt=RUN, data.target=DIR (unlabelled target images) and adapt.method=adabn|tent "
                          "(coral, dann and self_training adapt while training: vfmtune train data.target=DIR adapt.method=...).")
    out = make_run_dir(run_dir, "adapt")
    model = load_model(config.ckpt)
    task = get_task(model_task(model))
    if task.target != "class":
        raise ConfigError(f"adapt supports classifiers and distilled students, not task={task.name}.")
    if config.adapt.keep_source and not (method == AdaptMethod.adabn and _frozen_probe(model)
                                         and isinstance(model.head[0], nn.BatchNorm1d)):
        raise ConfigError(f"adapt.keep_source=true routes a frozen probe's feature BatchNorm (adapt.method=adabn on a "
                          f"finetune=frozen run with head.feature_norm=true); ckpt={config.ckpt} is not one. Deploy the "
                          "adapted run for the target camera and the source run for the source camera instead.")
    run_cfg = trained_run_config(model.config, config, overrides)
    run_cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, target=config.data.target,
                                                                    target_test=config.data.target_test), adapt=config.adapt)
    prepared = task.prepare(run_cfg, out)
    module, batches = task.evaluation(run_cfg, model, prepared, "test")
    metrics: dict[str, Any] = {f"before/{k}": v for k, v in score(module, batches, task.metrics, model.classes, "test", run_cfg).items()}
    if config.data.target_test:
        metrics.update({f"before/{k}": v for k, v in score_target(task, model, run_cfg).items()})
    pool = target_pool(run_cfg, prepared)
    device, precision = compute_device(run_cfg), resolve_precision(run_cfg)
    autocast = precision.autocast
    print(f"precision: {precision}")
    if method == AdaptMethod.adabn:
        if _frozen_probe(model):  # its BatchNorm is the head's: re-estimated on the pool's cached embeddings
            embed_cfg = dataclasses.replace(run_cfg, backbone=model.config.backbone)
            feats = embed_images(embed_cfg, model.backbone, pool)
            source_norm = copy.deepcopy(model.head[0])
            moved = adapt_batchnorm(model.head, feats.split(run_cfg.data.batch_size), device)
            if config.adapt.keep_source:
                # Both rows estimated alike (exact statistics over the domain's images): a short cached fit's
                # running estimate may have had only a few momentum updates from its initial (0, 1).
                source = embed_images(embed_cfg, model.backbone, prepared.subset("train")[0])
                adapt_batchnorm(source_norm, source.split(run_cfg.data.batch_size), device)
                model.head = model.head.cpu()
                model.head[0] = RoutedBatchNorm.fit([source_norm.cpu(), model.head[0]], [source, feats], run_cfg.seed)
                metrics.update(_routing(model.head[0], feats, source))
        else:
            moved = adapt_batchnorm(_module(model, task), _inputs(model, pool, run_cfg), device, autocast)
        if not moved:
            raise ConfigError(f"ckpt={config.ckpt} has no BatchNorm layer: AdaBN has nothing to re-estimate (try adapt.method=tent).")
        print(f"AdaBN: {moved} BatchNorm layers re-estimated on {len(pool)} target images")
    else:
        n = tent(_module(model, task), _inputs(model, pool, run_cfg), config.adapt.steps, config.adapt.lr, device, autocast)
        print(f"TENT: {n:,} norm-layer parameters adapted on {len(pool)} target images ({config.adapt.steps} passes)")
    model = model.cpu().eval()
    module, batches = task.evaluation(run_cfg, model, prepared, "test")
    metrics.update(score(module, batches, task.metrics, model.classes, "test", run_cfg))
    if config.data.target_test:
        metrics.update(score_target(task, model, run_cfg))
    checkpoint = load_checkpoint(resolve_checkpoint(config.ckpt))
    adapted = {"method": str(method), "target": str(config.data.target), "images": len(pool)}
    if config.adapt.keep_source:
        adapted["domains"] = ["source", "target"]  # rows of the head's RoutedBatchNorm statistics
    hp = {**checkpoint["hyper_parameters"], "adapted": adapted}
    torch_save({"state_dict": model.state_dict(), "hyper_parameters": hp}, out / "checkpoints" / "best.ckpt")
    task.report(metrics, model.classes, out, ["test", *(["target"] if config.data.target_test else [])])
    write_json(out / "metrics.json", {**metrics, "method": str(method), "source_checkpoint": str(config.ckpt)})
    print(f"run directory: {out}")
    return {"run_dir": str(out), "metrics": metrics, "best_checkpoint": str(out / "checkpoints" / "best.ckpt")}
