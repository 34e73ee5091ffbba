"""The eager lowering (issue 12): native kernels, the estimator's contract.

Exact tier: fixed sampling against the independent float64 reference (tests/reference.py, whose
gradient is autograd's through ``ref_batch_norm``); random sampling against the estimator's
composite form with the same offsets (the same RNG state); ``gradcheck`` in float64. Every
method, 1d/2d/3d, affine off, no running statistics, fp32/fp64/bf16, channels-last.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from reference import ref_batch_norm  # noqa: E402

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig  # noqa: E402
from bnrewrite.eager import eager_applicable, eager_sampled_batch_norm  # noqa: E402
from bnrewrite.estimators import sampled_batch_norm as composite  # noqa: E402

SHAPES = {
    "1d-NC": (64, 12),
    "1d-NCL": (32, 6, 10),
    "2d": (32, 8, 6, 6),
    "2d-odd": (16, 6, 5, 7),  # unequal channel groups, non-square maps
    "3d": (16, 4, 4, 4, 4),
}
METHODS = [("bs", 1 / 8), ("ns", 1 / 8), ("fs", 1 / 16), ("bs", 1 / 2), ("full", 1.0)]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _inputs(shape, dtype, affine=True, running=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    w = b = None
    if affine:
        w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(True)
        b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.zeros(c, dtype=stat) if running else None
    rv = torch.ones(c, dtype=stat) if running else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, rm, rv, dy


def _run(fn, x, w, b, rm, rv, dy, cfg):
    y = fn(x, rm, rv, w, b, True, 0.1, 1e-5, config=cfg)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    return [y, *grads] + [t.clone() for t in (rm, rv) if t is not None]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("method,ratio", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_fixed_sampling_equals_the_reference(shape, method, ratio, dtype):
    check_fixed_sampling(eager_sampled_batch_norm, shape, method, ratio, dtype)


def assert_close_outputs(got, want, dtype):
    tol = TOL[dtype]
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        scale = max(1.0, float(e.detach().double().abs().max()))
        torch.testing.assert_close(
            a.double(), e.detach().double(), rtol=tol, atol=tol * scale, msg=f"output {i}"
        )


def check_fixed_sampling(fn, shape, method, ratio, dtype):
    """``fn`` (a lowering, ``F.batch_norm``'s arguments) with fixed sampling equals the float64
    reference: output, input and parameter gradients, running statistics."""
    cfg = SamplingConfig(method, ratio=ratio, sampling="fixed")
    x, w, b, rm, rv, dy = _inputs(shape, dtype)
    rmr, rvr = rm.double().clone(), rv.double().clone()
    got = _run(fn, x, w, b, rm, rv, dy, cfg)
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    yr = ref_batch_norm(xr, wr, br, rmr, rvr, method, ratio, 0.1, 1e-5)
    want = [yr, *torch.autograd.grad(yr, (xr, wr, br), dy.double()), rmr, rvr]
    assert_close_outputs(got, want, dtype)


VARIANTS = [
    (name, shape, variant)
    for name, shape in SHAPES.items()
    for variant in ("plain", "no-affine", "no-running", "channels-last", "bf16", "seeded")
    if variant != "channels-last" or len(shape) == 4  # a 4-d layout
]


@pytest.mark.parametrize("name,shape,variant", VARIANTS, ids=[f"{n}-{v}" for n, _, v in VARIANTS])
@pytest.mark.parametrize("method,ratio", [*METHODS[:4], ("vdn", 1.0), ("fs_vdn", 1 / 4)])
def test_random_sampling_equals_the_estimator(name, shape, variant, method, ratio):
    """The same offsets (the same RNG state, or the same seeded generator): the eager lowering's
    outputs, gradients and running statistics equal the composite estimator's. ``vdn``/``fs_vdn``:
    the input's last ``vdn_samples`` rows are the virtual rows (what the VDN pass feeds the op)."""
    check_random_sampling(eager_sampled_batch_norm, shape, variant, method, ratio)


def check_random_sampling(fn, shape, variant, method, ratio):
    """``fn`` and the composite estimator, from the same random state, agree."""
    dtype = torch.bfloat16 if variant == "bf16" else torch.float64
    seed = 11 if variant == "seeded" else None
    cfg = SamplingConfig(method, ratio=ratio, seed=seed)
    results = []
    for lowering in (fn, composite):
        args = _inputs(
            shape,
            dtype,
            affine=variant != "no-affine",
            running=variant != "no-running",
            channels_last=variant == "channels-last",
        )
        if seed is not None:
            from bnrewrite import estimators

            estimators._GENERATORS.clear()  # both start from the seeded generator's first draw
        torch.manual_seed(5)
        results.append(_run(lowering, *args, cfg))
    assert_close_outputs(results[0], results[1], dtype)


@pytest.mark.parametrize("method", ["bs", "fs", "ns"])
@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (16, 2, 5), (12, 3)])
def test_gradcheck(method, shape):
    cfg = SamplingConfig(method, ratio=0.25, min_count=4)

    def f(x, w, b):
        torch.manual_seed(3)  # the same offsets at every evaluation
        return eager_sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=cfg)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_modules_and_rewritten_graphs_run_the_eager_lowering(monkeypatch):
    """``convert_`` modules and an FX-rewritten model run eagerly on the native kernels (the
    backward node is the eager lowering's); under ``torch.compile`` the estimator's aten form is
    traced instead, with the same numbers."""
    monkeypatch.setenv("BNREWRITE_EAGER", "1")  # every size (the default starts at 1M elements)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(16, 3, 8, 8)
    cfg = SamplingConfig("bs", ratio=1 / 4, sampling="fixed")
    gm = bnrewrite.rewrite(model, cfg)
    y = gm(x)
    names = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    assert any("EagerSampledBatchNorm" in n for n in names)
    twin = bnrewrite.convert_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), cfg)
    twin.load_state_dict(model.state_dict(), strict=False)
    assert "EagerSampledBatchNorm" in type(twin(x).grad_fn).__name__
    compiled = torch.compile(bnrewrite.rewrite(model, cfg), backend="aot_eager")
    torch.testing.assert_close(compiled(x), gm(x), rtol=1e-5, atol=1e-5)


def test_applicability_and_switch(monkeypatch):
    from bnrewrite.eager import EAGER_MIN_NUMEL

    monkeypatch.delenv("BNREWRITE_EAGER", raising=False)
    x = torch.randn(4, 3)
    big = torch.empty(EAGER_MIN_NUMEL // 64, 64)
    assert not eager_applicable(x) and eager_applicable(big)  # small: the composite form
    monkeypatch.setenv("BNREWRITE_EAGER", "1")
    assert eager_applicable(x)
    monkeypatch.setenv("BNREWRITE_EAGER", "0")
    assert not eager_applicable(big)
    monkeypatch.delenv("BNREWRITE_EAGER")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not eager_applicable(mode.from_tensor(x))
