"""VDN's rules: what each op family may do with a batch-carrying value (rules as data).

Each row of :data:`FAMILIES` is an op family, the op names in it and its handler. A handler gets
the :class:`~bnrewrite.passes.vdn_flow.BatchFlow`, the node and the op's name, and returns the
node's state (``BATCH``, ``BTUPLE``, ...) or ``None`` (the result does not depend on the batch);
it raises through ``flow.refuse`` when it cannot prove the node per-sample. The algebra, per
family, for ``x`` batch-carrying of shape ``(N, ...)``:

1. *pointwise*: ``f(x, w)`` is per-sample iff ``w`` broadcasts without reaching dim 0 (``w`` has a
   lower rank, or dim 0 of size 1).
2. *dim-wise* (reductions, softmax, cumulative ops, split/select/narrow, transpose): per-sample iff
   no dim argument is dim 0.
3. *layers* (conv, linear, layer_norm): per-sample when weight and bias are not batch-carrying.
4. *per-sample* (pooling, upsampling, group/instance norm, ...): per-sample by construction.
5. *matmul*: ``x @ W`` with ``W`` of rank <= 2 on the right, or batched (rank >= 3) products.
6. *cat / stack*: along a dim >= 1, of batch-carrying tensors only.
7. *reshapes* (view, expand, repeat, flatten, unsqueeze, squeeze, permute): dim 0 stays the batch
   dim, its size written as ``x.size(0)``, ``-1`` with known shapes, or a literal ``N`` (edited to
   ``N + V``).
8. *indexing* (getitem, slice, gather, embedding): dim 0 stays whole.
9. *creation* (``zeros(x.size(0), ...)``, ``new_zeros``): the batch size only in dim 0.
10. *access* (``getitem``, ``getattr``, ``size``): follow tuples, shapes and sizes.
11. *metadata* (``dim()``, ``dtype``, ...): not batch-dependent. *Whole-batch reads* (``numel``,
    ``item``, ``len``): refused.

:data:`MODULE_FAMILIES` is the same table for ``call_module`` nodes. An op in no family is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from .vdn_flow import BATCH, BNTUPLE, BSHAPE, BSIZE, BTUPLE, BatchFlow, same_size, value_of

__all__ = [
    "FAMILIES",
    "MODULE_FAMILIES",
    "Family",
    "apply_rule",
    "is_guard",
    "literal_broadcast",
    "op_name",
]

Handler = Callable[[BatchFlow, fx.Node, str], "str | None"]


@dataclasses.dataclass(frozen=True)
class Family:
    """An op family: its names (after stripping the in-place ``_``) and its handler."""

    name: str
    ops: frozenset[str]
    handler: Handler


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# ---------------------------------------------------------------------------------------------
# Op names and their families
# ---------------------------------------------------------------------------------------------
def op_name(target: Any) -> str | None:
    """A normalised op name for a call_function target; ``None`` if it is not a torch/operator op."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in ("aten", "prims"):
            return None
        return target._overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    name = getattr(target, "__name__", None)
    module = getattr(target, "__module__", None) or ""
    if name is None:
        return None
    if module in ("_operator", "operator", "builtins", "math") or module.startswith("torch"):
        return name
    return None


def _strip_inplace(name: str) -> tuple[str, bool]:
    inplace_ops = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv"}
    if name in inplace_ops:
        return inplace_ops[name], True
    if name.endswith("_") and not name.startswith("_") and not name.endswith("__"):
        return name[:-1], True
    return name, False


