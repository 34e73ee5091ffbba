"""The fused Triton kernels against the torch estimator (the single source of truth).

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before the kernels are built); on a CUDA machine the ``cuda`` tests run
them compiled. Every comparison covers the output, ``dx``, ``dweight``, ``dbias`` and both running
statistics, with fixed sampling and with identical random offsets (same RNG state or seed).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Triton's interpreter must be on before triton is first imported (its own tl.* helpers are built at
# import). If another test imported triton earlier in this process, the interpreter cases run in a
# subprocess (test_interpreter_subprocess) instead.
_NEED_SUBPROCESS = (
    not HAS_CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
if not HAS_CUDA and not _NEED_SUBPROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig, sampled_batch_norm  # noqa: E402
from bnrewrite.estimators import reset_generators  # noqa: E402
from bnrewrite.kernels import (  # noqa: E402
    can_use_kernels,
    convert_fused_,
    fused_bn_backward,
    fused_bn_forward,
    fused_sampled_batch_norm,
    use_interpreter,
)

if not HAS_CUDA and not _NEED_SUBPROCESS:
    assert use_interpreter(), "the kernels must run under the Triton interpreter on CPU"
DEV = "cpu" if not HAS_CUDA else "cuda"


@pytest.fixture(autouse=True)
def _interpreter_guard(request):
    if _NEED_SUBPROCESS and request.node.originalname != "test_interpreter_subprocess":
        pytest.skip(
            "triton was imported without TRITON_INTERPRET; run by test_interpreter_subprocess"
        )


def test_interpreter_subprocess():
    """Runs this file under TRITON_INTERPRET=1 in a fresh process when this one cannot."""
    if not _NEED_SUBPROCESS:
        pytest.skip("the interpreter cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def _input(shape, dtype=torch.float32, layout="cl", device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.7
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":  # neither layout: the kernels take a copy
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return x.to(device=device, dtype=dtype)


def _run(fn, x, cfg, *, affine=True, track=True, momentum=0.1, seed=1234, grad_layout=None):
    """Forward + backward of ``fn``; returns (y, dx, dw, db, rm, rv)."""
    C = x.shape[1]
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(C, generator=g) + 0.5).to(x.device) if affine else None
    b = torch.randn(C, generator=g).to(x.device) if affine else None
    xx = x.detach().clone().requires_grad_()
    ww = w.clone().requires_grad_() if affine else None
    bb = b.clone().requires_grad_() if affine else None
    rm = torch.randn(C, generator=g).to(x.device) if track else None
    rv = (torch.rand(C, generator=g) + 0.5).to(x.device) if track else None
    torch.manual_seed(seed)
    reset_generators()
    y = fn(xx, rm, rv, ww, bb, True, momentum, 1e-5, config=cfg)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype)
    if grad_layout == "nchw":
        dy = dy.contiguous()
    elif grad_layout == "expand":
        dy = dy[:1].expand_as(y)
    y.backward(dy)
    return (
        y,
        xx.grad,
        ww.grad if affine else None,
        bb.grad if affine else None,
        rm,
        rv,
    )


def _compare(x, cfg, **kw):
    assert can_use_kernels(x, cfg), "kernels are not used for this input"
    ref = _run(sampled_batch_norm, x, cfg, **kw)
    got = _run(fused_sampled_batch_norm, x, cfg, **kw)
    tol = TOL[x.dtype]
    names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"]
    for name, r, o in zip(names, ref, got):
        if r is None:
            assert o is None, name
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, name
        # low-precision outputs are compared at their own precision; fp32 statistics tightly
        t = tol if r.dtype != torch.float32 else TOL[torch.float32]
        if name in ("dweight", "dbias"):  # sums over the whole channel
            t = dict(atol=t["atol"] * 20, rtol=t["rtol"])
        torch.testing.assert_close(o, r, **t, msg=lambda m, n=name: f"{n}: {m}")
    return ref, got


# ----------------------------------------------------------------------------------------------
# acceptance 1: outputs and gradients equal the reference (fixed sampling), both layouts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize(
    "method,ratio", [("bs", 0.25), ("ns", 0.25), ("fs", 0.25), ("fs", 1 / 16), ("full", 1.0)]
)
def test_fixed_sampling_matches_reference(method, ratio, layout):
    x = _input((8, 6, 9, 7), layout=layout)
    _compare(x, SamplingConfig(method=method, ratio=ratio, sampling="fixed"))


@pytest.mark.parametrize("channels,groups", [(10, 3), (16, 4), (64, 4)])
@pytest.mark.parametrize("method", ["bs", "fs", "ns"])
def test_random_offsets_identical_sample_set(method, channels, groups):
    """Same RNG state -> same offsets from draw_offsets -> same sample set as the torch path.

    (10, 3): per-(row, channel) index math; (16, 4) and (64, 4): one group per channel block.
    """
    if method == "ns" and channels != 10:
        pytest.skip("ns has one group")
    x = _input((8, channels, 6, 5))
    cfg = SamplingConfig(method=method, ratio=0.25, groups=1 if method == "ns" else groups)
    ref, got = _compare(x, cfg)
    # and the sample really is random: fixed sampling gives different statistics
    fixed = _run(sampled_batch_norm, x, cfg.replace(sampling="fixed"))
    assert not torch.allclose(fixed[4], ref[4])


def test_sample_block_choice_covers_both_index_paths():
    from bnrewrite.kernels.ops import _launch_plan, _sample_blocks

    def uniform(C, G, method="bs"):
        lp = _launch_plan((8, C, 4, 4), method, 0.25, G, "random", 2)
        return _sample_blocks(C, lp.G, lp.parts[0], True)[2]

    assert uniform(64, 4) and uniform(16, 4) and uniform(8, 4) and uniform(6, 1, "ns")
    assert not uniform(10, 3) and not uniform(48, 4)  # 48/4 = 12: general path


def test_seeded_sampling_identical():
    x = _input((6, 8, 8, 8))
    _compare(x, SamplingConfig(method="fs", ratio=1 / 16, seed=11))


@pytest.mark.parametrize("method", ["vdn", "fs_vdn"])
def test_virtual_rows(method):
    x = _input((7, 6, 6, 5))
    _compare(x, SamplingConfig(method=method, ratio=0.25, vdn_samples=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["bs", "fs"])
def test_low_precision(dtype, method):
    x = _input((8, 6, 8, 6), dtype=dtype)
    _compare(x, SamplingConfig(method=method, ratio=0.25))


@pytest.mark.parametrize(
    "shape,method",
    [
        ((16, 6), "bs"),  # (N, C): fs is bs
        ((16, 6), "fs"),
        ((6, 5, 11), "fs"),  # BatchNorm1d with length
        ((3, 4, 4, 5, 6), "fs"),  # BatchNorm3d
        ((4, 130, 3, 3), "bs"),  # several channel blocks, groups straddling blocks
        ((4, 3, 3, 3), "fs"),  # fewer channels than groups
    ],
)
def test_shapes(shape, method):
    _compare(_input(shape), SamplingConfig(method=method, ratio=0.25))


def test_other_strides_and_grad_layouts():
    cfg = SamplingConfig(method="fs", ratio=0.25)
    _compare(_input((4, 6, 6, 6), layout="strided"), cfg)
    _compare(_input((4, 6, 6, 6)), cfg, grad_layout="nchw")
    _compare(_input((4, 6, 6, 6)), cfg, grad_layout="expand")


def test_no_affine_no_running_stats_and_tensor_momentum():
    x = _input((6, 5, 4, 4))
    cfg = SamplingConfig(method="bs", ratio=0.5)
    _compare(x, cfg, affine=False)
    _compare(x, cfg, track=False)
    _compare(x, cfg, momentum=torch.tensor(0.25))


def _relu_reference(*args, **kwargs):
    return torch.relu(sampled_batch_norm(*args, **kwargs))


def _fused_relu(*args, **kwargs):
    return fused_sampled_batch_norm(*args, relu=True, **kwargs)


@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize(
    "method,dtype", [("bs", torch.float32), ("fs", torch.float32), ("fs", torch.bfloat16)]
)
def test_relu_epilogue(method, dtype, layout):
    """relu=True: the ReLU fused into normalise, its mask recomputed from x in the backward."""
    x = _input((8, 16, 6, 5), dtype=dtype, layout=layout)
    cfg = SamplingConfig(method=method, ratio=0.25)
    ref = _run(_relu_reference, x, cfg)
    got = _run(_fused_relu, x, cfg)
    tol = TOL[dtype]
    for name, r, o in zip(["y", "dx", "dw", "db", "rm", "rv"], ref, got, strict=True):
        t = tol if r.dtype != torch.float32 else TOL[torch.float32]
        if name in ("dw", "db"):
            t = dict(atol=t["atol"] * 20, rtol=t["rtol"])
        torch.testing.assert_close(o, r, **t, msg=lambda m, n=name: f"{n}: {m}")
    assert (got[0] >= 0).all() and (got[0] == 0).any()


@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize("method,dtype", [("bs", torch.float32), ("fs", torch.bfloat16)])
def test_residual_relu_epilogue(method, dtype, layout):
    """relu(bn(x) + z): outputs, dx, dz, dweight, dbias and running stats vs the estimator."""
    x = _input((8, 16, 6, 5), dtype=dtype, layout=layout)
    z = _input((8, 16, 6, 5), dtype=dtype, layout=layout, seed=9)
    cfg = SamplingConfig(method=method, ratio=0.25)
    outs = []
    for fused in (False, True):
        # the reference in float32: in bf16 it would round bn(x) before adding z, which flips the
        # ReLU mask where bn(x) + z is near 0; the kernels add in float32 and round once
        xx = (x if fused else x.float()).clone().requires_grad_()
        zz = (z if fused else z.float()).clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, 16, device=DEV).requires_grad_()
        b = torch.linspace(-0.3, 0.3, 16, device=DEV).requires_grad_()
        rm, rv = torch.zeros(16, device=DEV), torch.ones(16, device=DEV)
        torch.manual_seed(3)
        if fused:
            y = fused_sampled_batch_norm(
                xx, rm, rv, w, b, True, 0.1, 1e-5, config=cfg, relu=True, residual=zz
            )
        else:
            y = torch.relu(sampled_batch_norm(xx, rm, rv, w, b, True, 0.1, 1e-5, config=cfg) + zz)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
        y.backward(dy.to(y.dtype))
        outs.append((y, xx.grad, zz.grad, w.grad, b.grad, rm, rv))
    tol = TOL[dtype]
    for name, r, o in zip(["y", "dx", "dz", "dw", "db", "rm", "rv"], *outs, strict=True):
        assert o.dtype == (dtype if name in ("y", "dx", "dz") else torch.float32), name
        o, r = o.float(), r.float()
        t = tol if name in ("y", "dx", "dz") else TOL[torch.float32]
        if name in ("dw", "db"):
            t = dict(atol=t["atol"] * 20, rtol=t["rtol"])
        torch.testing.assert_close(o, r, **t, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(ValueError, match="relu=True"):
        fused_sampled_batch_norm(x, None, None, training=True, config=cfg, residual=z)


def test_launch_heuristics_do_not_change_results():
    from bnrewrite.kernels.ops import tuning

    x = _input((8, 32, 6, 6))
    cfg = SamplingConfig(method="fs", ratio=0.25)
    with tuning(tile=256, max_bc=16, warps=4, bwd_progs_per_sm=1):
        _compare(x, cfg)
    with pytest.raises(ValueError, match="unknown tuning key"):
        with tuning(blocks=3):
            pass


def test_output_layout_follows_input():
    cfg = SamplingConfig(method="bs", ratio=0.5)
    x = _input((4, 6, 5, 5))
    y = fused_sampled_batch_norm(x, None, None, training=True, config=cfg)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = fused_sampled_batch_norm(x.contiguous(), None, None, training=True, config=cfg)
    assert y.is_contiguous()


def test_eval_mode_and_fallbacks(monkeypatch):
    x = _input((4, 6, 5, 5))
    rm, rv = torch.randn(6, device=DEV), torch.rand(6, device=DEV) + 0.5
    y = fused_sampled_batch_norm(x, rm, rv, training=False, config="bs")
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, rm, rv, training=False))
    # float64 is not a kernel dtype: the torch path, bit for bit
    xd = x.double()
    assert not can_use_kernels(xd)
    torch.manual_seed(0)
    a = fused_sampled_batch_norm(xd, None, None, training=True, config="bs")
    torch.manual_seed(0)
    b = sampled_batch_norm(xd, None, None, training=True, config="bs")
    assert torch.equal(a, b)
    monkeypatch.setenv("BNREWRITE_KERNELS", "0")
    assert not can_use_kernels(x)
    with pytest.raises(ValueError, match="more than 1 value"):
        fused_sampled_batch_norm(x[:1, :, :1, :1], None, None, training=True, config="bs")


def test_gradient_formula_by_hand():
    """The docstring's closed form: dx = s*dy - [a in A] * s/n * (dbeta + xhat*dgamma)."""
    x = _input((8, 4, 3, 3))
    cfg = SamplingConfig(method="bs", ratio=0.25, sampling="fixed", min_count=1)  # 2 of 8 rows
    xx = x.clone().requires_grad_()
    w = torch.rand(4, device=DEV) + 0.5
    y = fused_sampled_batch_norm(xx, None, None, w, None, True, 0.1, 1e-5, config=cfg)
    dy = torch.randn_like(y)
    y.backward(dy)
    s = x[:2]  # k = 2 fixed rows
    n = s.numel() // 4
    mu = s.mean((0, 2, 3), keepdim=True)
    var = s.var((0, 2, 3), unbiased=False, keepdim=True)
    r = torch.rsqrt(var + 1e-5)
    sc = w.view(1, -1, 1, 1) * r
    xhat = (x - mu) * r
    dbeta = dy.sum((0, 2, 3), keepdim=True)
    dgamma = (dy * xhat).sum((0, 2, 3), keepdim=True)
    expect = sc * dy
    expect[:2] -= sc * (dbeta + xhat[:2] * dgamma) / n
    torch.testing.assert_close(xx.grad, expect, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# torch.library: schema, fake implementations, autograd registration, torch.compile tracing
# ----------------------------------------------------------------------------------------------
def _op_args(x, cfg_args=("fs", 0.25, 4, "random", 2), eps=1e-5):
    C = x.shape[1]
    w = torch.rand(C, device=x.device) + 0.5
    b = torch.randn(C, device=x.device)
    off = torch.zeros((x.shape[0], 4, 2), dtype=torch.int64, device=x.device)
    off[..., 0] = 1
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    return (x, w, b, rm, rv, off, 0.1, None, *cfg_args, eps, True, None)


def test_opcheck_forward_and_backward():
    x = _input((4, 6, 4, 4)).requires_grad_()
    args = _op_args(x)
    torch.library.opcheck(fused_bn_forward, args)
    y, mean, var, _, _ = fused_bn_forward(*args)
    dy = torch.randn_like(y)
    bargs = (dy, x.detach(), mean, var, args[1], args[2], args[5], *args[8:])
    torch.library.opcheck(fused_bn_backward, bargs)
    # the residual-add + ReLU form
    z = torch.randn_like(x.detach()).requires_grad_()
    rargs = (*args[:-1], z)
    torch.library.opcheck(fused_bn_forward, rargs)
    y, mean, var, _, _ = fused_bn_forward(*rargs)
    torch.library.opcheck(fused_bn_backward, (*bargs[:-1], z.detach()))


def test_torch_compile_traces_the_ops():
    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")

    def f(x, w, b):
        return fused_sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=cfg)

    x = _input((4, 6, 5, 5))
    w, b = torch.rand(6, device=DEV) + 0.5, torch.randn(6, device=DEV)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (f, compiled):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, b)
        y.square().sum().backward()
        outs.append((y, xx.grad, ww.grad))
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_)


