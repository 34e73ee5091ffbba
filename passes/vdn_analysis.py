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

Three files, one concern each:

* :mod:`~bnrewrite.passes.vdn_flow` -- the states a value can be in and the checks rules share;
* :mod:`~bnrewrite.passes.vdn_rules` -- the op families and what each may do (rules as data);
* this module -- the walk: which placeholders carry the batch, the BatchNorm decisions (every
  training-mode BN must take the VDN config), the outputs to slice, and a rule per other node.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from bnrewrite.config import SamplingConfig
from bnrewrite.ops import config_from_str

from .fx import BatchNormSite, _as_patterns, find_batch_norm_nodes, select_config
from .vdn_flow import (
    BATCH,
    BNTUPLE,
    BSHAPE,
    BSIZE,
    BTUPLE,
    BatchFlow,
    BatchMixingError,
    same_size,
    value_of,
)
from .vdn_rules import apply_rule, literal_broadcast

__all__ = ["BatchMixingError", "Analysis", "analyze"]


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
    #: rows of dim 0 per sample where not 1 (a BN node here takes ``V * k`` virtual rows)
    rows: dict[fx.Node, int] = dataclasses.field(default_factory=dict)

    def rows_of(self, node: fx.Node) -> int:
        return self.rows.get(node, 1)


# -- inputs -------------------------------------------------------------------------------------
def _source(p: fx.Node) -> str:
    grapharg = p.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


#: Dynamo's placeholder names for module state: ``L_self_modules_bn_buffers_running_mean_``.
_DYNAMO_STATE = re.compile(r"^L_[A-Za-z0-9]+_(?:modules_.+_)?(?:parameters|buffers)_")


def _is_user_input(source: Any) -> bool:
    """A Dynamo source that is an argument of the compiled call: a local (``L['x']``) or an item
    of one (``L['args'][0]``, as ``dynamic=True`` traces ``nn.Module.__call__(*args)``); not an
    attribute, parameter or buffer of a module."""
    while type(source).__name__ == "GetItemSource":
        source = source.base
    return type(source).__name__ == "LocalSource"


def _batch_inputs(placeholders: list[fx.Node], names: Sequence[str] | None) -> list[fx.Node]:
    """The placeholders that carry the batch: named ones, else every tensor input of the user's."""
    if names is not None:
        wanted = set(names)
        chosen = [
            p
            for p in placeholders
            if p.name in wanted or str(p.target) in wanted or _source(p) in wanted
        ]
        missing = wanted - {p.name for p in chosen} - {str(p.target) for p in chosen}
        missing -= {_source(p) for p in chosen}
        if missing:
            raise ValueError(
                f"batch_inputs names {sorted(missing)} are not placeholders of the graph; "
                f"placeholders are {[p.name for p in placeholders]}"
            )
        return chosen
    chosen = []
    for p in placeholders:
        val = value_of(p)
        if val is not None and not isinstance(val, Tensor):
            continue  # SymInt / constant placeholders
        grapharg = p.meta.get("grapharg")
        if grapharg is None and _DYNAMO_STATE.match(str(p.target)):
            continue  # a Dynamo graph whose grapharg meta is gone: parameters/buffers by name
        if grapharg is not None:
            if not _is_user_input(getattr(grapharg, "source", None)):
                continue  # a parameter/buffer/attribute of self, a global, ...
            example = getattr(grapharg, "example", None)
            if isinstance(example, nn.Parameter):
                continue
            if _source(p) in ("L['self']",):
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


def _batch_size(flow: BatchFlow, batch_inputs: list[fx.Node]) -> Any:
    sizes = []
    for p in batch_inputs:
        val = value_of(p)
        if isinstance(val, Tensor):
            sizes.append(val.shape[0])
        else:
            shape = flow.shape(p)
            if shape is not None:
                sizes.append(shape[0])
    for a, b in zip(sizes, sizes[1:], strict=False):
        if not same_size(a, b):
            raise ValueError(
                f"VDN refused: the batch inputs {[p.name for p in batch_inputs]} have "
                f"different sizes along dim 0 ({sizes}); name the batch inputs with "
                f"batch_inputs=[...]"
            )
    return sizes[0] if sizes else None


