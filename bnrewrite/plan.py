"""The sample plan: which elements of a BatchNorm input make up the sample set.

Backend-neutral: the plan is sizes and index arithmetic only. The torch estimators
(:mod:`bnrewrite.estimators`), the ONNX rules and the GPU kernels all build their sample sets from
it, so the sample set is defined once.

For an input ``x`` of shape ``(N, C, *S)`` (``d = len(S)`` spatial dims) the plan is a list of
*sampled axes*. Along a sampled axis of ``size`` elements the sample takes ``count`` indices

    idx_j = (offset + step * j) mod size,        j = 0 .. count - 1,

and keeps every index of the axes not listed. Axes:

* ``ns``/``bs``: axis 0, ``count = k = take(N, ratio)``, step 1: ``k`` consecutive rows
  (cyclically) -- regular, contiguous memory access.
* ``fs``: every spatial axis ``i``, ``count = m_i = take(S_i, ratio ** (1/d))``,
  ``step = S_i // m_i`` for random sampling: a lattice spread over the whole feature map, so an image
  with empty borders is sampled as evenly as its centre (spatially representative); neighbouring
  positions, which are strongly correlated, are never both taken when ``step > 1``. FS takes part of
  every feature map *for every sample*; a ``(N, C)`` input has one position per map, so ``fs``
  there takes every row (the earlier rule "``fs`` on ``(N, C)`` is ``bs``" estimated a
  BatchNorm1d head from 4 values per channel at batch 64 and cost 12 points on real data).
* ``full``: no sampled axes (every element).
* ``vdn``: no real elements; the last ``virtual_rows`` rows of the input are the sample.
* ``fs_vdn``: the ``fs`` axes over the real rows, plus every element of the virtual rows.

Offsets. ``fixed`` sampling uses offset 0 and step 1: the first ``k`` rows, or the top-left patch of
side ``m_i`` (DESIGN.md). ``random`` sampling draws an offset uniform in ``[0, size)`` for each
sampled axis, for each of ``G`` channel groups and -- for the spatial axes of ``fs`` -- for each
real row, so offsets have shape ``(R, G, A)`` with ``R = plan.offset_rows`` (``N'`` for ``fs``, 1
for row sampling) and ``A = len(plan.axes)``. Because an index set is a rotation of a fixed set of
distinct indices, every index is taken with probability exactly ``count / size``: the sample mean is
an unbiased estimate of the full mean. Per-row lattice phases matter on real images: objects sit at
the same place in every image of a data set (digits are centred), so one phase shared by the whole
batch would make every row's error the same; a phase per row averages it out over the batch.
Channel ``c`` belongs to group ``c * G // C`` (contiguous, balanced groups; ``G = min(groups, C)``):
``ns`` has ``G = 1``, the same sample for all channels.

Floor. No channel's statistics come from fewer than ``config.min_count`` values, or from all the
real values when there are fewer: row sampling takes more rows, FS every position of its maps. ``unfloored_count`` keeps the count before, for reports.
``vdn`` has no real part to raise (its statistics never read a real row): the VDN passes carry
more virtual rows instead (:func:`virtual_rows_for_floor`).

The per-channel count of the sample set is ``n = N' * prod(counts) * prod(unsampled sizes)`` plus
``virtual_rows * prod(S)`` for the virtual part; running variance uses ``n / (n - 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .config import SamplingConfig, take

__all__ = [
    "SampledAxis",
    "SamplePlan",
    "sample_plan",
    "channel_group_of",
    "virtual_rows_for_batch",
    "virtual_rows_for_floor",
]


@dataclasses.dataclass(frozen=True)
class SampledAxis:
    """One sampled axis: indices ``(offset + step * j) mod size`` for ``j < count``."""

    axis: int
    size: Any  # int or SymInt
    count: Any
    step: Any

    def fixed_indices(self) -> list[int]:
        """The indices of fixed sampling (offset 0, step 1): ``0 .. count - 1``."""
        return list(range(int(self.count)))


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Concrete sample set of one BatchNorm input (see the module docstring)."""

    method: str
    shape: tuple[Any, ...]
    real_rows: Any
    virtual_rows: int
    axes: tuple[SampledAxis, ...]
    groups: int
    random: bool
    include_real: bool
    #: the floor (``config.min_count``) and the count before the plan applied it
    floor: int = 1
    unfloored_count: Any = None

    @property
    def raised(self) -> bool:
        """The floor raised the sample (``unfloored_count`` values -> ``count()``)."""
        before = self.unfloored_count
        return isinstance(before, int) and before != self.count()

    @property
    def channels(self) -> Any:
        return self.shape[1]

    @property
    def spatial(self) -> tuple[Any, ...]:
        return tuple(self.shape[2:])

    @property
    def offset_rows(self) -> Any:
        """``R``: rows that draw their own offsets -- every real row for spatial sampling, else 1."""
        return self.real_rows if any(ax.axis >= 2 for ax in self.axes) else 1

    @property
    def is_full(self) -> bool:
        return self.include_real and not self.axes and self.virtual_rows == 0

    def real_count(self) -> Any:
        """Per-channel number of sampled elements taken from the real rows."""
        if not self.include_real:
            return 0
        sizes = [self.real_rows, *self.spatial]
        for ax in self.axes:
            sizes[ax.axis if ax.axis == 0 else ax.axis - 1] = ax.count
        return math.prod(sizes)

    def virtual_count(self) -> Any:
        return self.virtual_rows * math.prod(self.spatial)

    def count(self) -> Any:
        """Per-channel size ``n`` of the sample set."""
        return self.real_count() + self.virtual_count()


