"""`vfmtune shift ckpt=RUN target=DIR`: how far new images are from a run's training images, and what
that does to its predictions (`shift.json`, `plots/shift_map.png`, `plots/shift_confidence.png`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfmtune.choices import ConfigError
from vfmtune.commands.evaluate import trained_run_config
from vfmtune.config import ShiftCommand
from vfmtune.data.datamodule import ImageDataset
from vfmtune.data.prepare import Prepared, align_classes, prepare_data, readable_images
from vfmtune.data.sources import SampleTable, from_imagefolder
from vfmtune.embedding_cache import embed_images
from vfmtune.inference import eval_loader, score
from vfmtune.io import write_json
from vfmtune.loading import load_model, model_task
from vfmtune.report import plot_shift
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.shift_stats import domain_auc, mmd_test, pca_2d, prediction_profile
from vfmtune.tasks import get_task
from vfmtune.tasks.classify import eval_transform


def labelled_target(target: str, classes: Sequence[str]) -> SampleTable | None:
    """The target folder as labelled images when its sub-folders are (some of) the model's classes."""
    root = Path(target)
    subfolders = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not subfolders or not set(subfolders) <= set(classes):
        return None
    return from_imagefolder(root)


def shift(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare a run's training images with a folder of target images (unlabelled, or an ImageFolder
    whose labelled images are also scored): MMD² with a permutation p-value and a domain classifier's
    AUC on the model's frozen embeddings, and the model's confidence, entropy and predicted classes on
    both domains.

    Example:
        >>> vfmtune.shift(overrides=["ckpt=runs/train/<date>", "target=/data/new_camera"])["metrics"]["domain_auc"]
    """
    config = command_config(cfg, overrides, ShiftCommand, "shift")
    if not config.ckpt or not config.target:
        raise ConfigError("shift needs ckpt=RUN (a classifier) and target=DIR (images from the new camera or site).")
    out = make_run_dir(run_dir, "shift")
    model = load_model(config.ckpt)
    if getattr(model, "backbone", None) is None or not hasattr(model, "head"):
        raise ConfigError(f"ckpt={config.ckpt}: shift reads a classifier's backbone embeddings (a `vfmtune train` "
                          "classification run).")
    run_cfg = trained_run_config(model.config, config, overrides)
    prepared = prepare_data(run_cfg, out)
    source = prepared.subset("train")[0]
    table = labelled_target(config.target, model.classes)
    target = table.paths if table is not None else readable_images(config.target, config.data)
    embed_cfg = dataclasses.replace(run_cfg, backbone=model.config.backbone)
    feats = embed_images(embed_cfg, model.backbone, [*source, *target])
    xs, xt = feats[: len(source)].numpy(), feats[len(source) :].numpy()
    with torch.inference_mode():
        probs_s, probs_t = (model.head.eval()(torch.from_numpy(x)).softmax(-1) for x in (xs, xt))
    metrics: dict[str, Any] = {"n_source": len(source), "n_target": len(target), **mmd_test(xs, xt, seed=config.seed),
                               "domain_auc": domain_auc(xs, xt, seed=config.seed)}
    metrics.update(prediction_profile(probs_s, model.classes, "source"))
    metrics.update(prediction_profile(probs_t, model.classes, "target"))
    train_labels = np.bincount(prepared.labels("train"), minlength=len(model.classes)) / max(len(source), 1)
    metrics.update({f"source/label_share/{c}": float(v) for c, v in zip(model.classes, train_labels)})
    if table is not None:
        labelled = align_classes(Prepared(table, ["test"] * len(table)), model.classes)
        task = get_task(model_task(model))
        batches = eval_loader(ImageDataset(*labelled.subset("test"), eval_transform(model)), run_cfg)
        metrics.update(score(model, batches, task.metrics, model.classes, "target", run_cfg))
    plot_shift(*pca_2d(xs, xt), probs_s.max(1).values.numpy(), probs_t.max(1).values.numpy(), metrics, out / "plots")
    write_json(out / "shift.json", metrics)
    print(f"domain shift: MMD² {metrics['mmd2']:.4f} (p = {metrics['mmd_p_value']:.3f}), domain classifier AUC "
          f"{metrics['domain_auc']:.3f}; mean confidence {metrics['source/confidence']:.3f} on the training images, "
          f"{metrics['target/confidence']:.3f} on the target" +
          (f"; target macro-F1 {metrics['target/macro_f1']:.3f}" if "target/macro_f1" in metrics else ""))
    if metrics["domain_auc"] >= 0.95:  # the routed AdaBN's domain classifier will separate them too
        print(f"the embedding tells the two domains apart: `vfmtune adapt ckpt={config.ckpt} data.target={config.target} "
              "adapt.method=adabn adapt.keep_source=true` adapts a frozen probe and keeps serving the training domain")
    print(f"run directory: {out}")
    return {"run_dir": str(out), "metrics": metrics}
