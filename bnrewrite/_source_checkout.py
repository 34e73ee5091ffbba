"""``bnrewrite.passes`` from a source checkout, with no install.

The graph passes live in the repository's top-level ``passes/`` folder, which setuptools installs
as ``bnrewrite.passes`` (``package-dir``). A wheel and an editable install map it; a plain checkout
on ``sys.path`` (running from the repository root, a notebook beside it, ``PYTHONPATH=.``) does
not, and the current directory then also shadows any installed copy. When this package is imported
from a checkout -- ``bnrewrite/`` has no ``passes`` of its own and ``../passes/__init__.py``
exists next to it -- a meta-path finder resolves ``bnrewrite.passes`` to that folder. Installed
copies are left to the normal import machinery. Importing this module registers it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["install_source_passes"]

_NAME = "bnrewrite.passes"


class _SourcePassesFinder(importlib.abc.MetaPathFinder):
    """Finds ``bnrewrite.passes`` (only) in the checkout's ``passes/`` folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            self.folder / "__init__.py",
            submodule_search_locations=[str(self.folder)],
        )


def install_source_passes() -> bool:
    """Register the finder when running from a checkout; returns whether it did."""
    package = Path(__file__).resolve().parent
    folder = package.parent / "passes"
    if (package / "passes").exists() or not (folder / "__init__.py").is_file():
        return False  # an installed layout (wheel), or a tree without passes/
    if not (package.parent / "pyproject.toml").is_file():
        return False
    if any(isinstance(f, _SourcePassesFinder) for f in sys.meta_path):
        return True
    # Before the path-based finder: an installed bnrewrite.passes elsewhere (editable or wheel)
    # must not mix with this checkout's bnrewrite package.
    sys.meta_path.insert(0, _SourcePassesFinder(folder))
    return True


install_source_passes()
