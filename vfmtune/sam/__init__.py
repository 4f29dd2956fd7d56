"""Segment Anything (SAM, MobileSAM, LiteMedSAM) with real weights, offline.

Public names: :func:`create_sam`, :class:`SamPromptPredictor`, :class:`SamPrediction`,
:data:`SAM_MODELS`, :func:`sam_weights_file`. Needs ``segment-anything==1.0`` (pure Python,
Apache-2.0); see the README section "SAM weights" for where the weights come from.

Example:
    >>> from vfmtune.sam import SamPromptPredictor, create_sam
    >>> predictor = SamPromptPredictor(create_sam("mobile_sam"))  # doctest: +SKIP
    >>> predictor.set_image(image)  # doctest: +SKIP
    >>> predictor.predict(boxes=[[148, 50, 550, 642]]).masks.shape  # doctest: +SKIP
    torch.Size([1, 643, 960])
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("segment_anything") is None:  # fail with the fix, not a bare ModuleNotFoundError
    raise ImportError("vfmtune.sam needs Meta's segment-anything package (pure Python, Apache-2.0): "
                      "pip install segment-anything==1.0")

from vfmtune.sam.models import SAM_MODELS, build_sam, create_sam
from vfmtune.sam.predictor import SamPrediction, SamPromptPredictor
from vfmtune.sam.weights import sam_weights_file

__all__ = ["SAM_MODELS", "SamPrediction", "SamPromptPredictor", "build_sam", "create_sam", "sam_weights_file"]
