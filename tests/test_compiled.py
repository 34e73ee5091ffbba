"""The compiled lowering (issue 23): the estimator with a hand-written backward, for compilers.

Exact tier: fixed sampling against the independent float64 reference (tests/reference.py; its
gradient is autograd's through ``ref_batch_norm``); random sampling against the estimator's
composite form with the same offsets (the same RNG state); ``gradcheck`` in float64. Every
method, 1d/2d/3d, affine off, no running statistics, fp32/fp64/bf16, channels-last; then the
same lowering under ``torch.compile`` (``aot_eager``: AOTAutograd traces the joint graph through
it; Inductor for a few), and Inductor's own byte count of one layer (the fusion plan, not a time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from test_eager import (  # noqa: E402
    METHODS,
    SHAPES,
    VARIANTS,
    _inputs,
    assert_close_outputs,
    check_fixed_sampling,
    check_random_sampling,
)

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig  # noqa: E402
from bnrewrite.compiled import compiled_sampled_batch_norm  # noqa: E402
from bnrewrite.estimators import sampled_batch_norm as composite  # noqa: E402


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("method,ratio", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_fixed_sampling_equals_the_reference(shape, method, ratio, dtype):
    check_fixed_sampling(compiled_sampled_batch_norm, shape, method, ratio, dtype)


@pytest.mark.parametrize("name,shape,variant", VARIANTS, ids=[f"{n}-{v}" for n, _, v in VARIANTS])
@pytest.mark.parametrize("method,ratio", [*METHODS[:4], ("vdn", 1.0), ("fs_vdn", 1 / 4)])
def test_random_sampling_equals_the_estimator(name, shape, variant, method, ratio):
    """The same offsets: outputs, gradients and running statistics equal the composite
    estimator's (autograd of its gather). ``vdn``/``fs_vdn``: the last rows are virtual."""
    check_random_sampling(compiled_sampled_batch_norm, shape, variant, method, ratio)


@pytest.mark.parametrize("method", ["bs", "fs", "ns", "vdn", "fs_vdn", "full"])
@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (16, 2, 5), (12, 3), (6, 2, 3, 3, 3)])
def test_gradcheck(method, shape):
    ratio = None if method in ("full", "vdn") else 0.25
    cfg = SamplingConfig(method, ratio=ratio, min_count=4, vdn_samples=2)

    def f(x, w, b):
        torch.manual_seed(3)  # the same offsets at every evaluation
        return compiled_sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=cfg)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("method", ["bs", "fs", "vdn"])
def test_symbolic_sizes_use_the_mask_form(method):
    """``dynamic=True`` (a symbolic sampled size): the backward's fix-up is the 0/1 mask form;
    the compiled gradient equals the composite estimator's with the same offsets."""
    cfg = SamplingConfig(method, ratio=0.25, min_count=4, vdn_samples=2)
    x0 = torch.randn(12, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn_like(x0)

    def run(fn):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = fn(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y.detach(), dx

    def layer(x):
        return bnrewrite.sampled_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, config=cfg)

    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    got = run(compiled)
    want = run(lambda x: composite(x, None, None, None, None, True, 0.1, 1e-5, config=cfg))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def _grad_fn_names(y: torch.Tensor) -> set[str]:
    names, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return names


def test_public_functional_takes_the_eager_lowering(monkeypatch):
    """``from bnrewrite import sampled_batch_norm`` on an eager tensor of 64x64x28x28 runs the
    eager lowering (native kernels; its backward node), below 1M elements the composite form."""
    monkeypatch.delenv("BNREWRITE_EAGER", raising=False)
    from bnrewrite import sampled_batch_norm

    cfg = SamplingConfig("bs", ratio=1 / 8)
    x = torch.randn(64, 64, 28, 28, requires_grad=True)
    y = sampled_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, config=cfg)
    assert "_EagerSampledBatchNormBackward" in _grad_fn_names(y)
    small = torch.randn(8, 4, 3, 3, requires_grad=True)
    y = sampled_batch_norm(small, None, None, None, None, True, 0.1, 1e-5, config=cfg)
    assert not any("SampledBatchNorm" in n for n in _grad_fn_names(y))


