"""``torch.library`` custom ops around the Triton kernels, their autograd, and the public function.

Ops (namespace ``bnrewrite``, prefix ``fused_bn_`` -- distinct from the graph-level
``bnrewrite::sampled_batch_norm`` of the FX pass):

* ``bnrewrite::fused_bn_forward(x, weight?, bias?, running_mean?, running_var?, offsets?,
  momentum, momentum_t?, method, ratio, groups, sampling, vdn_samples, eps, relu, residual?)
  -> (y, mean, var, new_running_mean, new_running_var)``: sampled statistics (fp32, biased), the
  normalised output over the whole tensor in ``x``'s layout (optionally ``relu(y)`` or
  ``relu(y + residual)``), and the updated running statistics (functional; empty without them).
* ``bnrewrite::fused_bn_backward(dy, x, mean, var, weight?, bias?, offsets?, <same config>, eps,
  relu, residual?) -> (dx, dgamma, dbeta, dresidual)``.

Both carry fake (meta) implementations, so ``torch.compile`` traces them as opaque nodes, and the
forward has ``register_autograd`` with the backward op. The sample set is rebuilt inside the op
from ``bnrewrite.plan.sample_plan`` and the ``offsets`` that the caller drew with
``bnrewrite.estimators.draw_offsets`` -- the same plan and the same draw as the torch path, so
fixed and seeded sampling give identical sample sets.

The gradient (``A`` the sample set of a channel, ``n = |A|``, ``r = rsqrt(var + eps)``,
``s = w * r``, ``xhat = (x - mu) * r``, ``y = xhat * w + b``; sums without a set run over all
elements of the channel):

    dbeta  = sum dy                      dgamma = sum dy * xhat
    dL/dmu  = sum dy * dy/dmu = -s * dbeta
    dL/dvar = sum dy * w * (x - mu) * dr/dvar = -(1/2) r^2 * w * dgamma
    dmu/dx_a = [a in A] / n              dvar/dx_a = [a in A] * 2 (x_a - mu) / n
    (the mu-dependence of var drops out because sum_A (x - mu) = 0)

    dL/dx_a = s * dy_a + [a in A] * (dL/dmu / n + dL/dvar * 2 (x_a - mu) / n)
            = s * dy_a - [a in A] * (s / n) * (dbeta + xhat_a * dgamma)

so one pass over everything writes ``s * dy`` and reduces ``dbeta``, ``dgamma``; a fix-up over the
sample (``n`` elements per channel) rewrites ``dx_a = s * (dy_a - (dbeta + xhat_a * dgamma) / n)``.
With ``A`` = everything this is PyTorch's BatchNorm backward. With the ReLU epilogue
``out = relu(y [+ z])``, ``dy`` above is replaced by ``g = dout * [y (+ z) > 0]`` (mask recomputed
from ``x`` and ``z``), and ``dz = g``. The ``mean``/``var``/running-statistics outputs are marked
non-differentiable (they feed the running statistics only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import DEFAULT_MIN_COUNT, SamplingConfig
from ..estimators import draw_offsets, sampled_batch_norm, update_running_stats
from ..plan import SamplePlan, sample_plan

__all__ = [
    "fused_sampled_batch_norm",
    "fused_bn_forward",
    "fused_bn_backward",
    "kernels_available",
    "can_use_kernels",
    "kernels_refusal",
    "interpreter_enabled",
    "use_interpreter",
    "tuning",
    "TUNING",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------
# [module or None, built for the interpreter] once loaded: plain globals that Dynamo folds
_KERNELS: list[Any] = []


def _load_kernels() -> None:
    try:
        from . import triton_kernels
    except Exception:  # pragma: no cover - no triton
        triton_kernels = None  # type: ignore[assignment]
    interpreted = triton_kernels is not None and (
        type(triton_kernels.normalize_kernel).__name__ == "InterpretedFunction"
    )
    _KERNELS[:] = [triton_kernels, interpreted]


def _triton_kernels() -> Any:
    """The kernels module, or ``None`` when Triton does not import."""
    if not _KERNELS:
        _load_kernels()
    return _KERNELS[0]


def kernels_available() -> bool:
    """True when Triton imports (kernels can run on CUDA, or on the CPU under the interpreter)."""
    return _triton_kernels() is not None


def interpreter_enabled() -> bool:
    """True when the kernels were built under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    if not _KERNELS:
        _load_kernels()
    return bool(_KERNELS[1])


