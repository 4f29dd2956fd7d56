"""Save and restore random-number-generator state in checkpoints (Lightning does not).

Without it a resumed run shuffles and augments differently from an uninterrupted one. States are
stored as tensors and plain numbers so checkpoints still load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def capture_rng() -> dict[str, Any]:
    """torch (CPU, and CUDA when present), numpy and python RNG states as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Checkpoint the RNG state at save time and restore it as soon as the checkpoint is loaded.

    Loading happens before Lightning builds the first training iterator of the resumed run (which
    draws the shuffling sampler's seed from the torch RNG and prefetches a batch), and nothing random
    runs in between (optimizer setup, the eval-only sanity check), so shuffles and augmentations
    continue exactly as in an uninterrupted run. Lightning saves rank 0's callback state; every
    process restores it (all processes are seeded alike, and DistributedSampler seeds itself).
    """

    @property
    @override
    def state_key(self) -> str:
        return "vfmtune.RNGState"

    @override
    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng(state_dict)
