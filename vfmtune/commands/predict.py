"""`vfmtune predict`: run a trained model on a folder of images and write its predictions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.choices import ConfigError
from vfmtune.config import PredictCommand
from vfmtune.data.prepare import readable_images
from vfmtune.loading import load_model, model_task
from vfmtune.run import ConfigLike, command_config, make_run_dir
from vfmtune.tasks import get_task


def predict(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict `images` (a folder or a file) with `ckpt`: a classifier writes predictions.csv (path,
    class, p_<class>...).

    Example:
        >>> vfmtune.predict(overrides=["ckpt=runs/train/<date>", "images=/data/new"])["predictions"]
    """
    config = command_config(cfg, overrides, PredictCommand, "predict")
    if not config.ckpt or not config.images:
        raise ConfigError("predict needs ckpt=PATH and images=DIR.")
    out = make_run_dir(run_dir, "predict")
    model = load_model(config.ckpt)
    paths = readable_images(config.images, config.data)
    return {"run_dir": str(out), **get_task(model_task(model)).predict(model, paths, config, out)}
