"""`vfmtune <command> [hydra overrides]`: a thin Hydra front door to `vfmtune.api` and friends."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from vfmtune.config import ConfigError, config_dirs, register_configs

# command -> "module:function"; imported on use, so `vfmtune --help` answers without loading torch.
COMMANDS: dict[str, str] = {
    "train": "vfmtune.api:train",
    "evaluate": "vfmtune.api:evaluate",
    "predict": "vfmtune.api:predict",
    "embed": "vfmtune.api:embed",
    "cv": "vfmtune.api:cv",
    "export-merged": "vfmtune.api:export_merged",
    "distill": "vfmtune.distill_api:distill",
    "pseudo-label": "vfmtune.distill_api:pseudo_label",
    "export": "vfmtune.exporter:export",
}


def command_function(command: str) -> Callable:
    module, name = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), name)

USAGE = """usage: vfmtune <command> [key=value ...] [hydra options]

commands:
  train      fine-tune a backbone + head          vfmtune train data.root=/path/to/imagefolder
  evaluate   recompute metrics for a checkpoint   vfmtune evaluate ckpt=runs/train/<date>/checkpoints/best.ckpt
  predict    classify images with a checkpoint    vfmtune predict ckpt=RUN_DIR images=/path/to/images
  embed      build the frozen-backbone cache      vfmtune embed backbone=dinov2_vits14
  cv         stratified k-fold, fold ensemble     vfmtune cv folds=5 loss=weighted_ce
  export-merged  merge a LoRA run into a plain checkpoint   vfmtune export-merged ckpt=RUN_DIR
  distill    teach a small CNN from a classifier  vfmtune distill teacher=RUN_DIR student=efficientnet_lite0
  pseudo-label  teacher labels -> CSV manifest    vfmtune pseudo-label teacher=RUN_DIR images=DIR pseudo_label.threshold=0.9
  export     verified ONNX/TorchScript bundle     vfmtune export ckpt=RUN_DIR format=onnx quantize=int8

`vfmtune train --cfg job` prints the composed config; `-m` runs a sweep (e.g. optim.lr=1e-3,1e-4);
`hydra.run.dir=DIR` sets the run directory; `recipes=<name>` applies a recipe from recipes/.
"""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix from the command line: printed as one message, no traceback.
    (DataError and ConfigError are ValueErrors.)"""
    from vfmtune.weights import WeightsError

    return (ValueError, FileNotFoundError, WeightsError)


def _config_groups() -> set[str]:
    conf_dir, _ = config_dirs()
    return {p.name for p in conf_dir.iterdir() if p.is_dir()} | {"recipes"}


def check_overrides(overrides: Sequence[str]) -> None:
    """Reject unknown keys before Hydra runs, naming the valid keys at that level.

    Hydra's own message says a key "is not in struct" without listing alternatives. Free-form
    sections (trainer, loss, early_stopping) are checked later against their classes' signatures.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    groups = _config_groups()
    choices = []
    for o in parsed:
        if o.key_or_group in groups and not o.is_add() and not o.is_delete():
            value = o.value()
            choices.append(f"{o.key_or_group}={value[0] if isinstance(value, list) else o.get_value_element_as_str()}")
    from vfmtune.runner import load_config

    cfg: DictConfig = load_config(*choices)
    for o in parsed:
        if o.is_add() or o.is_delete() or o.key_or_group in groups:
            continue
        node = cfg
        parts = o.key_or_group.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is dict:
                break  # free-form section: validated against its target's signature at run time
            if part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                valid = ", ".join(sorted(str(k) for k in node.keys()))
                raise ConfigError(f"Unknown key '{o.key_or_group}'. Valid keys at {where}: {valid}")
            node = node[part]


# Hydra flags that take a value ("--cfg job"): that value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides, takes_value = [], [], False
    for a in args:
        if takes_value:
            flags.append(a)
            takes_value = False
        elif a.startswith("-"):
            flags.append(a)
            takes_value = a in _FLAGS_WITH_VALUE and a not in ("--info", "-i")
        else:
            overrides.append(a)
    return flags, overrides


def main(argv: Optional[Sequence[str]] = None) -> None:
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vfmtune: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    register_configs()
    flags, overrides = _split_args(rest)
    if command == "distill":
        from vfmtune.distill_api import with_student_defaults

        overrides = with_student_defaults(overrides)
    try:
        check_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - a composition error is the user's to fix; show it plainly
        print(f"vfmtune {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    conf_dir, base = config_dirs()
    # Hydra's argparse wants the overrides in one run, so flags go first ("-m a=1 b=2,3 --cfg job").
    # argv[0] stays the real program: Lightning's DDP launcher re-executes it for the other ranks.
    real_argv = list(sys.argv)
    sys.argv = [real_argv[0], *flags, f"hydra.job.name={command}", f"hydra.searchpath=[file://{base}]", *overrides]

    @hydra.main(config_path=str(conf_dir), config_name="config", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        # What the DDP launcher re-executes (it appends hydra.run.dir / job.name for the other ranks).
        sys.argv = [real_argv[0], command, *rest]
        function, errors = command_function(command), user_errors()
        try:
            function(cfg, overrides=list(hc.overrides.task), run_dir=hc.runtime.output_dir)
        except errors as e:
            print(f"\nvfmtune {command}: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    run()


if __name__ == "__main__":
    main()
