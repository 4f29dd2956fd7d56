"""`vfmtune pseudo-label`: a teacher's labels for unlabelled images, as a CSV manifest."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.choices import ConfigError
from vfmtune.config import PseudoLabelCommand
from vfmtune.data.datamodule import ImageDataset
from vfmtune.data.prepare import readable_images
from vfmtune.inference import run_inference
from vfmtune.io import atomic_path
from vfmtune.loading import load_teacher
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks.classify import eval_transform

PSEUDO_LABEL_COLUMNS = ("path", "label", "confidence")


def pseudo_label(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Label `images=DIR` with `teacher=CKPT`: a CSV manifest `path,label,confidence` (auto-labelling).

    Rows below `pseudo_label.threshold` are left out. The manifest is marked teacher-labelled by its
    `confidence` column: it can feed training (`data.unlabeled=CSV`) but never validation or test.

    Example:
        >>> vfmtune.pseudo_label(overrides=["teacher=runs/teacher", "images=/data/new", "pseudo_label.threshold=0.9"])
    """
    config = command_config(cfg, overrides, PseudoLabelCommand, "pseudo_label")
    if not config.images:
        raise ConfigError("pseudo-label needs images=DIR (a folder of images, searched recursively).")
    teacher = load_teacher(config.teacher)
    threshold = float(config.pseudo_label.threshold)
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"pseudo_label.threshold={threshold} must lie in [0, 1).")
    out = make_run_dir(run_dir, "pseudo-label")
    paths = readable_images(config.images, config.data)
    conf, label = run_inference(teacher, ImageDataset(paths, [0] * len(paths), eval_transform(teacher)), config).softmax(-1).max(-1)
    target = Path(config.pseudo_label.output or out / "pseudo_labels.csv")
    kept = 0
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PSEUDO_LABEL_COLUMNS)
        for p, c, y in zip(paths, conf.tolist(), label.tolist()):
            if c >= threshold:
                writer.writerow([p, teacher.classes[y], f"{c:.6f}"])
                kept += 1
    print(f"{kept} of {len(paths)} images labelled at confidence >= {threshold}: {target}")
    return {"run_dir": str(out), "manifest": str(target), "n_labelled": kept, "n_images": len(paths)}
