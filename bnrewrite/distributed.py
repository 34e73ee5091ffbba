"""Sampled synchronised BatchNorm: the sample of every rank, pooled across a process group.

For rank ``r`` of a process group with local input ``x_r`` of shape ``(N_r, C, *S)`` and local
sample set ``A_r`` (the plan of ``x_r``'s shape, floor included; random positions drawn by each
rank from its own RNG), ``n_r = |A_r|`` values per channel:

    forward   local mean_r and M2_r = n_r * biased var_r over A_r (float32, two passes);
              one all_gather of (n_r, mean_r, M2_r) packed in one tensor, then Chan's merge:
              n = sum n_r,  mu = sum n_r mean_r / n,
              M2 = sum (M2_r + n_r (mean_r - mu)^2),  var = M2 / n
              y_r = (x_r - mu) * rsqrt(var + eps) * w + b        (the whole local tensor)
              running statistics with the global n: rv <- (1-m) rv + m var n/(n-1)
    backward  local Sdy_r = sum dy_r, Sdyx_r = sum dy_r * xh_r over every local element;
              one all_reduce of the two, packed; then on the local sampled elements a
              dx_a = s dy_a + (g_mu + 2 g_var (x_a - mu)) / n with s = w rstd,
              g_mu = -s * sum_r Sdy_r, g_var = -s rstd sum_r Sdyx_r / 2, and dx = s dy elsewhere;
              dw, db are the local sums (DDP averages parameter gradients across ranks, as for
              PyTorch's SyncBatchNorm).

Two collectives per layer and step, as ``nn.SyncBatchNorm``. With no process group initialised,
or one rank, it is the local sampled BN. ``method="full"`` is an exact SyncBatchNorm that also
runs on CPU (gloo). ``vdn``/``fs_vdn`` are refused: virtual rows are a whole-graph rewrite.

Two lowerings of the same forward. Eager (plain tensors): the statistics by the native kernels on
the gathered sample, c10d ``all_gather``, and the ``autograd.Function`` above (backward: one
``all_reduce`` + the fix-up). Traced (``torch.compile``, ``make_fx``): the estimator's
:func:`~bnrewrite.estimators.sample_statistics`, one *functional* ``all_gather`` (a
``_c10d_functional`` op that Dynamo, AOTAutograd and Inductor keep in the graph; its registered
backward is one ``reduce_scatter``, which sums every rank's gradient of its row -- the same two
sums), the merge and :func:`~bnrewrite.estimators.normalize`; autograd differentiates it, so
the compiled gradient is the exact gradient of the same forward. Under ``torch.compile`` the
channel-count check is not traced (it would add a collective to every step; DDP compares the
parameter shapes of all ranks when it wraps the model) and seeded configs draw from torch's
global RNG (seed every rank yourself, as for any random op under ``torch.compile``).

Errors instead of silently local statistics: a ``process_group`` given while
``torch.distributed`` is not initialised (never, or after ``destroy_process_group``), a rank
outside the layer's group, and ``WORLD_SIZE > 1`` in the environment (``torchrun``) without
``init_process_group``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._twin import twin_of
from .config import SamplingConfig
from .eager import _SampleAccess, _tracing, channel_sums, fix_up
from .eager import sampled_batch_norm as local_sampled_batch_norm
from .estimators import draw_offsets, normalize, sample_statistics, update_running_stats
from .plan import sample_plan

__all__ = ["SampledSyncBatchNorm", "sync_sampled_batch_norm", "sync_twin"]


#: Run the collectives even in a group of one rank (where the result is the local one): the test
#: of the NCCL path on a machine with one GPU sets it; NCCL puts one rank on each device.
COLLECTIVES_WITH_ONE_RANK = False


def _group_size(group: Any) -> int:
    """The number of ranks of ``group`` (``None``: the default group); 1 without a process group.

    ``ValueError`` where local statistics would silently replace the pooled ones: a ``group``
    given while ``torch.distributed`` is not initialised, ``WORLD_SIZE > 1`` in the environment
    without ``init_process_group``, or a rank that is not a member of ``group``."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "SampledSyncBatchNorm: its process_group is not initialised (torch.distributed "
                "has no default group: init_process_group was not called, or "
                "destroy_process_group was); initialise it before training, or set "
                "process_group=None for one process"
            )
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            raise ValueError(
                f"SampledSyncBatchNorm: WORLD_SIZE={world} in the environment (a launcher such "
                f"as torchrun started {world} processes) but torch.distributed is not "
                f"initialised; call torch.distributed.init_process_group() before the first "
                f"training step (unset WORLD_SIZE to train one process on its own)"
            )
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError(
            f"SampledSyncBatchNorm: rank {dist.get_rank()} is not a member of the layer's "
            f"process group; a rank outside the group cannot train the layer (give it a group "
            f"it belongs to)"
        )
    return size


