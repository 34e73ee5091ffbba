"""What VDN's batch-independence walk knows about each value, and the checks the rules share.

A node of the graph is in one of five *states* (or none: it does not depend on the batch):

====================  ========================================================================
``BATCH``             a tensor whose dim 0 is the batch (it becomes ``N + V`` rows)
``BTUPLE``            a tuple/list of ``BATCH`` tensors (``split``, ``max_pool(return_indices)``)
``BNTUPLE``           the tuple output of a BN op: item 0 is ``BATCH``, the others statistics
``BSIZE``             an int equal to the batch size ``N`` (it becomes ``N + V``)
``BSHAPE``            a ``torch.Size`` whose item 0 is the batch size
====================  ========================================================================

**Rows per sample.** A batch-carrying tensor may hold each sample in ``k`` consecutive rows of
dim 0 (``BatchFlow.rows``, absent means ``k = 1``): ``flatten(0, 1)`` of ``(N, T, C)``,
``reshape(N * T, C)``, ``x.view(-1, C)`` -- a row-major merge of the batch with the dims after it
keeps every sample's values together, so row-wise ops still treat samples independently; the
virtual rows are then the last ``V * k`` rows, and a BatchNorm over such a tensor takes its
statistics there. A size may carry ``k`` too (``BSIZE`` with ``k``: the value ``N * k``). A
reshape's ``k`` is its dim 0 divided by ``N`` (it must be a whole number: anything else cuts a
sample across rows and is refused); a reshape back to ``N`` rows returns to ``k = 1``. Ops that
combine batch-carrying values need the same ``k``; outputs need ``k = 1``.

:class:`BatchFlow` holds the states, the literal edits ``N -> N + V`` the rewrite must make, and
the checks every rule uses (:meth:`BatchFlow.check_dims`: a dim argument never names dim 0;
:meth:`BatchFlow.check_broadcast`: broadcasting never reaches dim 0). A rule that cannot prove a
node per-sample calls :meth:`BatchFlow.refuse`, which raises :class:`BatchMixingError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from .capture import user_line
from .fx import _normalize_qualname

__all__ = [
    "BATCH",
    "BNTUPLE",
    "BSHAPE",
    "BSIZE",
    "BTUPLE",
    "BatchFlow",
    "BatchMixingError",
    "describe",
    "value_of",
    "same_size",
    "where_from",
    "WITHOUT_EDITING",
]

BATCH = "batch"  # tensor whose dim 0 is the batch
BTUPLE = "btuple"  # tuple/list of batch tensors
BNTUPLE = "bntuple"  # tuple output of a BN op: item 0 is batch, the others are statistics
BSIZE = "bsize"  # an int equal to the batch size N (becomes N + V)
BSHAPE = "bshape"  # a torch.Size whose item 0 is the batch size

_VALUE_META = ("val", "example_value")


#: What a user can do about a refusal without editing the model's code.
WITHOUT_EDITING = (
    "Without editing the model: the per-node methods need no batch independence (method 'fs' "
    "instead of 'fs_vdn', 'bs' or 'fs' instead of 'vdn', through bnrewrite.rewrite, "
    "bnrewrite.convert_ or the torch.compile backend); name the batch inputs with "
    "batch_inputs=[...] if an input that is not the batch was taken for one"
)


class BatchMixingError(ValueError):
    """The graph cannot be proven to treat samples independently; names the node, where it comes
    from (module path and source line, where the graph records them) and the reason."""

    def __init__(self, node: str, what: str, reason: str, where: str = "") -> None:
        self.node = node
        self.reason = reason
        self.where = where
        at = f" {where}" if where else ""
        super().__init__(
            f"VDN refused: node {node!r} ({what}){at} {reason}. VDN carries virtual rows through "
            f"the whole graph and needs every op between the batch inputs and the outputs to "
            f"treat samples independently; nothing was rewritten. {WITHOUT_EDITING}"
        )


def where_from(node: fx.Node) -> str:
    """``in module <path> (<type>), at <file>:<line>: <code>`` from the node's ``nn_module_stack``
    and ``stack_trace`` meta (Dynamo, export and make_fx graphs record them; ``symbolic_trace``
    graphs have the module path of ``call_module`` nodes only)."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1][:2]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
        path = _normalize_qualname(str(path))
        if path:
            parts.append(f"in module {path} ({kind_name.rsplit('.', 1)[-1]})")
    elif node.op == "call_module":
        parts.append(f"in module {node.target}")
    trace = node.meta.get("stack_trace")
    line = user_line(trace) if trace else None
    if line:
        parts.append(f"at {line}")
    return ", ".join(parts)


