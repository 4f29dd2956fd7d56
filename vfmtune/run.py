"""Run plumbing shared by every command: typed configs, run directories, the Trainer, the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from omegaconf import DictConfig, OmegaConf

from vfmtune.checkpoint import AtomicCheckpointIO
from vfmtune.choices import LoggerName
from vfmtune.compose import check_kwargs, load_config, to_container, typed
from vfmtune.config import Config
from vfmtune.console import quiet_libraries
from vfmtune.device import drop_unusable_nvml_check
from vfmtune.io import write_text
from vfmtune.memory import lean_host_memory

C = TypeVar("C", bound=Config)
ConfigLike = Config | DictConfig | dict[str, Any] | None


def command_config(cfg: ConfigLike, overrides: Sequence[str], schema: type[C], command: str) -> C:
    """A command's typed config: `cfg` as given (DictConfig, dict or dataclass), or composed from
    `overrides` exactly as `vfmtune <command> OVERRIDES...` would."""
    return typed(load_config(*overrides, command=command) if cfg is None else cfg, schema)


def make_run_dir(run_dir: str | Path | None, command: str) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / command / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_run(config: Config, run_dir: str | Path | None, command: str) -> Path:
    """The run directory, holding the resolved config in `.hydra/config.yaml` (Hydra writes it for CLI
    runs; Python API runs get the same file)."""
    out = make_run_dir(run_dir, command)
    resolved = out / ".hydra" / "config.yaml"
    if not resolved.is_file():
        write_text(resolved, OmegaConf.to_yaml(OmegaConf.create(to_container(config))))
    return out


def with_overrides(trained: Config, overrides: Sequence[str], section: str, schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """A trained model's config with the command line's `<section>.*` overrides merged onto its section
    (e.g. `data.root=/new/images` for `evaluate`), as `schema`."""
    given = [o.split(".", 1)[1] for o in overrides if o.startswith(f"{section}.")]
    merged = OmegaConf.merge(OmegaConf.structured(getattr(trained, section)), OmegaConf.from_dotlist(given))
    base = to_container(trained)
    base[section] = to_container(merged)
    return typed(base, schema, strict=False)


def build_trainer(cfg: Config, run_dir: Path, callbacks: list, **extra: Any) -> L.Trainer:
    """`lightning.Trainer` from `cfg.trainer` (validated against its signature), our logger and atomic checkpoint IO."""
    quiet_libraries()
    drop_unusable_nvml_check()
    kwargs = {k: v for k, v in {**cfg.trainer, **extra}.items() if v is not None}
    check_kwargs(L.Trainer.__init__, kwargs, "trainer")
    logger: Any = False
    if cfg.logger == LoggerName.csv:
        logger = L.pytorch.loggers.CSVLogger(run_dir, name="logs", version="")
    elif cfg.logger == LoggerName.tensorboard:
        logger = L.pytorch.loggers.TensorBoardLogger(run_dir, name="tensorboard", version="")
    kwargs.setdefault("logger", logger)
    if cfg.lean_host_memory:
        lean_host_memory()
    return L.Trainer(default_root_dir=run_dir, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **kwargs)


def quiet(cfg: Config) -> Config:
    """The config for a Trainer that only evaluates or predicts: no logger."""
    return dataclasses.replace(cfg, logger=LoggerName.none)
