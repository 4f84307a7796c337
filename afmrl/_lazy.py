"""Lazy package exports: ``from afmrl import ProductEncoder`` imports torch only when that name is asked for.

__getattr__, __all__ = lazy_exports(__name__, {"ProductEncoder": "afmrl.encoder.model", ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first use, and ``__all__``."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
