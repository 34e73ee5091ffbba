"""VDN / FS+VDN on ONNX graphs: virtual rows at the inputs, sliced off the outputs.

The ONNX counterpart of :mod:`bnrewrite.passes.vdn`. For a model with static batch size ``N``:

1. **Batch-independence analysis** over the main graph: a value is batch-carrying (dim 0 is the
   batch) if it is a batch input (a graph input that is not an initializer) or an output of a node
   with a batch-carrying input; every such node must match a rule (Conv, pointwise ops with
   broadcasting that does not reach dim 0, pooling, Flatten(axis >= 1), Gemm/MatMul with the
   weight on the right, Concat/Split/Slice/Softmax/reductions over axes != 0, Transpose keeping
   axis 0 first, Reshape whose batch entry is 0, -1 with a proven dim 0, or the literal ``N``,
   BatchNormalization). Anything else raises :class:`bnrewrite.passes.vdn.BatchMixingError` naming
   the node; the model is not modified.
2. **Virtual rows**: each batch input ``x`` becomes ``Concat([x, R], axis=0)``. ``fixed``: ``R`` is
   an initializer holding the same rows as the torch pass (``torch.randn`` from
   ``torch.Generator().manual_seed((seed or 0) + i)`` in float64, cast). ``random``:
   ``RandomNormal(shape=[V, *x.shape[1:]])``, fresh at every run (``seed`` attribute when the
   config has a seed: onnxruntime then repeats one sequence per session).
3. **Batch sizes**: literal ``N`` entries of ``Reshape`` shapes become ``N + V``.
4. **Outputs**: every batch-carrying graph output ``y`` is ``Slice(y_full, [0], [N], [0])`` under
   its original name.
5. **BatchNormalization** (training) with ``X`` of shape ``(N + V, C, *S)``: ONNX shape inference
   on the edited graph gives every BN input its static shape, and the ONNX rule
   (:mod:`bnrewrite.passes.onnx_sampled_batchnorm`, ``allow_virtual_rows=True``) lowers it -- the
   one ONNX lowering of :func:`bnrewrite.sampled_batch_norm`, sizes from
   :func:`bnrewrite.plan.sample_plan`, running statistics in ONNX's convention:

       parts   = [sample of X[:N]]   (fs_vdn: the fs sample, fixed Slice or random Gather/
                                      GatherElements; vdn: none)
               + [X[N:N+V]]          (every element of the virtual rows)
       mu      = sum_p ReduceSum(p) / n          var = sum_p ReduceSum((p - mu)^2) / n
       Y       = (X - mu) * (1 / sqrt(var + eps)) * scale + B      (all rows)
       rm_out  = rm * momentum + mu * (1 - momentum);   rv_out = rv * momentum + var * (1 - momentum)

   Every batch-carrying training BN must be rewritten by the rule (else ``ValueError`` with the
   rule's reason); unnamed BNs get a name so that the rule's report can be checked.

Refused with a clear message: opset < 13, dynamic batch dims, control flow touching the batch,
``Shape`` of a batch value (dynamic reshapes: export with constant shapes or ``flatten(1)``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from bnrewrite.config import SamplingConfig
from bnrewrite.estimators import fixed_virtual_rows
from bnrewrite.plan import virtual_rows_for_batch, virtual_rows_for_floor

from .onnx_sampled_batchnorm import RewriteReport, sampled_batchnorm_rules
from .vdn import BatchMixingError

logger = logging.getLogger("bnrewrite")

__all__ = ["rewrite_vdn_onnx"]

_UNARY = set(
    """
    Relu LeakyRelu Sigmoid Tanh Elu Selu Celu Gelu HardSigmoid HardSwish Softplus Softsign Exp Log
    Sqrt Reciprocal Neg Abs Erf Identity Cast Floor Ceil Round Sign Mish ThresholdedRelu
    Shrink Not IsNaN IsInf Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Dropout
    """.split()
)
_BINARY = set(
    """
    Add Sub Mul Div Pow Max Min Mean Sum Where Equal Greater Less GreaterOrEqual LessOrEqual And Or
    Xor Mod PRelu Clip BitShift
    """.split()
)
_PER_SAMPLE = set(
    """
    MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool LRN
    InstanceNormalization GroupNormalization SpaceToDepth DepthToSpace Conv ConvTranspose
    """.split()
)
_REDUCE = set(
    """
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSumExp
    ReduceSumSquare ReduceLogSum
    """.split()
)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node in any of its attribute forms (``value``,
    ``value_int(s)``, ``value_float(s)``), else ``None``."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.int64)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.float32)
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Onnx:
    def __init__(self, model: onnx.ModelProto, config: SamplingConfig, batch_inputs: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.config = config
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, tuple[int, list[Any]]] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
                self.shapes[vi.name] = (t.elem_type, dims)
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in self.graph.initializer
        }
        for node in self.graph.node:
            value = _constant_value(node)
            if value is not None:
                self.consts[node.output[0]] = value
        inits = {i.name for i in self.graph.initializer}
        names = [i.name for i in self.graph.input if i.name not in inits]
        if batch_inputs is not None:
            unknown = set(batch_inputs) - set(names)
            if unknown:
                raise ValueError(f"batch_inputs {sorted(unknown)} are not graph inputs {names}")
            names = list(batch_inputs)
        self.batch_inputs = names
        sizes = set()
        for name in names:
            shape = self.shapes.get(name)
            if shape is None or not shape[1] or shape[1][0] is None:
                raise ValueError(
                    f"VDN refused for ONNX: input {name!r} has no static batch dim; export with a "
                    f"fixed batch size"
                )
            sizes.add(shape[1][0])
        if len(sizes) != 1:
            raise ValueError(f"VDN refused for ONNX: batch inputs disagree on dim 0 ({sizes})")
        self.n = sizes.pop()
        self.batch: set[str] = set(names)
        self.bn_nodes: list[onnx.NodeProto] = []
        self.reshape_edits: list[tuple[onnx.NodeProto, np.ndarray]] = []

    # -- helpers ---------------------------------------------------------------------------------
    def rank(self, name: str) -> int | None:
        if name in self.consts:
            return self.consts[name].ndim
        shape = self.shapes.get(name)
        return None if shape is None else len(shape[1])

    def dims(self, name: str) -> list[Any] | None:
        if name in self.consts:
            return list(self.consts[name].shape)
        shape = self.shapes.get(name)
        return None if shape is None else shape[1]

    def refuse(self, node: onnx.NodeProto, index: int, reason: str) -> None:
        name = node.name or f"{node.op_type}_{index}"
        raise BatchMixingError(name, f"ONNX {node.op_type}", reason)

    def norm_axis(self, node: onnx.NodeProto, index: int, axis: Any, rank: int | None) -> int:
        axis = int(axis)
        if axis >= 0:
            return axis
        if rank is None:
            self.refuse(node, index, f"uses the negative axis {axis} on a value of unknown rank")
        return axis + rank

    def axes_of(self, node: onnx.NodeProto, pos: int) -> list[int] | None:
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > pos and node.input[pos]:
            value = self.consts.get(node.input[pos])
            if value is None:
                return []  # non-constant axes: handled by the caller as a refusal
            axes = value.tolist()
        return None if axes is None else list(axes)

    # -- analysis ----------------------------------------------------------------------------------
    def analyze(self) -> list[str]:
        for index, node in enumerate(self.graph.node):
            ins = [i for i in node.input if i]
            if not any(i in self.batch for i in ins):
                continue
            if self.rule(node, index, ins):
                # BatchNormalization: only Y is batch-carrying (the others are statistics)
                outs = node.output[:1] if node.op_type == "BatchNormalization" else node.output
                self.batch.update(o for o in outs if o)
        return [o.name for o in self.graph.output if o.name in self.batch]

    def rule(self, node: onnx.NodeProto, index: int, ins: list[str]) -> bool:
        op = node.op_type
        x = node.input[0]
        if node.domain not in ("", "ai.onnx"):
            self.refuse(node, index, "is a custom-domain op the VDN analysis does not know")
        if op == "CastLike":  # input 1 only donates its dtype
            return x in self.batch
        if op in _UNARY:
            if x not in self.batch:
                self.refuse(node, index, "takes batch-carrying secondary inputs")
            return True
        if op in _BINARY:
            self.broadcast(node, index, ins)
            return True
        if op in _PER_SAMPLE:
            if x not in self.batch or any(i in self.batch for i in ins[1:]):
                self.refuse(node, index, "takes batch-carrying weights")
            return True
        if op == "BatchNormalization":
            if x not in self.batch or any(i in self.batch for i in ins[1:]):
                self.refuse(node, index, "takes batch-carrying statistics")
            training = _attr(node, "training_mode", 0) if self.opset >= 14 else len(node.output) > 1
            if training:
                self.bn_nodes.append(node)
                return True
            return True
        if op == "Flatten":
            if self.norm_axis(node, index, _attr(node, "axis", 1), self.rank(x)) == 0:
                self.refuse(node, index, "flattens the batch dim into the features")
            return True
        if op in ("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "LayerNormalization"):
            default = -1 if (self.opset >= 13 or op in ("LayerNormalization",)) else 1
            if op in ("ArgMax", "ArgMin"):
                default = 0
            axis = self.norm_axis(node, index, _attr(node, "axis", default), self.rank(x))
            if axis == 0:
                self.refuse(node, index, "normalises or reduces over the batch dim")
            if any(i in self.batch for i in ins[1:]):
                self.refuse(node, index, "takes batch-carrying weights")
            return True
        if op in _REDUCE:
            axes = self.axes_of(node, 1)
            if axes is None or axes == []:
                if _attr(node, "noop_with_empty_axes", 0) and axes is None:
                    return True
                self.refuse(node, index, "reduces over every axis (or non-constant axes)")
            rank = self.rank(x)
            if any(self.norm_axis(node, index, a, rank) == 0 for a in axes):
                self.refuse(node, index, "reduces over the batch dim (axis 0), which mixes samples")
            return True
        if op in ("Concat", "Split"):
            if op == "Concat" and not all(i in self.batch for i in ins):
                self.refuse(node, index, "concatenates batch and non-batch values")
            axis = self.norm_axis(node, index, _attr(node, "axis", 0), self.rank(x))
            if axis == 0:
                self.refuse(node, index, f"{op.lower()}s along the batch dim (axis 0)")
            if op == "Split" and any(i in self.batch for i in ins[1:]):
                self.refuse(node, index, "splits with batch-carrying sizes")
            return True
        if op == "Transpose":
            perm = _attr(node, "perm")
            if perm is None or perm[0] != 0:
                self.refuse(node, index, "moves the batch dim away from axis 0")
            return True
        if op in ("Unsqueeze", "Squeeze"):
            axes = self.axes_of(node, 1)
            if not axes:
                self.refuse(node, index, f"{op.lower()}s without constant axes")
            rank = self.rank(node.output[0] if op == "Unsqueeze" else x)
            if any(self.norm_axis(node, index, a, rank) == 0 for a in axes):
                self.refuse(node, index, f"{op.lower()}s at the batch dim")
            return True
        if op == "Slice":
            return self.slice(node, index, ins)
        if op == "Reshape":
            return self.reshape(node, index, ins)
        if op == "Gemm":
            if node.input[0] not in self.batch or _attr(node, "transA", 0):
                self.refuse(node, index, "multiplies across the batch (batch not the rows of A)")
            if any(i in self.batch for i in ins[1:]):
                self.refuse(node, index, "multiplies by a batch-carrying matrix")
            if len(node.input) > 2 and node.input[2]:
                c = self.dims(node.input[2])
                if c is None or (len(c) == 2 and c[0] != 1):
                    self.refuse(node, index, "adds a bias with rows tied to the batch size")
            return True
        if op == "MatMul":
            a, b = node.input[0], node.input[1]
            ra, rb = self.rank(a), self.rank(b)
            if a in self.batch and b not in self.batch and rb is not None and rb <= 2:
                return True
            if a in self.batch and b in self.batch and (ra or 0) >= 3 and (rb or 0) >= 3:
                return True
            self.refuse(node, index, "multiplies across the batch")
        if op == "Pad":
            pads = self.consts.get(node.input[1]) if len(node.input) > 1 else _attr(node, "pads")
            rank = self.rank(x)
            if pads is None or rank is None:
                self.refuse(node, index, "pads with non-constant pads")
            pads = list(np.asarray(pads).tolist())
            if len(node.input) > 3 and node.input[3]:
                self.refuse(node, index, "pads with explicit axes (not supported)")
            if pads[0] != 0 or pads[rank] != 0:
                self.refuse(node, index, "pads the batch dim")
            return True
        if op == "Shape":
            self.refuse(
                node,
                index,
                "reads the shape of a batch-carrying value (a dynamic reshape); export with "
                "constant shapes or flatten(1)",
            )
        self.refuse(node, index, "is an op the VDN analysis does not know")
        return False

    def broadcast(self, node: onnx.NodeProto, index: int, ins: list[str]) -> None:
        ranks = {self.rank(i) for i in ins if i in self.batch} - {None}
        if len(ranks) > 1:
            self.refuse(node, index, "combines batch values of different ranks")
        rank = next(iter(ranks)) if ranks else None
        for i in ins:
            if i in self.batch:
                continue
            dims = self.dims(i)
            if dims is None or rank is None:
                continue
            if len(dims) > rank or (len(dims) == rank and dims[0] != 1):
                self.refuse(node, index, f"broadcasts {i!r} of shape {dims} over the batch dim")

    def slice(self, node: onnx.NodeProto, index: int, ins: list[str]) -> bool:
        x = node.input[0]
        if any(i in self.batch for i in ins[1:]):
            self.refuse(node, index, "slices with batch-carrying bounds")
        vals = [
            self.consts.get(node.input[k]) if len(node.input) > k else None for k in (1, 2, 3, 4)
        ]
        starts, ends, axes, steps = vals
        if starts is None or ends is None:
            self.refuse(node, index, "slices with non-constant bounds")
        rank = self.rank(x)
        axes = list(range(len(starts))) if axes is None else axes.tolist()
        steps = [1] * len(axes) if steps is None else steps.tolist()
        for a, s, e, st in zip(axes, starts.tolist(), ends.tolist(), steps, strict=True):
            if self.norm_axis(node, index, a, rank) == 0:
                if not (s == 0 and st == 1 and e >= self.n):
                    self.refuse(node, index, "selects some rows of the batch")
        return True

    def reshape(self, node: onnx.NodeProto, index: int, ins: list[str]) -> bool:
        x, shape_name = node.input[0], node.input[1]
        if shape_name in self.batch or x not in self.batch:
            self.refuse(node, index, "reshapes with a batch-carrying shape")
        shape = self.consts.get(shape_name)
        if shape is None:
            self.refuse(node, index, "reshapes with a non-constant shape")
        first = int(shape[0])
        out = self.dims(node.output[0])
        inp = self.dims(x)
        if first == 0 and not _attr(node, "allowzero", 0):
            return True
        if out is not None and inp is not None and out and inp and out[0] == inp[0] == self.n:
            if first == -1:
                return True
            if first == self.n:
                new = shape.copy()
                new[0] = self.n + self.config.vdn_samples
                self.reshape_edits.append((node, new))
                return True
        self.refuse(node, index, f"reshapes with {first} in the batch position (merges the batch)")
        return False


def rewrite_vdn_onnx(
    model: onnx.ModelProto,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    batch_inputs: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """VDN / FS+VDN on an ONNX training graph; returns a new ``ModelProto`` (input untouched).

    Raises :class:`bnrewrite.passes.vdn.BatchMixingError` (a ``ValueError``) naming the node when
    the graph cannot be proven batch-independent, ``ValueError`` for unsupported settings.
    """
    cfg = SamplingConfig.coerce(config if config is not None else "vdn")
    if not cfg.uses_virtual_rows:
        raise ValueError(f"rewrite_vdn_onnx applies 'vdn' or 'fs_vdn', got {cfg.method!r}")
    model = copy.deepcopy(model)
    state = _Onnx(model, cfg, batch_inputs)
    if state.opset < 13:
        raise ValueError(
            f"VDN on ONNX needs opset >= 13 (ReduceSum with axes input), got {state.opset}"
        )
    outputs = state.analyze()
    state.config = _raise_virtual_rows(state)
    wanted = _name_batchnorms(state)  # before _rewrite, which copies the nodes
    _rewrite(state, outputs)
    model = _lower_batchnorms(model, state, wanted)
    onnx.checker.check_model(model)
    return model


def _raise_virtual_rows(state: _Onnx) -> SamplingConfig:
    """The config with the virtual rows the batch and the floor need (as the FX pass:
    :func:`bnrewrite.plan.virtual_rows_for_batch` of the static batch dim, then
    :func:`bnrewrite.plan.virtual_rows_for_floor` for the ``vdn`` BN with the fewest positions)."""
    cfg = state.config
    rows = virtual_rows_for_batch(cfg, state.n)
    if rows != cfg.vdn_samples:
        logger.info(
            "VDN for ONNX: %d virtual row(s) for a batch of %d (vdn_per_row=%g, vdn_min_rows=%d)",
            rows,
            state.n,
            cfg.vdn_per_row,
            cfg.vdn_min_rows,
        )
    base = rows
    for node in state.bn_nodes:
        dims = state.dims(node.input[0])
        if dims and all(isinstance(d, int) for d in dims[2:]):
            rows = max(rows, virtual_rows_for_floor(cfg, math.prod(dims[2:])))
    if rows != base:
        logger.info("VDN for ONNX: %d virtual row(s) instead of %d, for the floor", rows, base)
    return cfg.replace(vdn_samples=rows)


def _name_batchnorms(state: _Onnx) -> set[str]:
    """Unique names for the batch-carrying training BNs (the rule's report names nodes)."""
    names = [n.name for n in state.graph.node if n.op_type == "BatchNormalization"]
    taken = set(names)
    wanted: set[str] = set()
    for i, node in enumerate(state.bn_nodes):
        if not node.name or names.count(node.name) > 1:
            name = f"{node.name or 'BatchNormalization'}/vdn{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        wanted.add(node.name)
    return wanted


def _lower_batchnorms(model: onnx.ModelProto, state: _Onnx, wanted: set[str]) -> onnx.ModelProto:
    """Step 5: the training BNs of the main graph -> the ONNX rule with virtual rows.

    Shape inference on the edited graph gives every BN input its static shape ``(N + V, ...)``;
    the rule (``allow_virtual_rows=True``) must rewrite exactly the BNs the analysis found.
    """
    model_ir = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    report = RewriteReport()
    if wanted:
        rules = sampled_batchnorm_rules(state.config, report, allow_virtual_rows=True)
        rules.apply_to_model(model_ir)
    failed = [(name, why) for name, why in report.skipped if name in wanted]
    if failed:
        name, why = failed[0]
        raise ValueError(f"VDN refused for ONNX: BatchNormalization {name!r} not rewritten: {why}")
    extra = sorted(set(report.rewritten) - wanted)
    missing = sorted(wanted - set(report.rewritten))
    if extra or missing:
        raise ValueError(
            f"VDN refused for ONNX: the BN rule rewrote {extra} besides the batch-carrying BNs, "
            f"or missed {missing}"
        )
    return ir.serde.serialize_model(model_ir)


class _Builder:
    def __init__(self, state: _Onnx) -> None:
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"vdn/{base}_{self.count}"

    def const(self, value: Any, dtype: Any = np.int64, base: str = "const") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> Any:
        outs = [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs)
        )
        return outs[0] if outputs == 1 else outs

    def slice(self, x: str, axes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> str:
        return self.op("Slice", [x, self.const(starts), self.const(ends), self.const(axes)])


def _rewrite(state: _Onnx, outputs: list[str]) -> None:
    graph, cfg = state.graph, state.config
    v, n = cfg.vdn_samples, state.n
    b = _Builder(state)
    renames: dict[str, str] = {}
    # 2. virtual rows at the inputs
    head: list[onnx.NodeProto] = []
    for i, name in enumerate(state.batch_inputs):
        elem, dims = state.shapes[name]
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            raise ValueError(f"VDN refused for ONNX: batch input {name!r} is not floating point")
        shape = [v, *dims[1:]]
        if any(d is None for d in shape):
            raise ValueError(f"VDN refused for ONNX: input {name!r} has dynamic dims {dims}")
        if cfg.sampling == "fixed":
            np_dtype = helper.tensor_dtype_to_np_dtype(elem)
            virt = b.const(
                fixed_virtual_rows(tuple(shape), (cfg.seed or 0) + i).numpy(), np_dtype, "virtual"
            )
        else:
            attrs: dict[str, Any] = {"shape": shape, "dtype": elem}
            if cfg.seed is not None:
                attrs["seed"] = float((cfg.seed + i) % (1 << 24))
            virt = b.op("RandomNormal", [], **attrs)
        joined = b.op("Concat", [name, virt], axis=0)
        renames[name] = joined
    head, b.nodes = b.nodes, []
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in renames:
                node.input[k] = renames[inp]
    # 3. literal batch sizes in Reshape shapes
    for node, new in state.reshape_edits:
        node.input[1] = b.const(new, np.int64, "shape")
    # (5. BatchNormalization: the rule, in _lower_batchnorms, once shapes are inferred again)
    new_nodes: list[onnx.NodeProto] = list(head) + list(graph.node)
    # 4. outputs
    tail: list[onnx.NodeProto] = []
    for out in outputs:
        full = f"{out}__vdn_full"
        for node in new_nodes:
            for k, o in enumerate(node.output):
                if o == out:
                    node.output[k] = full
            for k, i in enumerate(node.input):
                if i == out:
                    node.input[k] = full
        b.nodes = []
        sliced = b.slice(full, [0], [0], [n])
        b.nodes[-1].output[0] = out
        del sliced
        tail.extend(b.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes + tail)
    graph.initializer.extend(b.inits)
    # intermediate shapes changed (N -> N + V): drop the stale value_info of batch values
    keep = [vi for vi in graph.value_info if vi.name not in state.batch]
    del graph.value_info[:]
    graph.value_info.extend(keep)