def channel_group_of(channel: int, channels: int, groups: int) -> int:
    """Group of a channel: ``c * G // C`` with ``G = min(groups, C)``."""
    return channel * min(groups, channels) // channels


def sample_plan(shape: Sequence[Any], config: SamplingConfig) -> SamplePlan:
    """The sample plan for an input of ``shape = (N, C, *S)`` under ``config``.

    For ``vdn``/``fs_vdn`` the last ``config.vdn_samples`` rows of the input are the virtual rows.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            f"BatchNorm input must have shape (N, C, *spatial) with at least 2 dims, got {shape}"
        )
    n_total, channels = shape[0], shape[1]
    spatial = shape[2:]
    method = config.method
    virtual = config.vdn_samples if config.uses_virtual_rows else 0
    real = n_total - virtual
    if virtual and isinstance(real, int) and real < 0:
        raise ValueError(
            f"method {method!r} expects the last {virtual} rows of the input to be virtual rows, "
            f"but the input has only {n_total} rows; apply VDN with bnrewrite.rewrite on the whole "
            f"model, which appends them"
        )
    random = config.sampling == "random"
    axes: list[SampledAxis] = []
    if method in ("ns", "bs"):
        k = take(real, config.ratio)
        axes.append(SampledAxis(0, real, k, 1))
    elif method in ("fs", "fs_vdn") and spatial:
        side = config.ratio ** (1.0 / len(spatial))
        counts = [take(size, side) for size in spatial]
        axes.extend(_lattice(spatial, counts, random))
    groups = 1 if method == "ns" else config.groups
    if isinstance(channels, int):
        groups = min(groups, channels)
    plan = SamplePlan(
        method=method,
        shape=shape,
        real_rows=real,
        virtual_rows=virtual,
        axes=tuple(axes),
        groups=groups,
        random=random and len(axes) > 0,  # not bool(list): Dynamo 2.11 cannot trace it
        include_real=method != "vdn",
        floor=config.min_count,
    )
    return dataclasses.replace(plan, axes=tuple(_apply_floor(plan)), unfloored_count=plan.count())


def _lattice(spatial: Sequence[Any], counts: Sequence[Any], random: bool) -> list[SampledAxis]:
    return [
        SampledAxis(2 + i, size, m, size // m if random else 1)
        for i, (size, m) in enumerate(zip(spatial, counts, strict=True))
    ]


def _apply_floor(plan: SamplePlan) -> list[SampledAxis]:
    """The axes of ``plan`` raised until a channel's statistics use ``>= min(floor, available)``
    values (the floor). Rows: more rows. FS: every position of the maps. ``vdn`` has no real part
    to raise (VDN's guarantee: statistics never read a real row); the VDN pass warns instead.
    Symbolic sizes (dynamic shapes) give the same sample: rows as a ``sym_max`` expression, FS
    through an inequality guard."""
    axes, floor = list(plan.axes), plan.floor
    if not plan.include_real or not axes:
        return axes
    real, spatial = plan.real_rows, plan.spatial
    per_row, vcount = math.prod(spatial), plan.virtual_count()
    if axes[0].axis == 0:  # rows
        ax = axes[0]
        if all(isinstance(v, int) for v in (real, per_row, ax.count)):
            need_rows = max(1, -(-(floor - vcount) // per_row))
            return [SampledAxis(0, ax.size, max(ax.count, min(real, need_rows)), 1)]
        import torch  # symbolic sizes (dynamic shapes): the same value as an expression

        need_rows = (floor - vcount + per_row - 1) // per_row
        k = torch.sym_max(ax.count, torch.sym_min(real, need_rows))
        return [SampledAxis(0, ax.size, k, 1)]
    available = real * per_row
    if isinstance(available, int):
        target = min(floor - vcount, available)
    else:
        import torch

        target = torch.sym_min(floor - vcount, available)
    if not bool(plan.real_count() < target):  # a SymBool answers from its hint (a guard)
        return axes
    # Below the floor, FS takes every position of its maps: one rule for concrete and symbolic
    # sizes (the condition is an inequality guard; no size becomes concrete), and it only meets
    # small maps or tiny batches, where whole maps are cheap.
    return _lattice(spatial, list(spatial), plan.random)


def virtual_rows_for_floor(config: SamplingConfig, positions: int) -> int:
    """Virtual rows a ``vdn`` layer with ``positions`` values per row and channel needs:
    ``max(vdn_samples, ceil(min_count / positions))`` (a ``(N, C)`` layer: ``min_count`` rows).
    The VDN passes (FX and ONNX) give the whole graph the most that any of its layers needs."""
    if config.method != "vdn":
        return config.vdn_samples
    return max(config.vdn_samples, -(-config.min_count // max(1, positions)))


def virtual_rows_for_batch(config: SamplingConfig, batch: int | None) -> int:
    """Virtual rows a ``vdn`` / ``fs_vdn`` graph carries for a batch of ``batch`` real rows:
    ``max(vdn_samples, ceil(batch * vdn_per_row), vdn_min_rows - batch)``, a term left out when its
    field is 0 (``vdn_samples`` when the batch is unknown). The floor
    (:func:`virtual_rows_for_floor`) may raise it further."""
    if not config.uses_virtual_rows or not batch:
        return config.vdn_samples
    rows = config.vdn_samples
    if config.vdn_per_row:
        rows = max(rows, math.ceil(int(batch) * config.vdn_per_row - 1e-9))  # may exceed N
    if config.vdn_min_rows:
        rows = max(rows, config.vdn_min_rows - int(batch))
    return rows
