"""Batch-independence analysis of the VDN pass: may virtual rows travel through this graph?

A flag "batch-carrying, dim 0 is the batch" is propagated from the batch inputs of a graph; every
node that touches a batch-carrying value must match a rule that proves it treats samples
independently (convolutions, linear layers and matmuls with the weight on the right, pointwise ops
with broadcasting that does not reach dim 0, pooling, dropout, per-sample reshapes such as
``flatten(1)`` or ``view(x.size(0), -1)``, reductions, softmax, ``cat``/``stack``/``split`` over
dims >= 1, indexing that keeps dim 0 whole, the BN itself). Anything else -- a reduction over dim
0, a view that merges the batch dim, a matmul across the batch, an op the analysis does not know --
raises :class:`BatchMixingError` (a ``ValueError``) that names the node and says why. The analysis
only reads the graph; :mod:`bnrewrite.passes.vdn` rewrites it once the analysis has passed, using
what :func:`analyze` returns (batch-carrying nodes, sizes equal to ``N`` that must become
``N + V``, outputs to slice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from bnrewrite.config import SamplingConfig

from .fx import BatchNormSite, _as_patterns, find_batch_norm_nodes, select_config

__all__ = ["BatchMixingError", "Analysis", "analyze"]

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class BatchMixingError(ValueError):
    """The graph cannot be proven to treat samples independently; names the node and the reason."""

    def __init__(self, node: str, what: str, reason: str) -> None:
        self.node = node
        self.reason = reason
        super().__init__(
            f"VDN refused: node {node!r} ({what}) {reason}. VDN carries virtual rows through the "
            f"whole graph and needs every op between the batch inputs and the outputs to treat "
            f"samples independently; nothing was rewritten"
        )


# ---------------------------------------------------------------------------------------------
# Analysis states
# ---------------------------------------------------------------------------------------------
BATCH = "batch"  # tensor whose dim 0 is the batch
BTUPLE = "btuple"  # tuple/list of batch tensors
BNTUPLE = "bntuple"  # tuple output of a BN op: item 0 is batch, the others are statistics
BSIZE = "bsize"  # an int equal to the batch size N (becomes N + V)
BSHAPE = "bshape"  # a torch.Size whose item 0 is the batch size

_VALUE_META = ("val", "example_value")


def _fn_name(target: Any) -> str | None:
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


_POINTWISE = set(
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
    """.split()
)
# ops whose tensor arguments besides the first are not broadcast (dtype/device donors)
_NO_BROADCAST = {"to", "type_as", "type", "zeros_like", "ones_like", "empty_like", "full_like"}
_PER_SAMPLE = set(
    """
    max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d lp_pool1d lp_pool2d lp_pool3d
    fractional_max_pool2d fractional_max_pool3d max_pool2d_with_indices max_pool3d_with_indices
    interpolate upsample upsample_nearest upsample_bilinear upsample_nearest1d upsample_nearest2d
    upsample_nearest3d upsample_bilinear2d upsample_bicubic2d upsample_linear1d
    upsample_trilinear3d pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
    local_response_norm group_norm native_group_norm instance_norm native_layer_norm
    """.split()
)
_TUPLE_OUT = {
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "native_group_norm",
    "native_layer_norm",
    "native_dropout",
}
_LAYERS = {  # name -> (positions that must not be batch-carrying)
    "conv1d": (1, 2),
    "conv2d": (1, 2),
    "conv3d": (1, 2),
    "conv_transpose1d": (1, 2),
    "conv_transpose2d": (1, 2),
    "conv_transpose3d": (1, 2),
    "convolution": (1, 2),
    "_convolution": (1, 2),
    "linear": (1, 2),
    "layer_norm": (2, 3),
}
# reductions / dim-wise ops: name -> (position of dim, keyword names, default, tuple output)
_DIM_REDUCE: dict[str, tuple[int, tuple[str, ...], Any, bool]] = {
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
    "unflatten": (1, ("dim",), None, False),
    "diff": (2, ("dim",), -1, False),
    "sort": (1, ("dim",), -1, True),
    "argsort": (1, ("dim",), -1, False),
    "topk": (2, ("dim",), -1, True),
    "repeat_interleave": (2, ("dim",), None, False),
    "flip": (1, ("dims",), None, False),
    "roll": (2, ("dims",), None, False),
    "transpose": (1, ("dim0",), None, False),  # both dims checked below
    "swapaxes": (1, ("axis0",), None, False),
    "swapdims": (1, ("dim0",), None, False),
    "movedim": (1, ("source",), None, False),
    "moveaxis": (1, ("source",), None, False),
}
_SECOND_DIM = {"transpose": (2, "dim1"), "swapaxes": (2, "axis1"), "swapdims": (2, "dim1")}
_SECOND_DIM.update({"movedim": (2, "destination"), "moveaxis": (2, "destination")})
_VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias"}
_CREATE_LIKE_SELF = {"new_zeros", "new_ones", "new_empty", "new_full"}
_CREATE = {"zeros", "ones", "empty", "full", "randn", "rand", "randint"}
_META_ATTRS = {
    "dtype",
    "device",
    "ndim",
    "is_cuda",
    "layout",
    "requires_grad",
    "is_sparse",
    "is_quantized",
}
_META_METHODS = {
    "dim",
    "ndimension",
    "is_contiguous",
    "element_size",
    "get_device",
    "is_floating_point",
    "stride",
    "sym_stride",
}