POINTWISE = _names(
    """
    add sub rsub mul div true_divide truediv floordiv floor_divide mod remainder fmod pow neg pos
    abs exp exp2 log log2 log10 log1p expm1 sqrt rsqrt sin cos tan asin acos atan atan2 sinh cosh
    tanh sigmoid relu relu6 leaky_relu elu selu celu gelu silu mish hardtanh hardswish hardsigmoid
    softplus softsign tanhshrink threshold clamp clamp_min clamp_max clip where maximum minimum
    fmax fmin lerp addcmul addcdiv reciprocal sign sgn square erf erfc erfinv logit prelu rrelu
    hardshrink softshrink logsigmoid log_sigmoid glu eq ne lt le gt ge logical_and logical_or
    logical_xor logical_not bitwise_and bitwise_or bitwise_xor bitwise_not and_ or_ xor invert
    not_ masked_fill nan_to_num floor ceil round trunc frac isnan isinf isfinite signbit copysign
    float double half bfloat16 int long bool to type type_as contiguous clone detach alias
    _to_copy lift_fresh_copy cpu cuda requires_grad dropout alpha_dropout feature_alpha_dropout
    dropout1d dropout2d dropout3d feature_dropout bernoulli zeros_like ones_like empty_like
    full_like rand_like randn_like randint_like fill sigmoid_ native_dropout
    """
)
# ops whose tensor arguments besides the first are not broadcast (dtype/device donors)
_NO_BROADCAST = _names("to type_as type zeros_like ones_like empty_like full_like")
PER_SAMPLE = _names(
    """
    max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d lp_pool1d lp_pool2d lp_pool3d
    fractional_max_pool2d fractional_max_pool3d max_pool2d_with_indices max_pool3d_with_indices
    interpolate upsample upsample_nearest upsample_bilinear upsample_nearest1d upsample_nearest2d
    upsample_nearest3d upsample_bilinear2d upsample_bicubic2d upsample_linear1d
    upsample_trilinear3d pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
    local_response_norm group_norm native_group_norm instance_norm native_layer_norm
    """
)
_TUPLE_OUT = _names(
    "max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool2d adaptive_max_pool3d "
    "native_group_norm native_layer_norm native_dropout"
)
#: layers: name -> positions that must not be batch-carrying (weight, bias)
LAYERS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution "
        "_convolution linear".split(),
        (1, 2),
    ),
    "layer_norm": (2, 3),
}
#: dim-wise ops: name -> (position of dim, keyword names, default, tuple output)
DIM_WISE: dict[str, tuple[int, tuple[str, ...], Any, bool]] = {
    "sum": (1, ("dim", "axis"), None, False),
    "mean": (1, ("dim", "axis"), None, False),
    "nansum": (1, ("dim", "axis"), None, False),
    "nanmean": (1, ("dim", "axis"), None, False),
    "prod": (1, ("dim", "axis"), None, False),
    "amax": (1, ("dim", "axis"), None, False),
    "amin": (1, ("dim", "axis"), None, False),
    "aminmax": (1, ("dim",), None, True),
    "var": (1, ("dim", "axis"), None, False),
    "std": (1, ("dim", "axis"), None, False),
    "var_mean": (1, ("dim", "axis"), None, True),
    "std_mean": (1, ("dim", "axis"), None, True),
    "logsumexp": (1, ("dim", "axis"), None, False),
    "argmax": (1, ("dim", "axis"), None, False),
    "argmin": (1, ("dim", "axis"), None, False),
    "all": (1, ("dim", "axis"), None, False),
    "any": (1, ("dim", "axis"), None, False),
    "count_nonzero": (1, ("dim",), None, False),
    "norm": (2, ("dim",), None, False),
    "linalg_vector_norm": (2, ("dim",), None, False),
    "softmax": (1, ("dim",), None, False),
    "log_softmax": (1, ("dim",), None, False),
    "softmin": (1, ("dim",), None, False),
    "_softmax": (1, ("dim",), None, False),
    "_log_softmax": (1, ("dim",), None, False),
    "cumsum": (1, ("dim",), None, False),
    "cumprod": (1, ("dim",), None, False),
    "cummax": (1, ("dim",), None, True),
    "cummin": (1, ("dim",), None, True),
    "logcumsumexp": (1, ("dim",), None, False),
    "normalize": (2, ("dim",), 1, False),
    "cosine_similarity": (2, ("dim",), 1, False),
    "narrow": (1, ("dim",), None, False),
    "select": (1, ("dim",), None, False),
    "index_select": (1, ("dim",), None, False),
    "unbind": (1, ("dim",), 0, True),
    "chunk": (2, ("dim",), 0, True),
    "split": (2, ("dim",), 0, True),
    "split_with_sizes": (2, ("dim",), 0, True),
    "tensor_split": (2, ("dim",), 0, True),
    "diff": (2, ("dim",), -1, False),
    "sort": (1, ("dim",), -1, True),
    "argsort": (1, ("dim",), -1, False),
    "topk": (2, ("dim",), -1, True),
    "repeat_interleave": (2, ("dim",), None, False),
    "flip": (1, ("dims",), None, False),
    "roll": (2, ("dims",), None, False),
    "transpose": (1, ("dim0",), None, False),  # both dims checked (_SECOND_DIM)
    "swapaxes": (1, ("axis0",), None, False),
    "swapdims": (1, ("dim0",), None, False),
    "movedim": (1, ("source",), None, False),
    "moveaxis": (1, ("source",), None, False),
}
_SECOND_DIM = {"transpose": (2, "dim1"), "swapaxes": (2, "axis1"), "swapdims": (2, "dim1")}
_SECOND_DIM.update({"movedim": (2, "destination"), "moveaxis": (2, "destination")})
_DIM_VERBS = {
    "narrow": "narrows",
    "select": "selects",
    "index_select": "selects",
    "unbind": "unbinds",
    "chunk": "splits",
    "split": "splits",
    "split_with_sizes": "splits",
    "tensor_split": "splits",
}
_CREATE_LIKE_SELF = _names("new_zeros new_ones new_empty new_full")
_CREATE = _names("zeros ones empty full randn rand randint")
_META_ATTRS = _names("dtype device ndim is_cuda layout requires_grad is_sparse is_quantized")
_META_METHODS = _names(
    "dim ndimension is_contiguous element_size get_device is_floating_point stride sym_stride"
)