def use_interpreter() -> bool:
    """Build the kernels for Triton's CPU interpreter (tests without a GPU); process-wide.

    Sets ``TRITON_INTERPRET=1`` and re-creates the kernels if they were already built for the GPU.
    Returns :func:`interpreter_enabled`.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    mod = _triton_kernels()
    if mod is not None and not interpreter_enabled():
        importlib.reload(mod)
        _load_kernels()
    return interpreter_enabled()


def kernels_refusal(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    """Why an input of this device, dtype and rank would not run the kernels (``None``: it would).

    The rules of :func:`can_use_kernels` without a tensor (graph passes call it on node meta).
    """
    if os.environ.get("BNREWRITE_KERNELS", "1") == "0":
        return "BNREWRITE_KERNELS=0"
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the kernels take float16, bfloat16, float32)"
    if not 2 <= dim <= 5:
        return f"{dim}-d input (the kernels take 2-d to 5-d)"
    if not kernels_available():
        return "Triton does not import"
    if device.type == "cuda":
        return "the kernels were built for the interpreter" if interpreter_enabled() else None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"a {device.type} tensor (the kernels run on CUDA)"


def can_use_kernels(x: Tensor, config: SamplingConfig | None = None) -> bool:
    """Whether :func:`fused_sampled_batch_norm` runs ``x`` through the kernels.

    Needs Triton, a float16/bfloat16/float32 input with 0 to 3 spatial dims, and either a CUDA
    tensor or a CPU tensor with the kernels built under ``TRITON_INTERPRET=1`` (tests). Set
    ``BNREWRITE_KERNELS=0`` to force the torch path.
    """
    if x.numel() == 0:
        return False
    return kernels_refusal(x.device, x.dtype, x.dim()) is None


# --------------------------------------------------------------------------------------------
# launch plan: the sample plan turned into kernel arguments
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Part:
    """One part of the sample set, enumerated by the sample kernels."""

    total: int  # sample rows of this part: rows_count * m0 * m1 * m2
    row_base: int
    row_mod: int
    m: tuple[int, int, int]
    st: tuple[int, int, int]
    off_cols: tuple[int, int, int, int]  # row, s0, s1, s2 (-1: no offset)


@dataclasses.dataclass(frozen=True)
class _Launch:
    plan: SamplePlan
    N: int
    C: int
    L: int
    S: tuple[int, int, int]
    G: int
    A: int
    n: int
    parts: tuple[_Part, ...]


def _np2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=1024)
def _launch_plan(
    shape: tuple[int, ...],
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    min_count: int = DEFAULT_MIN_COUNT,
) -> _Launch:
    cfg = SamplingConfig(
        method=method,
        ratio=ratio,
        groups=groups,
        sampling=sampling,
        vdn_samples=vdn_samples,
        min_count=min_count,
    )
    plan = sample_plan(shape, cfg)
    N, C = shape[0], shape[1]
    spatial = tuple(shape[2:])
    if len(spatial) > 3:
        raise ValueError(f"fused kernels support up to 3 spatial dims, got shape {shape}")
    S = spatial + (1,) * (3 - len(spatial))
    L = math.prod(spatial)
    parts: list[_Part] = []
    R = plan.real_rows
    if plan.include_real and R > 0:
        rows_count, off_r = R, -1
        m = list(S)
        st = [1, 1, 1]
        offc = [-1, -1, -1]
        for col, ax in enumerate(plan.axes):
            if ax.axis == 0:
                rows_count = ax.count
                off_r = col if plan.random else -1
            else:
                i = ax.axis - 2
                m[i], st[i] = ax.count, ax.step
                offc[i] = col if plan.random else -1
        total = rows_count * math.prod(m)
        parts.append(_Part(total, 0, R, tuple(m), tuple(st), (off_r, *offc)))
    if plan.virtual_rows:
        V = plan.virtual_rows
        parts.append(_Part(V * L, R, V, S, (1, 1, 1), (-1, -1, -1, -1)))
    return _Launch(
        plan, N, C, L, S, plan.groups, max(1, len(plan.axes)), plan.count(), tuple(parts)
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: few programs, big tiles


def _dummy_offsets(device: torch.device) -> Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def _is_channels_last(t: Tensor) -> bool:
    """``t`` is a ``(rows, C)`` matrix: element ``(n, c, l)`` at ``(n*L + l)*C + c``."""
    N, C = t.shape[0], t.shape[1]
    spatial = t.shape[2:]
    expected = 1
    if C != 1 and t.stride(1) != 1:
        return False
    expected = C
    for size, stride in reversed(list(zip(spatial, t.stride()[2:]))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return N == 1 or t.stride(0) == expected


def _canonical(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` in one of the two layouts the kernels read (a copy only for other strides)."""
    if _is_channels_last(t):
        return t, True
    return t.contiguous(), False


