"""`vfmtune <command> [hydra overrides]`: a thin Hydra front door to `vfmtune.commands`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from vfmtune.choices import ConfigError
from vfmtune.commands import COMMANDS, command_function
from vfmtune.compose import config_dirs, load_config, register_configs


def usage() -> str:
    rows = "\n".join(f"  {name:<13} {c.summary:<42} {c.example}" for name, c in COMMANDS.items())
    return f"""usage: vfmtune <command> [key=value ...] [hydra options]

commands:
{rows}

`vfmtune train --cfg job` prints the composed config; `-m` runs a sweep (e.g. optim.lr=1e-3,1e-4);
`hydra.run.dir=DIR` sets the run directory; `recipes=<name>` applies a recipe from recipes/.
"""


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix from the command line: printed as one message, no traceback.
    (DataError and ConfigError are ValueErrors.)"""
    from vfmtune.io import DiskError
    from vfmtune.weights import WeightsError

    return (ValueError, FileNotFoundError, WeightsError, DiskError)


def _config_groups() -> set[str]:
    conf_dir, _ = config_dirs()
    return {p.name for p in conf_dir.iterdir() if p.is_dir()} | {"recipes"}


def check_overrides(overrides: Sequence[str], schema: str = "train") -> None:
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
            # a group sweep (finetune=lora,frozen) is checked with its first option
            value = next(o.sweep_string_iterator()) if o.is_sweep_override() else o.get_value_element_as_str()
            choices.append(f"{o.key_or_group}={value}")
    cfg: DictConfig = load_config(*choices, command=schema)
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
                valid = ", ".join(sorted(str(k) for k in node))
                raise ConfigError(f"Unknown key '{o.key_or_group}'. Valid keys at {where}: {valid}")
            node = node[part]
    # Values too (enums name their valid choices); a sweep's values are checked by each job.
    load_config(*[o.input_line for o in parsed if not o.is_sweep_override()], command=schema)


# Hydra flags that take a value ("--cfg job"): that value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                     "--info", "-i", "--experimental-rerun"}


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


def main(argv: Sequence[str] | None = None) -> None:
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vfmtune: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    positional = COMMANDS[command].positional
    if positional and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"{positional}={rest[0]}", *rest[1:]]  # `vfmtune explore RUN` = `vfmtune explore ckpt=RUN`
    register_configs()
    flags, overrides = _split_args(rest)
    schema = COMMANDS[command].schema
    if command == "distill":
        from vfmtune.commands.distill import with_student_defaults

        overrides = with_student_defaults(overrides)
    try:
        check_overrides(overrides, schema)
    except Exception as e:  # noqa: BLE001 - a composition error is the user's to fix; show it plainly
        print(f"vfmtune {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    conf_dir, base = config_dirs()
    # Hydra's argparse wants the overrides in one run, so flags go first ("-m a=1 b=2,3 --cfg job").
    # argv[0] stays the real program: Lightning's DDP launcher re-executes it for the other ranks.
    real_argv = list(sys.argv)
    sys.argv = [real_argv[0], *flags, f"hydra.job.name={command}", f"hydra.searchpath=[file://{base}]", f"command={schema}", *overrides]

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
