"""Backbone names -> timm models with weights from the hub, a local file, the offline package, or none.

Every backbone is a plain timm model created with ``num_classes=0``: pooled features come from
``model(x)`` (``forward_head(forward_features(x), pre_logits=True)``), patch-token maps from timm's
``forward_intermediates`` (:func:`patch_tokens`), and the rest of timm's contract
(``reset_classifier``, ``group_matcher``, ``set_grad_checkpointing``) works unchanged.
Checkpoints in their authors' layouts (Meta's DINOv2 and SAM releases) are mapped with timm's own
``checkpoint_filter_fn`` and resampled to the requested ``img_size`` before a strict load.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from vfmtune.weights import (
    WeightsError,
    check_hub_reachable,
    file_sha256,
    load_packaged,
    load_state_dict_file,
    packaged_weights,
)

ALIASES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "vit_b16": "vit_base_patch16_224",
    "sam_vitb": "samvit_base_patch16",
}
WEIGHT_SOURCES = ("hub", "file", "packaged", "none")
_RANDOM_SEED = 0  # random-init backbones are identical across calls, so caches keyed by "none" stay valid


def resolve_model_name(name: str) -> str:
    """Turn a backbone name into a timm model name.

    Args:
        name: An alias from :data:`ALIASES` or ``"timm/<model>"`` (a pretrained tag such as
            ``timm/vit_small_patch14_dinov2.lvd142m`` is allowed).

    Returns:
        The timm model name.

    Raises:
        ValueError: Unknown alias or timm model; the message lists the valid choices.

    Example:
        >>> resolve_model_name("dinov2_vits14")
        'vit_small_patch14_dinov2'
        >>> resolve_model_name("timm/resnet18")
        'resnet18'
    """
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("timm/"):
        model = name.removeprefix("timm/")
        if model in timm.list_models() or model in timm.list_models(pretrained=True):
            return model
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        raise ValueError(f"Unknown timm model {model!r}" + (f"; did you mean {close}?" if close else ".")
                         + f" Browse with timm.list_models('*{model.split('_')[0]}*').")
    hint = f" Did you mean 'timm/{name}'?" if timm.is_model(name) else ""
    raise ValueError(f"Unknown backbone {name!r}.{hint} Use an alias ({', '.join(ALIASES)}) "
                     "or any timm model as 'timm/<name>'.")


def create_backbone(
    name: str,
    weights: str = "none",
    path: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    global_pool: str | None = None,
) -> nn.Module:
    """Create a headless timm backbone and load its weights.

    Args:
        name: Alias or ``"timm/<model>"`` (see :func:`resolve_model_name`).
        weights: ``"hub"`` (timm's pretrained weights, needs network), ``"file"`` (``path``),
            ``"packaged"`` (offline DINOv2-S, ``dinov2_vits14`` only) or ``"none"`` (random init,
            deterministic: seed 0).
        path: Checkpoint for ``weights="file"``: ``.safetensors``/``.pth``/``.pt``/``.bin`` in timm
            layout or Meta's DINOv2/SAM layouts. Ignored by the other sources.
        img_size: Input size in pixels. ViT-style models are built for it and their position
            embeddings (and SAM's relative position tables) resampled from the checkpoint's grid;
            CNNs take any size, so it only matters to :func:`data_config` there. ``None`` keeps
            the timm default (518 for DINOv2, 1024 for SAM).
        drop_path_rate: Stochastic depth rate for fine-tuning.
        global_pool: timm pooling override (e.g. ``"avg"``, ``"token"``); ``None`` keeps the default.

    Returns:
        A timm model with ``num_classes=0``; ``model(x)`` gives pooled features ``(B, num_features)``.

    Raises:
        WeightsError: The weights cannot be found, read or matched to the model.
        ValueError: Unknown name or weights source, or ``weights="file"`` without ``path``.

    Example:
        >>> model = create_backbone("dinov2_vits14", weights="packaged", img_size=224)  # doctest: +SKIP
        >>> model(torch.randn(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    model_name = resolve_model_name(name)
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"Unknown backbone.weights={weights!r}; choose one of {WEIGHT_SOURCES}.")
    if weights == "file" and path is None:  # a path with another source is ignored: configs keep it around
        raise ValueError("backbone.weights=file needs backbone.path=/path/to/ckpt(.safetensors|.pth|.bin).")
    # Fail on weights before spending seconds on building a large model.
    state_dict: dict[str, torch.Tensor] | None = None
    if weights == "hub":
        check_hub_reachable()
    elif weights == "packaged":
        state_dict = load_packaged(model_name)
    elif weights == "file":
        state_dict = load_state_dict_file(path)

    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    # A forked RNG keeps random init reproducible without disturbing the caller's seeded stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        try:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise ValueError(f"timm model {model_name} rejects one of {sorted(kwargs)}: {e}") from e
            # CNNs take any input size and have no img_size argument; data_config(model, img_size) still applies it.
            kwargs.pop("img_size")
            model = timm.create_model(model_name, pretrained=False, **kwargs)

    if weights == "hub":
        _load_hub(model, model_name)
    elif state_dict is not None:
        load_weights(model, state_dict, source=str(path) if weights == "file" else f"packaged {model_name}")
    return model


def _load_hub(model: nn.Module, model_name: str) -> None:
    """Download with timm's own loader, but adapt the checkpoint exactly like a local file.

    ``timm.create_model(pretrained=True)`` would apply timm's filter alone, which cannot load SAM
    below 1024 px (its pos_embed/rel_pos keep the release's shapes) and resamples DINOv2's grid with
    antialiasing, unlike the file and packaged paths.
    """
    from timm.models import load_pretrained

    def _filter(state_dict: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
        return adapt_state_dict(state_dict, target, source=f"hub {model_name}")

    try:
        load_pretrained(model, num_classes=0, filter_fn=_filter, strict=True)
    except WeightsError:
        raise
    except Exception as e:  # network, auth (gated repos) and "no pretrained weights" all land here
        raise WeightsError(f"Could not load hub weights for {model_name}: {type(e).__name__}: {e}\n"
                           "Use backbone.weights=file backbone.path=... or backbone.weights=none.") from e


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto ``model``'s keys and shapes; raise if anything is left unmatched.

    Applies the model module's timm ``checkpoint_filter_fn`` (Meta DINOv2: drops ``mask_token``,
    resamples ``pos_embed``; Meta SAM: strips ``image_encoder.``, ``lin1`` -> ``fc1``, drops the
    prompt encoder and mask decoder), then resamples what timm leaves alone: SAM's NHWC
    ``pos_embed`` and its ``rel_pos_h/w`` tables (linearly, as SAM's ``get_rel_pos`` does at runtime).
    Classifier weights are dropped because backbones have ``num_classes=0``.

    Raises:
        WeightsError: Missing, unexpected or mis-shaped keys remain (a few are named).
    """
    target = model.state_dict()
    sd = _timm_filter(model)(dict(state_dict), model)
    if "norm.weight" in sd and "fc_norm.weight" in target and "norm.weight" not in target:
        # global_pool="avg" moves the final norm after pooling in timm ViTs; same weights, new name.
        sd = {("fc_" + k if k.startswith("norm.") else k): v for k, v in sd.items()}
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    for key in list(sd):
        if key not in target and (key == "mask_token" or key.rsplit(".", 1)[0] in classifiers):
            del sd[key]
        elif key in target and sd[key].shape != target[key].shape:
            sd[key] = _resample(key, sd[key], target[key].shape)

    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        parts = [f"{label} ({len(keys)}): {keys[:5]}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise WeightsError(f"{source} does not fit {arch}: " + "; ".join(parts)
                           + ". Is the checkpoint for this architecture?")
    return sd


def _timm_filter(model: nn.Module) -> Any:
    fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fn is None:
        return lambda sd, _model: sd
    if "antialias" in inspect.signature(fn).parameters:
        # DINOv2 (Meta and HF) resize position grids with plain bicubic at runtime; the packaged
        # conversion verifies to 1e-5 against ONNX this way and is 0.5 off with antialias.
        return functools.partial(fn, antialias=False)
    return fn


def _resample(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2:
        out = F.interpolate(value.T[None].float(), size=shape[0], mode="linear")
        return out[0].T.to(value.dtype).contiguous()
    if key == "pos_embed" and value.ndim == 4:  # SAM keeps an NHWC grid without a cls token
        # Same function timm's SAM forward uses when the input grid differs, so loading at a
        # smaller img_size equals running the full-size checkpoint on that input.
        return resample_abs_pos_embed_nhwc(value, list(shape[1:3]))
    return value  # left for the mismatch report


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load a checkpoint (timm or author layout) into ``model``, adapting it first.

    Example:
        >>> model = timm.create_model("test_vit", num_classes=0)
        >>> _ = load_weights(model, model.state_dict())
    """
    model.load_state_dict(adapt_state_dict(state_dict, model, source), strict=True)
    return model


def timm_model(backbone: nn.Module) -> nn.Module:
    """The timm model inside a backbone: itself, or the model a peft `PeftModel` wraps.

    Parameter names (`blocks.3.attn.qkv...`), `group_matcher` and `forward_intermediates` come from
    the timm model, so block grouping, layer decay and patch tokens work the same with and without LoRA.
    """
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) and backbone is not get_base() else backbone


def patch_tokens(backbone: nn.Module, images: torch.Tensor, layers: int | Sequence[int] = 1) -> list[torch.Tensor]:
    """Patch-token maps of the last ``layers`` blocks (an int) or of the given block indices.

    Uses timm's ``forward_intermediates`` with the final norm applied to every map, as DINOv2's
    linear segmentation heads read them. Through a peft wrapper the LoRA layers take part.

    Args:
        backbone: a timm model (ViTs, and CNNs whose feature maps count as tokens), or a peft model.
        images: ``[B, 3, H, W]``.
        layers: how many of the last blocks, or explicit block indices.

    Returns:
        One ``[B, C, H / patch, W / patch]`` map per requested block, shallowest first.

    Example:
        >>> maps = patch_tokens(create_backbone("timm/test_vit", img_size=64), torch.randn(2, 3, 64, 64), layers=2)
        >>> [tuple(m.shape) for m in maps]
        [(2, 64, 4, 4), (2, 64, 4, 4)]
    """
    model = timm_model(backbone)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no forward_intermediates in timm: it cannot give patch tokens.")
    kwargs: dict[str, Any] = {"indices": layers if isinstance(layers, int) else list(layers), "intermediates_only": True,
                              "output_fmt": "NCHW"}
    if "norm" in inspect.signature(model.forward_intermediates).parameters:
        kwargs["norm"] = True
    return list(model.forward_intermediates(images, **kwargs))


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """Return timm's preprocessing config with ``input_size`` set to what the model really takes.

    timm reports the pretrained config's size (518 for DINOv2) even for a model created at 224.

    Args:
        model: A model from :func:`create_backbone`.
        img_size: Explicit size (needed for CNNs, which accept any size); default: the model's grid.

    Returns:
        Dict with ``input_size`` ``(C, H, W)``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.

    Example:
        >>> model = create_backbone("dinov2_vits14", img_size=224)
        >>> data_config(model)["input_size"]
        (3, 224, 224)
    """
    cfg = timm.data.resolve_model_data_config(model)
    size = img_size or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: cfg[k] for k in keys}


def weights_fingerprint(name: str, weights: str, path: str | os.PathLike[str] | None = None) -> str:
    """Return a stable identity of a backbone's weights, for feature/embedding cache keys.

    Returns:
        ``"file:<sha256>"``, ``"packaged:<sha256 of converted safetensors>"``,
        ``"hub:<timm model>.<tag>"`` or ``"none:random-init:seed=0"``.

    Example:
        >>> weights_fingerprint("dinov2_vits14", "none")
        'none:random-init:seed=0'
    """
    model_name = resolve_model_name(name)
    if weights == "none":
        return f"none:random-init:seed={_RANDOM_SEED}"
    if weights == "file":
        if path is None or not Path(path).expanduser().is_file():
            raise WeightsError(f"Checkpoint file not found: {path}. Set backbone.path to an existing file.")
        return f"file:{_cached_sha256(Path(path).expanduser().resolve())}"
    if weights == "packaged":
        return f"packaged:{_cached_sha256(packaged_weights(model_name))}"
    if weights == "hub":
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise WeightsError(f"timm has no hub weights for {model_name}.")
        return f"hub:{cfg.architecture}.{cfg.tag}"
    raise ValueError(f"Unknown backbone.weights={weights!r}; choose one of {WEIGHT_SOURCES}.")


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:  # size/mtime invalidate the memo
    return file_sha256(path)
