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
3. **BatchNormalization** (training) with ``X`` of shape ``(N + V, C, *S)`` -> sampled statistics
   (sizes from :func:`bnrewrite.plan.sample_plan`, the math of :func:`bnrewrite.sampled_batch_norm`;
   running statistics in ONNX's convention, as :mod:`bnrewrite.passes.onnx_sampled_batchnorm`):

       parts   = [X[N:N+V]]                      (vdn)
               + [X[:N, :, :m_1, ..., :m_d]]     (fs_vdn, fixed: top-left patch; (N, C): first k rows)
       mu      = sum_p ReduceSum(p) / n          var = sum_p ReduceSum((p - mu)^2) / n
       Y       = (X - mu) * (1 / sqrt(var + eps)) * scale + B      (all rows)
       rm_out  = rm * momentum + mu * (1 - momentum);   rv_out = rv * momentum + var * (1 - momentum)

4. **Outputs**: every batch-carrying graph output ``y`` is ``Slice(y_full, [0], [N], [0])`` under
   its original name.

Refused with a clear message: ``fs_vdn`` with random sampling (the random FS gather lives in the
ONNX rule's private helpers), opset < 13, dynamic batch dims, control flow touching the batch,
``Shape`` of a batch value (dynamic reshapes: export with constant shapes or ``flatten(1)``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnrewrite.config import SamplingConfig
from bnrewrite.plan import sample_plan

from .vdn import BatchMixingError

__all__ = ["rewrite_vdn_onnx"]

_UNARY = set(
    """
    Relu LeakyRelu Sigmoid Tanh Elu Selu Celu Gelu HardSigmoid HardSwish Softplus Softsign Exp Log
    Sqrt Reciprocal Neg Abs Erf Identity Cast CastLike Floor Ceil Round Sign Mish ThresholdedRelu
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
            if node.op_type == "Constant" and _attr(node, "value") is not None:
                self.consts[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
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


def _fixed_rows(shape: Sequence[int], dtype: np.dtype, seed: int) -> np.ndarray:
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return rows.numpy().astype(dtype)


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
    if cfg.method == "fs_vdn" and cfg.sampling == "random":
        raise ValueError(
            "fs_vdn with random sampling is not supported on ONNX graphs yet (the random FS "
            "gather belongs to the ONNX rule); use sampling='fixed' or method='vdn'"
        )
    model = copy.deepcopy(model)
    state = _Onnx(model, cfg, batch_inputs)
    if state.opset < 13:
        raise ValueError(
            f"VDN on ONNX needs opset >= 13 (ReduceSum with axes input), got {state.opset}"
        )
    outputs = state.analyze()
    _rewrite(state, outputs)
    onnx.checker.check_model(model)
    return model


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
    # 1. virtual rows at the inputs
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
            virt = b.const(_fixed_rows(shape, np_dtype, (cfg.seed or 0) + i), np_dtype, "virtual")
        else:
            attrs: dict[str, Any] = {"shape": shape, "dtype": elem}
            if cfg.seed is not None:
                attrs["seed"] = float((cfg.seed + i) % (1 << 24))
            virt = b.op("RandomNormal", [], **attrs)
        joined = b.op("Concat", [name, virt], axis=0)
        state.shapes[joined] = (elem, [n + v, *dims[1:]])  # a BN may read the input directly
        renames[name] = joined
    head, b.nodes = b.nodes, []
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in renames:
                node.input[k] = renames[inp]
    # 2. literal batch sizes in Reshape shapes
    for node, new in state.reshape_edits:
        node.input[1] = b.const(new, np.int64, "shape")
    # 3. BatchNormalization -> VDN statistics
    new_nodes: list[onnx.NodeProto] = list(head)
    bn_set = {id(nd) for nd in state.bn_nodes}
    for node in graph.node:
        if id(node) not in bn_set:
            new_nodes.append(node)
            continue
        new_nodes.extend(_bn_subgraph(b, state, node))
        b.nodes = []
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


def _bn_subgraph(b: _Builder, state: _Onnx, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    cfg, n, v = state.config, state.n, state.config.vdn_samples
    x, scale, bias, mean_in, var_in = list(node.input)[:5]
    elem, dims = state.shapes.get(x, (None, None)) if x in state.shapes else (None, None)
    dims = state.dims(x) if dims is None else dims
    if dims is None or any(d is None for d in dims[1:]):
        raise ValueError(
            f"VDN refused for ONNX: BatchNormalization {node.name!r} input shape unknown"
        )
    full_shape = (n + v, *dims[1:])
    plan = sample_plan(full_shape, cfg)
    eps = float(_attr(node, "epsilon", 1e-5))
    momentum = float(_attr(node, "momentum", 0.9))
    rank = len(full_shape)
    axes = [0, *range(2, rank)]
    np_acc = np.float64 if elem == onnx.TensorProto.DOUBLE else np.float32
    to_acc = onnx.TensorProto.DOUBLE if np_acc is np.float64 else onnx.TensorProto.FLOAT
    xa = x if elem == to_acc else b.op("Cast", [x], to=to_acc)
    parts = [b.slice(xa, [0], [plan.real_rows], [plan.real_rows + plan.virtual_rows])]
    if plan.include_real:
        real = b.slice(xa, [0], [0], [plan.real_rows])
        for ax in plan.axes:
            real = b.slice(real, [ax.axis], [0], [int(ax.count)])
        parts.append(real)
    count = float(plan.count())
    axes_c = b.const(axes)
    sums = [b.op("ReduceSum", [p, axes_c], keepdims=1) for p in parts]
    total = sums[0] if len(sums) == 1 else b.op("Sum", sums)
    mu = b.op("Div", [total, b.const(count, np_acc)])
    sq = [
        b.op("ReduceSum", [b.op("Mul", [c, c]), axes_c], keepdims=1)
        for c in (b.op("Sub", [p, mu]) for p in parts)
    ]
    sq_total = sq[0] if len(sq) == 1 else b.op("Sum", sq)
    var = b.op("Div", [sq_total, b.const(count, np_acc)])
    bshape = b.const([1, full_shape[1]] + [1] * (rank - 2))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps, np_acc)])])])
    scale_a = b.op("Reshape", [b.op("Cast", [scale], to=to_acc), bshape])
    bias_a = b.op("Reshape", [b.op("Cast", [bias], to=to_acc), bshape])
    y = b.op("Add", [b.op("Mul", [b.op("Sub", [xa, mu]), b.op("Mul", [inv, scale_a])]), bias_a])
    if elem != to_acc and elem is not None:
        y = b.op("Cast", [y], to=elem)
    results = [y]
    cshape = b.const([full_shape[1]])
    keep, new = b.const(momentum, np_acc), b.const(1.0 - momentum, np_acc)
    for old, stat in ((mean_in, mu), (var_in, var)):
        stat_c = b.op("Reshape", [stat, cshape])
        upd = b.op(
            "Add", [b.op("Mul", [b.op("Cast", [old], to=to_acc), keep]), b.op("Mul", [stat_c, new])]
        )
        old_elem = state.shapes.get(old, (None,))[0]
        if old in state.consts:
            old_elem = helper.np_dtype_to_tensor_dtype(state.consts[old].dtype)
        results.append(b.op("Cast", [upd], to=old_elem or to_acc))
    if len(node.output) > 3:  # opset 9-13 saved_mean, saved_var (inverse std, as onnxruntime)
        results.append(b.op("Reshape", [mu, cshape]))
        results.append(b.op("Reshape", [inv, cshape]))
    nodes = list(b.nodes)
    # the last producer of each result takes the original output name
    for k, out in enumerate(node.output):
        if not out or k >= len(results):
            continue
        producer = next(nd for nd in reversed(nodes) if results[k] in nd.output)
        idx = list(producer.output).index(results[k])
        producer.output[idx] = out
    return nodes
