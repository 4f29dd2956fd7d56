"""Fail points: named places where a test can kill the process, to prove that what was written survives.

`VFMTUNE_FAULT=<name>[:<n>]` makes the n-th pass (default the first) through `fault_point(name)` send
SIGKILL to this process: no exception handler, no `finally`, no atexit runs, as when the machine
loses power or the kernel's OOM killer strikes. Unset (always, outside the fault-injection tests) a
fail point costs one environment lookup.

Names: `embed_batch` (after each batch of an embedding pass), `train_batch` (after each training
step), `checkpoint_write_last` / `checkpoint_write_best` (that checkpoint's bytes written, before the
rename), `inference_batch` (after
each batch of predict / pseudo-label), `predict_image` (after each image of a segmentation predict).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process at the configured pass through `name` (see the module docstring)."""
    spec = os.environ.get("VFMTUNE_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
