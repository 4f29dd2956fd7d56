"""Linear probing, then fine-tuning (LP-FT): start a fine-tune from a frozen-head run's trained head.

A new random head sends large, noisy gradients into the pretrained features during the first steps
and distorts them; a head already fitted on the frozen features does not (Kumar et al. 2022,
https://arxiv.org/abs/2202.10054). The probe itself costs seconds on cached embeddings
(`vfmtune train`, i.e. `finetune=frozen`), so LP-FT is two commands:

    vfmtune train head.feature_norm=false hydra.run.dir=runs/probe
    vfmtune train finetune=lora head.feature_norm=false finetune.head_from=runs/probe
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from vfmtune.checkpoint import load_checkpoint, resolve_checkpoint
from vfmtune.choices import ConfigError, FinetuneMode
from vfmtune.compose import to_container

# A head fits the embedding space it was trained on: same model, weights, input size and pooling.
SAME_FEATURES = ("name", "weights", "path", "img_size", "global_pool")
SAME_HEAD = ("type", "hidden_dim", "feature_norm")


def init_head_from(model: Any, source: str | os.PathLike[str]) -> Path:
    """Copy the head of a frozen-backbone run into `model.head`.

    Args:
        model: the classifier about to be fine-tuned (a `vfmtune.tasks.classifier.Classifier`: `head`,
            `classes`, `config`).
        source: a run directory (its best checkpoint) or a `.ckpt` file of a `finetune=frozen` run.

    Returns:
        The checkpoint file the head came from.

    Raises:
        ConfigError: the source trained its backbone, or its classes, backbone or head differ.

    Example:
        >>> init_head_from(model, "runs/probe")  # doctest: +SKIP
        PosixPath('runs/probe/checkpoints/best.ckpt')
    """
    where = f"finetune.head_from={source}"
    try:
        path = resolve_checkpoint(source)
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    hp = ckpt["hyper_parameters"]
    src = hp["config"]
    mode = src["finetune"]["mode"]
    if mode != "frozen":
        raise ConfigError(f"{where}: that run trained its backbone (finetune.mode={mode}), so its head only fits "
                          "its own backbone weights. Point head_from at a finetune=frozen run, or continue that "
                          "run with ckpt=... instead.")
    if list(hp["classes"]) != model.classes:
        raise ConfigError(f"{where}: its classes {list(hp['classes'])} differ from this run's {model.classes}. "
                          "Train the probe on the same data.")
    mine = to_container(model.config)
    for group, keys in (("backbone", SAME_FEATURES), ("head", SAME_HEAD)):
        for key in keys:
            theirs, ours = src[group].get(key), mine[group].get(key)
            if theirs != ours:
                raise ConfigError(f"{where}: its {group}.{key}={theirs!r} but this run has {group}.{key}={ours!r}; "
                                  f"the head only fits the features it was trained on. Set {group}.{key}={theirs!r} "
                                  "here, or train the probe with this run's setting.")
    if src["head"].get("feature_norm") and model.config.finetune.mode != FinetuneMode.frozen:
        warnings.warn(f"{where}: the probe's head normalises features with BatchNorm, and leans on near-constant "
                      "feature channels that augmentation and fine-tuning move (first-epoch losses of ~30 on the "
                      "textile set). Train the probe and this run with head.feature_norm=false.", stacklevel=2)
    state = {k.removeprefix("head."): v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
    model.head.load_state_dict(state)
    return path
