"""Epilogue fusion: fold ``relu(BN(x))`` and ``relu(BN(x) + z)`` into the fused BN call.

The fused kernels (:mod:`bnrewrite.kernels`) apply a ReLU, or a residual add then a ReLU, inside
the normalise kernel and recompute the mask in the backward, so

    relu(y)            y = BN(x)
    relu(y + z)        (the tail of a residual block)

cost no pass of their own, where a separate ReLU costs 2 passes forward and 3 backward (more than
sampling saves). This pass finds those patterns after a BN has been lowered to the kernels, in two
graph forms:

* a ``call_function`` of ``bnrewrite::fused_sampled_batch_norm`` (what the FX pass emits with
  ``lowering="kernels"``, e.g. in Dynamo graphs under ``torch.compile(backend="bnrewrite")``):
  the op gets ``relu=True`` (and ``residual=z``);
* a ``call_module`` of a fused BN module (:func:`bnrewrite.kernels.convert_fused_`, traced with BN
  layers as leaves by :func:`bnrewrite.kernels.fuse_relu`): the call goes to a twin module with
  ``fuse_relu=True`` that shares the parameters and buffers, with ``z`` as second argument.

Matched, where every intermediate value has a single user: the BN output feeds a ReLU
(``F.relu`` with or without ``inplace=True``, ``torch.relu(_)``, ``aten.relu(_)``, ``.relu()``,
``.relu_()``, ``nn.ReLU``), or an add (``+``, ``torch.add``, ``aten.add.Tensor`` with
``alpha=1``, ``.add``, and the in-place ``+=``, ``.add_`` only when they write into the BN output,
never into ``z``) whose result feeds such a ReLU. The fused call is placed where the ReLU was, since
``z`` (a downsample branch) is often computed after the BN. The value is unchanged: the fused op
computes exactly ``relu(BN(x) [+ z])`` (and falls back to that composition where the kernels do
not apply, e.g. a ``z`` of another shape or dtype).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnrewrite.ops import fused_sampled_batch_norm_op

__all__ = ["accepts_epilogue", "is_relu", "residual_operand", "fuse_epilogues"]

aten = torch.ops.aten

_RELU_FUNCTIONS: tuple[Any, ...] = (
    F.relu,
    torch.relu,
    torch.relu_,
    aten.relu.default,
    aten.relu_.default,
)
_ADD_FUNCTIONS: tuple[Any, ...] = (operator.add, torch.add, aten.add.Tensor)
_INPLACE_ADDS: tuple[Any, ...] = (operator.iadd, aten.add_.Tensor)
_OP_ARGS = 9  # input, weight, bias, running_mean, running_var, training, momentum, eps, config


def is_relu(gm: fx.GraphModule | None, node: fx.Node) -> bool:
    """``node`` is a plain ReLU of one tensor (in place or not)."""
    if node.op == "call_module" and gm is not None:
        try:
            return isinstance(gm.get_submodule(str(node.target)), nn.ReLU)
        except AttributeError:
            return False
    if node.op == "call_function":
        if node.target not in _RELU_FUNCTIONS or len(node.args) != 1:
            return False
        return set(node.kwargs) <= {"inplace"}
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs
    return False


def residual_operand(node: fx.Node, bn_node: fx.Node) -> fx.Node | None:
    """``z`` if ``node`` computes ``bn_node + z`` (or ``z + bn_node``) with ``z`` a tensor node.

    In-place adds qualify only when they write into ``bn_node`` (``bn_node += z``): writing into
    ``z`` would be a side effect the fused call cannot reproduce.
    """
    args, kwargs = node.args, dict(node.kwargs)
    if kwargs.pop("alpha", 1) != 1 or kwargs or len(args) != 2:
        return None
    a, b = args
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        inplace = False
    elif node.op == "call_method" and node.target == "add":
        inplace = False
    elif (node.op == "call_function" and node.target in _INPLACE_ADDS) or (
        node.op == "call_method" and node.target == "add_"
    ):
        inplace = True
    else:
        return None
    if a is bn_node and isinstance(b, fx.Node) and b is not bn_node:
        return b
    if not inplace and b is bn_node and isinstance(a, fx.Node) and a is not bn_node:
        return a
    return None


def _is_tensor_node(node: fx.Node) -> bool:
    """False only when the meta says the value is not a tensor (e.g. a Python number)."""
    for key in ("example_value", "val"):
        if key in node.meta:
            return isinstance(node.meta[key], torch.Tensor)
    return True


def _match(gm: fx.GraphModule | None, node: fx.Node) -> tuple[fx.Node, fx.Node | None, Any]:
    """``(relu, add, z)`` of the epilogue after ``node``, or raises ``LookupError``."""
    if len(node.users) != 1:
        raise LookupError
    (user,) = node.users
    if is_relu(gm, user):
        return user, None, None
    z = residual_operand(user, node)
    if z is None or not _is_tensor_node(z) or len(user.users) != 1:
        raise LookupError
    (relu,) = user.users
    if not is_relu(gm, relu):
        raise LookupError
    return relu, user, z


def accepts_epilogue(module: nn.Module) -> bool:
    """The module protocol of a fused BN: a BatchNorm whose class declares ``fuse_relu: bool``
    and whose ``forward(input, residual=None)`` applies ``relu(BN(input) [+ residual])`` when the
    instance's ``fuse_relu`` is set (``bnrewrite.kernels.FusedSampledBatchNormNd``). Checked by
    attribute, so this pass needs nothing from the layer that implements it."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(
        getattr(type(module), "fuse_relu", None), bool
    )