_MODULE_POINTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_MODULE_PER_SAMPLE: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    nn.LocalResponseNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Embedding,
)


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    for key in _VALUE_META:
        if key in node.meta:
            return node.meta[key]
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal sizes (ints, or SymInts with the same expression); never adds guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return str(a) == str(b)
    return False


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Analysis:
    """Result of :func:`analyze`: node states, the BN decisions and the pending literal edits."""

    state: dict[fx.Node, str]
    batch_inputs: list[fx.Node]
    size_placeholders: list[fx.Node]  # SymInt placeholders equal to the batch size
    bn: list[tuple[BatchNormSite, SamplingConfig | None]]  # (site, config) to rewrite
    skipped: list[tuple[str, str]]
    edits: list[tuple[fx.Node, Callable[[int], None]]]  # literal N -> N + V
    batch_size: Any  # N from the example values (int or SymInt), None when unknown
    outputs: list[fx.Node]  # batch-carrying output leaves
    specialized: bool


class _Analyzer:
    def __init__(
        self,
        gm: fx.GraphModule,
        config: SamplingConfig,
        batch_inputs: Sequence[str] | None,
        traced: bool,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        overrides: Mapping[str, Any] | None,
    ) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.config = config
        self.traced = traced
        self.include, self.exclude, self.overrides = include, exclude, overrides
        self.state: dict[fx.Node, str] = {}
        self.edits: list[tuple[fx.Node, Callable[[int], None]]] = []
        self.bn: list[tuple[BatchNormSite, SamplingConfig | None]] = []
        self.skipped: list[tuple[str, str]] = []
        self.outputs: list[fx.Node] = []
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.specialized = any(_val(p) is not None for p in placeholders)
        self.batch_inputs = self._batch_inputs(placeholders, batch_inputs)
        self.batch_size = self._batch_size()
        self.size_placeholders = [
            p
            for p in placeholders
            if isinstance(_val(p), torch.SymInt) and _same(_val(p), self.batch_size)
        ]

    # -- inputs ---------------------------------------------------------------------------------
    def _batch_inputs(
        self, placeholders: list[fx.Node], names: Sequence[str] | None
    ) -> list[fx.Node]:
        if names is not None:
            wanted = set(names)
            chosen = [
                p
                for p in placeholders
                if p.name in wanted or str(p.target) in wanted or self._source(p) in wanted
            ]
            missing = wanted - {p.name for p in chosen} - {str(p.target) for p in chosen}
            missing -= {self._source(p) for p in chosen}
            if missing:
                raise ValueError(
                    f"batch_inputs names {sorted(missing)} are not placeholders of the graph; "
                    f"placeholders are {[p.name for p in placeholders]}"
                )
            return chosen
        chosen = []
        for p in placeholders:
            val = _val(p)
            if val is not None and not isinstance(val, Tensor):
                continue  # SymInt / constant placeholders
            grapharg = p.meta.get("grapharg")
            if grapharg is not None:
                source = getattr(grapharg, "source", None)
                if type(source).__name__ != "LocalSource":
                    continue  # a parameter/buffer of self, a global, ...
                example = getattr(grapharg, "example", None)
                if isinstance(example, nn.Parameter):
                    continue
                if self._source(p) in ("L['self']",):
                    continue
            if isinstance(val, Tensor) and val.dim() == 0:
                continue  # a scalar tensor has no batch dim
            chosen.append(p)
        if not chosen:
            raise ValueError(
                "VDN refused: the graph has no batch input (a tensor placeholder that is not a "
                "parameter or buffer); pass batch_inputs=[...] to name them"
            )
        return chosen

    @staticmethod
    def _source(p: fx.Node) -> str:
        grapharg = p.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None:
            return ""
        name = source.name
        return name() if callable(name) else str(name)

    def _batch_size(self) -> Any:
        sizes = []
        for p in self.batch_inputs:
            val = _val(p)
            if isinstance(val, Tensor):
                sizes.append(val.shape[0])
            else:
                shape = self._shape(p)
                if shape is not None:
                    sizes.append(shape[0])
        for a, b in zip(sizes, sizes[1:], strict=False):
            if not _same(a, b):
                raise ValueError(
                    f"VDN refused: the batch inputs {[p.name for p in self.batch_inputs]} have "
                    f"different sizes along dim 0 ({sizes}); name the batch inputs with "
                    f"batch_inputs=[...]"
                )
        return sizes[0] if sizes else None

    # -- helpers ----------------------------------------------------------------------------------
    def _shape(self, node: Any) -> tuple[Any, ...] | None:
        if not isinstance(node, fx.Node):
            if isinstance(node, Tensor):
                return tuple(node.shape)
            if isinstance(node, (int, float, bool)):
                return ()
            return None
        val = _val(node)
        if isinstance(val, Tensor):
            return tuple(val.shape)
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(tm.shape)
        if node.op == "get_attr":
            try:
                obj = _fetch_attr(self.gm, str(node.target))
            except AttributeError:
                return None
            if isinstance(obj, Tensor):
                return tuple(obj.shape)
        return None

    def _rank(self, node: Any) -> int | None:
        shape = self._shape(node)
        return None if shape is None else len(shape)

    def st(self, value: Any) -> str | None:
        return self.state.get(value) if isinstance(value, fx.Node) else None

    def refuse(self, node: fx.Node, reason: str) -> None:
        raise BatchMixingError(node.name, _describe(node), reason)

    def _arg(self, node: fx.Node, pos: int, names: Sequence[str] = (), default: Any = None) -> Any:
        for name in names:
            if name in node.kwargs:
                return node.kwargs[name]
        if len(node.args) > pos:
            return node.args[pos]
        return default

    def _norm_dim(self, node: fx.Node, dim: Any, rank: int | None, extra: int = 0) -> int:
        """Non-negative dim; refuses symbolic dims and negative dims of unknown rank."""
        if isinstance(dim, fx.Node) or not isinstance(dim, int):
            self.refuse(node, f"has a dim argument {dim!r} that is not a constant int")
        if dim >= 0:
            return dim
        if rank is None:
            self.refuse(
                node,
                f"uses the negative dim {dim} on a batch-carrying tensor of unknown rank, which "
                f"may be the batch dim; pass example_inputs=(...) so the pass knows the shapes",
            )
        return dim + rank + extra

    def _check_dims(self, node: fx.Node, dims: Any, rank: int | None, what: str) -> None:
        if dims is None:
            self.refuse(node, f"{what} over every dim, including the batch dim (dim 0)")
        seq = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if not seq:
            self.refuse(node, f"{what} over every dim (empty dim list), including the batch dim")
        for d in seq:
            if self._norm_dim(node, d, rank) == 0:
                self.refuse(node, f"{what} over the batch dim (dim 0), which mixes samples")

    def _tensor_args(self, node: fx.Node) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), out.append)
        return out

    def _check_not_size(self, node: fx.Node, nodes: Sequence[fx.Node]) -> None:
        for n in nodes:
            if self.st(n) in (BSIZE, BSHAPE):
                self.refuse(
                    node,
                    f"uses the batch size ({n.name}) as a value; inside the VDN graph it is "
                    f"N + V, so only per-sample reshapes and tensor creation may use it",
                )
            if self.st(n) in (BTUPLE, BNTUPLE):
                self.refuse(node, f"uses the tuple {n.name} as a whole")

    def _batch_rank(self, nodes: Sequence[fx.Node], node: fx.Node) -> int | None:
        ranks = {self._rank(n) for n in nodes if self.st(n) == BATCH} - {None}
        if len(ranks) > 1:
            self.refuse(
                node,
                f"combines batch-carrying tensors of different ranks {sorted(ranks)}, so "
                f"broadcasting would align dim 0 of one with another dim of the other",
            )
        return next(iter(ranks)) if ranks else None

    def _check_broadcast(self, node: fx.Node, args: Sequence[Any]) -> None:
        rank = self._batch_rank([a for a in args if isinstance(a, fx.Node)], node)
        for a in args:
            if not isinstance(a, fx.Node) or self.st(a) == BATCH:
                continue
            shape = self._shape(a)
            if shape is None or rank is None:
                continue
            if len(shape) > rank:
                self.refuse(
                    node,
                    f"broadcasts the batch-carrying operand (rank {rank}) against {a.name} of "
                    f"shape {list(shape)}, which moves the batch dim",
                )
            if len(shape) == rank and not _same(shape[0], 1):
                self.refuse(
                    node,
                    f"combines the batch with {a.name} of shape {list(shape)}, which is not "
                    f"batch-carrying but has a dim 0 of size {shape[0]} (a tensor tied to one "
                    f"batch size)",
                )

    def _literal_batch(self, node: fx.Node, value: Any, out_dim0: Any) -> bool:
        """A literal int in the batch position of a shape-specialized graph equal to N."""
        return (
            self.specialized
            and isinstance(value, int)
            and isinstance(self.batch_size, int)
            and value == self.batch_size
            and (out_dim0 is None or _same(out_dim0, self.batch_size))
        )

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> Analysis:
        sites = {site.node: site for site in find_batch_norm_nodes(self.gm)}
        batch = set(self.batch_inputs)
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node in batch:
                    self.state[node] = BATCH
                elif node in self.size_placeholders:
                    self.state[node] = BSIZE
                continue
            if node.op == "output":
                self._output(node)
                continue
            if node.op == "get_attr":
                continue
            if node in sites:
                result = self._batch_norm(node, sites[node])
            else:
                inputs = node.all_input_nodes
                if not any(self.st(n) for n in inputs):
                    continue
                result = self._rule(node)
            if result:
                self.state[node] = result
            self._sanity(node)
        return Analysis(
            state=self.state,
            batch_inputs=self.batch_inputs,
            size_placeholders=self.size_placeholders,
            bn=self.bn,
            skipped=self.skipped,
            edits=self.edits,
            batch_size=self.batch_size,
            outputs=self.outputs,
            specialized=self.specialized,
        )

    def _sanity(self, node: fx.Node) -> None:
        """In graphs with example values, a batch-carrying node must have dim 0 == N."""
        if self.st(node) != BATCH or self.batch_size is None:
            return
        shape = self._shape(node)
        if shape is not None and (not shape or not _same(shape[0], self.batch_size)):
            self.refuse(
                node,
                f"produces shape {list(shape)} from batch-carrying inputs, whose dim 0 is not "
                f"the batch size {self.batch_size}",
            )

    def _output(self, node: fx.Node) -> None:
        def visit(a: fx.Node) -> fx.Node:
            s = self.st(a)
            if s == BATCH:
                if a not in self.outputs:
                    self.outputs.append(a)
            elif s in (BSIZE, BSHAPE):
                self.refuse(node, f"returns {a.name}, which depends on the batch size")
            elif s in (BTUPLE, BNTUPLE):
                self.refuse(node, f"returns the tuple {a.name} as a whole; return its items")
            return a

        fx.node.map_arg(node.args, visit)

    # -- BatchNorm --------------------------------------------------------------------------------
    def _batch_norm(self, node: fx.Node, site: BatchNormSite) -> str | None:
        x = node.args[0] if node.args else None
        if site.form != "module":
            x = site.args.get("input")
        if self.st(x) != BATCH:
            others = [n for n in node.all_input_nodes if self.st(n)]
            if others:
                self.refuse(node, "takes batch-carrying statistics or parameters")
            return None
        tuple_out = site.spec is not None and site.spec.tuple_out
        out = BNTUPLE if tuple_out else BATCH
        if site.reason is None:
            chosen = select_config(
                site.name, self.config, self.include, self.exclude, self.overrides
            )
            self._require_vdn(node, site, chosen)
            self.bn.append((site, chosen))
            return out
        if site.reason == "eval mode":
            if site.form == "module" or (self.traced and self._has_owner(site)):
                # A frozen (eval) BN stays frozen, but is swapped for its VDN twin so that a later
                # .train() does not give it batch statistics over real and virtual rows.
                chosen = select_config(
                    site.name, self.config, self.include, self.exclude, self.overrides
                )
                if chosen is not None and chosen.uses_virtual_rows:
                    self._require_vdn(node, site, chosen)
                    self.bn.append((dataclasses.replace(site, reason=None), chosen))
                    return out
            self.skipped.append((site.name, "eval mode (per-sample, left alone)"))
            return out
        if site.reason == "already rewritten" and self._is_vdn_op(node):
            self.skipped.append((site.name, "already rewritten with VDN"))
            return out
        self.refuse(
            node,
            f"is a training-mode BatchNorm ({site.name}) that cannot be rewritten "
            f"({site.reason}); its batch statistics would mix real and virtual rows",
        )
        return None

    def _require_vdn(
        self, node: fx.Node, site: BatchNormSite, chosen: SamplingConfig | None
    ) -> None:
        if chosen is None or not chosen.uses_virtual_rows:
            what = "filtered out" if chosen is None else f"given method {chosen.method!r}"
            self.refuse(
                node,
                f"is a training-mode BatchNorm ({site.name}) {what}; under VDN every "
                f"training-mode BN must use 'vdn' or 'fs_vdn', since batch statistics would mix "
                f"real and virtual rows",
            )
        if chosen.vdn_samples != self.config.vdn_samples:
            self.refuse(
                node,
                f"is given vdn_samples={chosen.vdn_samples} but the graph carries "
                f"{self.config.vdn_samples} virtual rows; all BNs must use the same vdn_samples",
            )

    def _has_owner(self, site: BatchNormSite) -> bool:
        rm = site.args.get("running_mean")
        if not isinstance(rm, fx.Node) or rm.op != "get_attr":
            return False
        owner = str(rm.target).rpartition(".")[0]
        try:
            self.gm.get_submodule(owner)
        except AttributeError:
            return False
        return True

    def _is_vdn_op(self, node: fx.Node) -> bool:
        from bnrewrite.ops import config_from_str

        text = node.args[-1] if node.args else None
        if not isinstance(text, str):
            return False
        try:
            cfg = config_from_str(text)
        except ValueError:
            return False
        return cfg.uses_virtual_rows and cfg.vdn_samples == self.config.vdn_samples

    # -- rules ------------------------------------------------------------------------------------
    def _rule(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            return self._module(node)
        if node.op == "call_method":
            name = str(node.target)
        elif node.op == "call_function":
            fname = _fn_name(node.target)
            if fname is None:
                self.refuse(node, "is an op the VDN analysis does not know")
            name = fname
        else:
            self.refuse(node, "is an op the VDN analysis does not know")
        base, inplace = _strip_inplace(name)
        if name in ("getitem",):
            return self._getitem(node)
        if name == "getattr":
            return self._getattr(node)
        if name in ("size", "sym_size"):
            return self._size(node)
        if inplace and self.st(node.args[0] if node.args else None) != BATCH:
            self.refuse(node, "writes batch-carrying values into a tensor that is not")
        if base in _META_METHODS:
            return None
        if base in ("numel", "nelement", "sym_numel", "item", "tolist", "__len__", "len"):
            self.refuse(node, "reads the batch size or values of the whole batch")
        if base in ("max", "min"):
            second = self._arg(node, 1, ("dim", "other"))
            if isinstance(second, fx.Node):
                return self._pointwise(node, base)
            if second is None:
                self.refuse(node, "reduces over every dim, including the batch dim (dim 0)")
            return self._dims(node, base, 1, ("dim",), None, True)
        if base in _POINTWISE:
            return self._pointwise(node, base)
        if base in _DIM_REDUCE:
            pos, kws, default, tup = _DIM_REDUCE[base]
            return self._dims(node, base, pos, kws, default, tup)
        if base in _LAYERS:
            return self._layer(node, base)
        if base in _PER_SAMPLE:
            return self._per_sample(node, base)
        if base in ("matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "__matmul__"):
            return self._matmul(node, base)
        if base in ("cat", "concat", "concatenate", "stack"):
            return self._cat(node, base)
        if base in _VIEWS:
            return self._view(node)
        if base in ("view_as", "reshape_as", "expand_as"):
            other = self._arg(node, 1, ("other",))
            if self.st(node.args[0]) == BATCH and self.st(other) == BATCH:
                return BATCH
            if base == "expand_as" and self.st(other) == BATCH:
                return BATCH
            self.refuse(node, "reshapes between a batch-carrying and a non-batch tensor")
        if base == "expand":
            return self._expand(node)
        if base in ("repeat", "tile"):
            return self._repeat(node, base)
        if base == "flatten":
            x = node.args[0]
            start = self._arg(node, 1, ("start_dim",), 0)
            end = self._arg(node, 2, ("end_dim",), -1)
            rank = self._rank(x)
            if self._norm_dim(node, start, rank) == 0:
                if end == 0 or (rank is not None and self._norm_dim(node, end, rank) == 0):
                    return BATCH  # flatten(0, 0): nothing merged
                self.refuse(node, "flattens the batch dim into the features (use flatten(1))")
            return BATCH
        if base == "unsqueeze":
            d = self._arg(node, 1, ("dim",))
            if self._norm_dim(node, d, self._rank(node.args[0]), extra=1) == 0:
                self.refuse(node, "inserts a dim before the batch dim")
            return BATCH
        if base == "squeeze":
            d = self._arg(node, 1, ("dim",))
            if d is None:
                self.refuse(
                    node,
                    "squeezes every size-1 dim, which drops the batch dim when N == 1 but not "
                    "once the virtual rows are appended; name the dims",
                )
            self._check_dims(node, d, self._rank(node.args[0]), "squeezes")
            return BATCH
        if base == "permute":
            dims = node.args[1:] if len(node.args) > 2 else self._arg(node, 1, ("dims",))
            dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
            if not dims or self._norm_dim(node, dims[0], self._rank(node.args[0])) != 0:
                self.refuse(node, "moves the batch dim away from dim 0")
            return BATCH
        if base in ("t", "T", "numpy_T"):
            self.refuse(node, "transposes the batch dim")
        if base in ("slice",):
            return self._aten_slice(node)
        if base in ("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d"):
            return self._pad(node)
        if base in ("embedding",):
            w, idx = (node.args[0], node.args[1]) if "aten" in str(node.target) else (None, None)
            if w is None:
                idx, w = node.args[0], self._arg(node, 1, ("weight",))
            if self.st(idx) == BATCH and not self.st(w):
                return BATCH
            self.refuse(node, "looks up batch-carrying weights")
        if base in ("gather",):
            d = self._arg(node, 1, ("dim",))
            idx = self._arg(node, 2, ("index",))
            self._check_dims(node, d, self._rank(node.args[0]), "gathers")
            if self.st(node.args[0]) == BATCH and self.st(idx) == BATCH:
                return BATCH
            self.refuse(node, "gathers with an index that is not batch-carrying")
        if base in ("scaled_dot_product_attention",):
            args = [a for a in self._tensor_args(node) if self.st(a)]
            ranks = [self._rank(a) for a in args]
            if any(r is None or r < 3 for r in ranks):
                self.refuse(node, "needs batched (rank >= 3) inputs to be per-sample")
            self._check_not_size(node, args)
            return BATCH
        if base in _CREATE_LIKE_SELF or base in _CREATE:
            return self._create(node, base)
        self.refuse(node, "is an op the VDN analysis does not know")
        return None

    def _pointwise(self, node: fx.Node, name: str) -> str:
        args = self._tensor_args(node)
        self._check_not_size(node, args)
        if name in _NO_BROADCAST:
            if self.st(node.args[0]) != BATCH:
                self.refuse(node, "takes dtype/device from a batch-carrying tensor oddly")
            return BATCH
        if name == "native_dropout":
            return BTUPLE
        self._check_broadcast(node, list(node.args) + list(node.kwargs.values()))
        return BATCH

    def _dims(
        self, node: fx.Node, name: str, pos: int, kws: tuple[str, ...], default: Any, tup: bool
    ) -> str:
        x = node.args[0] if node.args else self._arg(node, 0, ("input", "self"))
        if self.st(x) != BATCH:
            self._check_not_size(node, node.all_input_nodes)
            self.refuse(node, f"applies {name} to a non-batch tensor with batch-carrying arguments")
        others = [n for n in node.all_input_nodes if n is not x and self.st(n)]
        if name in ("cosine_similarity",):
            others = [n for n in others if self.st(n) != BATCH]
        self._check_not_size(node, others)
        if others and name not in ("cosine_similarity",):
            self.refuse(node, "takes a batch-carrying tensor as a secondary argument")
        rank = self._rank(x)
        dims = self._arg(node, pos, kws, default)
        verb = {
            "narrow": "narrows",
            "select": "selects",
            "index_select": "selects",
            "unbind": "unbinds",
            "chunk": "splits",
            "split": "splits",
            "split_with_sizes": "splits",
            "tensor_split": "splits",
        }.get(name, f"reduces ({name})")
        self._check_dims(node, dims, rank, verb)
        if name in _SECOND_DIM:
            p2, k2 = _SECOND_DIM[name]
            self._check_dims(node, self._arg(node, p2, (k2,)), rank, verb)
        return BTUPLE if tup else BATCH

    def _layer(self, node: fx.Node, name: str) -> str:
        x = node.args[0] if node.args else self._arg(node, 0, ("input",))
        if self.st(x) != BATCH:
            self.refuse(node, f"applies {name} with batch-carrying weights")
        for pos in _LAYERS[name]:
            if pos < len(node.args) and self.st(node.args[pos]):
                self.refuse(node, f"applies {name} with batch-carrying weights")
        for key in ("weight", "bias"):
            if self.st(node.kwargs.get(key)):
                self.refuse(node, f"applies {name} with batch-carrying weights")
        if name == "layer_norm":
            shape = self._arg(node, 1, ("normalized_shape",))
            rank = self._rank(x)
            if rank is not None and isinstance(shape, (list, tuple)) and len(shape) >= rank:
                self.refuse(node, "normalises over the batch dim")
        return BATCH

    def _per_sample(self, node: fx.Node, name: str) -> str:
        x = node.args[0] if node.args else self._arg(node, 0, ("input",))
        others = [n for n in node.all_input_nodes if n is not x and self.st(n)]
        if self.st(x) != BATCH or others:
            self.refuse(node, f"applies {name} with batch-carrying secondary arguments")
        if name in _TUPLE_OUT or node.kwargs.get("return_indices"):
            return BTUPLE
        return BATCH

    def _matmul(self, node: fx.Node, name: str) -> str:
        args = list(node.args)
        if name in ("addmm", "baddbmm", "addbmm"):
            bias, a, b = args[0], args[1], args[2]
            if self.st(bias):
                self._check_not_size(node, [bias])
        else:
            bias, a, b = None, args[0], args[1]
        sa, sb = self.st(a), self.st(b)
        self._check_not_size(node, [n for n in (a, b) if isinstance(n, fx.Node)])
        ra, rb = self._rank(a), self._rank(b)
        if sa == BATCH and sb != BATCH:
            if name in ("mm", "addmm") or (rb is not None and rb <= 2 and (ra is None or ra >= 2)):
                out = BATCH
            else:
                self.refuse(
                    node,
                    f"multiplies the batch by {getattr(b, 'name', b)} of rank {rb}; only a "
                    f"weight of rank <= 2 on the right is per-sample",
                )
        elif sa == BATCH and sb == BATCH:
            if name in ("bmm", "baddbmm") or (
                ra is not None and rb is not None and min(ra, rb) >= 3
            ):
                out = BATCH
            else:
                self.refuse(
                    node,
                    "multiplies two batch-carrying tensors of rank < 3 (or unknown rank), which "
                    "contracts over the batch",
                )
        elif sb == BATCH:
            if rb is not None and rb >= 3 and ra is not None and ra <= 2 and name == "matmul":
                out = BATCH
            else:
                self.refuse(node, "multiplies across the batch (batch-carrying right operand)")
        else:
            self.refuse(node, "multiplies with batch-carrying values in an unsupported position")
        if bias is not None and self.st(bias) != BATCH:
            self._check_broadcast(node, [a, bias])
        return out

    def _cat(self, node: fx.Node, name: str) -> str:
        tensors = self._arg(node, 0, ("tensors",))
        if not isinstance(tensors, (list, tuple)):
            self.refuse(node, f"{name}s a tuple node whose items the pass cannot see")
        states = [self.st(t) for t in tensors]
        if any(s != BATCH for s in states):
            self.refuse(
                node,
                f"{name}s batch-carrying tensors with non-batch ones; their dim 0 would not "
                f"match once the virtual rows are appended",
            )
        self._check_not_size(node, [n for n in node.all_input_nodes if n not in tensors])
        dim = self._arg(node, 1, ("dim", "axis"), 0)
        rank = self._rank(tensors[0])
        extra = 1 if name == "stack" else 0
        if self._norm_dim(node, dim, rank, extra=extra) == 0:
            self.refuse(node, f"{name}s along the batch dim (dim 0), which mixes samples")
        return BATCH

    def _sizes(self, node: fx.Node) -> list[Any]:
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, fx.Node)):
            sizes = node.args[1]
        elif "size" in node.kwargs or "shape" in node.kwargs:
            sizes = node.kwargs.get("size", node.kwargs.get("shape"))
        else:
            sizes = node.args[1:]
        if isinstance(sizes, fx.Node):
            return [sizes]
        return list(sizes)

    def _set_size0(self, node: fx.Node) -> Callable[[int], None]:
        def edit(new: int) -> None:
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

    def _view(self, node: fx.Node) -> str:
        x = node.args[0]
        if len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
            return self._pointwise(node, "view")
        if self.st(x) != BATCH:
            self.refuse(node, "reshapes a non-batch tensor with the batch size")
        sizes = self._sizes(node)
        if len(sizes) == 1 and self.st(sizes[0]) == BSHAPE:
            return BATCH  # x.view(y.shape) with y batch-carrying
        if not sizes:
            self.refuse(node, "reshapes to a scalar")
        first, rest = sizes[0], sizes[1:]
        for s in rest:
            if self.st(s):
                self.refuse(node, "puts the batch size in a non-batch position of the new shape")
        out = self._shape(node)
        inp = self._shape(x)
        if self.st(first) == BSIZE:
            return BATCH
        if isinstance(first, fx.Node):
            self.refuse(node, f"reshapes with a computed batch-position size ({first.name})")
        if out is not None and inp is not None and _same(out[0], inp[0]):
            if first == -1:
                return BATCH
            if self._literal_batch(node, first, out[0]):
                self.edits.append((node, self._set_size0(node)))
                return BATCH
        if first == -1 and (out is None or inp is None):
            self.refuse(
                node,
                "reshapes with -1 in the batch position; without shapes the pass cannot prove "
                "it keeps samples apart (use x.size(0) / flatten(1), or pass example_inputs)",
            )
        self.refuse(
            node,
            f"reshapes with {first!r} in the batch position, which merges or splits the batch "
            f"dim (or bakes a literal batch size); use x.size(0) or flatten(1)",
        )
        return None

    def _expand(self, node: fx.Node) -> str:
        x = node.args[0]
        sizes = self._sizes(node)
        first, rest = (sizes[0] if sizes else None), sizes[1:]
        for s in rest:
            if self.st(s):
                self.refuse(node, "puts the batch size in a non-batch position")
        rank = self._rank(x)
        if self.st(x) == BATCH:
            if rank is not None and len(sizes) > rank:
                self.refuse(node, "adds leading dims before the batch dim")
            if first == -1 or self.st(first) == BSIZE:
                return BATCH
            out = self._shape(node)
            if self._literal_batch(node, first, out[0] if out else None):
                self.edits.append((node, self._set_size0(node)))
                return BATCH
            self.refuse(node, f"expands the batch dim to {first!r}")
        if self.st(first) == BSIZE:
            return BATCH  # a per-sample constant broadcast over the batch
        self.refuse(node, "expands with batch-carrying arguments")
        return None

    def _repeat(self, node: fx.Node, name: str) -> str:
        x = node.args[0]
        sizes = self._sizes(node)
        if self.st(x) != BATCH or any(self.st(s) for s in sizes):
            self.refuse(node, f"{name}s with batch-carrying arguments")
        rank = self._rank(x)
        if name == "tile" and (rank is None or len(sizes) < rank):
            self.refuse(node, "tiles with fewer reps than dims (rank unknown or smaller)")
        if rank is not None and len(sizes) > rank:
            self.refuse(node, f"{name}s with leading dims before the batch dim")
        if not sizes or sizes[0] != 1:
            self.refuse(node, f"{name}s the batch dim")
        return BATCH

    def _create(self, node: fx.Node, name: str) -> str:
        sizes = self._sizes(node) if name in _CREATE_LIKE_SELF else self._create_sizes(node)
        if len(sizes) == 1 and self.st(sizes[0]) == BSHAPE:
            return BATCH
        if sizes and self.st(sizes[0]) == BSIZE and not any(self.st(s) for s in sizes[1:]):
            others = [n for n in node.all_input_nodes if self.st(n) and n is not sizes[0]]
            if name in _CREATE_LIKE_SELF:
                others = [n for n in others if n is not node.args[0]]
            self._check_not_size(node, others)
            return BATCH
        if name in _CREATE_LIKE_SELF and not any(
            self.st(n) for n in node.all_input_nodes if n is not node.args[0]
        ):
            return ""  # shape from literals: not batch-carrying
        self.refuse(node, "creates a tensor whose shape uses the batch size outside dim 0")
        return None

    def _create_sizes(self, node: fx.Node) -> list[Any]:
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

    def _aten_slice(self, node: fx.Node) -> str:
        x = node.args[0]
        if self.st(x) != BATCH or any(self.st(a) for a in node.all_input_nodes if a is not x):
            self.refuse(node, "slices with batch-carrying bounds")
        dim = self._arg(node, 1, ("dim",), 0)
        if self._norm_dim(node, dim, self._rank(x)) != 0:
            return BATCH
        start = self._arg(node, 2, ("start",), None)
        end = self._arg(node, 3, ("end",), None)
        step = self._arg(node, 4, ("step",), 1)
        n = self.batch_size
        full_end = end is None or end >= (1 << 62) or (isinstance(n, int) and end == n)
        if start in (None, 0) and step == 1 and full_end:
            if isinstance(end, int) and isinstance(n, int) and end == n and end < (1 << 62):
                self.edits.append((node, lambda new, node=node: _set_arg(node, 3, "end", new)))
            return BATCH
        self.refuse(node, "selects some rows of the batch")
        return None

    def _pad(self, node: fx.Node) -> str:
        x = node.args[0]
        pad = self._arg(node, 1, ("pad", "padding"))
        if self.st(x) != BATCH or not isinstance(pad, (list, tuple)):
            self.refuse(node, "pads with batch-carrying or non-constant arguments")
        rank = self._rank(x)
        if rank is None or len(pad) // 2 >= rank:
            self.refuse(node, "pads the batch dim (or the rank is unknown; pass example_inputs)")
        return BATCH

    def _getitem(self, node: fx.Node) -> str | None:
        obj, idx = node.args[0], node.args[1]
        s = self.st(obj)
        if isinstance(idx, fx.Node) and self.st(idx) and s != BATCH:
            self.refuse(node, "indexes with a batch-carrying value")
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
            self.refuse(node, "takes a part of the shape that includes the batch size")
        if s in (BSIZE,):
            self.refuse(node, "indexes the batch size")
        if s != BATCH:
            # a non-batch container holding batch values (e.g. a list literal): be conservative
            self.refuse(node, "indexes a container of batch-carrying values")
        items = list(idx) if isinstance(idx, tuple) else [idx]
        first = items[0] if items else None
        rank = self._rank(obj)
        if first is Ellipsis:
            rest = [i for i in items[1:] if i is not None]
            if rank is None or len(rest) >= rank:
                self.refuse(node, "indexes with ... in front, which may reach the batch dim")
        elif not (isinstance(first, slice) and first == slice(None, None, None)):
            if isinstance(first, slice) and self._full_slice(first):
                pass
            else:
                self.refuse(
                    node,
                    f"indexes the batch dim with {first!r}, which selects or reorders samples",
                )
        tensors = [i for i in items[1:] if isinstance(i, fx.Node)]
        if len(tensors) > 1:
            self.refuse(node, "uses several tensor indices, which may move the batch dim")
        for t in tensors:
            if self.st(t):
                self.refuse(node, f"indexes with the batch-carrying tensor {t.name}")
            if isinstance(_val(t), Tensor) and _val(t).dtype == torch.bool:
                self.refuse(node, "indexes with a boolean mask")
        if isinstance(first, slice) and first != slice(None, None, None):
            self.edits.append((node, lambda new, node=node: _set_slice_end(node, new)))
        return BATCH

    def _full_slice(self, s: slice) -> bool:
        n = self.batch_size
        return (
            s.start in (None, 0)
            and s.step in (None, 1)
            and (s.stop is None or (isinstance(n, int) and s.stop == n and self.specialized))
        )

    def _getattr(self, node: fx.Node) -> str | None:
        obj, attr = node.args[0], node.args[1]
        s = self.st(obj)
        if s == BTUPLE and attr in ("values", "indices", "mean", "std"):
            return BATCH
        if s != BATCH:
            self.refuse(node, f"reads .{attr} of a batch-derived value")
        if attr == "shape":
            return BSHAPE
        if attr in _META_ATTRS:
            return None
        if attr in ("data", "real", "imag"):
            return BATCH
        if attr in ("mT", "mH"):
            rank = self._rank(obj)
            if rank is not None and rank >= 3:
                return BATCH
        self.refuse(node, f"reads .{attr}, which the VDN analysis does not know")
        return None

    def _size(self, node: fx.Node) -> str | None:
        x = node.args[0]
        if self.st(x) != BATCH:
            self.refuse(node, "takes the size of a batch-derived value")
        d = self._arg(node, 1, ("dim",))
        if d is None:
            return BSHAPE
        return BSIZE if self._norm_dim(node, d, self._rank(x)) == 0 else None

    # -- modules ----------------------------------------------------------------------------------
    def _module(self, node: fx.Node) -> str | None:
        if _is_guard(node):
            return None  # torch.export's input guards: they keep seeing the user's inputs
        mod = self.gm.get_submodule(str(node.target))
        x = node.args[0] if node.args else None
        others = [n for n in node.all_input_nodes if n is not x and self.st(n)]
        if self.st(x) != BATCH or others:
            self.refuse(node, f"calls {type(mod).__name__} with batch-carrying secondary inputs")
        rank = self._rank(x)
        if isinstance(mod, _MODULE_POINTWISE):
            return BATCH
        if isinstance(mod, _MODULE_PER_SAMPLE):
            if getattr(mod, "return_indices", False):
                return BTUPLE
            return BATCH
        if isinstance(mod, nn.LayerNorm):
            if rank is not None and len(mod.normalized_shape) >= rank:
                self.refuse(node, "normalises over the batch dim")
            return BATCH
        if isinstance(mod, nn.Flatten):
            if self._norm_dim(node, mod.start_dim, rank) == 0:
                self.refuse(node, "flattens the batch dim into the features (use Flatten(1))")
            return BATCH
        if isinstance(mod, nn.Unflatten):
            if self._norm_dim(node, mod.dim, rank) == 0:
                self.refuse(node, "unflattens the batch dim")
            return BATCH
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            self._check_dims(node, mod.dim, rank, "normalises (softmax)")
            return BATCH
        if isinstance(mod, nn.Softmax2d):
            self._check_dims(node, -3, rank, "normalises (softmax)")
            return BATCH
        self.refuse(
            node, f"calls the module {type(mod).__name__}, which the VDN analysis does not know"
        )
        return None


def _is_guard(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


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


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}"
    if node.op == "call_method":
        return f"call_method {node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
    return f"{node.op} {name}"


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def analyze(
    gm: fx.GraphModule,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    batch_inputs: Sequence[str] | None = None,
    traced: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Analysis:
    """The batch-independence analysis alone (nothing is modified); raises on a batch mix."""
    cfg = SamplingConfig.coerce(config if config is not None else "vdn")
    analyzer = _Analyzer(
        gm, cfg, batch_inputs, traced, _as_patterns(include), _as_patterns(exclude), overrides
    )
    return analyzer.run()