def test_convert_fused_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True)
    )  # the in-place ReLU modifies the op's output: it must not be a view
    ref_net = copy.deepcopy(net)
    cfg = SamplingConfig(method="fs", ratio=0.25)
    bnrewrite.convert_(ref_net, cfg)
    convert_fused_(net, cfg)
    assert type(net[1]).__name__ == "FusedSampledBatchNorm2d"
    net, ref_net = net.to(DEV), ref_net.to(DEV)
    x = _input((4, 3, 8, 8))
    outs = []
    for m in (ref_net, net):
        torch.manual_seed(5)
        y = m(x)
        y.sum().backward()
        outs.append((y, m[1].weight.grad, m[1].running_mean, m[1].num_batches_tracked))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# GPU only (skipped without CUDA): ResNet-sized bf16 channels-last shapes, compiled kernels
# ----------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(
    "shape", [(32, 64, 56, 56), (32, 256, 28, 28), (64, 2048, 7, 7), (64, 1000)]
)
@pytest.mark.parametrize("method,ratio", [("bs", 1 / 8), ("fs", 1 / 16)])
def test_cuda_resnet_shapes_bf16(shape, method, ratio):
    x = _input(shape, dtype=torch.bfloat16, device="cuda")
    _compare(x, SamplingConfig(method=method, ratio=ratio))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_cuda_dtypes_layouts(dtype, layout):
    x = _input((16, 96, 14, 14), dtype=dtype, layout=layout, device="cuda")
    _compare(x, SamplingConfig(method="fs", ratio=1 / 16, sampling="fixed"))
    _compare(x, SamplingConfig(method="bs", ratio=1 / 8))


