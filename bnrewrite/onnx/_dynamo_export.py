"""Training-mode BatchNorm through torch's ``torch.export``-based ONNX exporter (``dynamo=True``).

torch's exporter lowers ``aten._native_batch_norm_legit_functional`` (what a training BN becomes
after ``run_decompositions``) to an *inference* ``BatchNormalization``, and a BN without running
statistics to ``ReduceMean`` statistics fed into an inference BN: neither is a training BN, so the
ONNX rule would find nothing to sample. :data:`TRANSLATIONS` is a ``custom_translation_table`` that
keeps the ONNX training form instead, the same form the TorchScript exporter emits:

1. ``_native_batch_norm_legit_functional(x, w, b, rm, rv, training, m, eps)`` ->
   ``BatchNormalization(x, w, b, rm, rv, epsilon=eps, momentum=1 - m, training_mode=1)`` with its
   three outputs (y, new running mean, new running variance). ONNX's ``momentum`` weighs the old
   value, torch's the new one, hence ``1 - m``.
2. ``_native_batch_norm_legit.no_stats(x, w, b, training, m, eps)`` (``track_running_stats=False``)
   -> the same node whose running inputs are the batch mean and biased variance (``ReduceMean``),
   as the TorchScript exporter does; the rewrite drops them once nothing reads them.

The saved statistics (outputs 1 and 2 of the aten op) are read only by a backward graph, which an
ONNX export never holds. ``affine=False`` gets constant ones and zeros for ``w`` and ``b``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["translations"]


def translations() -> dict[Any, Any]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    import torch
    from onnxscript import opset18 as op

    def _affine(x: Any, weight: Any, bias: Any) -> tuple[Any, Any]:
        if weight is None or bias is None:
            channels = op.Shape(x, start=1, end=2)
            if weight is None:
                weight = op.Expand(op.CastLike(1.0, x), channels)
            if bias is None:
                bias = op.Expand(op.CastLike(0.0, x), channels)
        return weight, bias

    def training_batch_norm(
        input: Any,  # noqa: A002
        weight: Any,
        bias: Any,
        running_mean: Any,
        running_var: Any,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[Any, Any, Any, Any, Any]:
        weight, bias = _affine(input, weight, bias)
        if not training:
            y = op.BatchNormalization(
                input, weight, bias, running_mean, running_var, epsilon=eps, training_mode=0
            )
            return y, op.Identity(running_mean), op.Identity(running_var), running_mean, running_var
        y, new_mean, new_var = op.BatchNormalization(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            epsilon=eps,
            momentum=1.0 - momentum,
            training_mode=1,
        )
        return y, op.Identity(running_mean), op.Identity(running_var), new_mean, new_var

    def training_batch_norm_no_stats(
        input: Any,  # noqa: A002
        weight: Any,
        bias: Any,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[Any, Any, Any]:
        weight, bias = _affine(input, weight, bias)
        rank = op.Size(op.Shape(input))
        axes = op.Concat(op.Constant(value_ints=[0]), op.Range(2, rank, 1), axis=0)
        mean = op.ReduceMean(input, axes, keepdims=0)
        centred = op.Sub(input, op.ReduceMean(input, axes, keepdims=1))
        var = op.ReduceMean(op.Mul(centred, centred), axes, keepdims=0)
        y, _, _ = op.BatchNormalization(
            input, weight, bias, mean, var, epsilon=eps, momentum=1.0 - momentum, training_mode=1
        )
        return y, op.Identity(mean), op.Identity(var)

    aten = torch.ops.aten
    return {
        aten._native_batch_norm_legit_functional.default: training_batch_norm,
        aten._native_batch_norm_legit.no_stats: training_batch_norm_no_stats,
    }
