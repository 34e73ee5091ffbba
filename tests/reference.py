"""An independent float64 reference of the DESIGN.md contract for fixed sampling.

Written from DESIGN.md alone; it imports nothing from bnrewrite. ``ref_sample`` is the tests' one
definition of the fixed sample set: the zoo's, the ONNX tests' and the VDN tests' references build on it. ``bs``/``ns``: the first ``k`` samples;
``fs``: the top-left patch of side ``take(S_i, ratio ** (1/d))`` (every row of a ``(N, C)`` input); statistics are the biased mean and
variance over that set; the whole tensor is normalised; running stats use ``n / (n - 1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def ref_take(size: int, f: float) -> int:
    return max(1, min(size, math.ceil(size * f - 1e-9)))


#: The documented default of ``SamplingConfig.min_count`` (README, docs/results.md).
REF_MIN_COUNT = 32


def ref_sample(
    x: Any, method: str, ratio: float, min_count: int = REF_MIN_COUNT, virtual_values: int = 0
) -> Any:
    """The fixed sample set of ``x`` (N, C, *S) as (N', C, *S'); torch tensors or numpy arrays.

    The floor (DESIGN.md): a channel's statistics use at least ``min(min_count, available)``
    values, ``virtual_values`` of which may come from virtual rows (``fs_vdn``). Rows: more rows.
    FS: every position of the maps.
    """
    if method == "full":
        return x
    n, spatial = x.shape[0], list(x.shape[2:])
    per_row = math.prod(spatial)
    if method in ("bs", "ns"):
        k = ref_take(n, ratio)
        if k * per_row + virtual_values < min_count:
            k = max(k, min(n, math.ceil((min_count - virtual_values) / per_row)))
        return x[:k]
    if method == "fs" and len(spatial) == 0:
        return x  # one position per map: FS takes part of every map for every sample, i.e. all
    if method == "fs":
        side = ratio ** (1.0 / len(spatial))
        sides = [ref_take(s, side) for s in spatial]
        if n * math.prod(sides) < min(min_count - virtual_values, n * per_row):
            sides = spatial  # below the floor: every position of the maps
        index = [slice(None), slice(None)] + [slice(0, m) for m in sides]
        return x[tuple(index)]
    raise ValueError(f"the reference covers full/ns/bs/fs, got {method!r}")


def ref_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    method: str,
    ratio: float,
    momentum: float,
    eps: float,
    min_count: int = REF_MIN_COUNT,
) -> torch.Tensor:
    """Float64 forward of the contract (training mode); updates the running stats in place."""
    xd = x.double()
    s = ref_sample(xd, method, ratio, min_count)
    dims = [0] + list(range(2, x.dim()))
    n = s.numel() // s.shape[1]
    mean = s.sum(dims) / n
    shape = [1, -1] + [1] * (x.dim() - 2)
    var = ((s - mean.view(shape)) ** 2).sum(dims) / n
    y = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean)
        if running_var is not None:
            running_var.copy_((1 - momentum) * running_var.double() + momentum * var * n / (n - 1))
    return y
