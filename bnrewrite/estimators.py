"""The estimators: BatchNorm statistics from a sample, and ``sampled_batch_norm``.

This module is the single source of truth of bnrewrite's math; the FX pass, the ONNX rules and the
GPU kernels lower exactly these formulas. For ``x`` of shape ``(N, C, *S)`` in training mode and the
sample set ``A_c`` of channel ``c`` given by the sample plan (:mod:`bnrewrite.plan`),
``n = |A_c|``:

    mu_c     = (1/n) * sum_{a in A_c} x_a                        (accumulated in float32)
    var_c    = (1/n) * sum_{a in A_c} (x_a - mu_c)^2             (biased, two-pass)
    y        = (x - mu_c) * rsqrt(var_c + eps) * w_c + b_c       (the whole tensor)
    rm      <- (1 - m) * rm + m * mu_c
    rv      <- (1 - m) * rv + m * var_c * n / (n - 1)

The gradient is autograd's exact gradient of this forward: ``mu`` and ``var`` depend on the
sampled elements only. ``m`` is ``momentum``, a float or a 0-d tensor (the cumulative factor
``1 / num_batches_tracked`` of ``momentum=None`` is passed as a tensor so that compiled graphs do
not specialise on it). Eval mode (``training=False``) is ``torch.nn.functional.batch_norm``; a BN
without running statistics uses the batch statistics of the whole input there, as ``nn.BatchNorm``
does. An empty batch (``N = 0``) gives an empty output and leaves the running statistics alone.

Random offsets are drawn as device tensors on every call (``torch.rand`` scaled by the axis size,
floored): no host synchronisation and no Python integer that a compiled graph would specialise on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SamplingConfig
from .plan import SampledAxis, SamplePlan, sample_plan

__all__ = [
    "draw_offsets",
    "fixed_virtual_rows",
    "merge_input_moments",
    "moment_matched_rows",
    "remember_rows",
    "replayed_rows",
    "gather_sample",
    "grouped_gather",
    "grouped_sample_index",
    "sample_index",
    "sample_mask",
    "sample_parts",
    "sample_statistics",
    "normalize",
    "update_running_stats",
    "sampled_batch_norm",
]

_GENERATORS: dict[tuple[int, str], torch.Generator] = {}


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The dedicated generator of a seeded config (eager mode); ``None`` means torch's global RNG.

    Under ``torch.compile`` a ``torch.Generator`` cannot be traced, so seeded configs draw from the
    global RNG there; ``torch.manual_seed`` makes compiled runs reproducible.
    """
    if seed is None or torch.compiler.is_compiling():
        return None
    key = (seed, str(device))
    gen = _GENERATORS.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        _GENERATORS[key] = gen
    return gen


def reset_generators() -> None:
    """Forget the dedicated generators of seeded configs: the next call restarts every seed."""
    _GENERATORS.clear()


def draw_offsets(plan: SamplePlan, device: torch.device, seed: int | None = None) -> Tensor | None:
    """Random offsets, shape ``(R, G, A)`` int64 (see :mod:`bnrewrite.plan`), uniform in ``[0, size)``.

    ``None`` for fixed sampling (offset 0) or when nothing is sampled.
    """
    if not plan.random:
        return None
    gen = _generator(seed, device)
    shape = (plan.offset_rows, plan.groups, len(plan.axes))
    if gen is None:  # the generator= overload of rand refuses symbolic sizes (dynamic=True)
        u = torch.rand(shape, device=device, dtype=torch.float64)
    else:
        u = torch.rand(shape, device=device, generator=gen, dtype=torch.float64)
    # offset = min(floor(u * size), size - 1); u >= 0, so the cast's truncation is the floor
    sizes = [ax.size for ax in plan.axes]  # ints, or SymInts (unhashable) under dynamic=True
    if len(sizes) == 1 or (all(type(v) is int for v in sizes) and len(set(sizes)) == 1):
        size = sizes[0]  # rows (ns/bs), fs on square maps: one expression, 3 kernels in eager
        return (u * size).long().clamp_(max=size - 1)
    cols = [(u[..., i] * ax.size).long().clamp_(max=ax.size - 1) for i, ax in enumerate(plan.axes)]
    return torch.stack(cols, dim=-1)


