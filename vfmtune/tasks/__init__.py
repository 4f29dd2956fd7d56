"""The task registry: one entry per kind of model, named in every checkpoint it writes.

Adding a task touches this table, one task module (a `vfmtune.tasks.base.Task` subclass and its
LightningModule), its config section, and a command only if it needs a new verb. Entries are
imported on first use, so `vfmtune --help` and the torch-free runtime never load them.
"""

from __future__ import annotations

import importlib

from vfmtune.choices import ConfigError
from vfmtune.tasks.base import Task

# task name -> "module:Task subclass"
TASKS: dict[str, str] = {
    "classify": "vfmtune.tasks.classify:ClassifyTask",
    "distill": "vfmtune.tasks.distill:DistillTask",
    "segment": "vfmtune.tasks.segment:SegmentTask",
    "segment_distill": "vfmtune.tasks.seg_distill:SegDistillTask",
    "sam_prompt": "vfmtune.tasks.sam_prompt:SamPromptTask",
}


def get_task(name: str) -> Task:
    """The registered task called `name`.

    Raises:
        ConfigError: an unknown name, listing the known ones.

    Example:
        >>> get_task("classify").target
        'class'
    """
    if name not in TASKS:
        raise ConfigError(f"Unknown task {name!r}. Known tasks: {', '.join(TASKS)}.")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
