"""``bnrewrite bench`` in CI-size mode on the CPU, and the pieces the GPU run relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnrewrite.apps import bench
from bnrewrite.apps.resnet50 import bn_shapes, resnet50
from bnrewrite.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_resnet50_is_torchvision_sized():
    model = resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's count
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 53
    shapes = bn_shapes(256)
    assert len(shapes) == 12
    assert shapes[0] == (256, 64, 112, 112) and shapes[-1] == (256, 2048, 7, 7)
    # the shapes a forward actually sees (small input, so it is cheap)
    seen: set[tuple[int, ...]] = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.add(tuple(i[0].shape[1:])))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert seen == {s[1:] for s in bn_shapes(1, 64)}


def test_roofline_and_shape_parsing():
    # ANCHORS.md: 256x64x112x112 bf16 is 411 MB, 5-pass roofline 0.49 ms
    n = 256 * 64 * 112 * 112
    assert abs(bench.roofline_ms(n, 2) - 0.489) < 0.01
    assert bench._parse_shapes("64x56x56,2048x7x7", False, 8) == [(8, 64, 56, 56), (8, 2048, 7, 7)]
    assert len(bench._parse_shapes(None, False, 256)) == 12
    assert bench._parse_methods("bs:1/8,fs:0.0625") == [
        ("bs 1/8", "bs", 0.125),
        ("fs 0.0625", "fs", 0.0625),
    ]


def test_bench_cpu_small_mode(tmp_path, capsys):
    """Acceptance 2: one command, CPU, CI size; writes the JSON table and the ResNet-50 step."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--small", "--out", str(out), "--e2e-steps", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    # the eager rows (issue 12): native BN and every eager / composite variant, side by side
    assert [row["shape"] for row in data["eager"]] == [list(s) for s in bench.EAGER_SMALL_SHAPES]
    for row in data["eager"]:
        assert set(row["times_ms"]) == {"native"} | {
            f"{kind} {label}"
            for kind in ("eager", "composite")
            for label, *_ in bench.EAGER_METHODS
        }
        assert all(v > 0 for v in row["ratio_vs_native"].values())
    assert data["meta"]["mode"] == "small" and data["meta"]["torch"] == torch.__version__
    assert len(data["layers"]) == len(bench.SMALL_SHAPES)
    for row in data["layers"]:
        assert row["roofline_5pass_ms"] > 0
        for name in ("native", "torch bs 1/8", "torch fs 1/16"):
            assert row["times"][name]["ms"] > 0, (name, row)
        assert row["ratios"]["torch bs 1/8"]["speedup_vs_cudnn"] > 0
    variants = data["e2e"]["variants"]
    assert variants["plain"]["step_ms"] > 0 and variants["plain"]["finite_params"]
    assert variants["torch bs 0.125"]["step_ms"] > 0
    assert "wrote" in capsys.readouterr().out


def test_bench_bad_shapes_is_one_line_error(capsys):
    rc = main(["bench", "--device", "cpu", "--shapes", "64xfoo", "--no-e2e"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--shapes" in err


@pytest.mark.slow
def test_bench_interpreted_kernels(tmp_path):
    """The kernels' rows and checks, under TRITON_INTERPRET=1 in a fresh process (tiny shapes)."""
    pytest.importorskip("triton")
    out = tmp_path / "k.json"
    cmd = [sys.executable, "-m", "bnrewrite", "bench", "--interpret", "--no-e2e"]
    cmd += ["--shapes", "8x4x4", "--batch", "4", "--out", str(out)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["kernels"] is True
    assert data["checks"] and all(c["ok"] and c["kernels_used"] for c in data["checks"])
    times = data["layers"][0]["times"]
    assert times["kernels bs 1/8"]["ms"] > 0 and times["kernels fs 1/16"]["ms"] > 0


@pytest.mark.slow
def test_compiled_section_small(tmp_path, capsys):
    """``bnrewrite bench --sections compiled --small``: one layer shape, both layouts, every
    variant with Inductor's passes (and Triton's plan on the CPU), kernels and times side by
    side; the ResNet-50 rows with the no-statistics ceiling; the summary script reads the JSON."""
    out = tmp_path / "compiled.json"
    rc = main(["bench", "--device", "cpu", "--sections", "compiled", "--small", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["compiled"]["layers"]
    assert [r["layout"] for r in rows] == ["nchw", "cl"]
    for row in rows:
        v = row["variants"]
        assert list(v) == ["compiled BN", "full", "bs 1/8", "fs 1/16", "ns 1/8"]
        assert v["compiled BN"]["ratio"] == 1.0 and v["compiled BN"]["passes"] == pytest.approx(
            8, abs=0.05
        )
        assert all(
            x["kernels"] > 0 and x["ms"] > 0 and "passes_triton_plan" in x for x in v.values()
        )
        assert v["bs 1/8"]["passes"] < v["compiled BN"]["passes"]
    model = result["compiled"]["model"]["variants"]
    assert set(model) == {
        "compiled BN",
        "backend bs 1/8",
        "backend fs 1/16",
        "no statistics (ceiling)",
    }
    assert "passes" in capsys.readouterr().out
    summary = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compiled_summary.py"), str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| 16x8x8x8 | nchw |" in summary and "no statistics (ceiling)" in summary
