"""Packaging: ``passes/`` installs as ``bnrewrite.passes`` (normal and editable installs), never as a
top-level ``passes``; the console script and the Dynamo backend entry point are declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, bnrewrite.passes, bnrewrite;"
    "print(bnrewrite.passes.__file__);"
    "print(importlib.util.find_spec('passes'))"
)


def _probe(env_path: str | None, cwd: Path) -> list[str]:
    env = None
    if env_path is not None:
        import os

        env = dict(os.environ, PYTHONPATH=env_path)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_installed_import_is_bnrewrite_passes(tmp_path):
    """The install this test suite runs under (editable in CI): no top-level ``passes``."""
    where, top = _probe(None, tmp_path)
    assert Path(where).parent.name in {"passes"}  # editable: the repository folder
    assert top == "None"


@pytest.mark.slow
def test_wheel_maps_passes_into_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("bnrewrite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnrewrite/passes/__init__.py" in names
    assert "bnrewrite/passes/fx.py" in names
    assert not any(n.startswith("passes/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[torch_dynamo_backends]" in text and "bnrewrite = bnrewrite.backend" in text
    assert "[console_scripts]" in text and "bnrewrite = bnrewrite.cli:main" in text
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    where, top = _probe(str(target), tmp_path)
    assert where == str(target / "bnrewrite" / "passes" / "__init__.py")
    assert top == "None"
