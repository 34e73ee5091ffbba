"""The eager lowering: :func:`bnrewrite.estimators.sampled_batch_norm` on PyTorch's native BN
kernels, for code that runs without ``torch.compile``.

The estimator's math (:mod:`bnrewrite.estimators`) is unchanged; only the work is split so that the
full tensor is touched by fused native kernels and the sample by small ones. For ``x`` of shape
``(N, C, *S)``, the sample set ``A_c`` of channel ``c`` (the plan, floor included), ``n = |A_c|``:

Forward
    ``mu, var``  -- the sample's biased mean and variance, computed by the native BN statistics
    kernel on the gathered sample only (``n`` values per channel);
    ``y = F.batch_norm(x, mu, var, w, b, training=False)`` -- the native *inference* kernel: one
    pass over ``x``, no reduction; running statistics as the estimator updates them.

Backward (exact gradient of that forward; ``s_c = w_c * rstd_c``, ``xh = (x - mu) * rstd``)
    ``Sdy_c = sum dy``, ``Sdyx_c = sum dy * xh`` over *every* element (one native reduction pass,
    the inference-mode ``native_batch_norm_backward`` asked for the two sums only);
    ``dx = s * dy`` everywhere (one pointwise pass), then on the sampled elements only
    ``dx_a += (g_mu + 2 * g_var * (x_a - mu)) / n`` with ``g_mu = -s * Sdy`` and
    ``g_var = -s * rstd * Sdyx / 2`` (``mu`` and ``var`` depend on the sample alone);
    ``dw = Sdyx``, ``db = Sdy``.

The fix-up writes only the ``n`` sampled elements per channel, through the same indices the
estimator gathers (:func:`sample_index`). Offsets are device tensors: no host synchronisation.

Where it runs. :func:`sampled_batch_norm` picks this lowering for plain tensors outside any tracer
(``torch.compile``, ``torch.export``, ``make_fx``, FX tracing); under a tracer that differentiates
it picks the compiled lowering (:mod:`bnrewrite.compiled`), and otherwise the estimator's
composite aten form: ``SampledBatchNormNd`` modules, the FX pass's
``bnrewrite::sampled_batch_norm`` op run eagerly, and ``bnrewrite.sampled_batch_norm`` users all get
it, for inputs of at least ``EAGER_MIN_NUMEL`` (1M) elements; smaller ones are launch-bound either
way and keep the composite form. ``BNREWRITE_EAGER=0`` turns it off (the estimator's composite
form everywhere), ``BNREWRITE_EAGER=1`` uses it at every size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import compiled_sampled_batch_norm
from .config import SamplingConfig
from .estimators import (
    _check_arguments,
    _check_input,
    _has_symbolic_axis,
    _is_empty,
    axis_indices,
    draw_offsets,
    sample_index,
    update_running_stats,
)
from .estimators import sampled_batch_norm as composite_sampled_batch_norm
from .plan import SamplePlan, sample_plan

__all__ = [
    "EAGER_MIN_NUMEL",
    "channel_sums",
    "fix_up",
    "eager_applicable",
    "eager_sampled_batch_norm",
    "compiled_applicable",
    "sampled_batch_norm",
]

#: Inputs with fewer elements keep the composite form: there a layer costs a dozen kernel
#: launches and Python either way, and on this CPU neither form beats PyTorch's BN (0.1-1 ms per
#: layer; docs/results.md, "Eager speed"); from ~1M elements the native split wins clearly.
EAGER_MIN_NUMEL = 1 << 20


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    if getattr(torch.fx._symbolic_trace, "_is_fx_tracing_flag", False):  # symbolic_trace
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def eager_applicable(x: Tensor) -> bool:
    """True when :func:`eager_sampled_batch_norm` runs: a plain tensor of at least
    ``EAGER_MIN_NUMEL`` elements outside any tracer (no fake, functional or symbolic tensors);
    ``BNREWRITE_EAGER=0`` turns it off, ``BNREWRITE_EAGER=1`` drops the size threshold."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces no further
        return False
    setting = os.environ.get("BNREWRITE_EAGER", "")
    if setting == "0":
        return False
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return False
    if torch._is_functional_tensor(x) or _tracing():
        return False
    if not all(isinstance(d, int) for d in x.shape):
        return False
    return setting == "1" or x.numel() >= EAGER_MIN_NUMEL