def _as_layout(t: Tensor, cl: bool) -> Tensor:
    """``t`` in the given layout (copying if needed)."""
    if cl:
        if _is_channels_last(t):
            return t
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _empty(shape: tuple[int, ...], cl: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    if cl:  # empty_strided, not a view: outputs of custom ops may be modified in place
        strides = [0] * len(shape)
        strides[1] = 1
        acc = shape[1]
        for d in range(len(shape) - 1, 1, -1):
            strides[d] = acc
            acc *= shape[d]
        strides[0] = acc
        return torch.empty_strided(shape, strides, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _out_layout(x: Tensor) -> bool:
    return _is_channels_last(x)


# --------------------------------------------------------------------------------------------
# block shapes
# --------------------------------------------------------------------------------------------
#: Launch heuristics; ``tuning(...)`` changes them for a block (the bench's tuning pass uses it).
#: tile: elements per tile of the whole-tensor kernels; max_bc: widest channel block
#: (channels-last); warps: num_warps of those kernels (None: 8 for tiles >= 4096, else 4);
#: bwd_progs_per_sm: programs per SM of the backward main pass (each loops over its tiles).
TUNING: dict[str, Any] = {"tile": 4096, "max_bc": 128, "warps": None, "bwd_progs_per_sm": 8}


@contextlib.contextmanager
def tuning(**changes: Any) -> Iterator[None]:
    """Temporarily change the launch heuristics (``TUNING``); unknown keys are an error."""
    unknown = set(changes) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown tuning key(s) {sorted(unknown)}; known: {sorted(TUNING)}")
    saved = dict(TUNING)
    TUNING.update(changes)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)


def _dense_blocks(C: int, rows: int, cl: bool, tile_div: int = 1) -> tuple[int, int, int]:
    """``(BLOCK_L, BLOCK_C, num_warps)`` of the whole-tensor kernels."""
    tile = max(1, TUNING["tile"] // tile_div)
    if cl:
        bc = min(TUNING["max_bc"], _np2(C))
        bl = max(1, min(tile // bc, _np2(rows)))
    else:
        bl = min(256, _np2(rows))
        bc = max(1, min(_np2(C), tile // bl))
    warps = TUNING["warps"] or (8 if bl * bc * tile_div >= 4096 else 4)
    return bl, bc, warps


def _sample_blocks(C: int, G: int, part: _Part, cl: bool) -> tuple[int, int, bool]:
    """``(BLOCK_S, BLOCK_C, UNIFORM)`` of the sample kernels.

    ``UNIFORM`` (one channel group per block: per-row index math, 128-bit loads) when the part
    has no offsets, ``G == 1``, or the group width ``C/G`` has a power-of-two factor ``>= 8`` (or
    is a power of two) that the block width can divide.
    """
    cap = 64 if cl else 16
    has_offsets = any(o >= 0 for o in part.off_cols)
    if not has_offsets or G == 1:
        bc, uniform = min(cap, _np2(C)), True
    elif C % G == 0 and ((C // G) & -(C // G) >= 8 or (C // G) & (C // G - 1) == 0):
        per = C // G
        bc, uniform = min(cap, per & -per), True
    else:
        bc, uniform = min(cap, _np2(C)), False
    bs = max(1, min(2048 // bc, _np2(part.total)))
    return bs, bc, uniform


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dense_geometry(
    lp: _Launch, cl: bool, tile_div: int = 1
) -> tuple[int, int, int, int, int, int]:
    """``(L_eff, LB, n_tiles, BLOCK_L, BLOCK_C, num_warps)``; CL collapses ``(N, L)`` into rows."""
    L_eff = lp.N * lp.L if cl else lp.L
    bl, bc, nw = _dense_blocks(lp.C, L_eff, cl, tile_div)
    LB = _cdiv(L_eff, bl)
    n_tiles = LB if cl else LB * lp.N
    return L_eff, LB, n_tiles, bl, bc, nw


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------
def _forward_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    offsets: Tensor | None,
    momentum: float,
    momentum_t: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool = False,
    residual: Tensor | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    tk = _triton_kernels()
    lp = _launch_plan(tuple(x.shape), method, ratio, groups, sampling, vdn_samples, min_count)
    x, cl = _canonical(x)
    dev, C = x.device, lp.C
    off = offsets.contiguous() if offsets is not None else _dummy_offsets(dev)
    sms = _num_sms(dev)
    launches = []
    P_total = 0
    for part in lp.parts:
        bs, bc, uniform = _sample_blocks(C, lp.G, part, cl)
        cb = _cdiv(C, bc)
        n_tiles = _cdiv(part.total, bs)
        progs = max(1, min(n_tiles, (4 * sms) // cb))
        tpp = _cdiv(n_tiles, progs)
        progs = _cdiv(n_tiles, tpp)
        launches.append((part, bs, bc, uniform, cb, tpp, progs, P_total))
        P_total += progs
    partials = torch.empty((3, P_total, C), dtype=torch.float32, device=dev)
    for part, bs, bc, uniform, cb, tpp, progs, base in launches:
        o = part.off_cols
        tk.sample_stats_kernel[(progs, cb)](
            x, off, partials[0], partials[1], partials[2],
            C, lp.L, lp.G, lp.A, part.total, part.row_base, part.row_mod,
            *lp.S, *part.m, *part.st, tpp, base,
            OFF_R=o[0], OFF_0=o[1], OFF_1=o[2], OFF_2=o[3], CL=cl, UNIFORM=uniform,
            BLOCK_S=bs, BLOCK_C=bc, num_warps=4,
        )  # fmt: skip
    # separate allocations: custom-op outputs must not alias each other
    mean = torch.empty((C,), dtype=torch.float32, device=dev)
    var = torch.empty((C,), dtype=torch.float32, device=dev)
    scale = torch.empty((C,), dtype=torch.float32, device=dev)
    bc = min(64, _np2(C))
    bp = max(1, min(4096 // bc, _np2(P_total)))
    w = weight if weight is not None else scale
    has_running = running_mean is not None and running_var is not None
    rm = running_mean.contiguous() if has_running else scale
    rv = running_var.contiguous() if has_running else scale
    new_rm = torch.empty_like(rm) if has_running else rm.new_empty((0,))
    new_rv = torch.empty_like(rv) if has_running else rv.new_empty((0,))
    mom = momentum_t if momentum_t is not None else scale
    n = lp.n
    tk.finalize_stats_kernel[(_cdiv(C, bc),)](
        partials[0], partials[1], partials[2], w, mean, var, scale, rm, rv,
        new_rm if has_running else scale, new_rv if has_running else scale, mom,
        P_total, C, eps, float(momentum), n / (n - 1),
        HAS_W=weight is not None, HAS_RUNNING=has_running, MOM_TENSOR=momentum_t is not None,
        BLOCK_P=bp, BLOCK_C=bc, num_warps=4,
    )  # fmt: skip
    y = _empty(tuple(x.shape), cl, x.dtype, dev)
    L_eff, LB, n_tiles, bl, bc, nw = _dense_geometry(lp, cl)
    b = bias if bias is not None else scale
    z = _as_layout(residual, cl) if residual is not None else x
    tk.normalize_kernel[(n_tiles, _cdiv(C, bc))](
        x, y, mean, scale, b, z, C, L_eff, LB, n_tiles,
        CL=cl, HAS_B=bias is not None, HAS_Z=residual is not None, RELU=relu,
        BLOCK_L=bl, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip
    return y, mean, var, new_rm, new_rv


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    offsets: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool = False,
    residual: Tensor | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tk = _triton_kernels()
    lp = _launch_plan(tuple(x.shape), method, ratio, groups, sampling, vdn_samples, min_count)
    x, cl = _canonical(x)
    dy = _as_layout(dy, cl)
    dev, C = x.device, lp.C
    mean, var = mean.contiguous(), var.contiguous()
    off = offsets.contiguous() if offsets is not None else _dummy_offsets(dev)
    sms = _num_sms(dev)
    dx = _empty(tuple(x.shape), cl, x.dtype, dev)
    # with a residual the main pass holds one more tile (z) and writes dz: half-size tiles keep
    # it at two blocks per SM (161 registers at 4096 elements on sm_90)
    L_eff, LB, n_tiles, bl, bc, nw = _dense_geometry(lp, cl, 2 if residual is not None else 1)
    cb = _cdiv(C, bc)
    progs = max(1, min(n_tiles, (TUNING["bwd_progs_per_sm"] * sms) // cb))
    tpp = _cdiv(n_tiles, progs)
    progs = _cdiv(n_tiles, tpp)
    partials = torch.empty((2, progs, C), dtype=torch.float32, device=dev)
    w = weight if weight is not None else mean
    has_w = weight is not None
    b = bias if bias is not None else mean
    has_b = bias is not None
    has_z = residual is not None
    z = _as_layout(residual, cl) if residual is not None else x
    dz = _empty(tuple(x.shape), cl, residual.dtype, dev) if residual is not None else x.new_empty(0)
    tk.bwd_main_kernel[(progs, cb)](
        x, dy, dx, mean, var, w, b, z, dz if has_z else dx, partials[0], partials[1],
        C, L_eff, LB, n_tiles, tpp, eps,
        CL=cl, HAS_W=has_w, HAS_B=has_b, HAS_Z=has_z, RELU=relu,
        BLOCK_L=bl, BLOCK_C=bc, num_warps=nw,
    )  # fmt: skip
    db = torch.empty((C,), dtype=torch.float32, device=dev)
    dg = torch.empty((C,), dtype=torch.float32, device=dev)
    rbc = min(64, _np2(C))
    rbp = max(1, min(4096 // rbc, _np2(progs)))
    tk.reduce_partials_kernel[(_cdiv(C, rbc),)](
        partials[0], partials[1], db, dg, progs, C,
        BLOCK_P=rbp, BLOCK_C=rbc, num_warps=4,
    )  # fmt: skip
    inv_n = 1.0 / lp.n
    for part in lp.parts:
        bs, sbc, uniform = _sample_blocks(C, lp.G, part, cl)
        scb = _cdiv(C, sbc)
        s_tiles = _cdiv(part.total, bs)
        sprogs = max(1, min(s_tiles, (8 * sms) // scb))
        stpp = _cdiv(s_tiles, sprogs)
        sprogs = _cdiv(s_tiles, stpp)
        o = part.off_cols
        tk.bwd_fixup_kernel[(sprogs, scb)](
            x, dy, dx, off, mean, var, w, b, z, db, dg, inv_n, eps,
            C, lp.L, lp.G, lp.A, part.total, part.row_base, part.row_mod,
            *lp.S, *part.m, *part.st, stpp,
            OFF_R=o[0], OFF_0=o[1], OFF_1=o[2], OFF_2=o[3], CL=cl, UNIFORM=uniform, HAS_W=has_w, HAS_B=has_b, HAS_Z=has_z, RELU=relu,
            BLOCK_S=bs, BLOCK_C=sbc, num_warps=4,
        )  # fmt: skip
    return dx, dg, db, dz


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("bnrewrite::fused_bn_forward", mutates_args=())
def fused_bn_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    offsets: Tensor | None,
    momentum: float,
    momentum_t: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool,
    residual: Tensor | None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sampled statistics and normalisation (see the module docstring).

    ``relu``: ``relu(y)``; with ``residual`` (needs ``relu``): ``relu(y + residual)``.

    Returns ``(y, mean, var, new_running_mean, new_running_var)``. The new running statistics
    (functional, like ``aten._native_batch_norm_legit_functional``) come from the finalize kernel
    when both running statistics are given (momentum ``momentum_t`` if given, else ``momentum``,
    unbiased factor ``n/(n-1)``); otherwise they are empty tensors.
    """
    return _forward_impl(
        x, weight, bias, running_mean, running_var, offsets, momentum, momentum_t,
        method, ratio, groups, sampling, vdn_samples, eps, relu, residual, min_count,
    )  # fmt: skip


@fused_bn_forward.register_fake
def _forward_fake(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    offsets: Tensor | None,
    momentum: float,
    momentum_t: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool,
    residual: Tensor | None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cl = _out_layout(x)
    C = x.shape[1]
    y = _empty(tuple(x.shape), cl, x.dtype, x.device)
    stat = [x.new_empty((C,), dtype=torch.float32) for _ in range(2)]
    if running_mean is not None and running_var is not None:
        new = [torch.empty_like(running_mean), torch.empty_like(running_var)]
    else:
        new = [x.new_empty((0,), dtype=torch.float32) for _ in range(2)]
    return y, stat[0], stat[1], new[0], new[1]


@torch.library.custom_op("bnrewrite::fused_bn_backward", mutates_args=())
def fused_bn_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    offsets: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool,
    residual: Tensor | None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta, dresidual)`` of :func:`fused_bn_forward` (dgamma, dbeta float32).

    With ``relu`` the ReLU mask is recomputed from ``x`` (and ``residual``; ``bias`` is needed
    for that); ``dresidual`` is empty without a residual.
    """
    return _backward_impl(
        dy, x, mean, var, weight, bias, offsets,
        method, ratio, groups, sampling, vdn_samples, eps, relu, residual, min_count,
    )  # fmt: skip


@fused_bn_backward.register_fake
def _backward_fake(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    offsets: Tensor | None,
    method: str,
    ratio: float,
    groups: int,
    sampling: str,
    vdn_samples: int,
    eps: float,
    relu: bool,
    residual: Tensor | None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cl = _out_layout(x)
    C = x.shape[1]
    dx = _empty(tuple(x.shape), cl, x.dtype, x.device)
    dz = _empty(tuple(x.shape), cl, residual.dtype, x.device) if residual is not None else None
    if dz is None:
        dz = x.new_empty(0)
    stats = [x.new_empty((C,), dtype=torch.float32) for _ in range(2)]
    return dx, stats[0], stats[1], dz


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, _rm, _rv, offsets, _m, _mt, method, ratio, groups, sampling, vdn, eps = inputs[
        :14
    ]
    relu, residual = inputs[14], inputs[15]
    min_count = inputs[16] if len(inputs) > 16 else DEFAULT_MIN_COUNT
    _, mean, var, new_rm, new_rv = output
    ctx.save_for_backward(x, weight, bias, offsets, mean, var, residual)
    ctx.config = (method, ratio, groups, sampling, vdn, eps, relu)
    ctx.min_count = min_count
    ctx.mark_non_differentiable(mean, var, new_rm, new_rv)


def _backward(ctx: Any, dy: Tensor, *_unused: Any) -> tuple[Any, ...]:
    x, weight, bias, offsets, mean, var, residual = ctx.saved_tensors
    dx, dg, db, dz = fused_bn_backward(
        dy, x, mean, var, weight, bias, offsets, *ctx.config, residual, ctx.min_count
    )
    dw = dg.to(weight.dtype) if weight is not None else None
    dbias = db.to(bias.dtype) if bias is not None else None  # the bias's own dtype
    return (dx, dw, dbias) + (None,) * 12 + (dz if residual is not None else None, None)


fused_bn_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------
def fused_sampled_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    config: SamplingConfig | dict[str, Any] | str | None = None,
    relu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`bnrewrite.sampled_batch_norm` through the fused kernels when they apply.

    ``relu=True`` returns ``relu(batch_norm(...))`` with the ReLU fused into the kernels (no extra
    pass forward or backward); ``residual`` (with ``relu=True``) returns
    ``relu(batch_norm(...) + residual)`` (one more read forward, one write of its gradient).

    Same contract. Runs the Triton kernels for CUDA inputs (and CPU inputs under
    ``TRITON_INTERPRET=1``, see :func:`can_use_kernels`), else the pure-torch estimator. Offsets are
    drawn by :func:`bnrewrite.estimators.draw_offsets` exactly as the torch path does, so the same
    RNG state (or seed) gives the same sample set.
    """
    cfg = SamplingConfig.coerce(config)
    if residual is not None and not relu:
        raise ValueError("residual= is the residual-add + ReLU epilogue: pass relu=True too")
    use = training and can_use_kernels(input, cfg)
    if use and residual is not None:
        use = residual.shape == input.shape and residual.dtype == input.dtype
    plan = sample_plan(tuple(input.shape), cfg) if use else None
    n = plan.count() if plan is not None else 0
    if plan is None or (isinstance(n, int) and n <= 1):  # the estimator raises its error
        y = sampled_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, config=cfg
        )
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    offsets = draw_offsets(plan, input.device, cfg.seed)
    # both running statistics: computed by the finalize kernel and copied back (2 launches
    # instead of ~9 small ones); one alone: the estimator's update_running_stats
    in_kernel = running_mean is not None and running_var is not None
    mom_t = momentum if isinstance(momentum, Tensor) else None
    if mom_t is not None:
        mom_t = mom_t.to(device=input.device, dtype=torch.float32).reshape(())
    y, mean, var, new_rm, new_rv = fused_bn_forward(
        input,
        weight,
        bias,
        running_mean if in_kernel else None,
        running_var if in_kernel else None,
        offsets,
        0.0 if mom_t is not None else float(momentum),
        mom_t,
        cfg.method,
        float(cfg.ratio),
        int(cfg.groups),
        cfg.sampling,
        int(cfg.vdn_samples),
        float(eps),
        bool(relu),
        residual,
        int(cfg.min_count),
    )
    if in_kernel:
        with torch.no_grad():
            running_mean.copy_(new_rm)  # type: ignore[union-attr]
            running_var.copy_(new_rv)  # type: ignore[union-attr]
    elif running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y
