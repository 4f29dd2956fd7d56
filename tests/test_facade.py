"""The public façade: every name in `vfmtune.__all__` stays what it is after the package is imported."""

from __future__ import annotations

import importlib
import pkgutil
import types

import vfmtune


def test_public_names__are_not_shadowed_by_submodules() -> None:
    # Importing `vfmtune.x` binds the attribute `x` on the package, which would hide a lazily
    # imported façade function `vfmtune.x` for the rest of the process (a notebook calling
    # vfmtune.train and then vfmtune.embed got "'module' object is not callable").
    for info in pkgutil.walk_packages(vfmtune.__path__, "vfmtune."):
        importlib.import_module(info.name)
    for name in vfmtune.__all__:
        assert not isinstance(getattr(vfmtune, name), types.ModuleType), f"vfmtune.{name} is a module"
    assert callable(vfmtune.embed) and callable(vfmtune.cv)