# -- the walk -------------------------------------------------------------------------------------
class _Walk:
    """One pass over the nodes in order: placeholders, BatchNorm, outputs, and a rule for the rest."""

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
        self.config = config
        self.traced = traced
        self.include, self.exclude, self.overrides = include, exclude, overrides
        self.bn: list[tuple[BatchNormSite, SamplingConfig | None]] = []
        self.skipped: list[tuple[str, str]] = []
        self.outputs: list[fx.Node] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        specialized = any(value_of(p) is not None for p in placeholders)
        self.flow = BatchFlow(gm, batch_size=None, specialized=specialized)
        self.batch_inputs = _batch_inputs(placeholders, batch_inputs)
        self.flow.batch_size = _batch_size(self.flow, self.batch_inputs)
        self.size_placeholders = [
            p
            for p in placeholders
            if isinstance(value_of(p), torch.SymInt)
            and same_size(value_of(p), self.flow.batch_size)
        ]

    def run(self) -> Analysis:
        flow = self.flow
        sites = {site.node: site for site in find_batch_norm_nodes(self.gm)}
        batch = set(self.batch_inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node in batch:
                    flow.state[node] = BATCH
                elif node in self.size_placeholders:
                    flow.state[node] = BSIZE
                continue
            if node.op == "output":
                self._output(node)
                continue
            if node.op == "get_attr":
                continue
            if node in sites:
                result = self._batch_norm(node, sites[node])
                x = node.args[0] if sites[node].form == "module" else sites[node].args.get("input")
                if result and flow.rows_of(x) != 1:
                    flow.rows[node] = flow.rows_of(x)  # statistics from the last V * k rows
            else:
                if not any(flow.st(n) for n in node.all_input_nodes):
                    literal_broadcast(flow, node)  # cls_token.expand(N, ...) with a literal N
                    continue
                result = apply_rule(flow, node)
            if result:
                flow.state[node] = result
            self._sanity(node)
        return Analysis(
            state=flow.state,
            batch_inputs=self.batch_inputs,
            size_placeholders=self.size_placeholders,
            bn=self.bn,
            skipped=self.skipped,
            edits=flow.edits,
            batch_size=flow.batch_size,
            outputs=self.outputs,
            specialized=flow.specialized,
            rows=flow.rows,
        )

    def _sanity(self, node: fx.Node) -> None:
        """In graphs with example values, a batch-carrying node must have dim 0 == N * k (``k``
        rows per sample)."""
        flow = self.flow
        if flow.st(node) != BATCH or flow.batch_size is None:
            return
        shape = flow.shape(node)
        k = flow.rows_of(node)
        want = flow.batch_size * k
        if shape is not None and (not shape or not same_size(shape[0], want)):
            rows = "" if k == 1 else f" times its {k} rows per sample"
            flow.refuse(
                node,
                f"produces shape {list(shape)} from batch-carrying inputs, whose dim 0 is not "
                f"the batch size {flow.batch_size}{rows}",
            )

    def _output(self, node: fx.Node) -> None:
        flow = self.flow

        def visit(a: fx.Node) -> fx.Node:
            s = flow.st(a)
            if s == BATCH and flow.rows_of(a) != 1:
                flow.refuse(
                    a,
                    f"is an output whose dim 0 merges the batch with other dims "
                    f"({flow.rows_of(a)} rows per sample); return it split back to N rows",
                )
            if s == BATCH:
                if a not in self.outputs:
                    self.outputs.append(a)
            elif s in (BSIZE, BSHAPE):
                flow.refuse(node, f"returns {a.name}, which depends on the batch size")
            elif s in (BTUPLE, BNTUPLE):
                flow.refuse(node, f"returns the tuple {a.name} as a whole; return its items")
            return a

        fx.node.map_arg(node.args, visit)

    # -- BatchNorm --------------------------------------------------------------------------------
    def _choose(self, site: BatchNormSite) -> SamplingConfig | None:
        return select_config(site.name, self.config, self.include, self.exclude, self.overrides)

    def _batch_norm(self, node: fx.Node, site: BatchNormSite) -> str | None:
        flow = self.flow
        x = node.args[0] if node.args else None
        if site.form != "module":
            x = site.args.get("input")
        if flow.st(x) != BATCH:
            others = [n for n in node.all_input_nodes if flow.st(n)]
            if others:
                flow.refuse(node, "takes batch-carrying statistics or parameters")
            return None
        tuple_out = site.spec is not None and site.spec.tuple_out
        out = BNTUPLE if tuple_out else BATCH
        if site.reason is None:
            chosen = self._choose(site)
            self._require_vdn(node, site, chosen)
            self.bn.append((site, chosen))
            return out
        if site.reason == "eval mode":
            if site.form == "module" or (self.traced and self._has_owner(site)):
                # A frozen (eval) BN stays frozen, but is swapped for its VDN twin so that a later
                # .train() does not give it batch statistics over real and virtual rows.
                chosen = self._choose(site)
                if chosen is not None and chosen.uses_virtual_rows:
                    self._require_vdn(node, site, chosen)
                    self.bn.append((dataclasses.replace(site, reason=None), chosen))
                    return out
            self.skipped.append((site.name, "eval mode (per-sample, left alone)"))
            return out
        if site.reason == "already rewritten" and self._is_vdn_op(node):
            self.skipped.append((site.name, "already rewritten with VDN"))
            return out
        flow.refuse(
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
            self.flow.refuse(
                node,
                f"is a training-mode BatchNorm ({site.name}) {what}; under VDN every "
                f"training-mode BN must use 'vdn' or 'fs_vdn', since batch statistics would mix "
                f"real and virtual rows",
            )
        if chosen.vdn_samples != self.config.vdn_samples:
            self.flow.refuse(
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
        text = node.args[-1] if node.args else None
        if not isinstance(text, str):
            return False
        try:
            cfg = config_from_str(text)
        except ValueError:
            return False
        return cfg.uses_virtual_rows and cfg.vdn_samples == self.config.vdn_samples


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
    walk = _Walk(
        gm, cfg, batch_inputs, traced, _as_patterns(include), _as_patterns(exclude), overrides
    )
    return walk.run()
