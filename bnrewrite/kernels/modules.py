"""Module form of the fused lowering: ``FusedSampledBatchNorm1d/2d/3d`` and ``convert_fused_``.

A ``FusedSampledBatchNormNd`` is a :class:`bnrewrite.SampledBatchNormNd` (same parameters,
buffers, ``state_dict`` and running-statistics bookkeeping) whose training forward calls
:func:`bnrewrite.kernels.fused_sampled_batch_norm` instead of the torch estimator.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
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


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1
    return False


class _LeafTracer(fx.Tracer):
    """Keeps BatchNorm layers (sampled, fused or not) as ``call_module`` leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _residual_add(node: fx.Node, bn_node: fx.Node) -> fx.Node | None:
    """The other operand if ``node`` is ``bn_node + z`` (or ``z + bn_node``), else ``None``."""
    is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add"
    )
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if a is bn_node and isinstance(b, fx.Node) and b is not bn_node:
        return b
    if b is bn_node and isinstance(a, fx.Node) and a is not bn_node:
        return a
    return None


def fuse_relu(model: nn.Module) -> fx.GraphModule:
    """A ``GraphModule`` of ``model`` with BN -> ReLU (and BN + z -> ReLU) fused into one op.

    ``model`` must already hold fused sampled BN layers (:func:`convert_fused_`). Patterns, where
    each intermediate has a single user and the BN module is called once:

    * ``relu(bn(x))`` (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``);
    * ``relu(bn(x) + z)`` (``+``, ``torch.add``, ``.add``; the residual block's tail).

    Each becomes one call of a twin of that BN (sharing its parameters and buffers) with
    ``fuse_relu=True`` (and ``z`` as ``residual``), placed where the ReLU was: the epilogue runs
    in the kernels and its backward costs no extra pass (``dz`` is written by the main pass).
    ``model`` itself is not modified; call ``.train()``/``.eval()`` on the returned module.
    """
    gm = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[str(node.target)] != 1:
            continue
        bn = gm.get_submodule(str(node.target))
        if not isinstance(bn, _FusedMixin) or len(node.users) != 1:
            continue
        (user,) = node.users
        residual = None
        if not _is_relu(gm, user):
            residual = _residual_add(user, node)
            if residual is None or len(user.users) != 1:
                continue
            add, (user,) = user, user.users
            if not _is_relu(gm, user):
                continue
        twin = copy.copy(bn)  # shares _parameters / _buffers with the original
        twin.fuse_relu = True
        parent, _, name = str(node.target).rpartition(".")
        gm.get_submodule(parent).register_module(name, twin)
        if residual is None:
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
        else:  # the residual may be computed after the BN: call the twin where the ReLU was
            with gm.graph.inserting_before(user):
                new = gm.graph.call_module(str(node.target), (node.args[0], residual))
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
            gm.graph.erase_node(add)
            gm.graph.erase_node(node)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    gm.bnrewrite_fused_relu = fused  # type: ignore[assignment]
    return gm