def test_backend_routes_to_kernels():
    """lowering="kernels": AOTAutograd's forward graph calls the fused op (BN + ReLU fused)."""
    pytest.importorskip("bnrewrite.passes.fx")  # installed (package-dir), not just on PYTHONPATH
    backend = pytest.importorskip("bnrewrite.backend")

    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ).to(DEV)
    ref = copy.deepcopy(net)
    bnrewrite.convert_(ref, cfg)
    x = _input((4, 3, 6, 6))
    seen = []

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def count_ops(gm, example_inputs):  # noqa: ANN001
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def inner(gm, example_inputs):  # noqa: ANN001
        return aot_module_simplified(gm, example_inputs, fw_compiler=count_ops)

    be = backend.make_backend(cfg, inner="eager", lowering="kernels")
    compiled = torch.compile(net, backend=lambda gm, ex: inner(_rewrite(be, gm, ex), ex))
    y = compiled(x)
    y.sum().backward()
    y_ref = ref(x)
    y_ref.sum().backward()
    assert any("fused_bn_forward" in t for t in seen), seen
    assert not any("relu" in t for t in seen), seen  # the ReLU runs inside the kernels
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(net[1].weight.grad, ref[1].weight.grad, atol=2e-4, rtol=2e-5)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)


def _rewrite(be, gm, example_inputs):  # noqa: ANN001
    """The backend's FX rewrite only (its inner compiler is replaced by the op counter)."""
    from bnrewrite.passes.fx import rewrite_graph

    rewrite_graph(gm, be.config, lowering=be.lowering)
    return gm