# ---------------------------------------------------------------------------------------------
# Handlers, one per family
# ---------------------------------------------------------------------------------------------
def _int_value(f: BatchFlow, value: Any) -> int | None:
    """A plain int, or a non-batch node whose example value is an int; else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, fx.Node) and not f.st(value):
        val = value_of(value)
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    return None


def _size_arithmetic(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    """``N * T`` and ``(N * T) // T``: the batch size times (or divided by) a known int is a size
    with ``T`` rows per sample more (or fewer); ``None`` when ``node`` is not that."""
    if name not in ("mul", "floordiv", "floor_divide") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if f.st(a) != BSIZE and not (name == "mul" and f.st(b) == BSIZE):
        return None
    size, other = (a, b) if f.st(a) == BSIZE else (b, a)
    c = _int_value(f, other)
    if c is None or c <= 0:
        if f.st(other):
            return None
        f.refuse(
            node,
            f"multiplies or divides the batch size by {getattr(other, 'name', other)!r}, whose "
            f"value the pass does not know; capture the model with example inputs "
            f"(rewrite(model, cfg, example_inputs=(x,)))",
        )
    k = f.rows_of(size)
    if name == "mul":
        f.rows[node] = k * c
    elif k % c == 0:
        f.rows[node] = k // c
    else:
        f.refuse(
            node, f"divides the batch size by {c}, which does not divide its {k} rows per sample"
        )
    return BSIZE


def _pointwise(f: BatchFlow, node: fx.Node, name: str) -> str:
    sized = _size_arithmetic(f, node, name)
    if sized is not None:
        return sized
    args = f.tensor_args(node)
    f.check_not_size(node, args)
    if name in _NO_BROADCAST:
        if f.st(node.args[0]) != BATCH:
            f.refuse(node, "takes dtype/device from a batch-carrying tensor oddly")
        return BATCH
    if name == "native_dropout":
        return BTUPLE
    f.check_broadcast(node, list(node.args) + list(node.kwargs.values()))
    return BATCH


def _dims(
    f: BatchFlow, node: fx.Node, name: str, pos: int, kws: tuple[str, ...], default: Any, tup: bool
) -> str:
    x = node.args[0] if node.args else f.arg(node, 0, ("input", "self"))
    if f.st(x) != BATCH:
        f.check_not_size(node, node.all_input_nodes)
        f.refuse(node, f"applies {name} to a non-batch tensor with batch-carrying arguments")
    others = [n for n in node.all_input_nodes if n is not x and f.st(n)]
    if name in ("cosine_similarity",):
        others = [n for n in others if f.st(n) != BATCH]
    f.check_not_size(node, others)
    if others and name not in ("cosine_similarity",):
        f.refuse(node, "takes a batch-carrying tensor as a secondary argument")
    rank = f.rank(x)
    dims = f.arg(node, pos, kws, default)
    verb = _DIM_VERBS.get(name, f"reduces ({name})")
    f.check_dims(node, dims, rank, verb)
    if name in _SECOND_DIM:
        p2, k2 = _SECOND_DIM[name]
        f.check_dims(node, f.arg(node, p2, (k2,)), rank, verb)
    return BTUPLE if tup else BATCH


def _dim_wise(f: BatchFlow, node: fx.Node, name: str) -> str:
    pos, kws, default, tup = DIM_WISE[name]
    return _dims(f, node, name, pos, kws, default, tup)


def _max_min(f: BatchFlow, node: fx.Node, name: str) -> str:
    """``max(x, y)`` is pointwise, ``max(x, dim)`` dim-wise, ``max(x)`` a whole-tensor reduction."""
    second = f.arg(node, 1, ("dim", "other"))
    if isinstance(second, fx.Node):
        return _pointwise(f, node, name)
    if second is None:
        f.refuse(node, "reduces over every dim, including the batch dim (dim 0)")
    return _dims(f, node, name, 1, ("dim",), None, True)


def _layer(f: BatchFlow, node: fx.Node, name: str) -> str:
    x = node.args[0] if node.args else f.arg(node, 0, ("input",))
    if f.st(x) != BATCH:
        f.refuse(node, f"applies {name} with batch-carrying weights")
    for pos in LAYERS[name]:
        if pos < len(node.args) and f.st(node.args[pos]):
            f.refuse(node, f"applies {name} with batch-carrying weights")
    for key in ("weight", "bias"):
        if f.st(node.kwargs.get(key)):
            f.refuse(node, f"applies {name} with batch-carrying weights")
    if name == "layer_norm":
        shape = f.arg(node, 1, ("normalized_shape",))
        rank = f.rank(x)
        if rank is not None and isinstance(shape, (list, tuple)) and len(shape) >= rank:
            f.refuse(node, "normalises over the batch dim")
    return BATCH


def _per_sample(f: BatchFlow, node: fx.Node, name: str) -> str:
    x = node.args[0] if node.args else f.arg(node, 0, ("input",))
    others = [n for n in node.all_input_nodes if n is not x and f.st(n)]
    if f.st(x) != BATCH or others:
        f.refuse(node, f"applies {name} with batch-carrying secondary arguments")
    if name in _TUPLE_OUT or node.kwargs.get("return_indices"):
        return BTUPLE
    return BATCH


def _matmul(f: BatchFlow, node: fx.Node, name: str) -> str:
    args = list(node.args)
    if name in ("addmm", "baddbmm", "addbmm"):
        bias, a, b = args[0], args[1], args[2]
        if f.st(bias):
            f.check_not_size(node, [bias])
    else:
        bias, a, b = None, args[0], args[1]
    sa, sb = f.st(a), f.st(b)
    f.check_not_size(node, [n for n in (a, b) if isinstance(n, fx.Node)])
    ra, rb = f.rank(a), f.rank(b)
    out = BATCH
    if sa == BATCH and sb != BATCH:
        if not (
            name in ("mm", "addmm") or (rb is not None and rb <= 2 and (ra is None or ra >= 2))
        ):
            f.refuse(
                node,
                f"multiplies the batch by {getattr(b, 'name', b)} of rank {rb}; only a "
                f"weight of rank <= 2 on the right is per-sample",
            )
    elif sa == BATCH and sb == BATCH:
        if not (
            name in ("bmm", "baddbmm") or (ra is not None and rb is not None and min(ra, rb) >= 3)
        ):
            f.refuse(
                node,
                "multiplies two batch-carrying tensors of rank < 3 (or unknown rank), which "
                "contracts over the batch",
            )
    elif sb == BATCH:
        if not (rb is not None and rb >= 3 and ra is not None and ra <= 2 and name == "matmul"):
            f.refuse(node, "multiplies across the batch (batch-carrying right operand)")
    else:
        f.refuse(node, "multiplies with batch-carrying values in an unsupported position")
    if bias is not None and f.st(bias) != BATCH:
        f.check_broadcast(node, [a, bias])
    return out


def _einsum(f: BatchFlow, node: fx.Node, name: str) -> str:
    """``einsum(eq, *operands)`` is per-sample when every batch-carrying operand's first subscript
    is one letter ``b``, no other operand uses ``b``, and the output starts with ``b``."""
    eq = f.arg(node, 0, ("equation",))
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        f.refuse(node, "uses an einsum equation without an explicit output (or with ...)")
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        f.refuse(node, "has an einsum equation whose terms do not match its operands")
    f.check_not_size(node, [t for t in operands if isinstance(t, fx.Node)])
    batch = {t[0] for t, x in zip(terms, operands) if f.st(x) == BATCH and t}
    if len(batch) != 1:
        f.refuse(node, "contracts batch-carrying operands over different first subscripts")
    (b,) = batch
    for t, x in zip(terms, operands):
        if f.st(x) != BATCH and b in t:
            f.refuse(node, f"uses the batch subscript {b!r} on the non-batch operand {x}")
        if f.st(x) == BATCH and b in t[1:]:
            f.refuse(node, f"repeats the batch subscript {b!r} inside an operand")
    if not out.startswith(b) or b in out[1:]:
        f.refuse(node, f"does not keep the batch subscript {b!r} first in its output {out!r}")
    return BATCH


def _unfold(f: BatchFlow, node: fx.Node, name: str) -> str:
    """``F.unfold`` / ``F.fold`` (im2col, col2im) are per-sample; ``Tensor.unfold(dim, size,
    step)`` is a dim-wise op that must not name the batch dim."""
    im2col = name in ("fold", "im2col", "col2im") or (
        node.op == "call_function"
        and node.target in (torch.nn.functional.unfold, torch.nn.functional.fold)
    )
    if im2col:
        return _per_sample(f, node, name)
    return _dims(f, node, name, 1, ("dimension", "dim"), None, False)


def _cat(f: BatchFlow, node: fx.Node, name: str) -> str:
    tensors = f.arg(node, 0, ("tensors",))
    if not isinstance(tensors, (list, tuple)):
        f.refuse(node, f"{name}s a tuple node whose items the pass cannot see")
    states = [f.st(t) for t in tensors]
    if any(s != BATCH for s in states):
        f.refuse(
            node,
            f"{name}s batch-carrying tensors with non-batch ones; their dim 0 would not "
            f"match once the virtual rows are appended",
        )
    f.check_not_size(node, [n for n in node.all_input_nodes if n not in tensors])
    dim = f.arg(node, 1, ("dim", "axis"), 0)
    rank = f.rank(tensors[0])
    extra = 1 if name == "stack" else 0
    if f.norm_dim(node, dim, rank, extra=extra) == 0:
        f.refuse(node, f"{name}s along the batch dim (dim 0), which mixes samples")
    return BATCH


# -- reshapes ---------------------------------------------------------------------------------
def _sizes(node: fx.Node) -> list[Any]:
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, fx.Node)):
        sizes = node.args[1]
    elif "size" in node.kwargs or "shape" in node.kwargs:
        sizes = node.kwargs.get("size", node.kwargs.get("shape"))
    else:
        sizes = node.args[1:]
    if isinstance(sizes, fx.Node):
        return [sizes]
    return list(sizes)


def _set_size0(node: fx.Node, rows: int = 1) -> Callable[[int], None]:
    """The edit that writes ``new * rows`` into the batch position of a shape argument."""

    def edit(new: int) -> None:
        new = new * rows
        args = list(node.args)
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            seq = list(args[1])
            seq[0] = new
            args[1] = type(args[1])(seq)
        elif "size" in node.kwargs or "shape" in node.kwargs:
            key = "size" if "size" in node.kwargs else "shape"
            seq = list(node.kwargs[key])
            seq[0] = new
            kwargs = dict(node.kwargs)
            kwargs[key] = type(node.kwargs[key])(seq)
            node.kwargs = kwargs
            return
        else:
            args[1] = new
        node.args = tuple(args)

    return edit


def _view(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    x = node.args[0]
    if len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return _pointwise(f, node, "view")
    if f.st(x) != BATCH:
        f.refuse(node, "reshapes a non-batch tensor with the batch size")
    sizes = _sizes(node)
    if len(sizes) == 1 and f.st(sizes[0]) == BSHAPE:
        f.rows[node] = f.rows_of(sizes[0])
        return BATCH  # x.view(y.shape) with y batch-carrying
    if not sizes:
        f.refuse(node, "reshapes to a scalar")
    first, rest = sizes[0], sizes[1:]
    for s in rest:
        if f.st(s):
            f.refuse(node, "puts the batch size in a non-batch position of the new shape")
    out = f.shape(node)
    inp = f.shape(x)
    if f.st(first) == BSIZE:
        f.rows[node] = f.rows_of(first)  # view(N * T, ...): T rows per sample
        return BATCH
    if isinstance(first, fx.Node):
        f.refuse(node, f"reshapes with a computed batch-position size ({first.name})")
    if out is not None and inp is not None:
        k = f.rows_per_sample(node, out[0])
        if k is not None and first == -1:
            f.rows[node] = k
            return BATCH
        if k is not None and f.literal_rows(node, first, k):
            f.edits.append((node, _set_size0(node, k)))
            f.rows[node] = k
            return BATCH
    if first == -1 and (out is None or inp is None):
        f.refuse(
            node,
            "reshapes with -1 in the batch position; without shapes the pass cannot prove "
            "it keeps samples apart (use x.size(0) / flatten(1), or pass example_inputs)",
        )
    f.refuse(
        node,
        f"reshapes with {first!r} in the batch position, which merges or splits the batch "
        f"dim (or bakes a literal batch size); use x.size(0) or flatten(1)",
    )
    return None


def _like(f: BatchFlow, node: fx.Node, name: str) -> str:
    other = f.arg(node, 1, ("other",))
    f.rows[node] = f.rows_of(other)  # the shape donor's rows per sample
    if f.st(node.args[0]) == BATCH and f.st(other) == BATCH:
        return BATCH
    if name == "expand_as" and f.st(other) == BATCH:
        return BATCH
    f.refuse(node, "reshapes between a batch-carrying and a non-batch tensor")
    return BATCH


def _expand(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    x = node.args[0]
    sizes = _sizes(node)
    first, rest = (sizes[0] if sizes else None), sizes[1:]
    for s in rest:
        if f.st(s):
            f.refuse(node, "puts the batch size in a non-batch position")
    rank = f.rank(x)
    if f.st(x) == BATCH:
        if rank is not None and len(sizes) > rank:
            f.refuse(node, "adds leading dims before the batch dim")
        if first == -1 or f.st(first) == BSIZE:
            return BATCH
        out = f.shape(node)
        if f.literal_batch(node, first, out[0] if out else None):
            f.edits.append((node, _set_size0(node)))
            return BATCH
        f.refuse(node, f"expands the batch dim to {first!r}")
    if f.st(first) == BSIZE:
        return BATCH  # a per-sample constant broadcast over the batch
    f.refuse(node, "expands with batch-carrying arguments")
    return None


def literal_broadcast(f: BatchFlow, node: fx.Node) -> bool:
    """``cls_token.expand(N, -1, -1)`` in a shape-specialized graph: a per-sample constant (dim 0
    of size 1) expanded to the literal batch size ``N``. It carries no sample's values, so it is
    batch-carrying with ``N -> N + V`` edited in; recorded here (state and edit) when it is."""
    name = str(node.target) if node.op == "call_method" else op_name(node.target)
    if node.op not in ("call_function", "call_method") or name != "expand":
        return False
    x = node.args[0] if node.args else None
    sizes = _sizes(node)
    shape = f.shape(x)
    if not sizes or shape is None or len(sizes) != len(shape) or not same_size(shape[0], 1):
        return False
    if not f.literal_rows(node, sizes[0], 1) or f.batch_size == 1:
        return False
    f.edits.append((node, _set_size0(node)))
    f.state[node] = BATCH
    return True


def _repeat(f: BatchFlow, node: fx.Node, name: str) -> str:
    x = node.args[0]
    sizes = _sizes(node)
    if f.st(x) != BATCH or any(f.st(s) for s in sizes):
        f.refuse(node, f"{name}s with batch-carrying arguments")
    rank = f.rank(x)
    if name == "tile" and (rank is None or len(sizes) < rank):
        f.refuse(node, "tiles with fewer reps than dims (rank unknown or smaller)")
    if rank is not None and len(sizes) > rank:
        f.refuse(node, f"{name}s with leading dims before the batch dim")
    if not sizes or sizes[0] != 1:
        f.refuse(node, f"{name}s the batch dim")
    return BATCH


def _flatten(f: BatchFlow, node: fx.Node, name: str) -> str:
    x = node.args[0]
    start = f.arg(node, 1, ("start_dim",), 0)
    end = f.arg(node, 2, ("end_dim",), -1)
    rank = f.rank(x)
    if f.norm_dim(node, start, rank) == 0:
        if end == 0 or (rank is not None and f.norm_dim(node, end, rank) == 0):
            return BATCH  # flatten(0, 0): nothing merged
        return _merge_rows(f, node, "flattens the batch dim into the features (use flatten(1))")
    return BATCH


def _merge_rows(f: BatchFlow, node: fx.Node, unknown: str) -> str:
    """A row-major merge of the batch with the dims after it (``flatten(0, j)``): the output's rows
    per sample come from its shape; without shapes, ``unknown`` is the refusal."""
    out = f.shape(node)
    k = f.rows_per_sample(node, out[0]) if out else None
    if k is None:
        f.refuse(
            node,
            f"{unknown}; without shapes the pass cannot count the rows per sample (pass "
            f"example_inputs=(x,))",
        )
    f.rows[node] = k
    return BATCH


def _unflatten(f: BatchFlow, node: fx.Node, name: str) -> str:
    """``unflatten(dim, sizes)``: dims >= 1 as any dim-wise op; ``unflatten(0, (N, T))`` of a tensor
    with ``N * T`` rows splits them back (the first size ``-1``, the batch size, or the literal ``N``
    of a shape-specialized graph)."""
    x = node.args[0]
    dim = f.arg(node, 1, ("dim",))
    if f.st(x) != BATCH or f.norm_dim(node, dim, f.rank(x)) != 0:
        return _dims(f, node, name, 1, ("dim",), None, False)
    sizes = list(f.arg(node, 2, ("sizes",), ()) or ())
    first = sizes[0] if sizes else None
    if any(f.st(s) for s in sizes[1:]):
        f.refuse(node, "puts the batch size in a non-batch position of the new shape")
    if f.st(first) == BSIZE:
        f.rows[node] = f.rows_of(first)
        return BATCH
    out = f.shape(node)
    k = f.rows_per_sample(node, out[0]) if out else None
    if k is not None and first == -1:
        f.rows[node] = k
        return BATCH
    if k is not None and f.literal_rows(node, first, k):

        def edit(new: int, node: fx.Node = node, k: int = k) -> None:
            args = list(node.args)
            args[2] = type(args[2])([new * k, *list(args[2])[1:]])
            node.args = tuple(args)

        f.edits.append((node, edit))
        f.rows[node] = k
        return BATCH
    f.refuse(node, f"unflattens the batch dim with {first!r} first (use -1 or x.size(0))")
    return BATCH


def _unsqueeze(f: BatchFlow, node: fx.Node, name: str) -> str:
    d = f.arg(node, 1, ("dim",))
    if f.norm_dim(node, d, f.rank(node.args[0]), extra=1) == 0:
        f.refuse(node, "inserts a dim before the batch dim")
    return BATCH


def _squeeze(f: BatchFlow, node: fx.Node, name: str) -> str:
    d = f.arg(node, 1, ("dim",))
    if d is None:
        f.refuse(
            node,
            "squeezes every size-1 dim, which drops the batch dim when N == 1 but not "
            "once the virtual rows are appended; name the dims",
        )
    f.check_dims(node, d, f.rank(node.args[0]), "squeezes")
    return BATCH


def _permute(f: BatchFlow, node: fx.Node, name: str) -> str:
    dims = node.args[1:] if len(node.args) > 2 else f.arg(node, 1, ("dims",))
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims or f.norm_dim(node, dims[0], f.rank(node.args[0])) != 0:
        f.refuse(node, "moves the batch dim away from dim 0")
    return BATCH


# -- indexing ---------------------------------------------------------------------------------
def _set_arg(node: fx.Node, pos: int, key: str, value: Any) -> None:
    if key in node.kwargs:
        kwargs = dict(node.kwargs)
        kwargs[key] = value
        node.kwargs = kwargs
    else:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)


def _set_slice_end(node: fx.Node, new: int) -> None:
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    first = items[0]
    items[0] = slice(first.start, None, first.step)
    node.args = (node.args[0], tuple(items) if isinstance(idx, tuple) else items[0])


def _aten_slice(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    x = node.args[0]
    if f.st(x) != BATCH or any(f.st(a) for a in node.all_input_nodes if a is not x):
        f.refuse(node, "slices with batch-carrying bounds")
    dim = f.arg(node, 1, ("dim",), 0)
    if f.norm_dim(node, dim, f.rank(x)) != 0:
        return BATCH
    start = f.arg(node, 2, ("start",), None)
    end = f.arg(node, 3, ("end",), None)
    step = f.arg(node, 4, ("step",), 1)
    n = f.batch_size
    full_end = end is None or end >= (1 << 62) or (isinstance(n, int) and end == n)
    if start in (None, 0) and step == 1 and full_end:
        if isinstance(end, int) and isinstance(n, int) and end == n and end < (1 << 62):
            f.edits.append((node, lambda new, node=node: _set_arg(node, 3, "end", new)))
        return BATCH
    f.refuse(node, "selects some rows of the batch")
    return None


def _pad(f: BatchFlow, node: fx.Node, name: str) -> str:
    x = node.args[0]
    pad = f.arg(node, 1, ("pad", "padding"))
    if f.st(x) != BATCH or not isinstance(pad, (list, tuple)):
        f.refuse(node, "pads with batch-carrying or non-constant arguments")
    rank = f.rank(x)
    if rank is None or len(pad) // 2 >= rank:
        f.refuse(node, "pads the batch dim (or the rank is unknown; pass example_inputs)")
    return BATCH


def _embedding(f: BatchFlow, node: fx.Node, name: str) -> str:
    w, idx = (node.args[0], node.args[1]) if "aten" in str(node.target) else (None, None)
    if w is None:
        idx, w = node.args[0], f.arg(node, 1, ("weight",))
    if f.st(idx) == BATCH and not f.st(w):
        return BATCH
    f.refuse(node, "looks up batch-carrying weights")
    return BATCH


def _gather(f: BatchFlow, node: fx.Node, name: str) -> str:
    d = f.arg(node, 1, ("dim",))
    idx = f.arg(node, 2, ("index",))
    f.check_dims(node, d, f.rank(node.args[0]), "gathers")
    if f.st(node.args[0]) == BATCH and f.st(idx) == BATCH:
        return BATCH
    f.refuse(node, "gathers with an index that is not batch-carrying")
    return BATCH


def _attention(f: BatchFlow, node: fx.Node, name: str) -> str:
    args = [a for a in f.tensor_args(node) if f.st(a)]
    ranks = [f.rank(a) for a in args]
    if any(r is None or r < 3 for r in ranks):
        f.refuse(node, "needs batched (rank >= 3) inputs to be per-sample")
    f.check_not_size(node, args)
    return BATCH


def _full_slice(f: BatchFlow, s: slice) -> bool:
    n = f.batch_size
    return (
        s.start in (None, 0)
        and s.step in (None, 1)
        and (s.stop is None or (isinstance(n, int) and s.stop == n and f.specialized))
    )


def _getitem(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    obj, idx = node.args[0], node.args[1]
    s = f.st(obj)
    if isinstance(idx, fx.Node) and f.st(idx) and s != BATCH:
        f.refuse(node, "indexes with a batch-carrying value")
    if s == BNTUPLE:
        return BATCH if idx == 0 else None
    if s == BTUPLE:
        return BTUPLE if isinstance(idx, slice) else BATCH
    if s == BSHAPE:
        if idx == 0:
            return BSIZE
        if isinstance(idx, int) and idx > 0:
            return None
        if isinstance(idx, slice) and isinstance(idx.start, int) and idx.start >= 1:
            return None
        if (
            isinstance(idx, slice)
            and idx.start in (None, 0)
            and idx.step in (None, 1)
            and isinstance(idx.stop, int)
            and idx.stop >= 1
        ):
            return BSHAPE  # x.shape[:2]: a prefix, item 0 still the batch size
        f.refuse(node, "takes a part of the shape that includes the batch size")
    if s in (BSIZE,):
        f.refuse(node, "indexes the batch size")
    if s != BATCH:
        # a non-batch container holding batch values (e.g. a list literal): be conservative
        f.refuse(node, "indexes a container of batch-carrying values")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    first = items[0] if items else None
    rank = f.rank(obj)
    if first is Ellipsis:
        rest = [i for i in items[1:] if i is not None]
        if rank is None or len(rest) >= rank:
            f.refuse(node, "indexes with ... in front, which may reach the batch dim")
    elif not (isinstance(first, slice) and first == slice(None, None, None)):
        if not (isinstance(first, slice) and _full_slice(f, first)):
            f.refuse(
                node,
                f"indexes the batch dim with {first!r}, which selects or reorders samples",
            )
    tensors = [i for i in items[1:] if isinstance(i, fx.Node)]
    if len(tensors) > 1:
        f.refuse(node, "uses several tensor indices, which may move the batch dim")
    for t in tensors:
        if f.st(t):
            f.refuse(node, f"indexes with the batch-carrying tensor {t.name}")
        if isinstance(value_of(t), Tensor) and value_of(t).dtype == torch.bool:
            f.refuse(node, "indexes with a boolean mask")
    if isinstance(first, slice) and first != slice(None, None, None):
        f.edits.append((node, lambda new, node=node: _set_slice_end(node, new)))
    return BATCH


def _getattr(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    obj, attr = node.args[0], node.args[1]
    s = f.st(obj)
    if s == BTUPLE and attr in ("values", "indices", "mean", "std"):
        return BATCH
    if s != BATCH:
        f.refuse(node, f"reads .{attr} of a batch-derived value")
    if attr == "shape":
        return BSHAPE
    if attr in _META_ATTRS:
        return None
    if attr in ("data", "real", "imag"):
        return BATCH
    if attr in ("mT", "mH"):
        rank = f.rank(obj)
        if rank is not None and rank >= 3:
            return BATCH
    f.refuse(node, f"reads .{attr}, which the VDN analysis does not know")
    return None


def _size(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    x = node.args[0]
    if f.st(x) != BATCH:
        f.refuse(node, "takes the size of a batch-derived value")
    d = f.arg(node, 1, ("dim",))
    if d is None:
        return BSHAPE
    return BSIZE if f.norm_dim(node, d, f.rank(x)) == 0 else None


# -- creation, metadata, refusals ---------------------------------------------------------------
def _create_sizes(node: fx.Node) -> list[Any]:
    if "size" in node.kwargs:
        sizes = node.kwargs["size"]
    elif len(node.args) == 1 and isinstance(node.args[0], (list, tuple, fx.Node)):
        sizes = node.args[0]
    else:
        sizes = node.args if node.target is not torch.full else node.args[:1]
    if isinstance(sizes, fx.Node):
        return [sizes]
    if node.target is torch.full and sizes and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    return list(sizes)


def _create(f: BatchFlow, node: fx.Node, name: str) -> str | None:
    sizes = _sizes(node) if name in _CREATE_LIKE_SELF else _create_sizes(node)
    if len(sizes) == 1 and f.st(sizes[0]) == BSHAPE:
        return BATCH
    if sizes and f.st(sizes[0]) == BSIZE and not any(f.st(s) for s in sizes[1:]):
        others = [n for n in node.all_input_nodes if f.st(n) and n is not sizes[0]]
        if name in _CREATE_LIKE_SELF:
            others = [n for n in others if n is not node.args[0]]
        f.check_not_size(node, others)
        return BATCH
    if name in _CREATE_LIKE_SELF and not any(
        f.st(n) for n in node.all_input_nodes if n is not node.args[0]
    ):
        return ""  # shape from literals: not batch-carrying
    f.refuse(node, "creates a tensor whose shape uses the batch size outside dim 0")
    return None


def _metadata(f: BatchFlow, node: fx.Node, name: str) -> None:
    return None


def _refuser(reason: str) -> Handler:
    def refuse(f: BatchFlow, node: fx.Node, name: str) -> None:
        f.refuse(node, reason)

    return refuse


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------
#: Looked up by the op's own name, before the in-place check: they read, never write.
ACCESS: tuple[Family, ...] = (
    Family("getitem", _names("getitem"), _getitem),
    Family("getattr", _names("getattr"), _getattr),
    Family("size", _names("size sym_size"), _size),
)

#: Looked up by the name without its in-place ``_``; no op is in two families.
FAMILIES: tuple[Family, ...] = (
    Family("metadata", _META_METHODS, _metadata),
    Family(
        "whole-batch read",
        _names("numel nelement sym_numel item tolist __len__ len"),
        _refuser("reads the batch size or values of the whole batch"),
    ),
    Family("max/min", _names("max min"), _max_min),
    Family("pointwise", POINTWISE, _pointwise),
    Family("dim-wise", frozenset(DIM_WISE), _dim_wise),
    Family("layer", frozenset(LAYERS), _layer),
    Family("per-sample", PER_SAMPLE, _per_sample),
    Family("matmul", _names("matmul mm bmm addmm baddbmm addbmm __matmul__"), _matmul),
    Family("cat", _names("cat concat concatenate stack"), _cat),
    Family("einsum", _names("einsum"), _einsum),
    Family("unfold", _names("unfold fold im2col col2im"), _unfold),
    Family("view", _names("view reshape _unsafe_view _reshape_alias"), _view),
    Family("view_as", _names("view_as reshape_as expand_as"), _like),
    Family("expand", _names("expand"), _expand),
    Family("repeat", _names("repeat tile"), _repeat),
    Family("flatten", _names("flatten"), _flatten),
    Family("unflatten", _names("unflatten"), _unflatten),
    Family("unsqueeze", _names("unsqueeze"), _unsqueeze),
    Family("squeeze", _names("squeeze"), _squeeze),
    Family("permute", _names("permute"), _permute),
    Family("transpose 2-D", _names("t T numpy_T"), _refuser("transposes the batch dim")),
    Family("slice", _names("slice"), _aten_slice),
    Family("pad", _names("pad constant_pad_nd reflection_pad1d reflection_pad2d"), _pad),
    Family("embedding", _names("embedding"), _embedding),
    Family("gather", _names("gather"), _gather),
    Family("attention", _names("scaled_dot_product_attention"), _attention),
    Family("create", _CREATE_LIKE_SELF | _CREATE, _create),
)


def _index(families: tuple[Family, ...]) -> dict[str, Family]:
    index: dict[str, Family] = {}
    for family in families:
        for op in family.ops:
            if op in index:
                raise AssertionError(f"{op!r} is in {index[op].name!r} and {family.name!r}")
            index[op] = family
    return index


_ACCESS_BY_OP = _index(ACCESS)
_BY_OP = _index(FAMILIES)

_UNKNOWN = "is an op the VDN analysis does not know"


_CARRIERS = (BATCH, BTUPLE, BNTUPLE, BSIZE, BSHAPE)


def apply_rule(f: BatchFlow, node: fx.Node) -> str | None:
    """The state of ``node`` (which has a batch-derived input), or raises ``BatchMixingError``.

    Rows per sample (:attr:`BatchFlow.rows`): a rule that reshapes sets the node's own; every
    other batch-derived node takes its inputs', which must agree."""
    state = _apply_rule(f, node)
    if state in _CARRIERS and node not in f.rows:
        rows = {f.rows_of(n) for n in node.all_input_nodes if f.st(n) in _CARRIERS}
        if len(rows) > 1:
            f.refuse(
                node,
                f"combines batch-carrying values with different rows per sample "
                f"{sorted(rows)} (one merges the batch with other dims), which misaligns samples",
            )
        if rows and (k := rows.pop()) != 1:
            f.rows[node] = k
    return state