class _SyncSampledBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        n: Tensor,
        eps: float,
        access: _SampleAccess,
        group: Any,
    ) -> Tensor:
        y = normalize(x, mean, var, weight, bias, eps)  # the estimator's normalisation
        ctx.save_for_backward(x, weight, mean, var)
        ctx.n, ctx.access, ctx.group, ctx.eps = n, access, group, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        acc = mean.dtype
        local = channel_sums(dy, x, mean, var, ctx.eps)  # (2, C): Σdy, Σdy·x̂ on this rank
        total = local.clone()
        dist.all_reduce(total, group=ctx.group)  # one collective: both sums packed
        sdy, sdyx = total[0], total[1]
        rstd = torch.rsqrt(var + ctx.eps)
        scale = rstd if weight is None else rstd * weight.to(acc)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy.to(acc) * scale.view([1, -1] + [1] * (x.dim() - 2))).to(x.dtype)
            fix = fix_up(-scale * sdy / ctx.n, -scale * rstd * sdyx / ctx.n, mean, dx.dtype)
            ctx.access.add_fix(dx, x, fix)
        dw = local[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = local[0].to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


def _check_channels(channels: int, device: torch.device, group: Any) -> None:
    mine = torch.tensor([channels], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(_group_size(group))]
    dist.all_gather(counts, mine, group=group)
    seen = [int(c) for c in counts]
    if len(set(seen)) > 1:
        raise ValueError(
            f"SampledSyncBatchNorm: the ranks of the process group disagree on the number of "
            f"channels ({seen} by rank); every rank must run the same model"
        )


def _merge(stats: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of the gathered ``(world, 1 + 2C)`` rows ``(n_r, mean_r, M2_r)``."""
    counts = stats[:, :1]  # (W, 1)
    means, m2 = stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    n = counts.sum()
    mu = (counts * means).sum(0) / n
    var = (m2 + counts * (means - mu).square()).sum(0) / n
    return mu, var, n


def _row(mean_r: Tensor, var_r: Tensor, n_r: Any) -> Tensor:
    """One rank's ``(n_r, mean_r, M2_r)`` packed in one tensor, for one all_gather."""
    return torch.cat([mean_r.new_full((1,), n_r), mean_r, var_r * n_r])


def _all_gather_rows(row: Tensor, group: Any) -> Tensor:
    """``(world, len(row))``: every rank's row, by a functional collective with autograd (its
    backward is a ``reduce_scatter`` of the rows' gradients)."""
    import torch.distributed._functional_collectives as funcol

    group = dist.group.WORLD if group is None else group
    gather = getattr(funcol, "all_gather_single_autograd", None)  # torch >= 2.13
    if gather is None:  # pragma: no cover - torch 2.11/2.12
        gather = funcol.all_gather_tensor_autograd
    return gather(row[None], 0, group)


def _traced_sync_batch_norm(
    input: Tensor,  # noqa: A002
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    cfg: SamplingConfig,
    group: Any,
) -> Tensor:
    """The traceable lowering (module docstring): estimator statistics of the local sample, one
    functional ``all_gather``, Chan's merge, the estimator's normalisation; autograd's gradient."""
    plan = sample_plan(tuple(input.shape), cfg)
    offsets = draw_offsets(plan, input.device, cfg.seed)
    mean_r, var_r = sample_statistics(input, plan, offsets)
    mean, var, n = _merge(
        _all_gather_rows(_row(mean_r, var_r, plan.count()), group), input.shape[1]
    )
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return normalize(input, mean, var, weight, bias, eps)


def sync_sampled_batch_norm(
    input: Tensor,  # noqa: A002 - F.batch_norm's name
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    *,
    config: SamplingConfig | dict[str, Any] | str | None = None,
    process_group: Any = None,
    check_channels: bool = True,
) -> Tensor:
    """``F.batch_norm`` whose training statistics pool every rank's sample (module docstring).

    ``check_channels``: first gather every rank's channel count (one small extra collective) so
    that a mismatch is a ``ValueError`` on every rank instead of an abort inside the collective
    library; :class:`SampledSyncBatchNorm` does it on its first training call only."""
    cfg = SamplingConfig.coerce(config)
    if cfg.uses_virtual_rows:
        raise ValueError(
            f"method {cfg.method!r} is not supported across processes: virtual rows are a "
            f"whole-graph rewrite; use 'bs', 'fs', 'ns' or 'full' with SampledSyncBatchNorm"
        )
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    world = _group_size(process_group) if training else 1
    if not training or (world == 1 and not COLLECTIVES_WITH_ONE_RANK):
        return local_sampled_batch_norm(*args, config=cfg)
    if _tracing():
        return _traced_sync_batch_norm(
            input, running_mean, running_var, weight, bias, momentum, eps, cfg, process_group
        )
    if cfg.seed is not None:  # each rank its own reproducible stream
        cfg = cfg.replace(seed=(cfg.seed + 7919 * dist.get_rank(process_group)) % 2**63)
    if check_channels:
        _check_channels(int(input.shape[1]), input.device, process_group)
    plan = sample_plan(tuple(input.shape), cfg)
    offsets = draw_offsets(plan, input.device, cfg.seed)
    access = _SampleAccess(input, plan, offsets)
    with torch.no_grad():
        mean_r, var_r = access.statistics(input, eps)  # keeps the sample for the fix-up
        n_r = float(plan.count())
        channels = input.shape[1]
        row = _row(mean_r, var_r, n_r)
        gathered = [torch.empty_like(row) for _ in range(world)]
        dist.all_gather(gathered, row, group=process_group)  # one collective
        mean, var, n = _merge(torch.stack(gathered), channels)  # n: a 0-d tensor
    # the pooled count stays on the device (no host sync per layer); it is read only where the
    # local sample alone is too small to vouch for it (batch 1 per rank with a BatchNorm1d)
    if n_r <= 1 and float(n) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in the pooled sample set when training, "
            f"got {float(n):g}"
        )
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return _SyncSampledBatchNorm.apply(
        input, weight, bias, mean, var, n, eps, access, process_group
    )


class SampledSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The sampled twin of ``nn.SyncBatchNorm``: the same arguments (``process_group`` included),
    parameters, buffers and ``state_dict``; training statistics pool every rank's sample. Not a
    subclass of ``nn.SyncBatchNorm``, whose DDP handling refuses CPU modules: this one trains
    under DDP with gloo on CPU as well as with NCCL."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        config: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        self.config = SamplingConfig.coerce(config)
        if self.config.uses_virtual_rows:
            raise ValueError(
                f"method {self.config.method!r} is not supported across processes: virtual rows "
                f"are a whole-graph rewrite; use 'bs', 'fs', 'ns' or 'full'"
            )

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        self._check_input_dim(input)
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / self.num_batches_tracked.to(torch.float32)
        use_running = not self.training or self.track_running_stats
        out = sync_sampled_batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
            config=self.config,
            process_group=self.process_group,
            check_channels=self._check_channels_now(),
        )
        return out

    def _check_channels_now(self) -> bool:
        """True on the first eager training call with more than one rank (then never again);
        never under ``torch.compile`` (module docstring)."""
        if torch.compiler.is_compiling() or not self.training:
            return False
        if self.__dict__.get("_channels_checked", False) or _group_size(self.process_group) == 1:
            return False
        self.__dict__["_channels_checked"] = True
        return True


def sync_twin(bn: nn.SyncBatchNorm, config: Any) -> SampledSyncBatchNorm:
    """A :class:`SampledSyncBatchNorm` that shares ``bn``'s parameters, buffers and process group
    (no copies), for :func:`bnrewrite.convert_`."""
    cfg = SamplingConfig.coerce(config)
    if cfg.uses_virtual_rows:
        raise ValueError(
            f"method {cfg.method!r} is not supported across processes: virtual rows are a "
            f"whole-graph rewrite; use 'bs', 'fs', 'ns' or 'full'"
        )
    new = twin_of(bn, SampledSyncBatchNorm)
    new.config = cfg
    return new
