"""Packaging: ``passes/`` is ``bnrewrite.passes`` in all three forms -- a source checkout with no
install, an editable install and a wheel -- never a top-level ``passes``; the console script and the
Dynamo backend entry point are declared; the CLI reports a broken import as what it is."""

from __future__ import annotations

import os
import shutil
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
    assert "bnrewrite/passes/vdn_rules.py" in names
    assert "bnrewrite/apps/demo.py" in names and "bnrewrite/apps/__init__.py" in names
    assert not any(n.startswith(("passes/", "tests/", "bench/")) for n in names)
    assert not any(n.startswith("passes/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[torch_dynamo_backends]" in text and "bnrewrite = bnrewrite.backend" in text
    assert "[console_scripts]" in text and "bnrewrite = bnrewrite.cli:main" in text
    # A fresh venv holding only the wheel; its dependencies (torch, onnx, ...) are this
    # environment's site-packages, added by a .pth line (whose own .pth files, such as the
    # editable install's finder, are not processed there).
    import sysconfig
    import venv

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--ignore-installed", str(wheel)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # pip runs from this environment, where an editable bnrewrite of the same version is
    # installed: --ignore-installed, or pip may call the wheel "already satisfied" and skip it
    assert (site / "bnrewrite" / "__init__.py").is_file(), "the wheel was not installed"
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run(
        [str(python), "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    where, top = out.stdout.split()
    assert where == str(site / "bnrewrite" / "passes" / "__init__.py")
    assert top == "None"
    res = subprocess.run(
        [str(python), "-m", "bnrewrite", "onnx", "--help"], cwd=tmp_path, capture_output=True,
        text=True,
    )  # fmt: skip
    assert res.returncode == 0 and "--method" in res.stdout, res.stderr
    installed = {p.relative_to(site).as_posix() for p in (site / "bnrewrite").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == installed


def _checkout_copy(tmp_path: Path) -> Path:
    """The source tree as a user has it after ``git clone``, without installing it."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("bnrewrite", "passes"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_source_checkout_imports_passes_without_install(tmp_path):
    """From the repository root with no install (the current directory shadows any installed
    copy), ``bnrewrite.passes`` is the checkout's ``passes/`` folder."""
    root = _checkout_copy(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", "import bnrewrite.passes.vdn_rules as m; print(m.__file__)"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(out.stdout.strip()) == root / "passes" / "vdn_rules.py"


def test_source_checkout_cli_runs_onnx(tmp_path):
    """The issue's reproduction: ``python -m bnrewrite onnx IN OUT ...`` from the checkout root."""
    import torch

    root = _checkout_copy(tmp_path)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4)).train()
    src = tmp_path / "in.onnx"
    import bnrewrite.onnx

    bnrewrite.onnx.export(model, (torch.randn(4, 2, 6, 6),), str(src), config=None)
    dst = tmp_path / "out.onnx"
    res = subprocess.run(
        [sys.executable, "-m", "bnrewrite", "onnx", str(src), str(dst), "--method", "bs",
         "--ratio", "0.5"],
        cwd=root,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert dst.is_file()


def test_cli_reports_a_broken_import_as_such(tmp_path):
    """A subcommand whose module fails to import is reported with the import error, exit 1 --
    never as an unknown command or a missing argument."""
    root = _checkout_copy(tmp_path)
    (root / "bnrewrite" / "onnx" / "cli.py").write_text("import module_that_does_not_exist\n")
    res = subprocess.run(
        [sys.executable, "-m", "bnrewrite", "onnx", "IN.onnx", "OUT.onnx", "--method", "bs"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "cannot import bnrewrite.onnx.cli" in lines[0]
    assert "No module named 'module_that_does_not_exist'" in lines[0]
    assert "unrecognized arguments" not in res.stderr
