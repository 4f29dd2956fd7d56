"""Composing and checking configs: Hydra composition for a command (`load_config`), the typed view of a
composed config (`typed`), plain containers (`to_container`) and allow-listed `_target_` instantiation.

The schema itself (what keys exist, their types and defaults) is `vfmtune.config`; this module is how a
config is built from `conf/`, `recipes/` and overrides, and how code reads it back.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from vfmtune.choices import ConfigError
from vfmtune.config import SCHEMAS, Config


def register_configs() -> None:
    """Register the schemas so that `conf/config.yaml` can extend them (type-checked, unknown keys rejected)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="command", name=name, node=schema, package="_global_")


# Hydra's `instantiate` will import and call anything a YAML file names; configs may come from
# users or shared recipes, so only classes from these packages may be built from them.
ALLOWED_TARGET_PREFIXES = (
    "torch.", "timm.", "lightning.", "torchmetrics.", "vfmtune.", "peft.", "sklearn.", "imblearn.",
)


def _check_targets(node: Any, where: str) -> None:
    if isinstance(node, (dict, DictConfig)):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGET_PREFIXES):
            raise ConfigError(
                f"{where}._target_={target!r} is not allowed: configs may only build classes from "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PREFIXES)}."
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, (list, ListConfig)):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


def safe_instantiate(node: Any, where: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` restricted to `ALLOWED_TARGET_PREFIXES`.

    Example:
        >>> safe_instantiate({"_target_": "torch.nn.CrossEntropyLoss"}, "loss")
        CrossEntropyLoss()
    """
    from hydra.utils import instantiate

    _check_targets(node, where)
    return instantiate(node, **kwargs)


def check_kwargs(target: Any, kwargs: dict[str, Any], where: str) -> None:
    """Reject keys that `target`'s signature does not accept, naming the valid ones."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(sorted(k for k in params if k != "self"))
        raise ConfigError(f"Unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}. Valid keys: {valid}")


C = TypeVar("C", bound=Config)


def typed(cfg: Config | DictConfig | dict[str, Any], schema: type[C] = Config, strict: bool = True) -> C:  # type: ignore[assignment]
    """The config as `schema`'s dataclass objects (attribute access, enums), whatever form it came in.

    Args:
        cfg: a composed DictConfig, a plain dict (e.g. from a checkpoint) or a dataclass.
        schema: the command's schema class.
        strict: reject keys the schema does not have; False drops them (configs stored by older
            versions, or by another command, carry keys this schema has no use for).

    Raises:
        ConfigError: unknown keys (strict) or invalid values, naming the key.

    Example:
        >>> typed({"finetune": {"mode": "lora"}}).finetune.mode == "lora"
        True
    """
    if isinstance(cfg, schema):
        return cfg
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = to_container(cfg)
    base = OmegaConf.structured(schema)
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if not strict:
        node = OmegaConf.create(_known(OmegaConf.to_container(node), base))
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, node))  # type: ignore[return-value]
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the key; keep the message, drop the trace
        raise ConfigError(str(e).split("\n    full_key")[0].strip()) from None


def _known(node: Any, schema: Any) -> Any:
    """`node` with only the keys `schema` (a structured DictConfig) has; free-form sections kept whole."""
    if not isinstance(node, dict) or not isinstance(schema, DictConfig) or OmegaConf.get_type(schema) is dict:
        return node
    return {k: _known(v, schema[k]) for k, v in node.items() if k in schema}


def to_container(cfg: Config | DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Plain, resolved Python types (enums as strings): safe to store in checkpoints loaded with
    `torch.load(weights_only=True)` and in `.hydra/config.yaml`."""
    if isinstance(cfg, dict):
        return cfg
    node = OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def config_dirs() -> tuple[Path, Path]:
    """(conf dir, folder holding `recipes/`): the repo layout in a checkout, the wheel's copy otherwise."""
    pkg = Path(__file__).parent
    packed = pkg / "_configs"
    base = packed if (packed / "conf").is_dir() else pkg.parent
    return base / "conf", base


def load_config(*overrides: str, command: str = "train") -> DictConfig:
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
        try:
            return compose("config", overrides=[f"command={command}", *overrides, f"hydra.searchpath=[file://{recipes_parent}]"])
        except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types; the user needs their messages
            raise ConfigError(composition_message(e)) from None


def composition_message(error: BaseException) -> str:
    """Hydra's composition error with the OmegaConf causes it wraps (which say what the valid values are)."""
    parts: list[str] = []
    while error is not None:
        text = str(error).split("\n    full_key")[0].split("\nConfig search path")[0].strip()
        if text and text not in parts and "$VALUE" not in text and not text.startswith("'"):
            parts.append(text)
        error = error.__cause__ or error.__context__
    return ": ".join(parts)