#: The fix-up's ops: the per-element ``index_put`` and the grouped view's ``scatter`` (C++ code,
#: contiguous inputs).
_FIX_UPS = ("aten.index_put.default", "aten.scatter.src")


def test_compilers_take_the_compiled_lowering(monkeypatch):
    """Under ``torch.compile`` (backend, ``convert_`` and rewritten-graph routes) the joint graph
    holds the
    hand-written backward: its fix-up (``index_put`` or the grouped ``scatter``) writing the
    sample's values only, and no full-size scatter of the gather's autograd
    (``scatter_add``/``index_add``/``new_zeros`` of the input's size)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs: list[torch.fx.GraphModule] = []

    def inner(gm, example_inputs):
        from functorch.compile import make_boxed_func

        def keep(g, _inputs):
            graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    cfg = SamplingConfig("bs", ratio=1 / 4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(16, 3, 8, 8)
    for route in ("backend", "convert_", "rewrite"):
        graphs.clear()
        if route == "backend":
            from bnrewrite.backend import make_backend

            torch._dynamo.reset()
            backend = make_backend(cfg, inner="eager")
            rewritten = {}

            def capture(gm, example_inputs, backend=backend, rewritten=rewritten):
                backend(gm, example_inputs)
                rewritten["gm"] = gm
                return inner(gm, example_inputs)

            f = torch.compile(model, backend=capture)
        elif route == "convert_":
            torch._dynamo.reset()
            f = torch.compile(bnrewrite.convert_(nn.Sequential(*model), cfg), backend=inner)
        else:  # a rewritten GraphModule, compiled
            torch._dynamo.reset()
            f = torch.compile(bnrewrite.rewrite(model, cfg), backend=inner)
        f(x).sum().backward()
        backward = graphs[-1]
        calls = [n for n in backward.graph.nodes if n.op == "call_function"]
        targets = [str(n.target) for n in calls]
        fix_ups = [n for n in calls if str(n.target) in _FIX_UPS]
        assert fix_ups, (route, targets)
        for n in fix_ups:  # the values written are the sample's, not a full-size tensor
            src = n.args[2] if "index_put" in str(n.target) else n.args[3]
            assert src.meta["val"].numel() < n.meta["val"].numel(), (route, n.format_node())
        banned = ("scatter_add", "index_add", "new_zeros", "zeros")
        assert not any(b in t for t in targets for b in banned), (route, targets)


@pytest.mark.slow
@torch._inductor.config.patch(fallback_random=True)
def test_inductor_matches_the_estimator():
    """Inductor compiles the lowering (bs channels-last, fs NCHW) and gives the composite
    estimator's outputs, gradients and running statistics (``fallback_random``: Inductor draws
    the offsets from torch's RNG, as eager code does)."""
    for method, shape, cl in [("bs", (16, 8, 6, 6), True), ("fs", (8, 4, 8, 8), False)]:
        cfg = SamplingConfig(method, ratio=1 / 4, min_count=4)
        torch._dynamo.reset()
        results = []
        for compiled in (True, False):
            x, w, b, rm, rv, dy = _inputs(shape, torch.float32, channels_last=cl)

            def layer(x, w, b, rm=rm, rv=rv, cfg=cfg):
                return bnrewrite.sampled_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, config=cfg)

            fn = torch.compile(layer, backend="inductor") if compiled else layer
            torch.manual_seed(4)
            y = fn(x, w, b)
            grads = torch.autograd.grad(y, (x, w, b), dy)
            results.append([y, *grads, rm, rv])
        assert_close_outputs(results[0], results[1], torch.float32)


# -- Inductor's byte count of one layer, forward + backward ---------------------------------------