def fixed_virtual_rows(shape: tuple[int, ...], seed: int) -> Tensor:
    """The virtual rows of ``fixed`` VDN sampling: standard normal, float64, on the CPU.

    Drawn from ``torch.Generator().manual_seed(seed)`` at every call, so they are identical on every
    call, device and backend (the torch VDN pass casts and moves them; the ONNX pass stores them as
    an initializer).
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(int(d) for d in shape), generator=gen, dtype=torch.float64)


#: Samples of history the running input moments of VDN keep at most (an average over the last
#: ~1024 real samples once that many were seen; a cumulative average before).
INPUT_MOMENTS_WINDOW = 1024


@torch.no_grad()
def merge_input_moments(x: Tensor, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """Fold the real rows ``x`` (``(N, *F)``) into running per-feature moments, in place.

    Chan's merge of ``(count, mean, var)`` with the batch's ``(N, mean_b, var_b)`` (biased
    variances, float32), the old part's weight capped at ``INPUT_MOMENTS_WINDOW - N`` samples::

        c = min(count, W - N),  t = c + N,  d = mean_b - mean
        mean += d * N / t,      var = (c * var + N * var_b + d^2 * c * N / t) / t,   count = t
    """
    n = x.shape[0]
    if n == 0:
        return
    xf = x.detach().to(mean.dtype)
    var_b, mean_b = torch.var_mean(xf, dim=0, unbiased=False)
    c = count.clamp(max=max(INPUT_MOMENTS_WINDOW - n, 0))
    t = c + n
    d = mean_b - mean
    var.copy_((c * var + n * var_b + d * d * (c * n / t)) / t)
    mean.add_(d * (n / t))
    count.copy_(t)


def moment_matched_rows(z: Tensor, mean: Tensor, var: Tensor, count: Tensor) -> Tensor:
    """Virtual rows ``mean + sqrt(var) * z`` in ``z``'s dtype, or ``z`` itself (standard normal)
    while fewer than two real samples were seen (``count < 2``: no variance yet)."""
    known = count >= 2
    mu = torch.where(known, mean, torch.zeros_like(mean))
    sd = torch.where(known, var.sqrt(), torch.ones_like(var))
    return (z.to(mean.dtype) * sd + mu).to(z.dtype)


#: Real inputs that ``virtual="memory"`` keeps (a ring of the most recent ones).
MEMORY_ROWS = 64


def replayed_rows(z: Tensor, memory: Tensor, filled: Tensor) -> Tensor:
    """``virtual="memory"``: ``len(z)`` rows drawn uniformly (with replacement) from the first
    ``filled`` rows of ``memory`` -- real inputs of *earlier* calls --, or ``z`` (standard normal)
    while the memory is empty. No host synchronisation."""
    u = torch.rand(z.shape[0], device=memory.device)
    idx = (u * filled.clamp(min=1)).long().clamp(max=memory.shape[0] - 1)
    picks = memory.index_select(0, idx).to(z.dtype)
    return torch.where(filled > 0, picks, z)


@torch.no_grad()
def remember_rows(x: Tensor, memory: Tensor, filled: Tensor, cursor: Tensor) -> None:
    """Write the real rows ``x`` into the ring ``memory`` at ``cursor`` (the last ``len(memory)``
    rows when ``x`` has more), in place."""
    size = memory.shape[0]
    rows = x.detach()[-size:]
    n = rows.shape[0]
    if n == 0:
        return
    pos = (cursor + torch.arange(n, device=memory.device)) % size
    memory.index_copy_(0, pos, rows.to(memory.dtype))
    cursor.copy_((cursor + n) % size)
    filled.copy_((filled + n).clamp(max=size))


def axis_indices(ax: SampledAxis, offsets: Tensor, column: int) -> Tensor:
    """Indices along one sampled axis, ``(R, G, count)``: ``(offset + step * j) mod size``.

    When the lattice covers the axis exactly (``step * count == size``, e.g. 28 = 4 * 7) the same
    set is ``offset mod step + step * j`` in rotated order (with ``offset = q * step + r``,
    ``(offset + step * j) mod size = r + step * ((q + j) mod count)``): an affine index with one
    remainder per offset instead of one per element, which compiled code gathers faster.
    """
    j = torch.arange(ax.count, device=offsets.device, dtype=torch.long)
    start = offsets[..., column : column + 1]
    if all(isinstance(v, int) for v in (ax.size, ax.step, ax.count)) and (
        ax.step * ax.count == ax.size and ax.step > 1
    ):
        return torch.remainder(start, ax.step) + ax.step * j
    return torch.remainder(start + ax.step * j, ax.size)


def gather_sample(x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> Tensor:
    """The sampled elements of the real rows of ``x``, shaped ``(N', C, *S')``.

    Fixed sampling narrows each sampled axis to its first ``count`` indices. Random sampling gathers
    ``(offset + step * j) mod size``, the offset being that of the channel's group (and, for
    spatial axes, of the row).
    """
    if plan.virtual_rows:
        x = x.narrow(0, 0, plan.real_rows)
    if offsets is None:
        for ax in plan.axes:
            x = x.narrow(ax.axis, 0, ax.count)
        return x
    channels = x.shape[1]
    for i, ax in enumerate(plan.axes):
        idx = axis_indices(ax, offsets, i)  # (R, G, count)
        if plan.groups == 1 and idx.shape[0] == 1:
            x = x.index_select(ax.axis, idx[0, 0])
            continue
        if plan.groups > 1:
            group_of = torch.arange(channels, device=x.device) * plan.groups // channels
            idx = idx.index_select(1, group_of)  # (R, C, count)
        if ax.axis == 0:  # rows: (1, C, k) -> (k, C, 1, ...)
            idx = idx[0].t()
            shape = [ax.count, idx.shape[1]] + [1] * (x.dim() - 2)
        else:
            shape = [idx.shape[0], idx.shape[1]] + [1] * (x.dim() - 2)
            shape[ax.axis] = ax.count
        out_shape = list(x.shape)
        out_shape[ax.axis] = ax.count
        x = torch.gather(x, ax.axis, idx.reshape(shape).expand(out_shape))
    return x


def sample_index(
    plan: SamplePlan, offsets: Tensor | None, device: torch.device
) -> tuple[Tensor, ...]:
    """Advanced indices ``(i_0, i_1, ...)`` with ``x[i_0, i_1, ...] == gather_sample(x, plan,
    offsets)``: every axis gets a broadcastable index, sampled axes the estimator's
    ``(offset + step * j) mod size`` for the channel's group (and row), or ``0 .. count - 1``
    for fixed sampling (``offsets=None``)."""
    rank = len(plan.shape)
    channels = plan.shape[1]
    index: list[Tensor] = []
    for d in range(rank):
        size = plan.real_rows if d == 0 else plan.shape[d]
        shape = [1] * rank
        shape[d] = size
        index.append(torch.arange(size, device=device).view(shape))
    group_of = torch.arange(channels, device=device) * plan.groups // channels
    for i, ax in enumerate(plan.axes):
        if offsets is None:
            shape = [1] * rank
            shape[ax.axis] = ax.count
            index[ax.axis] = torch.arange(ax.count, device=device).view(shape)
            continue
        idx = axis_indices(ax, offsets, i)  # (R, G, count)
        idx = idx.index_select(1, group_of)  # (R, C, count)
        if ax.axis == 0:  # rows: (1, C, k) -> (k, C, 1, ...)
            index[0] = idx[0].t().contiguous().view([ax.count, channels] + [1] * (rank - 2))
        else:
            shape = [idx.shape[0], channels] + [1] * (rank - 2)
            shape[ax.axis] = ax.count
            index[ax.axis] = idx.reshape(shape)
    return tuple(index)


def grouped_sample_index(
    plan: SamplePlan, offsets: Tensor | None, device: torch.device
) -> tuple[list[Any], int, Tensor]:
    """The real rows' sample set as one gather index into a grouped view of ``x``.

    Returns ``(view, dim, index)``: ``torch.gather(x.reshape(view), dim, index)`` holds, for every
    channel, the elements of :func:`gather_sample` (the same set, possibly in another order).
    ``view`` is ``(N, G', C / G', P)`` with ``P = prod(S)`` (the spatial dims merged: a view of
    contiguous and channels-last tensors) and ``G'`` the channel groups (1 for fixed sampling;
    ``C`` when ``G`` does not divide ``C``). Row sampling (``ns``, ``bs``) gathers along
    ``dim = 0`` with ``index`` of shape ``(k, G', C / G', P)``; spatial sampling (``fs``) along
    ``dim = 3``, ``(N', G', C / G', M)``, the sampled positions of all spatial axes as one flat
    position ``sum_d idx_d * stride_d``. ``index`` is an expanded view of a tensor that depends on
    the row and group only: a compiled gather reads one small index per row and group, runs one
    indirect load per element over a contiguous row of values, and the channels of a group are
    contiguous in a channels-last tensor.
    """
    rows, channels = plan.real_rows, plan.shape[1]
    spatial = list(plan.shape[2:])
    positions = math.prod(spatial) if spatial else 1
    groups = 1 if offsets is None else plan.groups
    per_channel = groups > 1 and channels % groups != 0
    g = channels if per_channel else groups
    view = [plan.shape[0], g, channels // g, positions]

    def indices(i: int, ax: SampledAxis) -> Tensor:  # (R or 1, g or 1, count)
        if offsets is None:
            return torch.arange(ax.count, device=device).view(1, 1, ax.count)
        idx = axis_indices(ax, offsets, i)
        if not per_channel:
            return idx
        group_of = torch.arange(channels, device=device) * plan.groups // channels
        return idx.index_select(1, group_of)

    axes = {ax.axis: (i, ax) for i, ax in enumerate(plan.axes)}
    if 0 in axes:
        i, ax = axes[0]
        row = indices(i, ax)[0].t()  # (k, g or 1)
        index = row.reshape(ax.count, row.shape[1], 1, 1)
        return view, 0, index.expand(ax.count, g, channels // g, positions)
    k = len(spatial)
    flat = torch.arange(positions, device=device).view(1, 1, positions)  # no sampled axis
    for d in range(k if axes else 0):
        if d + 2 in axes:
            t = indices(*axes[d + 2])
        else:
            t = torch.arange(spatial[d], device=device).view(1, 1, spatial[d])
        shape = [t.shape[0], t.shape[1]] + [1] * k
        shape[2 + d] = t.shape[2]
        t = t.view(shape) * math.prod(spatial[d + 1 :])
        flat = t if d == 0 else flat + t
    index = flat.reshape(flat.shape[0], flat.shape[1], 1, -1)
    return view, 3, index.expand(rows, g, channels // g, index.shape[-1])


def grouped_gather(x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> Tensor:
    """The real rows' sample set as ``(N'_s, G', C / G', M)`` through
    :func:`grouped_sample_index` (channel ``c`` at ``[:, c // (C / G'), c % (C / G')]``)."""
    view, dim, index = grouped_sample_index(plan, offsets, x.device)
    return torch.gather(x.reshape(view), dim, index)


def _has_symbolic_axis(plan: SamplePlan) -> bool:
    """A sampled axis whose size is symbolic (``torch.compile(dynamic=True)``)."""
    return any(not isinstance(ax.size, int) for ax in plan.axes)


def sample_mask(x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> Tensor:
    """The sample set of the real rows as a 0/1 mask broadcastable to ``x[:N']``.

    The same index set as :func:`gather_sample` -- position ``p`` of a sampled axis is taken iff
    ``r = (p - offset) mod size`` has ``r mod step == 0`` and ``r // step < count`` (fixed:
    ``p < count``) -- for symbolic sizes, where a gathered tensor's shape ``ceil(size * ratio)``
    would be a floor division that Inductor cannot order strides by.
    """
    rank, channels = x.dim(), x.shape[1]
    mask: Tensor | None = None
    for i, ax in enumerate(plan.axes):
        p = torch.arange(ax.size, device=x.device)
        if offsets is None:
            taken = (p < ax.count).view([-1 if d == ax.axis else 1 for d in range(rank)])
        else:
            rel = torch.remainder(p - offsets[..., i : i + 1], ax.size)  # (R, G, size)
            taken = (torch.remainder(rel, ax.step) == 0) & (rel // ax.step < ax.count)
            if plan.groups > 1:
                group_of = torch.arange(channels, device=x.device) * plan.groups // channels
                taken = taken.index_select(1, group_of)  # (R, C, size)
            if ax.axis == 0:  # rows: (1, C, N') -> (N', C, 1, ...)
                taken = taken[0].t().reshape([ax.size, taken.shape[1]] + [1] * (rank - 2))
            else:
                shape = [taken.shape[0], taken.shape[1]] + [1] * (rank - 2)
                shape[ax.axis] = ax.size
                taken = taken.reshape(shape)
        mask = taken if mask is None else mask & taken
    assert mask is not None
    return mask


def sample_parts(x: Tensor, plan: SamplePlan, offsets: Tensor | None) -> list[Tensor]:
    """The sample set as a list of tensors ``(rows, C, ...)``: real-row sample, then virtual rows."""
    parts: list[Tensor] = []
    if plan.include_real:
        parts.append(gather_sample(x, plan, offsets))
    if plan.virtual_rows:
        parts.append(x.narrow(0, plan.real_rows, plan.virtual_rows))
    return parts


def _channel_sum(t: Tensor) -> Tensor:
    dims = [0, *range(2, t.dim())]
    return t.sum(dim=dims)


def sample_statistics(
    x: Tensor, plan: SamplePlan, offsets: Tensor | None = None, grouped: bool = False
) -> tuple[Tensor, Tensor]:
    """Biased mean and variance over the sample set, float32 (float64 for float64 inputs).

    Two passes over the parts of the sample set: ``mean = sum / n``, then
    ``var = sum((a - mean)^2) / n``. A part is a gathered sample (:func:`sample_parts`), or -- with
    symbolic sizes -- the real rows weighted by their 0/1 :func:`sample_mask`: the same sums.
    ``grouped``: the gathered sample as :func:`grouped_gather` lays it out (the compiled
    lowering's form; the same elements summed in another order).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    virtual = x.narrow(0, plan.real_rows, plan.virtual_rows) if plan.virtual_rows else None
    # (values, 0/1 weight or None, grouped layout)
    parts: list[tuple[Tensor, Tensor | None, bool]]
    if plan.include_real and plan.axes and _has_symbolic_axis(plan):
        real = (x.narrow(0, 0, plan.real_rows) if plan.virtual_rows else x).to(acc)
        parts = [(real, sample_mask(real, plan, offsets).to(acc), False)]
    elif grouped and plan.include_real and plan.axes:
        parts = [(grouped_gather(x, plan, offsets).to(acc), None, True)]
    else:
        parts = [(p.to(acc), None, False) for p in sample_parts(x, plan, offsets)]
        virtual = None  # sample_parts lists it
    if virtual is not None:
        parts.append((virtual.to(acc), None, False))
    n = plan.count()

    def weighted_sum(t: Tensor, w: Tensor | None, grouped_part: bool) -> Tensor:
        t = t if w is None else t * w
        return t.sum((0, 3)).reshape(-1) if grouped_part else _channel_sum(t)

    def centered(t: Tensor, grouped_part: bool) -> Tensor:
        if grouped_part:
            return t - mean.view(1, t.shape[1], t.shape[2], 1)
        return t - mean.view([1, -1] + [1] * (t.dim() - 2))

    mean = sum(weighted_sum(t, w, g) for t, w, g in parts) / n
    var = sum(weighted_sum(centered(t, g).square(), w, g) for t, w, g in parts) / n
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - mean) * rsqrt(var + eps) * w + b`` over the whole tensor, computed in ``mean.dtype``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(mean.dtype).view(shape)
    return y.to(x.dtype)


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    n: Any,
    momentum: float | Tensor,
) -> None:
    """PyTorch's running-statistics rule with the sample count ``n`` (unbiased variance)."""
    with torch.no_grad():
        if running_mean is not None:
            new = (1 - momentum) * running_mean + momentum * mean.detach()
            running_mean.copy_(new)
        if running_var is not None:
            unbiased = var.detach() * (n / (n - 1))
            new = (1 - momentum) * running_var + momentum * unbiased
            running_var.copy_(new)


_TENSOR_ARGS = ("input", "running_mean", "running_var", "weight", "bias")


def _check_arguments(values: tuple[Any, ...]) -> None:
    """torch's kind of error for a non-tensor argument (``F.batch_norm`` raises ``TypeError``)."""
    for position, (name, value) in enumerate(zip(_TENSOR_ARGS, values, strict=True)):
        if not isinstance(value, Tensor) and (value is not None or name == "input"):
            raise TypeError(
                f"sampled_batch_norm(): argument '{name}' (position {position + 1}) must be "
                f"Tensor{'' if name == 'input' else ' or None'}, not {type(value).__name__}"
            )


def _check_input(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"sampled_batch_norm expects an input of shape (N, C, *spatial), got {tuple(x.shape)}"
        )


def _is_empty(x: Tensor) -> bool:
    """A batch of no rows, known when tracing (Dynamo specialises sizes 0 and 1)."""
    n = x.shape[0]
    return isinstance(n, int) and n == 0


def sampled_batch_norm(
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
) -> Tensor:
    """``torch.nn.functional.batch_norm`` with training statistics from a sample.

    Same arguments and behaviour as ``F.batch_norm``; ``config`` (a :class:`SamplingConfig`, a dict
    of its fields or a method name; default ``full``) chooses the sample set. For ``vdn`` and
    ``fs_vdn`` the last ``config.vdn_samples`` rows of ``input`` are the virtual rows (appended by the
    VDN pass); they are normalised like every other row.
    """
    cfg = SamplingConfig.coerce(config)
    _check_arguments((input, running_mean, running_var, weight, bias))
    if not training:
        if running_mean is None or running_var is None:
            # A BN without running statistics in eval mode: batch statistics of the whole input,
            # exactly what nn.BatchNorm does there (nothing to sample in eval mode).
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        m = momentum if isinstance(momentum, float) else 0.0  # unused in eval mode
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, m, eps)
    if input.dim() >= 1 and _is_empty(input):
        # An empty batch: PyTorch returns an empty output and leaves the running statistics as
        # they are (the module still counts num_batches_tracked).
        m = momentum if isinstance(momentum, float) else 0.0
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, m, eps)
    _check_input(input)
    plan = sample_plan(tuple(input.shape), cfg)
    n = plan.count()
    if n <= 1:  # a SymInt (dynamic shapes) answers from its hint and guards on it
        raise ValueError(
            f"Expected more than 1 value per channel in the sample set when training, got input "
            f"size {tuple(input.shape)} with method {cfg.method!r} and ratio {cfg.ratio}; use a "
            f"larger batch or ratio"
        )
    offsets = draw_offsets(plan, input.device, cfg.seed)
    mean, var = sample_statistics(input, plan, offsets)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return normalize(input, mean, var, weight, bias, eps)