def _native_stats(sample: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Biased mean and variance per channel (dim 1) of ``sample`` by the native BN statistics
    kernel, in float32 (float64 for float64 input)."""
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    if sample.is_cuda:
        mean, invstd = torch.batch_norm_stats(sample, eps)
    else:
        _, mean, invstd = torch.ops.aten.native_batch_norm(
            sample, None, None, None, None, True, 0.0, eps
        )
    mean, invstd = mean.to(acc), invstd.to(acc)
    var = (invstd.reciprocal().square() - eps).clamp_min(0.0)
    return mean, var


def _group_ranges(channels: int, groups: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each channel group (``c * G // C``: contiguous, balanced)."""
    starts = [
        next(c for c in range(channels) if c * groups // channels == g) for g in range(groups)
    ]
    return list(zip(starts, [*starts[1:], channels], strict=True))


class _SampleAccess:
    """How one call reads the sample set of ``x`` and adds the fix-up into ``dx``: the same
    elements as :func:`bnrewrite.estimators.gather_sample`, through the cheapest native op.

    * ``fixed``: views (the first rows, the top-left patch);
    * ``rows`` (random ``ns``/``bs``): per channel group, ``index_select`` / ``index_add_`` of the
      group's ``k`` rows;
    * ``flat`` (random ``fs``, NCHW-contiguous or channels-last input): the lattice as flat spatial
      indices, one ``gather`` / ``scatter_add_`` over the flattened maps;
    * ``index``: advanced indexing (any other layout, and plans with virtual rows).
    """

    def __init__(self, x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> None:
        self.plan, self.offsets = plan, offsets
        self.virtual = plan.virtual_rows > 0
        #: the gathered samples of the forward (``rows``: one per group; ``flat``: one), reused by
        #: the backward's fix-up instead of gathering again (the sample is 1/8-1/16 of ``x``)
        self.gathered: list[Tensor] = []
        if offsets is None:
            self.mode = "fixed"
        elif self.virtual:
            self.mode = "index"
        elif plan.axes[0].axis == 0:
            self.mode = "rows"
        elif x.is_contiguous() or (
            x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ):
            self.mode = "flat"
            self.channels_last = not x.is_contiguous()
        else:
            self.mode = "index"
        if self.mode == "rows":
            ax = plan.axes[0]
            j = torch.arange(ax.count, device=x.device)
            starts = offsets[0, :, 0]  # (G,)
            self.rows = [torch.remainder(starts[g] + j, ax.size) for g in range(plan.groups)]
            self.ranges = _group_ranges(plan.channels, plan.groups)
        elif self.mode == "flat":
            spatial = plan.spatial
            flat: Tensor | None = None
            for i, ax in enumerate(plan.axes):  # row-major over the spatial dims
                idx = axis_indices(ax, offsets, i)  # (R, G, m_i)
                flat = (
                    idx if flat is None else (flat[..., :, None] * spatial[i] + idx[..., None, :])
                )
                flat = flat.reshape(idx.shape[0], idx.shape[1], -1)
            assert flat is not None  # (N', G, M)
            c, g = plan.channels, plan.groups
            # equal groups: one index per group, broadcast (stride 0) over its channels
            self.group_size = c // g if c % g == 0 else 0
            if self.group_size:
                n, m = flat.shape[0], flat.shape[2]
                if self.channels_last:  # view (N', P, G, Cg), gather along P
                    self.flat_index = flat.transpose(1, 2)[..., None].expand(n, m, g, c // g)
                else:  # view (N', G, Cg, P)
                    self.flat_index = flat[:, :, None, :].expand(n, g, c // g, m)
            else:
                group_of = torch.arange(c, device=x.device) * g // c
                index = flat.index_select(1, group_of)  # (N', C, M)
                self.flat_index = index.transpose(1, 2) if self.channels_last else index
        elif self.mode == "index":
            self.index = sample_index(plan, offsets, x.device) if plan.include_real else None

    def _flat(self, t: Tensor) -> Tensor:
        """A view of the real rows with the maps flattened: ``(N', C, P)`` (channels-last:
        ``(N', P, C)``), or with the channels split into equal groups ``(N', G, Cg, P)``
        (``(N', P, G, Cg)``). ``view`` (never a copy): the fix-up writes through it."""
        n, c, g = self.plan.real_rows, self.plan.channels, self.plan.groups
        if self.channels_last:
            t = t.permute(0, 2, 3, 1)
            return t.view(n, -1, g, c // g) if self.group_size else t.view(n, -1, c)
        return t.view(n, g, c // g, -1) if self.group_size else t.view(n, c, -1)

    def _flat_gather(self, x: Tensor) -> Tensor:
        """The sample, ``(N', C, M)`` (channels-last: ``(N', M, C)``)."""
        dim = 1 if self.channels_last else (3 if self.group_size else 2)
        sample = torch.gather(self._flat(x), dim, self.flat_index)
        n, c = self.plan.real_rows, self.plan.channels
        if not self.group_size:
            return sample
        return sample.view(n, -1, c) if self.channels_last else sample.view(n, c, -1)

    def _flat_scatter_add(self, dx: Tensor, values: Tensor) -> None:
        """``dx[sample] += values`` (``values`` shaped as :meth:`_flat_gather` returns)."""
        dim = 1 if self.channels_last else (3 if self.group_size else 2)
        flat_dx = self._flat(dx)
        flat_dx.scatter_add_(dim, self.flat_index, values.view(self.flat_index.shape))

    def parts(self, x: Tensor) -> list[tuple[tuple[int, int] | None, Tensor]]:
        """``(channel range or None for all, sample)`` pieces whose per-channel statistics are
        the sample set's (the virtual rows joined to the real sample)."""
        plan = self.plan
        if self.mode == "rows":
            self.gathered = [
                x.narrow(1, rng[0], rng[1] - rng[0]).index_select(0, rows)
                for rng, rows in zip(self.ranges, self.rows, strict=True)
            ]
            return list(zip(self.ranges, self.gathered, strict=True))
        if self.mode == "flat":
            sample = self._flat_gather(x)
            self.gathered = [sample]
            return [(None, sample.transpose(1, 2) if self.channels_last else sample)]
        pieces = []
        if plan.include_real:
            if self.mode == "fixed":
                real = x.narrow(0, 0, plan.real_rows) if self.virtual else x
                for ax in plan.axes:
                    real = real.narrow(ax.axis, 0, ax.count)
                pieces.append(real)
            else:
                pieces.append(x[self.index])
        if self.virtual:
            pieces.append(x.narrow(0, plan.real_rows, plan.virtual_rows))
        if len(pieces) == 1:
            return [(None, pieces[0])]
        # real sample and virtual rows differ in shape (fs patch vs whole maps): (1, C, n)
        c = plan.channels
        return [(None, torch.cat([p.transpose(0, 1).reshape(c, -1) for p in pieces], 1)[None])]

    def statistics(self, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """Biased mean and variance per channel over the sample set, by the native statistics
        kernel on each gathered piece (keeps the gathered sample for :meth:`add_fix`)."""
        stats = [_native_stats(sample, eps) for _, sample in self.parts(x.detach())]
        if len(stats) == 1:
            return stats[0]
        return torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])

    def add_fix(self, dx: Tensor, x: Tensor, fix: Any) -> None:
        """``dx_a += fix(x_a)`` on every sampled element; ``fix(values, channel range, dim)``
        gives the per-channel affine fix-up of ``values`` whose channel dim is ``dim``."""
        plan = self.plan
        if self.mode == "rows":
            for (c0, c1), rows, xs in zip(self.ranges, self.rows, self.gathered, strict=True):
                dx.narrow(1, c0, c1 - c0).index_add_(0, rows, fix(xs, (c0, c1), 1))
            return
        if self.mode == "flat":
            (xs,) = self.gathered
            self._flat_scatter_add(dx, fix(xs, None, 2 if self.channels_last else 1))
            return
        if plan.include_real:
            if self.mode == "fixed":
                vdx = dx.narrow(0, 0, plan.real_rows) if self.virtual else dx
                vx = x.narrow(0, 0, plan.real_rows) if self.virtual else x
                for ax in plan.axes:
                    vdx, vx = vdx.narrow(ax.axis, 0, ax.count), vx.narrow(ax.axis, 0, ax.count)
                vdx.add_(fix(vx, None, 1))
            else:
                dx.index_put_(self.index, fix(x[self.index], None, 1), accumulate=True)
        if self.virtual:
            rows = slice(plan.real_rows, plan.real_rows + plan.virtual_rows)
            dx[rows].add_(fix(x[rows], None, 1))


def channel_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``(Σdy, Σdy·x̂)`` per channel over every element, ``(2, C)`` in ``mean``'s dtype: one native
    reduction pass (the inference-mode ``native_batch_norm_backward`` asked for the two sums)."""
    _, sdyx, sdy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, mean, var, None, None, False, eps, [False, True, True]
    )
    return torch.stack([sdy, sdyx]).to(mean.dtype)


def fix_up(g_mean: Tensor, g_var2: Tensor, mean: Tensor, dtype: torch.dtype) -> Any:
    """The fix-up of the sampled elements as a function of their values: ``fix(values, channel
    range or None, channel dim) = g_mean + g_var2 * (values - mean)`` per channel, in ``dtype``
    (``g_mean = dL/dmu / n``, ``g_var2 = 2 dL/dvar / n``)."""

    def fix(values: Tensor, rng: tuple[int, int] | None, dim: int) -> Tensor:
        gm, gv, mu = g_mean, g_var2, mean
        if rng is not None:
            gm, gv, mu = gm[rng[0] : rng[1]], gv[rng[0] : rng[1]], mu[rng[0] : rng[1]]
        shape = [1] * values.dim()
        shape[dim] = -1
        out = gm.view(shape) + gv.view(shape) * (values.to(mean.dtype) - mu.view(shape))
        return out.to(dtype)

    return fix


class _EagerSampledBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        access: _SampleAccess,
    ) -> Tensor:
        acc = mean.dtype
        w = None if weight is None else weight.to(acc)
        b = None if bias is None else bias.to(acc)
        y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.access = eps, access
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        access: _SampleAccess = ctx.access
        acc = mean.dtype
        sdy, sdyx = channel_sums(dy, x, mean, var, ctx.eps)
        rstd = torch.rsqrt(var + ctx.eps)
        scale = rstd if weight is None else rstd * weight.to(acc)
        dx = None
        if ctx.needs_input_grad[0]:
            bshape = [1, -1] + [1] * (x.dim() - 2)
            dx = torch.empty_like(x)  # x's memory format
            torch.mul(dy, scale.to(dy.dtype).view(bshape), out=dx)
            n = access.plan.count()
            fix = fix_up(-scale * sdy / n, -scale * rstd * sdyx / n, mean, dx.dtype)
            access.add_fix(dx, x, fix)
        dw = sdyx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = sdy.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def eager_sampled_batch_norm(
    input: Tensor,  # noqa: A002 - F.batch_norm's name
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    config: SamplingConfig | dict[str, Any] | str | None = None,
) -> Tensor:
    """The estimator on native kernels (module docstring); same arguments and results as
    :func:`bnrewrite.estimators.sampled_batch_norm`, same offsets from the same RNG state."""
    cfg = SamplingConfig.coerce(config)
    _check_arguments((input, running_mean, running_var, weight, bias))
    if not training or _is_empty(input) or cfg.method == "full":
        return composite_sampled_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, config=cfg
        )
    _check_input(input)
    plan = sample_plan(tuple(input.shape), cfg)
    n = plan.count()
    if n <= 1 or _has_symbolic_axis(plan):
        return composite_sampled_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, config=cfg
        )
    offsets = draw_offsets(plan, input.device, cfg.seed)
    access = _SampleAccess(input, plan, offsets)
    with torch.no_grad():
        mean, var = access.statistics(input, eps)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return _EagerSampledBatchNorm.apply(input, weight, bias, mean, var, eps, access)


def _needs_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Grad mode is on and the input, weight or bias (``F.batch_norm``'s positions 0, 3, 4)
    requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    names = ("input", "running_mean", "running_var", "weight", "bias")
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]
    return any(isinstance(values[i], Tensor) and values[i].requires_grad for i in (0, 3, 4))


def sampled_batch_norm(*args: Any, **kwargs: Any) -> Tensor:
    """``F.batch_norm``'s contract with sampled training statistics (``config=``: a
    :class:`~bnrewrite.SamplingConfig`, a dict of its fields or a method name), on the fastest
    lowering of the estimator for the context: :func:`eager_sampled_batch_norm` for eager plain
    tensors of at least ``EAGER_MIN_NUMEL`` elements, the compiled lowering
    (:mod:`bnrewrite.compiled`) under ``torch.compile`` and other tracers that differentiate, and
    the estimator's composite form (:func:`bnrewrite.estimators.sampled_batch_norm`) otherwise.
    All three compute the same values from the same random state."""
    x = args[0] if args else kwargs.get("input")
    if isinstance(x, Tensor) and eager_applicable(x):
        return eager_sampled_batch_norm(*args, **kwargs)
    if isinstance(x, Tensor) and compiled_applicable(x) and _needs_grad(args, kwargs):
        return compiled_sampled_batch_norm(*args, **kwargs)
    return composite_sampled_batch_norm(*args, **kwargs)


def compiled_applicable(x: Tensor) -> bool:
    """True where the compiled lowering runs (when a gradient is needed): under a tracer
    (Dynamo, ``make_fx``, AOTAutograd's functional tensors) other than ``torch.export``, whose
    graphs the ONNX exporter reads in the composite form; ``BNREWRITE_COMPILED=0`` keeps the
    composite form everywhere."""
    if os.environ.get("BNREWRITE_COMPILED", "") == "0" or torch.compiler.is_exporting():
        return False
    if torch.compiler.is_compiling():
        return True
    return type(x) is not torch.Tensor or torch._is_functional_tensor(x) or _tracing()