#: Upper bounds of Inductor's count (passes over the activation) on torch 2.13, measured
#: 2026-12-07. Before this lowering (C++ backend): bs 11.75, fs 12.5-13.0, full 11.0; compiled BN
#: 8.0. Issue 23 asks for 6.5: met under Triton's fusion rules (the GPU's plan) for NCHW, and for
#: fs in channels-last; not by the C++ backend (docs/architecture.md says why).
#: C++ backend: contiguous inputs take the grouped gather and scatter (one flat index per row and
#: group), channels-last keeps the per-element ``index_put`` fix-up (faster there on this CPU).
CPP_PASSES = {
    ("bs", "nchw"): 7.01,
    ("fs", "nchw"): 6.54,
    ("bs", "cl"): 7.51,
    ("fs", "cl"): 7.26,
}
TRITON_PLAN_PASSES = {
    ("bs", "nchw"): 6.5,
    ("fs", "nchw"): 6.5,
    ("bs", "cl"): 6.65,
    ("fs", "cl"): 6.5,
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (64, 64, 28, 28)], ids=["32x64", "64x64"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_inductor_byte_count(shape, layout):
    """The C++ backend's count (what the CPU runs) and Triton's plan of the same graphs."""
    from bnrewrite.apps.bench_compiled import inductor_passes, triton_plan_passes

    cl = layout == "cl"
    bn = inductor_passes("inductor", None, shape, cl)
    full = inductor_passes("bnrewrite", {"method": "full"}, shape, cl)
    assert bn[0] == pytest.approx(8.0, abs=0.01)
    assert full[0] <= bn[0] + 1e-6, (full, bn)
    bn_plan = sum(triton_plan_passes("inductor", None, shape, cl))
    full_plan = sum(triton_plan_passes("bnrewrite", {"method": "full"}, shape, cl))
    assert bn_plan == pytest.approx(8.0, abs=0.01) and full_plan <= bn_plan + 1e-6
    for method in ("bs", "fs"):
        options = {"method": method}
        passes, kernels = inductor_passes("bnrewrite", options, shape, cl)
        assert passes <= CPP_PASSES[method, layout], (method, passes, kernels)
        plan = sum(triton_plan_passes("bnrewrite", options, shape, cl))
        assert plan <= TRITON_PLAN_PASSES[method, layout], (method, plan)


@pytest.mark.slow
def test_pre_grad_pass_takes_the_compiled_lowering():
    """``backend="inductor"`` with ``SampledBatchNormPass`` as the pre-grad pass: Inductor's
    backward graph (seen by a post-grad pass) holds the fix-up (``index_put`` or the grouped
    ``scatter``, writing the sample's values only) and no full-size scatter of the gather's
    autograd."""
    from bnrewrite.backend import SampledBatchNormPass

    seen: list[list[torch.fx.Node]] = []

    def post_grad(graph: torch.fx.Graph) -> None:
        seen.append([n for n in graph.nodes if n.op == "call_function"])

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    torch._dynamo.reset()
    patches = {
        "pre_grad_custom_pass": SampledBatchNormPass(SamplingConfig("bs", ratio=1 / 4)),
        "post_grad_custom_post_pass": post_grad,
        "fx_graph_cache": False,
    }
    with torch._inductor.config.patch(patches):
        torch.compile(model, backend="inductor")(torch.randn(16, 3, 8, 8)).sum().backward()
    backward = [str(n.target) for n in seen[-1]]
    fix_ups = [n for n in seen[-1] if "index_put" in str(n.target) or "scatter" in str(n.target)]
    assert fix_ups, backward
    for n in fix_ups:  # the values written are the sample's, not a full-size tensor
        src = n.args[2] if "index_put" in str(n.target) else n.args[3]
        assert src.meta["val"].numel() < n.meta["val"].numel(), n.format_node()
    assert not any(b in t for t in backward for b in ("scatter_add", "index_add")), backward
