"""`vfmtune explore RUN`: look at a classification run's data before trusting its scores.

Writes into `RUN/plots/` (or `explore.output`) the figures the `02_look_at_your_data` notebook
draws, with the same `vfmtune.viz` functions: images per class, a 2-D map of the frozen embeddings
with outliers, the nearest train image of every test image (leakage), patch-feature PCA at two
input sizes, and the misclassified images of a split with their probabilities.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfmtune import viz
from vfmtune.backbones import create_backbone
from vfmtune.choices import ConfigError
from vfmtune.commands.evaluate import align_classes, trained_run_config
from vfmtune.config import Config, ExploreCommand
from vfmtune.embedding_cache import embed_images
from vfmtune.inference import score
from vfmtune.io import atomic_path, write_json
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks import get_task


def explore(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Draw the data-look figures of a trained classifier's run into its `plots/` folder.

    Figures: `class_grid.png`, `embedding_map.png` (PCA / t-SNE of the frozen backbone's embeddings,
    coloured by class, outliers numbered and shown), `leakage.png` (each test image's nearest training
    image by cosine distance of the mean-centred embeddings, against the training images' own nearest
    neighbours; `leakage.csv` in the command's run directory lists every pair),
    `patch_pca.png` (`explore.patch_sizes`) and `misclassified_<split>.png`. `explore.json` in the run
    directory summarises them. The embeddings are the run's backbone as configured (pretrained
    weights), through the embedding cache, as `vfmtune embed` computes them.

    Returns:
        `{"run_dir", "plots" (folder), "figures" {name: PNG path}, "summary" {...}}`.

    Example:
        >>> vfmtune.explore(overrides=["ckpt=runs/train/<date>"])["figures"]["leakage"]
    """
    config = command_config(cfg, overrides, ExploreCommand, "explore")
    if not config.ckpt:
        raise ConfigError("explore needs a trained run: `vfmtune explore RUN_DIR` (or ckpt=RUN_DIR / a .ckpt file).")
    model = load_model(config.ckpt)
    task = get_task(model_task(model))
    if task.target != "class":
        raise ConfigError(f"explore draws classification figures; {config.ckpt} is a {task.name!r} run.")
    ex = config.explore
    out = make_run_dir(run_dir, "explore")
    ckpt = Path(config.ckpt)
    plots = Path(ex.output) if ex.output else (ckpt if ckpt.is_dir() else ckpt.parent.parent) / "plots"
    run_cfg = trained_run_config(model.config, config, overrides)
    prepared = align_classes(task.prepare(run_cfg, out), model.classes)
    table, splits, classes = prepared.table, prepared.splits, list(model.classes)
    paths, labels = table.paths, table.labels

    figures: dict[str, Path] = {}

    def draw(name: str, fig: Any) -> None:
        figures[name] = viz.save(fig, plots / f"{name}.png")

    b = run_cfg.backbone
    features = embed_images(run_cfg, frozen_backbone(run_cfg).eval(), paths).numpy()
    draw("class_grid", viz.plot_class_grid(paths, labels, classes, ex.grid_per_class, seed=run_cfg.seed))
    draw("embedding_map", viz.plot_embedding_map(features, labels, classes, paths, splits, [str(p) for p in ex.projections],
                                                 ex.outliers, seed=run_cfg.seed))
    pairs = viz.leakage_pairs(features, splits, "test", "train")
    baseline = viz.leakage_pairs(features, splits, "train", "train")
    threshold = ex.leakage_threshold if ex.leakage_threshold is not None else viz.duplicate_threshold(baseline)
    draw("leakage", viz.plot_leakage_pairs(paths, pairs, labels, classes, ex.leakage_pairs, threshold, baseline))
    with atomic_path(out / "leakage.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test_path", "train_path", "cosine_distance"])
        writer.writerows([paths[p.query], paths[p.reference], f"{p.distance:.6f}"] for p in pairs)
    shown = viz.spread_over_classes(labels, ex.patch_images, [i for i, s in enumerate(splits) if s == str(ex.split)] or None)
    maps = patch_maps(run_cfg, [paths[i] for i in shown], ex.patch_sizes)
    if maps:
        draw("patch_pca", viz.plot_patch_pca([paths[i] for i in shown], maps, [classes[labels[i]] for i in shown]))

    split = str(ex.split)
    summary: dict[str, Any] = {"images": len(paths), "backbone": b.name, "img_size": b.img_size,
                               "leakage_threshold": threshold,
                               "leakage_pairs_below_threshold": sum(p.distance <= threshold for p in pairs),
                               "nearest_train_distance_min": pairs[0].distance if pairs else None,
                               "outliers": [paths[i] for i in viz.outliers(features, labels, ex.outliers)]}
    if split in splits or split == "all":
        module, batches = task.evaluation(run_cfg, model, prepared, split)
        outputs: list[torch.Tensor] = []
        score(module, batches, task.metrics, classes, split, run_cfg, outputs)
        split_paths, split_labels = prepared.subset(split)
        probs = torch.cat(outputs).softmax(-1).numpy()
        draw(f"misclassified_{split}", viz.plot_misclassified(split_paths, split_labels, probs, classes, ex.misclassified))
        summary[f"misclassified_{split}"] = int((probs.argmax(1) != np.asarray(split_labels)).sum())
    summary["figures"] = {k: str(v) for k, v in figures.items()}
    write_json(out / "explore.json", summary)
    print(f"{len(figures)} figures written to {plots}: {', '.join(figures)}; "
          f"{summary['leakage_pairs_below_threshold']} test images within {threshold:.3g} of a training image")
    return {"run_dir": str(out), "plots": str(plots), "figures": {k: str(v) for k, v in figures.items()}, "summary": summary}


def frozen_backbone(config: Config, img_size: int | None = None) -> torch.nn.Module:
    """The run's backbone as configured (pretrained weights, no fine-tuning), at `img_size` or its own size."""
    b = config.backbone
    return create_backbone(b.name, weights=str(b.weights), path=b.path, img_size=img_size or b.img_size, global_pool=b.global_pool)


def patch_maps(config: Config, images: Sequence[str], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """`{"<size> px": viz.patch_pca(...)}` of the run's frozen backbone at each size; empty when it has no patch tokens."""
    try:
        return {f"{size} px": viz.patch_pca(frozen_backbone(config, size), images, size) for size in sizes}
    except ValueError as e:  # e.g. a CNN without forward_intermediates
        print(f"patch PCA skipped: {e}")
        return {}
