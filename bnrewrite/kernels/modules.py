"""Module form of the fused lowering: ``FusedSampledBatchNorm1d/2d/3d`` and ``convert_fused_``.

A ``FusedSampledBatchNormNd`` is a :class:`bnrewrite.SampledBatchNormNd` (same parameters,
buffers, ``state_dict`` and running-statistics bookkeeping) whose training forward calls
:func:`bnrewrite.kernels.fused_sampled_batch_norm` instead of the torch estimator.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, fx, nn

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
    "fused_twin",
    "fuse_relu",
]


class _FusedMixin:
    """The forward of :class:`bnrewrite.modules.SampledBatchNormMixin`, calling the fused op."""

    config: SamplingConfig
    #: set by :func:`fuse_relu` on the twin that replaces a ``BN -> ReLU`` pair
    fuse_relu: bool = False

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # noqa: A002
        return fused_sampled_batch_norm(
            *self.batch_norm_arguments(input),  # type: ignore[attr-defined]
            config=self.config,
            relu=self.fuse_relu,
            residual=residual,
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


def fused_twin(module: nn.Module) -> nn.Module:
    """Turn a ``SampledBatchNormNd`` into its ``FusedSampledBatchNormNd`` in place (other
    modules are returned as they are)."""
    fused = _FUSED.get(type(module))
    if fused is not None:
        module.__class__ = fused
    return module


def convert_fused_(
    model: nn.Module, config: SamplingConfig | dict[str, Any] | str | None
) -> nn.Module:
    """:func:`bnrewrite.convert_`, then switch every sampled BN to its fused twin, in place.

    Parameters and buffers are shared (no copies); returns ``model``.
    """
    convert_(model, config)
    for module in model.modules():
        fused_twin(module)
    return model


class _LeafTracer(fx.Tracer):
    """Keeps BatchNorm layers (sampled, fused or not) as ``call_module`` leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fuse_relu(model: nn.Module) -> fx.GraphModule:
    """A ``GraphModule`` of ``model`` with BN -> ReLU (and BN + z -> ReLU) fused into one op.

    ``model`` must already hold fused sampled BN layers (:func:`convert_fused_`). Patterns, where
    each intermediate has a single user and the BN module is called once:

    * ``relu(bn(x))`` (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``, in place or not);
    * ``relu(bn(x) + z)`` (``+``, ``torch.add``, ``.add``, ``+=``; the residual block's tail).

    The matching is :func:`bnrewrite.passes.epilogue.fuse_epilogues`, shared with the FX pass.

    Each becomes one call of a twin of that BN (sharing its parameters and buffers) with
    ``fuse_relu=True`` (and ``z`` as ``residual``), placed where the ReLU was: the epilogue runs
    in the kernels and its backward costs no extra pass (``dz`` is written by the main pass).
    ``model`` itself is not modified; call ``.train()``/``.eval()`` on the returned module.
    """
    from ..passes.epilogue import fuse_epilogues  # the one epilogue matcher (also the FX pass's)

    gm = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
    fused = fuse_epilogues(gm)
    gm.bnrewrite_fused_relu = len(fused)  # type: ignore[assignment]
    return gm
