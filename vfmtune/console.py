"""What a run prints: the user's figures, not third-party tips and deprecation notices they cannot act on.

Lightning announces hardware it did not find, advertises its cloud logger, narrates checkpoint
restores and warns about its own internals; none of it asks anything of a vfmtune user. Warnings
about the user's own data or settings stay on.
"""

from __future__ import annotations

import logging
import warnings

# Messages (regexes) of warnings that come from libraries' internals, never from the user's input.
_LIBRARY_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning's pytree shim on new torch
    r".*is smaller than the logging interval.*",  # tiny epochs: nothing to fix, logs are per epoch anyway
    r".*does not have many workers.*",  # cached embeddings are in memory: workers would only slow them
    r".*`torch.jit.(load|trace|trace_method|save)` is deprecated.*",  # TorchScript export is what the user asked for
    r".*module\(s\) in eval mode at the start of training.*",  # frozen encoders stay in eval mode on purpose
    # gathers with non-negative indices (SAM's decoder, a routed feature norm); every export is verified against torch
    r".*Exporting aten::index operator of advanced indexing.*",
    # the ONNX exporter's own optimisation note on strided slices (CNN students): the graph stays correct and is verified
    r".*Constant folding - Only steps=1 can be constant folded.*",
)


def quiet_libraries() -> None:
    """Silence Lightning's informational chatter and the library-internal warnings above (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