def test_fused_modules_compile_without_graph_breaks():
    """convert_fused_ + torch.compile(fullgraph=True): the ResNet-50 bench's 'fused' variant."""
    cfg = SamplingConfig(method="fs", ratio=0.25)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=None),
    ).to(DEV)
    ref = copy.deepcopy(net)
    convert_fused_(net, cfg)
    convert_fused_(ref, cfg)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = _input((4, 3, 6, 6))
    for _ in range(2):  # two steps: running stats and num_batches_tracked advance
        torch.manual_seed(1)
        y = compiled(x)
        y.square().sum().backward()
        torch.manual_seed(1)
        y_ref = ref(x)
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad, atol=2e-4, rtol=2e-4)


class _Block(torch.nn.Module):
    """A shared ReLU module (as in torchvision's Bottleneck) and a BN with two users."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):  # noqa: ANN001
        h = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(h))
        return self.relu(z) + torch.nn.functional.relu(z) + z  # bn2 has three users: not fused


def test_fuse_relu_graph_module():
    from bnrewrite.kernels import fuse_relu

    cfg = SamplingConfig(method="fs", ratio=0.25)
    torch.manual_seed(0)
    net = _Block().to(DEV)
    ref = copy.deepcopy(net)
    bnrewrite.convert_(ref, cfg)
    convert_fused_(net, cfg)
    gm = fuse_relu(net)
    assert gm.bnrewrite_fused_relu == 1
    assert gm.get_submodule("bn1").fuse_relu and not net.bn1.fuse_relu
    assert not gm.get_submodule("bn2").fuse_relu
    x = _input((4, 3, 6, 6))
    outs = []
    for m in (ref, gm):
        torch.manual_seed(5)
        y = m(x)
        y.square().sum().backward()
        outs.append((y, m.get_submodule("conv1").weight.grad, m.get_submodule("bn1").running_var))
    for a, b in zip(*outs, strict=True):  # conv grads reach ~1e3: tolerance relative to that
        torch.testing.assert_close(a, b, atol=5e-6 * max(1.0, b.abs().max().item()), rtol=5e-5)
    assert net.bn1.weight.grad is not None  # parameters are shared with the original model


class _ResBlock(torch.nn.Module):
    """Bottleneck tail: relu(bn3(conv3(h)) + identity), the identity computed after bn3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 8, 1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv3 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = torch.nn.BatchNorm2d(8)
        self.proj = torch.nn.Conv2d(8, 8, 1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):  # noqa: ANN001
        h = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(h))
        identity = self.proj(x)
        return self.relu(out + identity)


