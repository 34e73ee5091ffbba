"""The sampled BatchNorm op: exact tier (full == F.batch_norm; fixed == float64 reference; gradcheck).

Statistical tier (random sampling) is in ``test_estimators_random.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ref_batch_norm, ref_take

from bnrewrite import SamplingConfig, sampled_batch_norm
from bnrewrite.estimators import reset_generators

SHAPES = [(6, 5), (6, 5, 7), (6, 5, 7, 9), (4, 3, 5, 6, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (forward atol/rtol, gradient atol/rtol) per dtype, against a float32 / float64 reference.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-9),
}


def _layouts(shape):
    yield "contiguous", torch.contiguous_format
    if len(shape) == 4:
        yield "channels_last", torch.channels_last
    if len(shape) == 5:
        yield "channels_last_3d", torch.channels_last_3d


def _input(shape, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    return x.to(memory_format=fmt).requires_grad_(True)


def _params(c, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5).to(dtype).requires_grad_(True)
    b = torch.randn(c, generator=g).to(dtype).requires_grad_(True)
    return w, b


CASES = [
    (shape, dtype, name, fmt)
    for shape in SHAPES
    for dtype in DTYPES
    for name, fmt in _layouts(shape)
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape,dtype,layout,fmt", CASES, ids=[f"{s}-{str(d)[6:]}-{n}" for s, d, n, _ in CASES]
)
def test_full_equals_functional_batch_norm(shape, dtype, layout, fmt, affine):
    c = shape[1]
    x1 = _input(shape, dtype, fmt)
    x2 = x1.detach().clone().requires_grad_(True)
    w1, b1 = _params(c) if affine else (None, None)
    w2, b2 = (
        (w1.detach().clone().requires_grad_(True), b1.detach().clone().requires_grad_(True))
        if affine
        else (None, None)
    )
    rm1, rv1 = torch.randn(c), torch.rand(c) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    cfg = SamplingConfig(method="full")
    y1 = sampled_batch_norm(x1, rm1, rv1, w1, b1, True, 0.1, 1e-5, config=cfg)
    y2 = F.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5)
    assert y1.dtype == y2.dtype == dtype
    assert y1.is_contiguous(memory_format=fmt)
    tol = TOL[dtype]
    torch.testing.assert_close(y1.float(), y2.float(), **tol)
    torch.testing.assert_close(rm1, rm2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv1, rv2, atol=1e-5, rtol=1e-5)
    g = torch.randn(shape).to(dtype)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), **tol)
    if affine:  # parameter gradients are sums over many elements: relative tolerance by dtype
        ptol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(w1.grad, w2.grad, atol=ptol, rtol=ptol)
        torch.testing.assert_close(b1.grad, b2.grad, atol=ptol * b2.grad.abs().max(), rtol=ptol)


@pytest.mark.parametrize("shape", SHAPES)
def test_full_eval_mode_and_no_running_stats(shape):
    c = shape[1]
    x = _input(shape, torch.float32, torch.contiguous_format)
    w, b = _params(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    for method in ("full", "bs", "fs"):
        cfg = SamplingConfig(method=method)
        # eval mode: running statistics, untouched buffers, exactly F.batch_norm
        rm1, rv1 = rm.clone(), rv.clone()
        y = sampled_batch_norm(x, rm1, rv1, w, b, False, 0.1, 1e-5, config=cfg)
        torch.testing.assert_close(y, F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
        assert torch.equal(rm1, rm) and torch.equal(rv1, rv)
    # no running stats (track_running_stats=False): batch statistics, nothing to update
    y = sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config="full")
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))


def _fixed_cases():
    for method, ratio in [("bs", 0.5), ("ns", 0.34), ("fs", 0.25), ("fs", 0.1)]:
        for shape in SHAPES:
            if ref_take(shape[0], ratio) < 2 and (method != "fs" or len(shape) == 2):
                continue  # one value per channel: an error, tested below
            for dtype in DTYPES:
                for name, fmt in _layouts(shape):
                    yield method, ratio, shape, dtype, name, fmt


FIXED = list(_fixed_cases())


@pytest.mark.parametrize(
    "method,ratio,shape,dtype,layout,fmt",
    FIXED,
    ids=[f"{m}{r}-{s}-{str(d)[6:]}-{n}" for m, r, s, d, n, _ in FIXED],
)
def test_fixed_equals_float64_reference(method, ratio, shape, dtype, layout, fmt):
    c = shape[1]
    x = _input(shape, dtype, fmt, seed=5)
    w, b = _params(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    cfg = SamplingConfig(method=method, ratio=ratio, sampling="fixed")
    y = sampled_batch_norm(x, rm, rv, w, b, True, 0.2, 1e-5, config=cfg)

    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = b.detach().double().requires_grad_(True)
    yr = ref_batch_norm(xr, wr, br, rm_ref, rv_ref, method, ratio, 0.2, 1e-5)

    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(rm.double(), rm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    y.backward(g.to(dtype))
    yr.backward(g.double())
    # gradients of low-precision inputs: compare with a relative-norm error
    for got, want in [(x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)]:
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-12)
        bound = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        assert err < bound, (err, bound)


@pytest.mark.parametrize("method,ratio", [("bs", 0.5), ("fs", 0.25), ("ns", 0.5)])
@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 4, 5), (3, 2, 3, 4, 4)])
def test_gradcheck_fixed(method, ratio, shape):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    cfg = SamplingConfig(method=method, ratio=ratio, sampling="fixed")

    def f(x, w, b):
        return sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=cfg)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("method,ratio", [("bs", 0.5), ("fs", 0.25)])
@pytest.mark.parametrize("shape", [(8, 6, 4, 5), (8, 6, 6)])
def test_gradcheck_random_with_replayed_draws(method, ratio, shape):
    """The random gather path: a seeded config replays the same offsets on every call."""
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    cfg = SamplingConfig(method=method, ratio=ratio, groups=3, seed=11)

    def f(x, w, b):
        reset_generators()
        return sampled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, config=cfg)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_single_value_per_channel_is_an_error():
    x = torch.randn(4, 3)
    no_floor = SamplingConfig("bs", ratio=0.25, min_count=1)  # the floor would take all 4 rows
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sampled_batch_norm(x, None, None, training=True, config=no_floor)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # 1 value available
        sampled_batch_norm(torch.randn(1, 3), None, None, training=True, config="bs")
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        sampled_batch_norm(torch.randn(4), None, None, training=True, config="bs")


def test_vdn_statistics_come_from_the_last_rows():
    """The op accepts externally supplied statistics rows: for vdn, the last vdn_samples rows."""
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    cfg = SamplingConfig(method="vdn", vdn_samples=2)
    y = sampled_batch_norm(x, None, None, training=True, config=cfg, eps=0.0)
    v = x[3:]
    mean = v.mean((0, 2, 3), keepdim=True)
    var = v.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / var.sqrt())
    # fs_vdn: union of the fs patch of the real rows and every virtual element
    cfg = SamplingConfig(method="fs_vdn", ratio=0.25, vdn_samples=2, sampling="fixed", min_count=1)
    y = sampled_batch_norm(x, None, None, training=True, config=cfg, eps=0.0)
    real = x[:3, :, :2, :2].permute(1, 0, 2, 3).reshape(3, -1)
    virt = x[3:].permute(1, 0, 2, 3).reshape(3, -1)
    both = torch.cat([real, virt], 1)
    mean = both.mean(1).view(1, 3, 1, 1)
    var = both.var(1, unbiased=False).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / var.sqrt())


def test_non_tensor_argument_is_torchs_type_error():
    """Issue 18, item 11: a non-tensor argument raises ``TypeError`` naming it, as F.batch_norm."""
    import numpy as np

    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"argument 'input' \(position 1\) must be Tensor"):
        sampled_batch_norm(np.zeros((4, 3)), rm, rv, training=True, config="bs")
    with pytest.raises(TypeError, match="argument 'weight' .* must be Tensor or None, not list"):
        sampled_batch_norm(torch.zeros(4, 3), rm, rv, [1.0, 1.0, 1.0], training=True)


@pytest.mark.parametrize("method", ["full", "bs", "fs", "ns"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (0,)])
def test_empty_batch_matches_pytorch(method, shape):
    """Issue 18, item 15: N = 0 gives an empty output, running statistics untouched (and an
    empty gradient), as F.batch_norm; including the 1-D empty input it accepts."""
    x = torch.randn(shape, requires_grad=True)
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    rm0, rv0 = rm.clone(), rv.clone()
    y = sampled_batch_norm(x, rm, rv, training=True, config=method)
    want = F.batch_norm(x.detach(), rm0.clone(), rv0.clone(), training=True)
    assert y.shape == want.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_eval_without_running_stats_uses_the_whole_batch():
    """Issue 18, item 1 (the estimator's part): in eval mode a BN without running statistics
    normalises with the statistics of the whole batch, exactly nn.BatchNorm's eval -- never a
    sample, whatever the config."""
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    for cfg in (SamplingConfig("bs", ratio=0.25), SamplingConfig("vdn", vdn_samples=2)):
        y = sampled_batch_norm(x, None, None, bn.weight, bn.bias, False, 0.1, 1e-5, config=cfg)
        torch.testing.assert_close(y, bn(x), rtol=0, atol=0)


def _ref_random_sample(x: torch.Tensor, plan, offsets: torch.Tensor) -> list[list[float]]:
    """Per channel, the sorted values of the random sample set, straight from the plan's
    contract: along a sampled axis ``(offset + step * j) mod size`` for ``j < count``, the offset
    of the channel's group ``c * G // C`` (and, for spatial axes, of the row); every index of the
    other axes; real rows only."""
    import itertools

    n_real, channels = plan.real_rows, x.shape[1]
    sampled = {ax.axis: (i, ax) for i, ax in enumerate(plan.axes)}
    out = []
    for c in range(channels):
        g = c * plan.groups // channels
        values = []
        rows = range(n_real)
        if 0 in sampled:
            i, ax = sampled[0]
            off = int(offsets[0, g, i])
            rows = [(off + ax.step * j) % ax.size for j in range(ax.count)]
        for r in rows:
            axes = []
            for d, size in enumerate(x.shape[2:], start=2):
                if d in sampled:
                    i, ax = sampled[d]
                    off = int(offsets[r if plan.offset_rows > 1 else 0, g, i])
                    axes.append([(off + ax.step * j) % ax.size for j in range(ax.count)])
                else:
                    axes.append(range(size))
            for pos in itertools.product(*axes):
                values.append(float(x[(r, c, *pos)]))
        out.append(sorted(values))
    return out


@pytest.mark.parametrize(
    "shape,method,kw",
    [
        ((16, 8, 6, 6), "bs", {}),
        ((16, 8, 6, 6), "ns", {}),
        ((16, 6, 6, 6), "bs", {"groups": 4}),  # 4 groups do not divide 6 channels
        ((12, 8, 7, 5), "fs", {}),
        ((12, 6, 7, 5), "fs", {"groups": 4}),
        ((8, 8, 10), "fs", {}),
        ((4, 4, 4, 6, 6), "fs", {}),
        ((14, 8, 6, 6), "fs_vdn", {"vdn_samples": 4}),
        ((16, 8), "bs", {}),
    ],
)
def test_grouped_gather_is_the_sample_set(shape, method, kw):
    """The compiled lowering's grouped gather (one flat index per row and group) takes exactly
    the sample set of the plan's contract, channel by channel, for contiguous and channels-last
    inputs; its statistics equal the reference's over that set."""
    from bnrewrite.estimators import draw_offsets, grouped_gather, sample_statistics
    from bnrewrite.plan import sample_plan

    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64)
    plan = sample_plan(shape, SamplingConfig(method, ratio=0.25, min_count=1, **kw))
    offsets = draw_offsets(plan, x.device)
    ref = _ref_random_sample(x, plan, offsets)
    layouts = [x]
    if x.dim() == 4:
        layouts.append(x.contiguous(memory_format=torch.channels_last))
    for t in layouts:
        got = grouped_gather(t, plan, offsets)  # (rows, G', C / G', M)
        per_channel = got.permute(1, 2, 0, 3).reshape(shape[1], -1)
        assert [sorted(v.tolist()) for v in per_channel] == ref
        mean, var = sample_statistics(t, plan, offsets, grouped=True)
        values = torch.tensor(ref, dtype=torch.float64)
        if plan.virtual_rows:
            virt = x[plan.real_rows :].transpose(0, 1).reshape(shape[1], -1)
            values = torch.cat([values, virt], 1)
        torch.testing.assert_close(mean, values.mean(1))
        torch.testing.assert_close(var, values.var(1, correction=0))