def _fused_module(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if accepts_epilogue(mod) and not mod.fuse_relu else None


def fuse_epilogues(graph_or_module: fx.Graph | fx.GraphModule) -> list[tuple[str, str]]:
    """Fuse every matched epilogue in place; returns ``[(bn name, kind)]``.

    ``kind`` is ``"relu"`` or ``"residual+relu"``. The name is the module path for module calls
    and the node name for op calls. Recompiles the owning module when something changed.
    """
    if isinstance(graph_or_module, fx.GraphModule):
        gm: fx.GraphModule | None = graph_or_module
        graph = graph_or_module.graph
    else:
        graph, gm = graph_or_module, graph_or_module.owning_module
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    fused: list[tuple[str, str]] = []
    for node in list(graph.nodes):
        is_op = node.op == "call_function" and node.target == fused_sampled_batch_norm_op
        module = None if is_op or gm is None else _fused_module(gm, node)
        if is_op:
            if len(node.args) > _OP_ARGS or node.kwargs:  # already has an epilogue
                continue
        elif module is None or calls[str(node.target)] != 1:
            continue
        try:
            relu, add, z = _match(gm, node)
        except LookupError:
            continue
        with graph.inserting_before(relu):
            if is_op:
                extra = (True,) if z is None else (True, z)  # relu, residual
                new = graph.call_function(fused_sampled_batch_norm_op, (*node.args, *extra))
                name = str(node.name)
            else:
                assert gm is not None
                twin = copy.copy(module)  # shares _parameters / _buffers with the original
                twin.fuse_relu = True
                parent, _, attr = str(node.target).rpartition(".")
                gm.get_submodule(parent).register_module(attr, twin)
                args = (node.args[0],) if z is None else (node.args[0], z)
                new = graph.call_module(str(node.target), args)
                name = str(node.target)
        new.meta.update(node.meta)
        for key in ("val", "example_value", "tensor_meta"):  # the value is the ReLU's
            if key in relu.meta:
                new.meta[key] = relu.meta[key]
        relu.replace_all_uses_with(new)
        graph.erase_node(relu)
        if add is not None:
            graph.erase_node(add)
        graph.erase_node(node)
        fused.append((name, "relu" if z is None else "residual+relu"))
    if fused:
        graph.lint()
        if gm is not None:
            gm.recompile()
    return fused