def _apply_rule(f: BatchFlow, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return _module(f, node)
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        fname = op_name(node.target)
        if fname is None:
            f.refuse(node, _UNKNOWN)
        name = fname
    else:
        f.refuse(node, _UNKNOWN)
    access = _ACCESS_BY_OP.get(name)
    if access is not None:
        return access.handler(f, node, name)
    base, inplace = _strip_inplace(name)
    if inplace and f.st(node.args[0] if node.args else None) != BATCH:
        f.refuse(node, "writes batch-carrying values into a tensor that is not")
    family = _BY_OP.get(base)
    if family is None:
        f.refuse(node, _UNKNOWN)
    return family.handler(f, node, base)


# ---------------------------------------------------------------------------------------------
# Modules (call_module), the same table by type
# ---------------------------------------------------------------------------------------------
_MODULE_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_MODULE_PER_SAMPLE: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
    nn.CircularPad2d, nn.CircularPad3d, nn.LocalResponseNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding,
)  # fmt: skip

ModuleHandler = Callable[[BatchFlow, fx.Node, Any, "int | None"], "str | None"]


def _module_per_sample(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    return BTUPLE if getattr(mod, "return_indices", False) else BATCH


def _module_layer_norm(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    if rank is not None and len(mod.normalized_shape) >= rank:
        f.refuse(node, "normalises over the batch dim")
    return BATCH


def _module_flatten(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    if f.norm_dim(node, mod.start_dim, rank) == 0 and (
        rank is None or f.norm_dim(node, mod.end_dim, rank) != 0
    ):
        return _merge_rows(f, node, "flattens the batch dim into the features (use Flatten(1))")
    return BATCH


def _module_unflatten(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    if f.norm_dim(node, mod.dim, rank) == 0:
        out = f.shape(node)
        k = f.rows_per_sample(node, out[0]) if out else None
        if k is None or mod.unflattened_size[0] != -1:
            f.refuse(node, "unflattens the batch dim with a fixed first size (use -1)")
        f.rows[node] = k
    return BATCH


def _module_softmax(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    f.check_dims(node, mod.dim, rank, "normalises (softmax)")
    return BATCH


def _module_softmax2d(f: BatchFlow, node: fx.Node, mod: Any, rank: int | None) -> str:
    f.check_dims(node, -3, rank, "normalises (softmax)")
    return BATCH


#: (module types, handler), first match wins.
MODULE_FAMILIES: tuple[tuple[tuple[type[nn.Module], ...], ModuleHandler], ...] = (
    (_MODULE_POINTWISE, lambda f, node, mod, rank: BATCH),
    (_MODULE_PER_SAMPLE, _module_per_sample),
    ((nn.LayerNorm,), _module_layer_norm),
    ((nn.Flatten,), _module_flatten),
    ((nn.Unflatten,), _module_unflatten),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), _module_softmax),
    ((nn.Softmax2d,), _module_softmax2d),
)


def is_guard(node: fx.Node) -> bool:
    """torch.export's input guards (``_guards_fn``): they keep seeing the user's inputs."""
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


def _module(f: BatchFlow, node: fx.Node) -> str | None:
    if is_guard(node):
        return None
    mod = f.gm.get_submodule(str(node.target))
    x = node.args[0] if node.args else None
    others = [n for n in node.all_input_nodes if n is not x and f.st(n)]
    if f.st(x) != BATCH or others:
        f.refuse(node, f"calls {type(mod).__name__} with batch-carrying secondary inputs")
    rank = f.rank(x)
    for types, handler in MODULE_FAMILIES:
        if isinstance(mod, types):
            return handler(f, node, mod, rank)
    f.refuse(node, f"calls the module {type(mod).__name__}, which the VDN analysis does not know")
    return None