def value_of(node: Any) -> Any:
    """The example value of a node (``meta["val"]`` or ``meta["example_value"]``), else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    for key in _VALUE_META:
        if key in node.meta:
            return node.meta[key]
    return None


def same_size(a: Any, b: Any) -> bool:
    """Equal sizes (ints, or SymInts with the same expression); never adds guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return str(a) == str(b)
    return False


def _expr(size: Any) -> Any:
    import sympy

    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def describe(node: fx.Node) -> str:
    """``call_module layer1.0``, ``call_function aten.view.default``, ..., for error messages."""
    if node.op == "call_module":
        return f"call_module {node.target}"
    if node.op == "call_method":
        return f"call_method {node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
    return f"{node.op} {name}"


def fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass
class BatchFlow:
    """The states of the nodes seen so far, the pending literal edits, and the shared checks."""

    gm: fx.GraphModule
    batch_size: Any  # N from the example values (int or SymInt), None when unknown
    specialized: bool  # the graph carries example values (shapes are known)
    state: dict[fx.Node, str] = dataclasses.field(default_factory=dict)
    edits: list[tuple[fx.Node, Callable[[int], None]]] = dataclasses.field(default_factory=list)
    #: rows of dim 0 per sample, where it is not 1 (see the module docstring)
    rows: dict[fx.Node, int] = dataclasses.field(default_factory=dict)

    def rows_of(self, value: Any) -> int:
        return self.rows.get(value, 1) if isinstance(value, fx.Node) else 1

    def rows_per_sample(self, node: fx.Node, dim0: Any) -> int | None:
        """``dim0 / N`` for a reshape of a batch-carrying tensor to ``dim0`` rows: a positive whole
        number (a sample's values stay in ``k`` whole rows), else refused; ``None`` when ``N`` or
        ``dim0`` is unknown."""
        n = self.batch_size
        if n is None or dim0 is None:
            return None
        if isinstance(n, int) and isinstance(dim0, int):
            if n == 1 and dim0 != 1:
                self.refuse(
                    node,
                    f"reshapes the batch to {dim0} rows, and with an example batch of one "
                    f"sample the pass cannot tell merged batch rows from other dims; give "
                    f"example inputs with 2 or more samples",
                )
            if dim0 > 0 and dim0 % n == 0:
                return dim0 // n
        elif isinstance(n, (int, torch.SymInt)) and isinstance(dim0, (int, torch.SymInt)):
            import sympy

            ratio = sympy.simplify(_expr(dim0) / _expr(n))
            if ratio.is_Integer and int(ratio) > 0:
                return int(ratio)
        self.refuse(
            node,
            f"reshapes the batch ({n} samples) to {dim0} rows, not a whole number of rows per "
            f"sample, which cuts samples across rows",
        )
        return None

    # -- reading --------------------------------------------------------------------------------
    def st(self, value: Any) -> str | None:
        return self.state.get(value) if isinstance(value, fx.Node) else None

    def shape(self, node: Any) -> tuple[Any, ...] | None:
        if not isinstance(node, fx.Node):
            if isinstance(node, Tensor):
                return tuple(node.shape)
            if isinstance(node, (int, float, bool)):
                return ()
            return None
        val = value_of(node)
        if isinstance(val, Tensor):
            return tuple(val.shape)
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(tm.shape)
        if node.op == "get_attr":
            try:
                obj = fetch_attr(self.gm, str(node.target))
            except AttributeError:
                return None
            if isinstance(obj, Tensor):
                return tuple(obj.shape)
        return None

    def rank(self, node: Any) -> int | None:
        shape = self.shape(node)
        return None if shape is None else len(shape)

    @staticmethod
    def arg(node: fx.Node, pos: int, names: Sequence[str] = (), default: Any = None) -> Any:
        for name in names:
            if name in node.kwargs:
                return node.kwargs[name]
        if len(node.args) > pos:
            return node.args[pos]
        return default

    @staticmethod
    def tensor_args(node: fx.Node) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), out.append)
        return out

    # -- checks ---------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, reason: str) -> None:
        raise BatchMixingError(node.name, describe(node), reason, where_from(node))

    def norm_dim(self, node: fx.Node, dim: Any, rank: int | None, extra: int = 0) -> int:
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

    def check_dims(self, node: fx.Node, dims: Any, rank: int | None, what: str) -> None:
        if dims is None:
            self.refuse(node, f"{what} over every dim, including the batch dim (dim 0)")
        seq = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if not seq:
            self.refuse(node, f"{what} over every dim (empty dim list), including the batch dim")
        for d in seq:
            if self.norm_dim(node, d, rank) == 0:
                self.refuse(node, f"{what} over the batch dim (dim 0), which mixes samples")

    def check_not_size(self, node: fx.Node, nodes: Sequence[fx.Node]) -> None:
        for n in nodes:
            if self.st(n) in (BSIZE, BSHAPE):
                self.refuse(
                    node,
                    f"uses the batch size ({n.name}) as a value; inside the VDN graph it is "
                    f"N + V, so only per-sample reshapes and tensor creation may use it",
                )
            if self.st(n) in (BTUPLE, BNTUPLE):
                self.refuse(node, f"uses the tuple {n.name} as a whole")

    def batch_rank(self, nodes: Sequence[fx.Node], node: fx.Node) -> int | None:
        ranks = {self.rank(n) for n in nodes if self.st(n) == BATCH} - {None}
        if len(ranks) > 1:
            self.refuse(
                node,
                f"combines batch-carrying tensors of different ranks {sorted(ranks)}, so "
                f"broadcasting would align dim 0 of one with another dim of the other",
            )
        return next(iter(ranks)) if ranks else None

    def check_broadcast(self, node: fx.Node, args: Sequence[Any]) -> None:
        rank = self.batch_rank([a for a in args if isinstance(a, fx.Node)], node)
        for a in args:
            if not isinstance(a, fx.Node) or self.st(a) == BATCH:
                continue
            shape = self.shape(a)
            if shape is None or rank is None:
                continue
            if len(shape) > rank:
                self.refuse(
                    node,
                    f"broadcasts the batch-carrying operand (rank {rank}) against {a.name} of "
                    f"shape {list(shape)}, which moves the batch dim",
                )
            if len(shape) == rank and not same_size(shape[0], 1):
                self.refuse(
                    node,
                    f"combines the batch with {a.name} of shape {list(shape)}, which is not "
                    f"batch-carrying but has a dim 0 of size {shape[0]} (a tensor tied to one "
                    f"batch size)",
                )

    def literal_rows(self, node: fx.Node, value: Any, rows: int) -> bool:
        """A literal int equal to ``N * rows`` in the batch position of a shape-specialized graph."""
        return (
            self.specialized
            and isinstance(value, int)
            and isinstance(self.batch_size, int)
            and value == self.batch_size * rows
        )

    def literal_batch(self, node: fx.Node, value: Any, out_dim0: Any) -> bool:
        """A literal int in the batch position of a shape-specialized graph equal to N."""
        return self.literal_rows(node, value, 1) and (
            out_dim0 is None or same_size(out_dim0, self.batch_size)
        )
