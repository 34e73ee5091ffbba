"""Module form of the fused lowering: ``FusedSampledBatchNorm1d/2d/3d`` and ``convert_fused_``.

A ``FusedSampledBatchNormNd`` is a :class:`bnrewrite.SampledBatchNormNd` (same parameters,
buffers, ``state_dict`` and running-statistics bookkeeping) whose training forward calls
:func:`bnrewrite.kernels.fused_sampled_batch_norm` instead of the torch estimator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import SamplingConfig
from ..modules import (
    SampledBatchNorm1d,
    SampledBatchNorm2d,
    SampledBatchNorm3d,
    convert_,
)
from .ops import fused_sampled_batch_norm

__all__ = [
    "FusedSampledBatchNorm1d",
    "FusedSampledBatchNorm2d",
    "FusedSampledBatchNorm3d",
    "convert_fused_",
]


class _FusedMixin:
    """The forward of :class:`bnrewrite.modules.SampledBatchNormMixin`, calling the fused op."""

    config: SamplingConfig

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - PyTorch's name
        self._check_input_dim(input)  # type: ignore[attr-defined]
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats:  # type: ignore[attr-defined]
            nbt = self.num_batches_tracked  # type: ignore[attr-defined]
            if nbt is not None:
                nbt.add_(1)
                if self.momentum is None:  # type: ignore[attr-defined]
                    momentum = 1.0 / nbt.to(torch.float32)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        use_running = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        return fused_sampled_batch_norm(
            input,
            self.running_mean if use_running else None,  # type: ignore[attr-defined]
            self.running_var if use_running else None,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            bn_training,
            momentum,
            self.eps,  # type: ignore[attr-defined]
            config=self.config,
        )


class FusedSampledBatchNorm1d(_FusedMixin, SampledBatchNorm1d):
    """``SampledBatchNorm1d`` lowered to the fused kernels."""


class FusedSampledBatchNorm2d(_FusedMixin, SampledBatchNorm2d):
    """``SampledBatchNorm2d`` lowered to the fused kernels."""


class FusedSampledBatchNorm3d(_FusedMixin, SampledBatchNorm3d):
    """``SampledBatchNorm3d`` lowered to the fused kernels."""


_FUSED = {
    SampledBatchNorm1d: FusedSampledBatchNorm1d,
    SampledBatchNorm2d: FusedSampledBatchNorm2d,
    SampledBatchNorm3d: FusedSampledBatchNorm3d,
}


def convert_fused_(
    model: nn.Module, config: SamplingConfig | dict[str, Any] | str | None
) -> nn.Module:
    """:func:`bnrewrite.convert_`, then switch every sampled BN to its fused twin, in place.

    Parameters and buffers are shared (no copies); returns ``model``.
    """
    convert_(model, config)
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model
