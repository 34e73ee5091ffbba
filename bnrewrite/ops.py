"""``torch.library`` custom ops: ``bnrewrite::sampled_batch_norm`` and its functional form.

The graph passes emit these ops instead of calling Python functions, so that rewritten graphs stay
made of hashable ``OpOverload`` targets (AOTAutograd's cache refuses graphs that call user Python
functions) and every lowering computes exactly :func:`bnrewrite.estimators.sampled_batch_norm`.

Both ops are registered as ``CompositeImplicitAutograd``: their implementation is the estimator
through :func:`bnrewrite.eager.sampled_batch_norm`, which picks its lowering for the context (the
eager lowering without a compiler; under AOTAutograd the compiled lowering of
:mod:`bnrewrite.compiled`, whose hand-written backward is traced as aten ops; the composite form
otherwise), so they decompose into aten ops under AOTAutograd / ``make_fx`` / fake tensors (no
separate meta kernel is needed, and Inductor sees ordinary reductions it can fuse) and their
gradient is the exact gradient of the sampled forward.

    sampled_batch_norm(input, weight, bias, running_mean!, running_var!, training, momentum, eps,
                       config) -> y
        The mutating form (like ``aten.batch_norm``, but with honest ``(a!)`` annotations):
        running statistics are updated in place with the sample count ``n``.
    sampled_batch_norm_functional(input, weight, bias, running_mean, running_var, training,
                                  momentum, eps, config) -> (y, new_running_mean, new_running_var)
        The functional form (like ``aten._native_batch_norm_legit_functional``): the inputs are not
        mutated, the updated statistics are returned.

    fused_sampled_batch_norm(input, weight, bias, running_mean!, running_var!, training, momentum,
                             eps, config, relu=False, residual=None) -> y
        The mutating form lowered to the fused GPU kernels (:mod:`bnrewrite.kernels`), emitted by
        the FX pass with ``lowering="kernels"``: ``relu`` gives ``relu(y)``, ``residual`` (with
        ``relu``) ``relu(y + residual)``. Its implementation is
        :func:`bnrewrite.kernels.fused_sampled_batch_norm`, which draws the sample exactly as the
        estimator does and runs the kernels for CUDA inputs (the estimator elsewhere), so its
        value is the estimator's; under AOTAutograd it decomposes into the offset draw and the
        opaque ``bnrewrite::fused_bn_forward`` op (with its registered backward).

``config`` is the canonical string of a :class:`bnrewrite.SamplingConfig`
(:func:`config_to_str`), a plain scalar argument that is part of the graph and of cache keys.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import Tensor

from .config import SamplingConfig
from .eager import sampled_batch_norm as _sampled_batch_norm  # eager: native kernels

__all__ = [
    "config_to_str",
    "config_from_str",
    "sampled_batch_norm_op",
    "sampled_batch_norm_functional_op",
    "fused_sampled_batch_norm_op",
    "is_sampled_batch_norm_op",
]

_NAMESPACE = "bnrewrite"


def config_to_str(config: SamplingConfig) -> str:
    """Canonical string of a config: JSON with sorted keys (equal configs give equal strings)."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def config_from_str(text: str) -> SamplingConfig:
    """Inverse of :func:`config_to_str`."""
    return SamplingConfig.from_dict(json.loads(text))


def _estimator_args(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    config: str,
) -> tuple[tuple[Any, ...], SamplingConfig]:
    """The ops' arguments (aten's order) as the estimator's (``F.batch_norm``'s order) + config."""
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    return args, config_from_str(config)


def _sampled_batch_norm_impl(*op_args: Any) -> Tensor:
    args, cfg = _estimator_args(*op_args)
    return _sampled_batch_norm(*args, config=cfg)


def _sampled_batch_norm_functional_impl(*op_args: Any) -> tuple[Tensor, Tensor, Tensor]:
    (x, running_mean, running_var, *rest), cfg = _estimator_args(*op_args)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    return _sampled_batch_norm(x, new_mean, new_var, *rest, config=cfg), new_mean, new_var


def _fused_sampled_batch_norm_impl(
    *op_args: Any, relu: bool = False, residual: Tensor | None = None
) -> Tensor:
    from .kernels.ops import fused_sampled_batch_norm  # the kernels load Triton lazily

    if len(op_args) > 9:  # the dispatcher passes relu, residual positionally
        relu, residual = op_args[9], op_args[10] if len(op_args) > 10 else residual
    args, cfg = _estimator_args(*op_args[:9])
    return fused_sampled_batch_norm(*args, config=cfg, relu=relu, residual=residual)


def _register() -> Any:
    """Define the ops once per process (re-importing the module must not redefine them)."""
    if hasattr(torch.ops, _NAMESPACE) and hasattr(
        getattr(torch.ops, _NAMESPACE), "sampled_batch_norm"
    ):
        return None
    lib = torch.library.Library(_NAMESPACE, "DEF")
    lib.define(
        "sampled_batch_norm(Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
        "float eps, str config) -> Tensor"
    )
    lib.define(
        "sampled_batch_norm_functional(Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor running_mean, Tensor running_var, bool training, float momentum, float eps, "
        "str config) -> (Tensor, Tensor, Tensor)"
    )
    lib.define(
        "fused_sampled_batch_norm(Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
        "float eps, str config, bool relu=False, Tensor? residual=None) -> Tensor"
    )
    lib.impl("sampled_batch_norm", _sampled_batch_norm_impl, "CompositeImplicitAutograd")
    lib.impl(
        "fused_sampled_batch_norm", _fused_sampled_batch_norm_impl, "CompositeImplicitAutograd"
    )
    lib.impl(
        "sampled_batch_norm_functional",
        _sampled_batch_norm_functional_impl,
        "CompositeImplicitAutograd",
    )
    return lib


_LIB = _register()

sampled_batch_norm_op = torch.ops.bnrewrite.sampled_batch_norm.default
sampled_batch_norm_functional_op = torch.ops.bnrewrite.sampled_batch_norm_functional.default
fused_sampled_batch_norm_op = torch.ops.bnrewrite.fused_sampled_batch_norm.default


def is_sampled_batch_norm_op(target: Any) -> bool:
    """True for the targets this module registers (a node the pass already emitted)."""
    return target in (
        sampled_batch_norm_op,
        sampled_batch_norm_functional_op,
        fused_sampled_batch_norm_op,
        torch.ops.bnrewrite.sampled_batch_norm,
        torch.ops.bnrewrite.sampled_batch_norm_functional,
        torch.ops.bnrewrite.fused_sampled_batch_norm,
    )
