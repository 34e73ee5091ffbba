"""The compiled lowering: :func:`bnrewrite.estimators.sampled_batch_norm` in the form that
``torch.compile`` (AOTAutograd + Inductor) schedules near the memory floor.

The math is the estimator's (:mod:`bnrewrite.estimators`); this module only chooses how the
forward and the backward are written, so that Inductor's fusion plan materialises no full-size
tensor that the floor does not need. For ``x`` of shape ``(N, C, *S)``, the sample set ``A_c`` of
channel ``c`` (the plan, floor included), ``n = |A_c|``, ``s_c = w_c * rstd_c``:

Forward (the estimator's own functions)
    ``mu, var = sample_statistics(x, plan, offsets, grouped=True)`` -- reductions over the
    sample only, gathered with one flat index per row and channel group
    (:func:`bnrewrite.estimators.grouped_sample_index`: the same set; at 128x256x14x14 ``fs``
    1/16 it took the C++ forward from 13.9 to 2.4 ms, compiled BN's being 2.9 ms);
    ``y = normalize(x, mu, var, w, b, eps)`` -- one read of ``x``, one write of ``y``.

Backward (hand-written, the exact gradient of that forward; the eager lowering's formulas)
    ``Sdy_c = sum dy``, ``Sdyx_c = sum dy * xh`` over every element (one reduction pass over
    ``dy`` and ``x``) and ``dx = s * dy`` everywhere (one pointwise pass that does not depend on
    the sums); then on the sampled elements only ``dx_a += g_mu + g_var * (x_a - mu)`` with
    ``g_mu = -s * Sdy / n`` and ``g_var = -s * rstd * Sdyx / n`` (the fix-up of
    :func:`bnrewrite.eager.fix_up`), an ``index_put(accumulate=True)`` whose gather of ``x`` and
    scatter into ``dx`` touch the ``n`` sampled elements per channel (in C++ code a plain
    scatter of ``s * dy_a + fix``: through the grouped view for a contiguous ``x``,
    :func:`_grouped_fix_up`, per element for channels-last, where it measured faster,
    :func:`_fix_up_at`); ``dw = Sdyx``,
    ``db = Sdy``. On CUDA the sums run in two stages (spatial dims, then rows) so that Triton's
    fusion rules can put them in the loop of ``dx`` (one pass reading ``dy`` and ``x``).

Inductor's count (one layer, forward + backward, CPU, 64x64x28x28): ``bs`` 1/8 7.0 passes
NCHW / 7.5 channels-last, ``fs`` 1/16 6.53 / 7.25, ``full`` 8.0 = compiled BN. Autograd of the estimator's gather (the route
before this module) was instead a scatter into a zero-filled tensor of the input's full size, an
``index_put`` over it and a re-read: 11.75 / 12.5 / 11.0 passes. What keeps the C++ backend above
the 6.1 of the floor: it fuses a pointwise pass with a reduction only when the pointwise node
comes first and its loops are the reduction's loops followed by the reduced ones (never for
channels-last; for NCHW ``dx`` is materialised where the fix-up needs it, after the sums, and a
one-stage sum's loops are ``(C; N, S)``), and it counts a per-element (``index_put``) gather as a
read of its whole source (docs/architecture.md).

Forms
    * random and fixed sampling with concrete sampled sizes: the sample's indices
      (:func:`bnrewrite.estimators.sample_index`), the virtual rows of ``vdn`` / ``fs_vdn`` as a
      row range;
    * a symbolic sampled size (``dynamic=True`` or automatic dynamic shapes on the sampled axis):
      the fix-up is ``dx = s * dy + mask * (g_mu + g_var * (x - mu))`` with the estimator's 0/1
      :func:`~bnrewrite.estimators.sample_mask` (a gathered tensor of shape ``ceil(size * ratio)``
      would be a floor division Inductor cannot order strides by): one more read of ``x``, still
      no full-size scatter;
    * ``full``: ``F.batch_norm`` itself, which Inductor lowers to its own BatchNorm (8 passes);
      with a tensor momentum (``momentum=None`` modules) the running statistics are updated from
      the batch statistics Inductor already computes.

Where it runs: :func:`bnrewrite.eager.sampled_batch_norm` (the dispatcher behind the modules, the
custom ops and ``bnrewrite.sampled_batch_norm``) takes it under every tracer that builds a
training graph with autograd (``torch.compile``, ``make_fx`` of a joint graph, AOTAutograd)
whenever an input requires a gradient. ``torch.export`` and graphs without gradients keep the
composite form (the same forward ops; the ONNX exporter reads it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SamplingConfig
from .estimators import (
    _check_arguments,
    _has_symbolic_axis,
    _is_empty,
    draw_offsets,
    grouped_sample_index,
    normalize,
    sample_index,
    sample_mask,
    sample_statistics,
    update_running_stats,
)
from .estimators import sampled_batch_norm as composite_sampled_batch_norm
from .plan import SamplePlan, sample_plan

__all__ = ["compiled_sampled_batch_norm", "full_batch_norm"]


def _bshape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _triton_codegen(x: Tensor) -> bool:
    """Inductor generates Triton code for ``x``'s device: any GPU, or the CPU with
    ``torch._inductor.config.cpu_backend = "triton"``."""
    if x.device.type != "cpu":
        return True
    from torch._inductor import config

    return getattr(config, "cpu_backend", "cpp") == "triton"


def _channel_sum(t: Tensor, two_stage: bool) -> Tensor:
    """Per-channel sum; ``two_stage``: over each row's spatial dims, then over the rows. Triton's
    fusion rules (GPU) then run the sums in the loop of the pointwise ``dx``, whose iteration
    ``(N * C, *S)`` the first stage shares (one read of ``dy`` and ``x`` for both); Inductor's
    C++ backend fuses the one-stage form better (measured, bs 1/8 NCHW 64x64x28x28: 7.5 against
    8.5 passes; under Triton's plan 6.4 against 7.5)."""
    if two_stage and t.dim() > 2:
        return t.sum(list(range(2, t.dim()))).sum(0)
    return t.sum(_channel_dims(t))


def _fix_up_at(
    dx: Tensor,
    dy: Tensor,
    xs: Tensor,
    index: tuple[Tensor, ...],
    coef: Any,
    add: bool,
    shape: list[int],
) -> Tensor:
    """The fix-up of the sampled elements ``index`` (distinct), ``xs = x[index]``; ``shape``
    views a per-channel coefficient against ``xs``.

    ``add``: ``dx[index] += g_mu + g_var * (xs - mu)``, a scatter-add that reads no ``dy``
    (Triton code: atomic adds to distinct addresses). Otherwise ``dx[index] = s * dy[index] +
    g_mu + g_var * (xs - mu)``, a plain scatter: Inductor 2.13's C++ backend miscomputes the
    addresses of a vectorised atomic add inside a transposed (channels-last to NCHW) tile and
    writes out of bounds (seen with fixed ``fs`` under the pre-grad pass), so CPU code stores.
    """
    if add:
        val = _fix_values(xs, None, coef, shape)
        return torch.index_put(dx, index, val.to(dx.dtype), accumulate=True)
    val = _fix_values(xs, dy[index], coef, shape)
    return torch.index_put(dx, index, val.to(dx.dtype))


def _fix_values(xs: Tensor, dys: Tensor | None, coef: Any, shape: list[int]) -> Tensor:
    """The fix-up's values at the sampled elements: ``g_mu + g_var * (x_a - mu)``, plus
    ``s * dy_a`` when ``dys`` is given (the plain scatter)."""
    s, g_mu, g_var, mu = coef
    val = g_mu.view(shape) + g_var.view(shape) * (xs.to(mu.dtype) - mu.view(shape))
    return val if dys is None else val + dys.to(mu.dtype) * s.view(shape)


def _scatter_fix_up(
    dx: Tensor,
    dy: Tensor,
    x: Tensor,
    dim: int,
    index: Tensor,
    coef: Any,
    shape: list[int],
) -> Tensor:
    """:func:`_fix_up_at`'s plain scatter for a sample given as one gather index along ``dim``
    (a grouped view): ``dx_a = s * dy_a + g_mu + g_var * (x_a - mu)``."""
    val = _fix_values(torch.gather(x, dim, index), torch.gather(dy, dim, index), coef, shape)
    return dx.scatter(dim, index, val.to(dx.dtype))


def _grouped_fix_up(
    dx: Tensor, dy: Tensor, x: Tensor, plan: SamplePlan, offsets: Tensor | None, coef: Any
) -> Tensor:
    """The real rows' fix-up in C++ code for a contiguous ``x``: a scatter through the grouped
    view of :func:`bnrewrite.estimators.grouped_sample_index` (one flat position per sampled
    element, loops along contiguous memory)."""
    view, dim, index = grouped_sample_index(plan, offsets, x.device)
    dxv, dyv, xv = (t.reshape(view) for t in (dx, dy, x))
    dxv = _scatter_fix_up(dxv, dyv, xv, dim, index, coef, [1, view[1], view[2], 1])
    return dxv.reshape(x.shape)


def _virtual_index(plan: SamplePlan, x: Tensor) -> tuple[Tensor, ...]:
    """Advanced indices of the virtual rows (the last ``plan.virtual_rows`` rows, all elements)."""
    rank = x.dim()
    index = []
    for d in range(rank):
        shape = [1] * rank
        if d == 0:
            shape[0] = plan.virtual_rows
            idx = torch.arange(plan.virtual_rows, device=x.device) + plan.real_rows
        else:
            shape[d] = x.shape[d]
            idx = torch.arange(x.shape[d], device=x.device)
        index.append(idx.view(shape))
    return tuple(index)


class _SampledBatchNorm(torch.autograd.Function):
    """Forward: the estimator; backward: one fused pass plus the fix-up (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        offsets: Tensor | None,
        plan: SamplePlan,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = sample_statistics(x, plan, offsets, grouped=True)
        y = normalize(x, mean, var, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, var, offsets)
        ctx.plan, ctx.eps = plan, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dm: Any, _dv: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, mean, var, offsets = ctx.saved_tensors
        plan: SamplePlan = ctx.plan
        acc = mean.dtype
        shape = _bshape(x)
        rstd = torch.rsqrt(var + ctx.eps)
        s = rstd if weight is None else rstd * weight.to(acc)
        dyf = dy.to(acc)
        xmu = x.to(acc) - mean.view(shape)
        triton = _triton_codegen(x)
        sdy = _channel_sum(dyf, triton)
        sdyx = _channel_sum(dyf * xmu, triton) * rstd  # sum dy * xh
        dx = None
        if ctx.needs_input_grad[0]:
            n = plan.count()
            g_mu, g_var = -s * sdy / n, -s * rstd * sdyx / n
            if plan.include_real and plan.axes and _has_symbolic_axis(plan):
                fix = g_mu.view(shape) + g_var.view(shape) * xmu
                dx = (dyf * s.view(shape) + _mask(x, plan, offsets) * fix).to(x.dtype)
            else:
                dx = (dyf * s.view(shape)).to(x.dtype)
                coef = (s, g_mu, g_var, mean)
                if plan.include_real and (triton or not x.is_contiguous()):
                    index = sample_index(plan, offsets, x.device)
                    dx = _fix_up_at(dx, dy, x[index], index, coef, triton, shape)
                elif plan.include_real:
                    dx = _grouped_fix_up(dx, dy, x, plan, offsets, coef)
                if plan.virtual_rows:
                    index = _virtual_index(plan, x)
                    dx = _fix_up_at(dx, dy, x[index], index, coef, triton, shape)
        dw = sdyx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = (
            sdy.to(ctx.bias_dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]
            else None
        )
        return dx, dw, db, None, None, None


def _mask(x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> Tensor:
    """The sample set as a 0/1 mask over all of ``x``'s rows (virtual rows all taken)."""
    real = plan.real_rows
    mask = sample_mask(x.narrow(0, 0, real), plan, offsets).to(x.dtype)
    if not plan.virtual_rows:
        return mask
    mask = mask.expand([real, *mask.shape[1:]])
    ones = torch.ones_like(mask.narrow(0, 0, 1)).expand([plan.virtual_rows, *mask.shape[1:]])
    return torch.cat([mask, ones])


def compiled_sampled_batch_norm(
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
    """The estimator in its compiled lowering (module docstring); same arguments, values and
    random draws as :func:`bnrewrite.estimators.sampled_batch_norm`, which it calls itself for
    eval mode, an empty batch and a sample of one value (its error)."""
    cfg = SamplingConfig.coerce(config)
    _check_arguments((input, running_mean, running_var, weight, bias))
    if not training or input.dim() < 2 or _is_empty(input):
        return composite_sampled_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, config=cfg
        )
    if cfg.method == "full" and _native_dtypes(input, running_mean, running_var, weight, bias):
        return full_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps)
    plan = sample_plan(tuple(input.shape), cfg)
    if plan.count() <= 1:
        return composite_sampled_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, config=cfg
        )
    offsets = draw_offsets(plan, input.device, cfg.seed)
    y, mean, var = _SampledBatchNorm.apply(input, weight, bias, offsets, plan, eps)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, plan.count(), momentum)
    return y


def _native_dtypes(x: Tensor, *tensors: Tensor | None) -> bool:
    """PyTorch's BN takes these dtypes: parameters and statistics all of the input's dtype, or
    all float32 (mixed precision). Other mixes stay on the estimator's composite form."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return dtypes <= {x.dtype} or dtypes <= {torch.float32}


def full_batch_norm(
    input: Tensor,  # noqa: A002
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
) -> Tensor:
    """``method="full"`` in training mode as ``F.batch_norm`` (Inductor's own BatchNorm). A
    tensor ``momentum`` (the cumulative factor of ``momentum=None``) updates the running
    statistics from the batch's own mean and unbiased variance."""
    if not isinstance(momentum, Tensor):
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    y = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if running_mean is not None or running_var is not None:
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        var, mean = torch.var_mean(input.detach().to(acc), _channel_dims(input), correction=0)
        n = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y
