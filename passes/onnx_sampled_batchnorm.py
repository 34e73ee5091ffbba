"""ONNX rule: training-mode ``BatchNormalization`` -> sampled-estimation subgraph of standard ops.

A lowering of :func:`bnrewrite.estimators.sampled_batch_norm`; the sample set comes from
:func:`bnrewrite.plan.sample_plan` (sizes, steps, groups), nothing is re-derived here. For
``X`` of static shape ``(N, C, *S)``, the plan's sampled axes, ``N' = plan.real_rows``,
``V = plan.virtual_rows`` (``N = N' + V``), ``n = plan.count()`` and the node's ``epsilon`` and
``momentum`` (ONNX's convention: the weight of the *old* running value):

    parts    = [sample of X[:N']]   if plan.include_real   (Slice / Gather / GatherElements, below)
             + [X[N':N'+V]]         if V > 0               (Slice: every element of the virtual rows)
    mu       = sum_p ReduceSum(p, axes=[0, 2, ...]) / n    (keepdims; float32 for float16/bfloat16 X)
    var      = sum_p ReduceSum((p - mu)^2, same axes) / n  (biased, two-pass, over the sample set)
    Y        = (X - mu) * (Reciprocal(Sqrt(var + eps)) * scale) + B     (the *whole* tensor)
    rm_out   = input_mean * momentum + mu  * (1 - momentum)
    rv_out   = input_var  * momentum + var * (1 - momentum)

the parts of :func:`bnrewrite.estimators.sample_parts` and the sums of ``sample_statistics``. Every
method but ``vdn``/``fs_vdn`` has ``V = 0``: one part, the sample of ``X`` (no Slice of rows).
``vdn``/``fs_vdn`` (``V = config.vdn_samples``) are accepted only with ``allow_virtual_rows=True``,
which :mod:`bnrewrite.passes.onnx_vdn` passes after it has appended the virtual rows at the graph's
inputs: the rule alone would treat the last ``V`` real rows as virtual. ``vdn`` has no real part
(``plan.include_real`` is False); ``fs_vdn`` samples the real rows as ``fs`` does, fixed or random.

Running statistics keep the semantics of the original node: ONNX's training ``BatchNormalization``
(opset 14+, and the opset 9-13 five-output form) updates ``running_var`` with the **biased**
variance, whereas PyTorch's ``BatchNorm`` uses ``var * n / (n - 1)``; a model exported from torch
therefore drifts from torch's buffers by that factor, as the unrewritten ONNX model does. The
opset 9-13 outputs ``saved_mean`` and ``saved_var`` are ``mu`` and ``1 / sqrt(var + eps)``: the
spec calls the latter "saved variance" without a formula; onnxruntime (and torch's
``native_batch_norm``) return the inverse standard deviation there, and we keep that.

Sample of the real rows ``A = X[:N']`` (the estimator's ``gather_sample``):

1. ``full``: ``A`` itself.
2. ``fixed`` sampling: ``Slice`` each sampled axis to ``[0, count)``: the first ``k`` rows
   (``ns``/``bs``) or the top-left patch (``fs``).
3. ``random`` sampling: ``U = RandomUniform(shape=[R, G, A], dtype=double, seed)``, offsets
   ``o = int64(min(floor(U * size), size - 1))``, and along each sampled axis indices
   ``idx = (o + step * j) mod size`` of shape ``(R, G, count)``. With one group and one offset row
   this is a ``Gather``; otherwise ``idx`` is taken per channel (``Gather`` over the group of
   channel ``c``, ``c * G // C``), reshaped to broadcast over the other axes, expanded and fed to
   ``GatherElements`` -- the same index tensor torch's ``gather`` uses. ``R`` is
   ``plan.offset_rows`` (every row draws its own spatial phase for ``fs``).

``seed`` becomes the ``seed`` attribute of the ``RandomUniform`` of the ``i``-th rewritten node,
``(seed + 7919 * i) mod 2**24`` (exact in float32, distinct per layer). onnxruntime seeds each
random kernel once per session: a seeded model gives the same sequence of samples in every new
session, and new samples at every run within one. Without ``seed`` the node has no seed attribute
and onnxruntime starts every such kernel from its process-wide seed (``onnxruntime.set_seed``;
the same value in every process unless set), so all unseeded layers would draw the same ``U``:
the ``i``-th rewritten node rotates its draw, ``U <- frac(U + frac(i * 0.618...))`` -- still
uniform on ``[0, 1)``, different positions per layer.

Cases (``check`` declines, with a reason, everything else):

1. opset >= 14, ``training_mode=1``, 1 to 3 outputs.
2. opset 9-13 with more than one output (the training form), 2 to 5 outputs.
3. Declined: inference BN (``training_mode=0`` / single output at opset 9-13), opset < 9 forms,
   input shape or dtype unknown or not static, sample sets of one element per channel, random
   sampling at opset < 11 (no ``GatherElements``), fewer than ``V`` rows (virtual rows).
4. ``ValueError`` when the rule is built: ``vdn``/``fs_vdn`` without ``allow_virtual_rows``.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from ..config import SamplingConfig, select_config
from ..plan import SamplePlan, channel_group_of, sample_plan

__all__ = [
    "ONNX_UNSUPPORTED_METHODS",
    "RewriteReport",
    "SampledBatchNormRule",
    "layer_names",
    "sampled_batchnorm_rules",
]

logger = logging.getLogger(__name__)

#: Methods the per-node rule applies only when asked by the whole-graph pass
#: (:mod:`bnrewrite.passes.onnx_vdn`, ``allow_virtual_rows=True``): VDN needs virtual rows carried
#: through the whole network.
ONNX_UNSUPPORTED_METHODS = ("vdn", "fs_vdn")

_GOLDEN = 0.6180339887498949  # rotation of the i-th unseeded layer's uniforms: frac(i * phi)
_ACCUMULATE = {
    ir.DataType.FLOAT16: ir.DataType.FLOAT,
    ir.DataType.BFLOAT16: ir.DataType.FLOAT,
    ir.DataType.FLOAT: ir.DataType.FLOAT,
    ir.DataType.DOUBLE: ir.DataType.DOUBLE,
}


@dataclasses.dataclass
class RewriteReport:
    """What one rewrite did: the rewritten nodes and the skipped ones with their reasons."""

    rewritten: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (name, values before, values after) for each node whose sample the floor raised
    raised: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"rewrote {len(self.rewritten)} BatchNormalization node(s), skipped {len(self.skipped)}"
        )
        if self.raised:
            text += "; the floor raised " + ", ".join(
                f"{name} from {a} to {b} values" for name, a, b in self.raised
            )
        if self.skipped:
            text += " (" + "; ".join(f"{name}: {why}" for name, why in self.skipped) + ")"
        return text


def _opset(context: Any) -> int:
    model = context.model
    version = model.opset_imports.get("")
    if version is None:
        version = model.opset_imports.get("ai.onnx", 1)
    return int(version)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(op: Any, array: Any, dtype: Any) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(array, dtype=dtype)))


def _slice(op: Any, x: ir.Value, axis: int, start: int, end: int, opset: int) -> ir.Value:
    if opset >= 10:
        return op.Slice(
            x,
            _const(op, [start], np.int64),
            _const(op, [end], np.int64),
            _const(op, [axis], np.int64),
        )
    return op.Slice(x, starts=[start], ends=[end], axes=[axis])


def _reduce_sum(op: Any, x: ir.Value, axes: Sequence[int], opset: int) -> ir.Value:
    if opset >= 13:
        return op.ReduceSum(x, _const(op, list(axes), np.int64), keepdims=1)
    return op.ReduceSum(x, axes=list(axes), keepdims=1)


def _total(op: Any, terms: Sequence[ir.Value]) -> ir.Value:
    total = terms[0]
    for term in terms[1:]:
        total = op.Add(total, term)
    return total


def _reshape(op: Any, x: ir.Value, shape: Sequence[int]) -> ir.Value:
    return op.Reshape(x, _const(op, list(shape), np.int64))


def _random_sample(
    op: Any, x: ir.Value, plan: SamplePlan, seed: float | None, index: int, opset: int
) -> ir.Value:
    """Mirror of ``estimators.draw_offsets`` + ``gather_sample`` with in-graph random offsets.

    ``x`` holds the real rows only (``plan.real_rows`` of them)."""
    rows, groups, n_axes = int(plan.offset_rows), int(plan.groups), len(plan.axes)
    channels = int(plan.shape[1])
    attrs: dict[str, Any] = {"dtype": int(ir.DataType.DOUBLE), "shape": [rows, groups, n_axes]}
    if seed is not None:
        attrs["seed"] = seed
    u = op.RandomUniform(**attrs)
    if seed is None and index:  # unseeded kernels share a state: rotate, u <- frac(u + c_i)
        u = op.Add(u, _const(op, (index * _GOLDEN) % 1.0, np.float64))
        u = op.Sub(u, op.Floor(u))
    sizes = [int(ax.size) for ax in plan.axes]
    off = op.Floor(op.Mul(u, _const(op, sizes, np.float64)))
    off = op.Min(off, _const(op, [s - 1 for s in sizes], np.float64))  # (Min on int64: opset 12+)
    off = op.Cast(off, to=int(ir.DataType.INT64))  # (R, G, A)
    shape = list(int(d) for d in plan.shape)
    shape[0] = int(plan.real_rows)
    sample = x
    for i, ax in enumerate(plan.axes):
        count, size, step = int(ax.count), int(ax.size), int(ax.step)
        col = _slice(op, off, 2, i, i + 1, opset)  # (R, G, 1)
        idx = op.Add(col, _const(op, [step * j for j in range(count)], np.int64))
        size_c = _const(op, size, np.int64)
        idx = op.Sub(idx, op.Mul(op.Div(idx, size_c), size_c))  # mod size, idx >= 0
        if groups == 1 and rows == 1:
            sample = op.Gather(sample, _reshape(op, idx, [count]), axis=ax.axis)
            shape[ax.axis] = count
            continue
        width = 1
        if groups > 1:
            group_of = [channel_group_of(c, channels, groups) for c in range(channels)]
            idx = op.Gather(idx, _const(op, group_of, np.int64), axis=1)  # (R, C, count)
            width = channels
        if ax.axis == 0:  # rows: (1, C', k) -> (k, C', 1, ...)
            idx = op.Transpose(_reshape(op, idx, [width, count]), perm=[1, 0])
            idx_shape = [count, width] + [1] * (len(shape) - 2)
        else:
            idx_shape = [rows, width] + [1] * (len(shape) - 2)
            idx_shape[ax.axis] = count
        shape[ax.axis] = count
        idx = op.Expand(_reshape(op, idx, idx_shape), _const(op, shape, np.int64))
        sample = op.GatherElements(sample, idx, axis=ax.axis)
    return sample


class _NamedOps:
    """Wraps the rewriter's ``op`` builder so that every new value gets a model-wide unique name.

    The rewriter's default names (``val_0``, ...) are unique per graph only; onnxruntime wants one
    name space across a graph and its subgraphs (a BN rewritten inside an ``If`` branch and one in
    the main graph would both make ``val_0``).
    """

    def __init__(self, op: Any, prefix: str) -> None:
        self._op, self._prefix, self._count = op, prefix, 0

    def __getattr__(self, op_type: str) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            self._count += 1
            kwargs.setdefault("_outputs", [f"{self._prefix}/{op_type}_{self._count}"])
            return getattr(self._op, op_type)(*args, **kwargs)

        return make


class SampledBatchNormRule(RewriteRuleClassBase):
    """Training ``BatchNormalization`` with ``num_outputs`` outputs -> sampled statistics."""

    def __init__(
        self,
        config: SamplingConfig,
        num_outputs: int,
        report: RewriteReport,
        allow_virtual_rows: bool = False,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name=f"SampledBatchNorm{num_outputs}", remove_nodes=True)
        _check_method(config, allow_virtual_rows)
        self.config = config
        self.overrides = overrides
        self._chosen = config  # the config of the node ``check`` accepted last
        self.num_outputs = num_outputs
        self.report = report
        self._opset = 0  # set by ``check``, which runs right before ``rewrite``

    def pattern(self, op: Any, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
        return op.BatchNormalization(
            x, scale, bias, mean, var, _outputs=[f"out{i}" for i in range(self.num_outputs)]
        )

    def _decline(self, node: ir.Node, reason: str) -> MatchResult:
        self.report.skipped.append((node.name or "<unnamed>", reason))
        logger.info("skip BatchNormalization %s: %s", node.name, reason)
        return MatchResult().fail(reason, node)

    def check(self, context: Any, x: ir.Value, **_: Any) -> MatchResult:
        node = context.root
        if len(node.outputs) != self.num_outputs:
            return MatchResult().fail("another rule handles this output count")
        opset = _opset(context)
        if opset < 9:
            return self._decline(node, f"opset {opset} < 9 (is_test/spatial forms) not supported")
        if opset >= 14:
            if not _attr(node, "training_mode", 0):
                return self._decline(node, "inference mode (training_mode=0)")
        elif len(node.outputs) < 2:
            return self._decline(node, "inference mode (single output)")
        if x.dtype not in _ACCUMULATE:
            return self._decline(node, f"input dtype {x.dtype} unknown or not floating point")
        if x.shape is None or not x.shape.is_static():
            return self._decline(
                node,
                f"input shape {x.shape} is unknown or not static; export with fixed input shapes",
            )
        shape = tuple(int(d) for d in x.shape)
        if len(shape) < 2:
            return self._decline(node, f"input shape {shape} has fewer than 2 dims")
        chosen = select_config(layer_names(node), self.config, None, None, self.overrides)
        if chosen is None:
            return self._decline(node, "kept as BatchNormalization (overrides: None)")
        self._chosen = chosen
        try:
            plan = sample_plan(shape, chosen)
        except ValueError as exc:  # vdn/fs_vdn: fewer rows than virtual rows
            return self._decline(node, str(exc))
        if plan.count() <= 1:
            return self._decline(
                node, f"sample set has {plan.count()} element per channel; use a larger ratio"
            )
        if plan.random and opset < 11:
            return self._decline(
                node, f"random sampling needs GatherElements (opset >= 11), model has {opset}"
            )
        self._opset = opset
        return MatchResult()

    def rewrite(
        self,
        op: Any,
        x: ir.Value,
        scale: ir.Value,
        bias: ir.Value,
        mean: ir.Value,
        var: ir.Value,
        **outs: ir.Value,
    ) -> Any:
        node = outs["out0"].producer()
        opset = self._opset
        shape = tuple(int(d) for d in x.shape)
        config = self._chosen
        plan = sample_plan(shape, config)
        eps = float(_attr(node, "epsilon", 1e-5))
        momentum = float(_attr(node, "momentum", 0.9))
        acc = _ACCUMULATE[x.dtype]
        np_acc = np.float64 if acc == ir.DataType.DOUBLE else np.float32
        rank, channels = len(shape), shape[1]
        axes = [0, *range(2, rank)]
        bshape = [1, channels] + [1] * (rank - 2)

        index = len(self.report.rewritten)  # shared by the rules of one rewrite
        self.report.rewritten.append(node.name or "<unnamed>")
        if plan.raised:
            self.report.raised.append(
                (node.name or "<unnamed>", plan.unfloored_count, plan.count())
            )
        logger.info("rewrite BatchNormalization %s (plan %s)", node.name, plan)

        op = _NamedOps(op, f"{node.name or 'BatchNormalization'}/bnrewrite{index}")
        xa = x if acc == x.dtype else op.Cast(x, to=int(acc))
        parts = []  # estimators.sample_parts: real-row sample, then the virtual rows
        if plan.include_real:
            real = xa
            if plan.virtual_rows:
                real = _slice(op, xa, 0, 0, int(plan.real_rows), opset)
            if plan.random:
                seed = None
                if config.seed is not None:
                    seed = float((config.seed + 7919 * index) % (1 << 24))
                real = _random_sample(op, real, plan, seed, index, opset)
            else:
                for ax in plan.axes:
                    real = _slice(op, real, ax.axis, 0, int(ax.count), opset)
            parts.append(real)
        if plan.virtual_rows:
            end = int(plan.real_rows) + int(plan.virtual_rows)
            parts.append(_slice(op, xa, 0, int(plan.real_rows), end, opset))
        count = _const(op, float(plan.count()), np_acc)
        # estimators.sample_statistics: sums over the parts / n; two-pass biased variance
        mu = op.Div(_total(op, [_reduce_sum(op, p, axes, opset) for p in parts]), count)
        squares = []
        for p in parts:
            centered = op.Sub(p, mu)
            squares.append(_reduce_sum(op, op.Mul(centered, centered), axes, opset))
        var_hat = op.Div(_total(op, squares), count)

        inv_std = op.Reciprocal(op.Sqrt(op.Add(var_hat, _const(op, eps, np_acc))))
        factor = op.Mul(inv_std, _reshape(op, self._cast(op, scale, acc), bshape))
        y = op.Mul(op.Sub(xa, mu), factor)
        y = op.Add(y, _reshape(op, self._cast(op, bias, acc), bshape))
        results = [y if acc == x.dtype else op.Cast(y, to=int(x.dtype))]

        if self.num_outputs == 1:
            return results[0]
        mu_c = _reshape(op, mu, [channels])
        keep, new = _const(op, momentum, np_acc), _const(op, 1.0 - momentum, np_acc)
        for old, stat in ((mean, mu), (var, var_hat))[: self.num_outputs - 1]:
            stat_c = mu_c if stat is mu else _reshape(op, stat, [channels])
            updated = op.Add(op.Mul(self._cast(op, old, acc), keep), op.Mul(stat_c, new))
            results.append(self._cast(op, updated, old.dtype))
        if self.num_outputs > 3:  # opset 9-13: saved_mean, saved_var (= inverse std, as ORT)
            results.append(self._cast(op, mu_c, x.dtype))
        if self.num_outputs > 4:
            results.append(self._cast(op, _reshape(op, inv_std, [channels]), x.dtype))
        return tuple(results)

    @staticmethod
    def _cast(op: Any, value: ir.Value, dtype: Any) -> ir.Value:
        if dtype is None or value.dtype == dtype:
            return value
        return op.Cast(value, to=int(dtype))


def _check_method(config: SamplingConfig, allow_virtual_rows: bool) -> None:
    if config.method in ONNX_UNSUPPORTED_METHODS and not allow_virtual_rows:
        raise ValueError(
            f"method {config.method!r} needs virtual rows carried through the whole graph: use "
            f"bnrewrite.onnx.rewrite (bnrewrite.passes.onnx_vdn.rewrite_vdn_onnx), not the "
            f"per-node rule"
        )


def sampled_batchnorm_rules(
    config: SamplingConfig,
    report: RewriteReport,
    *,
    allow_virtual_rows: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> RewriteRuleSet:
    """The rule set: one rule per output count (5 down to 1), sharing ``report`` and seeds.

    ``allow_virtual_rows`` (for :mod:`bnrewrite.passes.onnx_vdn` only): accept ``vdn``/``fs_vdn``,
    whose BN inputs already carry the virtual rows as their last ``vdn_samples`` rows.
    ``overrides``: ``{name or pattern: config or None}`` matched against each node's name and its
    module path (:func:`layer_names`), as :func:`bnrewrite.rewrite` matches module paths.
    """
    _check_method(config, allow_virtual_rows)
    checked = {}
    for name, value in (overrides or {}).items():
        checked[name] = None if value is None else SamplingConfig.coerce(value)
        if checked[name] is not None:
            _check_method(checked[name], allow_virtual_rows)
    rules = [
        SampledBatchNormRule.rule(config, k, report, allow_virtual_rows, checked or None)
        for k in (5, 4, 3, 2, 1)
    ]
    return RewriteRuleSet(rules)


def layer_names(node: ir.Node) -> list[str]:
    """The names a BN node answers to: its node name and, where the exporter recorded it, the
    module path of the ``nn.BatchNorm`` it came from (``"layer1.0.bn1"``), read from the
    ``pkg.torch.onnx.name_scopes`` metadata (torch.export route) or from a TorchScript-style name
    ``/layer1/layer1.0/bn1/BatchNormalization``."""
    names = [node.name or ""]
    scopes: list[str] = []
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if raw:
        try:
            parsed = ast.literal_eval(raw)
            scopes = [str(p) for p in parsed[:-1] if p]  # the last one is the op
        except (ValueError, SyntaxError):
            scopes = []
    elif node.name and node.name.startswith("/"):
        scopes = [p for p in node.name.split("/")[1:-1] if p]
    # A scope either extends the one before it ("layers" -> "layers.0", "shortcut" ->
    # "shortcut.1": replace it) or is a child of it ("layers.0" -> "bn1": append).
    segments: list[str] = []
    for part in scopes:
        if segments and part.startswith(segments[-1] + "."):
            segments[-1] = part
        else:
            segments.append(part)
    if segments:
        names.append(".".join(segments))
    return names
