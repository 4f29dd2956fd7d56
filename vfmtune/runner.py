"""Run plumbing shared by every command: config composition, run directories, the Trainer, reports."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig

from vfmtune.checkpoint import AtomicCheckpointIO
from vfmtune.config import Config, ConfigError, check_kwargs, config_dirs, register_configs, to_container
from vfmtune.memory import lean_host_memory
from vfmtune.report import plot_confusion_matrix, plot_curves, plot_per_class, results_table, write_json


def load_config(*overrides: str) -> DictConfig:
    """Compose the same config `vfmtune <command> OVERRIDES...` would, without running anything.

    Example:
        >>> cfg = load_config("backbone=vit_b16", "trainer.max_epochs=3")
        >>> cfg.backbone.name
        'vit_b16'
    """
    from hydra import compose, initialize_config_dir

    register_configs()
    conf_dir, recipes_parent = config_dirs()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"hydra.searchpath=[file://{recipes_parent}]"])


def as_config_dict(cfg: Config | DictConfig | dict[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
    if cfg is None:
        cfg = load_config(*overrides)
    return to_container(cfg)


def make_run_dir(run_dir: Optional[str | Path], command: str) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / command / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_trainer(cfg: dict[str, Any], run_dir: Path, callbacks: list, **extra: Any) -> L.Trainer:
    kwargs = {k: v for k, v in {**cfg["trainer"], **extra}.items() if v is not None}
    check_kwargs(L.Trainer.__init__, kwargs, "trainer")
    logger: Any = False
    if cfg["logger"] == "csv":
        logger = L.pytorch.loggers.CSVLogger(run_dir, name="logs", version="")
    elif cfg["logger"] == "tensorboard":
        logger = L.pytorch.loggers.TensorBoardLogger(run_dir, name="tensorboard", version="")
    elif cfg["logger"] != "none":
        raise ConfigError(f"logger={cfg['logger']!r} is not one of csv, tensorboard, none.")
    kwargs.setdefault("logger", logger)
    if cfg["lean_host_memory"]:
        lean_host_memory()
    return L.Trainer(default_root_dir=run_dir, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **kwargs)


def compute_device(cfg: dict[str, Any]) -> torch.device:
    """Where work outside the Trainer (embedding and teacher caches) runs: the GPU when the trainer
    config would use one (`trainer.accelerator` auto / gpu / cuda and CUDA available), else the CPU."""
    accelerator = str(cfg["trainer"].get("accelerator", "auto"))
    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and cfg["trainer"].get("devices") != 0
    return torch.device("cuda") if use_gpu else torch.device("cpu")


def write_run_report(metrics: dict[str, Any], classes: Sequence[str], run_dir: Path, prefixes: Sequence[str]) -> None:
    (run_dir / "plots").mkdir(exist_ok=True)
    for prefix in prefixes:
        if f"{prefix}/confusion_matrix" in metrics:
            plot_confusion_matrix(metrics[f"{prefix}/confusion_matrix"], classes, run_dir / "plots" / f"confusion_matrix_{prefix}.png", f"{prefix} confusion matrix")
            plot_per_class(metrics, classes, prefix, run_dir / "plots" / f"per_class_{prefix}.png")
    plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "curves.png")
    write_json(run_dir / "metrics.json", metrics)
    for prefix in prefixes:
        if f"{prefix}/accuracy" in metrics:
            print(results_table(metrics, classes, prefix))
    print(f"run directory: {run_dir}")


def overridden(overrides: Sequence[str], section: str) -> list[str]:
    return [o.split(".", 1)[1] for o in overrides if o.startswith(f"{section}.")]
