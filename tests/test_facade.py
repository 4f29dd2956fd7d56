"""The public façade: every name in `vfmtune.__all__` stays what it is after the package is imported
(functions stay functions; `vfmtune.viz` is the one public submodule)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import vfmtune


def test_public_names__are_not_shadowed_by_submodules() -> None:
    # Importing `vfmtune.x` binds the attribute `x` on the package, which would hide a lazily
    # imported façade function `vfmtune.x` for the rest of the process (a notebook calling
    # vfmtune.train and then vfmtune.embed got "'module' object is not callable").
    for info in pkgutil.walk_packages(vfmtune.__path__, "vfmtune."):
        importlib.import_module(info.name)
    for name in vfmtune.__all__:
        is_module = isinstance(getattr(vfmtune, name), types.ModuleType)
        assert is_module == (name in vfmtune._MODULES), f"vfmtune.{name} is {'' if is_module else 'not '}a module"
    assert callable(vfmtune.embed) and callable(vfmtune.cv) and callable(vfmtune.explore) and callable(vfmtune.subsample)
    assert callable(vfmtune.viz.plot_embedding_map)


def test_viz__reachable_after_a_bare_import() -> None:
    # In a fresh process (nothing imported yet): `vfmtune.viz` is loaded by the façade, not by an earlier import.
    code = "import vfmtune, sys; assert 'vfmtune.viz' not in sys.modules; print(vfmtune.viz.plot_misclassified.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "plot_misclassified"
