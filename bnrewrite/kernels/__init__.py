"""Fused GPU lowering of sampled BatchNorm: Triton kernels behind ``torch.library`` custom ops.

The pure-torch estimator (:mod:`bnrewrite.estimators`) stays the CPU path and the reference;
:func:`fused_sampled_batch_norm` has its contract and runs the kernels on CUDA (and on the CPU
under ``TRITON_INTERPRET=1``, for tests). Design and byte counts: ``docs/kernels.md``.
"""

from __future__ import annotations

from .modules import (
    FusedSampledBatchNorm1d,
    FusedSampledBatchNorm2d,
    FusedSampledBatchNorm3d,
    convert_fused_,
    fuse_relu,
)
from .ops import (
    can_use_kernels,
    fused_bn_backward,
    fused_bn_forward,
    fused_sampled_batch_norm,
    interpreter_enabled,
    kernels_available,
    use_interpreter,
)

__all__ = [
    "fused_sampled_batch_norm",
    "fused_bn_forward",
    "fused_bn_backward",
    "can_use_kernels",
    "kernels_available",
    "interpreter_enabled",
    "use_interpreter",
    "FusedSampledBatchNorm1d",
    "FusedSampledBatchNorm2d",
    "FusedSampledBatchNorm3d",
    "convert_fused_",
    "fuse_relu",
]
