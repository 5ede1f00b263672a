"""Names a package exports from its submodules, imported on first use (so importing one submodule stays light)."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a submodule of ``package``) when ``name`` is first used."""

    def getattr_(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{exports[name]}", package), name)
        namespace[name] = value  # importing a submodule named like the export (compute) bound the module: the export wins
        return value

    return getattr_