def test_fuse_relu_residual_graph_module():
    from bnrewrite.kernels import fuse_relu

    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")  # call order changes: fixed
    torch.manual_seed(0)
    net = _ResBlock().to(DEV)
    ref = copy.deepcopy(net)
    bnrewrite.convert_(ref, cfg)
    convert_fused_(net, cfg)
    gm = fuse_relu(net)
    assert gm.bnrewrite_fused_relu == 2
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("call_function") == 0  # the add is gone
    x = _input((4, 8, 5, 5))
    outs = []
    for m in (ref, gm):
        y = m(x)
        y.square().sum().backward()
        outs.append((y, m.get_submodule("proj").weight.grad, m.get_submodule("bn3").weight.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=5e-6 * max(1.0, b.abs().max().item()), rtol=5e-5)
    # what the bench's 'fused+relu' ResNet-50 variant compiles
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), gm(x), atol=1e-5, rtol=1e-5)


def test_bias_gradient_has_the_bias_dtype():
    """Issue 18, item 14: the bias gradient is cast to the bias's own dtype, not the weight's."""
    x = _input((8, 4, 5, 5), torch.float32).requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, 4, device=DEV, dtype=torch.bfloat16).requires_grad_(True)
    bias = torch.linspace(-0.2, 0.3, 4, device=DEV, dtype=torch.float32).requires_grad_(True)
    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")
    assert can_use_kernels(x, cfg)
    y = fused_sampled_batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5, config=cfg)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    y.backward(dy)
    assert bias.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    # d(sum dy*y)/db = sum dy for any sample set; a detour through bfloat16 (the weight's dtype)
    # would lose ~3 significant digits
    want = dy.double().sum(dim=(0, 2, 3)).float()
    torch.testing.assert_close(bias.grad, want, atol=1e-4, rtol=1e-5)
