"""The VDN pass: virtual rows through the whole graph, BN statistics from them.

Virtual Dataset Normalization (Chen et al., TNNLS 2021) appends ``V = config.vdn_samples`` synthetic
rows to the batch, carries them through the network, and lets every BatchNorm take its statistics
from them (``vdn``) or from them together with the ``fs`` sample of the real rows (``fs_vdn``). For
a BN input ``x`` of shape ``(N + V, C, *S)`` whose last ``V`` rows are virtual (the estimator's
convention, :func:`bnrewrite.sampled_batch_norm`):

    vdn:     A = x[N:]                        (every element of the virtual rows)
    fs_vdn:  A = fs_sample(x[:N]) + x[N:]     (union of the two sets)
    mu = mean(A), var = biased var(A);  y = (x - mu) * rsqrt(var + eps) * w + b   (all rows)

The pass rewrites a whole graph so that the user's forward keeps its signature and shapes:

1. **Batch-independence analysis** (:func:`analyze`, in :mod:`bnrewrite.passes.vdn_analysis`). A flag "batch-carrying, dim 0 is the batch"
   is propagated from the batch inputs; every node that touches a batch-carrying value must match a
   rule that proves it treats samples independently (convolutions, linear layers and matmuls with
   the weight on the right, pointwise ops with broadcasting that does not reach dim 0, pooling,
   dropout, per-sample reshapes such as ``flatten(1)`` or ``view(x.size(0), -1)``, reductions,
   softmax, ``cat``/``stack``/``split`` over dims >= 1, indexing that keeps dim 0 whole, the BN
   itself). Anything else -- a reduction over dim 0, a view that merges the batch dim, a matmul
   across the batch, an op the pass does not know -- raises :class:`BatchMixingError` (a
   ``ValueError``) that names the node and says why. Nothing is rewritten before the analysis has
   passed, so a refused model or graph is left untouched.
2. **BN rewrite**: every training-mode BN is rewritten by :func:`bnrewrite.passes.fx.rewrite_node`
   with the VDN config (a BN left with batch statistics would mix real and virtual rows, so
   filtering one out is refused too).
3. **Virtual rows**: after the placeholders, each batch input ``x`` becomes
   ``cat([x, virtual_rows(x)], 0)``: ``torch.randn((V, *x.shape[1:]))`` in ``x``'s dtype and device
   for ``random`` sampling (fresh every call, graph nodes, global RNG), the op
   ``bnrewrite::vdn_fixed_rows`` for ``fixed`` sampling (standard normal from
   ``torch.Generator().manual_seed(seed or 0)``, identical on every call and device).
4. **Outputs**: every batch-carrying output is cut back to its first ``N`` rows.

Graph kinds. ``nn.Module`` (``symbolic_trace`` on a deep copy), ``symbolic_trace`` GraphModules,
Dynamo graphs (what a ``torch.compile`` backend receives: parameters and buffers are placeholders
too; batch inputs are the placeholders whose ``meta["grapharg"].source`` is a plain local of the
compiled frame, not an attribute of ``self``) and aten-level graphs (``make_fx``,
``torch.export(...).module()``). Graphs traced from a module read the root's ``training`` flag at
run time: in eval mode the number of virtual rows is 0, so the model computes exactly what the
original does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from bnrewrite.config import SamplingConfig
from bnrewrite.estimators import (
    MEMORY_ROWS,
    fixed_virtual_rows,
    merge_input_moments,
    moment_matched_rows,
    remember_rows,
    replayed_rows,
)
from bnrewrite.modules import share_structure
from bnrewrite.ops import is_sampled_batch_norm_op
from bnrewrite.plan import virtual_rows_for_batch, virtual_rows_for_floor

from .capture import CapturedModel
from .capture import capture as capture_model
from .fx import (
    BatchNormRoot,
    RewriteReport,
    _as_patterns,
    _copy_graph_module,
    example_size,
    input_shape,
    rewrite_node,
    shape_prop,
    warn_unmatched,
    warn_user,
)
from .vdn_analysis import Analysis, analyze
from .vdn_flow import BatchMixingError
from .vdn_flow import value_of as _val
from .vdn_rules import is_guard as _is_guard

__all__ = [
    "BatchMixingError",
    "RunningVirtualRows",
    "VDNReport",
    "analyze",
    "rewrite_vdn",
    "vdn_fixed_rows",
]

log = logging.getLogger("bnrewrite")
aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# The fixed virtual rows: a registered op (hashable target, fake impl) so that compiled graphs keep
# caching; the rows depend only on (shape, dtype, device, seed).
# ---------------------------------------------------------------------------------------------
_FIXED_CACHE: dict[tuple[Any, ...], Tensor] = {}


def _vdn_fixed_rows(like: Tensor, rows: int, seed: int) -> Tensor:
    """``rows`` standard-normal rows shaped like ``like[0]``, identical on every call.

    Drawn in float64 on the CPU from ``torch.Generator().manual_seed(seed)``, then cast to
    ``like``'s dtype and moved to its device: the same values on every device.
    """
    shape = (int(rows), *like.shape[1:])
    key = (shape, like.dtype, str(like.device), int(seed))
    rows_t = _FIXED_CACHE.get(key)
    if rows_t is None:
        rows_t = fixed_virtual_rows(shape, seed).to(dtype=like.dtype, device=like.device)
        if len(_FIXED_CACHE) > 64:
            _FIXED_CACHE.clear()
        _FIXED_CACHE[key] = rows_t
    return rows_t.clone()


def _vdn_fixed_rows_fake(like: Tensor, rows: int, seed: int) -> Tensor:
    return like.new_empty((rows, *like.shape[1:]))


def _register_fixed_rows() -> Any:
    """Define ``bnrewrite::vdn_fixed_rows`` once per process (a second import reuses it)."""
    if hasattr(torch.ops.bnrewrite, "vdn_fixed_rows"):
        return torch.ops.bnrewrite.vdn_fixed_rows
    op = torch.library.custom_op("bnrewrite::vdn_fixed_rows", mutates_args=())(_vdn_fixed_rows)
    op.register_fake(_vdn_fixed_rows_fake)
    return op


#: The op (``torch.ops.bnrewrite.vdn_fixed_rows``); callable as ``vdn_fixed_rows(x, rows, seed)``.
vdn_fixed_rows = _register_fixed_rows()


class RunningVirtualRows(nn.Module):
    """Virtual rows from the real inputs of *earlier* calls (``virtual="running"`` or
    ``"memory"``), then this call's real rows are folded in:

    * ``running``: standard-normal rows ``z`` become ``mean + std * z`` with the per-feature
      moments of the inputs seen so far (:func:`bnrewrite.estimators.merge_input_moments`);
    * ``memory``: rows drawn from a ring of the last ``MEMORY_ROWS`` real inputs
      (:func:`bnrewrite.estimators.replayed_rows`).

    The rows of a call never depend on that call's real rows, so VDN's guarantee holds: a real
    sample's output does not depend on another real sample of its batch. Until something was seen
    the rows are ``z``. State (float32) is made on the first call when the feature shape is not
    known at rewrite time, and is updated only when virtual rows are drawn (training mode).
    """

    def __init__(self, feature_shape: Sequence[int] | None = None, kind: str = "running") -> None:
        super().__init__()
        if kind not in ("running", "memory"):
            raise ValueError(f"kind must be 'running' or 'memory', got {kind!r}")
        self.kind = kind
        # not persistent: the rewritten model's state_dict keeps the original model's keys
        self.register_buffer("count", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("mean", None, persistent=False)
        self.register_buffer("var", None, persistent=False)
        self.register_buffer("memory", None, persistent=False)
        if feature_shape is not None:
            self._make(tuple(feature_shape), torch.device("cpu"))

    def _make(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)
        if self.kind == "memory":
            self.memory = torch.zeros((MEMORY_ROWS, *shape), dtype=torch.float32, device=device)
        else:
            self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
            self.var = torch.ones(shape, dtype=torch.float32, device=device)

    def forward(self, x: Tensor, z: Tensor, rows: int) -> Tensor:
        memory = self.kind == "memory"
        state = self.memory if memory else self.mean
        if state is None or tuple(state.shape[1:] if memory else state.shape) != x.shape[1:]:
            self._make(tuple(x.shape[1:]), x.device)
        elif state.device != x.device:
            self.to(x.device)
        if memory:
            assert self.memory is not None
            virt = replayed_rows(z, self.memory, self.count)
            if rows:
                remember_rows(x, self.memory, self.count, self.cursor)
            return virt
        assert self.mean is not None and self.var is not None
        virt = moment_matched_rows(z, self.mean, self.var, self.count)
        if rows:
            merge_input_moments(x, self.mean, self.var, self.count)
        return virt


# Dynamo graphs (a torch.compile backend) cannot own mutable buffers that the user's model does not
# have (AOTAutograd lifts parameters and buffers by their source in the user's frame), so there the
# moments live in a ``RunningVirtualRows`` held by the GraphModule as a plain attribute and the
# graph calls it through an opaque op. Tagged nondeterministic_seeded: never recomputed or deduped.
_RUNNING_SOURCES: weakref.WeakValueDictionary[int, RunningVirtualRows] = (
    weakref.WeakValueDictionary()
)
_RUNNING_KEYS = itertools.count()


def _vdn_running_rows(x: Tensor, z: Tensor, rows: int, key: int) -> Tensor:
    source = _RUNNING_SOURCES.get(key)
    if source is None:
        raise RuntimeError(
            f"bnrewrite::vdn_running_rows: the running moments {key} are gone (their GraphModule "
            f"was freed); rewrite the model again"
        )
    return source(x, z, rows)


def _vdn_running_rows_fake(x: Tensor, z: Tensor, rows: int, key: int) -> Tensor:
    return torch.empty_like(z)


def _register_running_rows() -> Any:
    if hasattr(torch.ops.bnrewrite, "vdn_running_rows"):
        return torch.ops.bnrewrite.vdn_running_rows
    op = torch.library.custom_op(
        "bnrewrite::vdn_running_rows",
        mutates_args=(),
        tags=(torch.Tag.nondeterministic_seeded,),
    )(_vdn_running_rows)
    op.register_fake(_vdn_running_rows_fake)
    return op


vdn_running_rows = _register_running_rows()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class VDNReport:
    """What :func:`rewrite_vdn` did."""

    virtual_rows: int
    sampling: str
    batch_inputs: list[str] = dataclasses.field(default_factory=list)
    sliced_outputs: int = 0
    literal_sizes: list[str] = dataclasses.field(default_factory=list)  # nodes whose N became N+V
    bn: RewriteReport = dataclasses.field(default_factory=RewriteReport)
    #: (BN name, k) for each BN whose input merges every sample into k rows (V * k virtual rows)
    merged_rows: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        merged = "".join(
            f"\n  {name}: input merges the batch, {k} rows per sample ({k} x virtual rows)"
            for name, k in self.merged_rows
        )
        return (
            f"bnrewrite VDN: {self.virtual_rows} {self.sampling} virtual row(s) appended to "
            f"{self.batch_inputs}, {self.sliced_outputs} output(s) sliced{merged}\n{self.bn}"
        )


# ---------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------
def _is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(
        n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "aten"
        for n in gm.graph.nodes
    )


class _Emitter:
    """Emits the virtual-row nodes in the graph's own vocabulary (torch-level or aten)."""

    def __init__(self, gm: fx.GraphModule, aten_level: bool, analysis: Analysis) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.aten = aten_level
        self.analysis = analysis
        self.dynamo = any(n.op == "placeholder" and "grapharg" in n.meta for n in gm.graph.nodes)

    def rows(self, conditional: bool, v: int) -> Any:
        """``V``, or ``self._vdn_rows * self.training`` for graphs traced from a module (0 in
        eval mode; an attribute, so that the first call can raise it for the floor)."""
        if not conditional:
            return v
        self.gm._vdn_rows = v
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            flag = self.graph.get_attr("training")
            count = self.graph.get_attr("_vdn_rows")
        return self.graph.call_function(operator.mul, (flag, count))

    def virtual(self, x: fx.Node, rows: Any, config: SamplingConfig, seed: int) -> fx.Node:
        g = self.graph
        val = _val(x)
        if config.sampling == "fixed":
            if self.aten:
                like = g.call_function(aten.detach.default, (x,))
            else:
                like = g.call_method("detach", (x,))
            return g.call_function(torch.ops.bnrewrite.vdn_fixed_rows.default, (like, rows, seed))
        if isinstance(val, Tensor) and isinstance(rows, int):
            shape = [rows, *val.shape[1:]]
            if self.aten:
                return g.call_function(
                    aten.randn.default,
                    (shape,),
                    {"dtype": val.dtype, "device": val.device, "pin_memory": False},
                )
            return g.call_function(
                torch.randn, (tuple(shape),), {"dtype": val.dtype, "device": val.device}
            )
        shape = g.call_function(getattr, (x, "shape"))
        rest = g.call_function(operator.getitem, (shape, slice(1, None, None)))
        size = g.call_function(operator.add, ((rows,), rest))
        dtype = g.call_function(getattr, (x, "dtype"))
        device = g.call_function(getattr, (x, "device"))
        return g.call_function(torch.randn, (size,), {"dtype": dtype, "device": device})

    def affine(self, virt: fx.Node, moments: tuple[Tensor, Tensor], index: int) -> fx.Node:
        """``mean + std * virt`` with the moments stored as buffers of the GraphModule."""
        g = self.graph
        nodes = []
        for kind, value in zip(("mean", "std"), moments, strict=True):
            name = f"_vdn_{kind}_{index}"
            self.gm.register_buffer(name, torch.as_tensor(value).detach().clone())
            nodes.append(g.get_attr(name))
        mean, std = nodes
        if self.aten:
            scaled = g.call_function(aten.mul.Tensor, (virt, std))
            return g.call_function(aten.add.Tensor, (scaled, mean))
        return g.call_function(operator.add, (g.call_function(operator.mul, (virt, std)), mean))

    def running(self, x: fx.Node, virt: fx.Node, rows: Any, index: int, kind: str) -> fx.Node:
        """``RunningVirtualRows`` as a submodule of the GraphModule, called on ``(x, z, rows)``."""
        name = f"_vdn_running_{index}"
        val = _val(x)
        shape = tuple(val.shape[1:]) if isinstance(val, Tensor) else None
        if shape is not None and not all(isinstance(d, int) for d in shape):
            shape = None
        source = RunningVirtualRows(shape, kind)
        if isinstance(val, Tensor) and shape is not None and val.device.type != "meta":
            source.to(val.device)
        if not self.dynamo:
            self.gm.add_submodule(name, source)
            return self.graph.call_module(name, (x, virt, rows))
        key = next(_RUNNING_KEYS)
        _RUNNING_SOURCES[key] = source
        held = self.gm.__dict__.setdefault("_bnrewrite_running_sources", [])
        held.append(source)  # the GraphModule keeps its sources alive
        like = self.graph.call_function(torch.ops.aten.detach.default, (x,))
        return self.graph.call_function(
            torch.ops.bnrewrite.vdn_running_rows.default, (like, virt, rows, key)
        )

    def cat(self, x: fx.Node, v: fx.Node) -> fx.Node:
        target = aten.cat.default if self.aten else torch.cat
        return self.graph.call_function(target, ([x, v], 0))

    def strip(self, out: fx.Node, rows: Any) -> fx.Node:
        g = self.graph
        n = self.analysis.batch_size
        if isinstance(rows, int) and isinstance(n, int):
            if self.aten:
                return g.call_function(aten.slice.Tensor, (out, 0, 0, n))
            return g.call_function(operator.getitem, (out, slice(None, n, None)))
        if self.aten:
            size = g.call_function(aten.sym_size.int, (out, 0))
            keep = g.call_function(operator.sub, (size, rows))
            return g.call_function(aten.slice.Tensor, (out, 0, 0, keep))
        size = g.call_method("size", (out, 0))
        keep = g.call_function(operator.sub, (size, rows))
        return g.call_method("narrow", (out, 0, 0, keep))


def rewrite_vdn(
    obj: Any,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    inplace: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    return_report: bool = False,
    tracer_kwargs: Mapping[str, Any] | None = None,
    batch_inputs: Sequence[str] | None = None,
    example_inputs: Sequence[Any] | None = None,
    virtual_moments: Any = None,
    capture: str = "auto",
) -> Any:
    """Apply VDN / FS+VDN to a whole model or graph; returns a ``GraphModule`` (a
    :class:`~bnrewrite.passes.capture.CapturedModel` for a model captured with ``torch.export``).

    ``obj``: an ``nn.Module`` (traced with ``torch.fx.symbolic_trace`` on a copy of its module tree
    that shares its parameters and buffers; its own modules are never converted, ``inplace`` or
    not, since a VDN layer outside the VDN graph would be wrong), a ``symbolic_trace`` GraphModule, the Dynamo graph a ``torch.compile`` backend
    receives, or an aten-level GraphModule (``make_fx``, ``torch.export(...).module()``). The result
    takes and returns the user's shapes. ``batch_inputs``: placeholder names (or Dynamo sources such
    as ``"L['x']"``) of the batch inputs, when the default (every tensor input that is not a
    parameter or buffer) is wrong. ``example_inputs``: run the graph once on them to learn tensor
    ranks, which resolves negative dims and ``view(-1, ...)`` (the model's state is restored).
    ``include`` / ``exclude`` / ``overrides`` as for :func:`bnrewrite.passes.fx.rewrite`, except that
    every training-mode BN must end up with a ``vdn``/``fs_vdn`` config of the same
    ``vdn_samples``. ``virtual_moments``: ``(mean, std)`` tensors broadcastable to one sample
    (``x.shape[1:]``), or a dict ``{input name: (mean, std)}``: the virtual rows become
    ``mean + std * z`` with ``z`` standard normal (per-feature moment-matched noise; default
    ``None``, plain standard normal). Raises :class:`BatchMixingError` (a ``ValueError``) naming the offending node
    when the graph cannot be proven batch-independent; the input is then left untouched.
    ``capture`` as for :func:`bnrewrite.passes.fx.rewrite`: a model ``symbolic_trace`` cannot
    trace is exported on ``example_inputs`` and VDN rewrites the program's aten graph.
    """
    cfg = SamplingConfig.coerce(config if config is not None else "vdn")
    if not cfg.uses_virtual_rows:
        raise ValueError(
            f"rewrite_vdn applies 'vdn' or 'fs_vdn', got method {cfg.method!r}; use "
            f"bnrewrite.rewrite for the per-node methods"
        )
    export_cls = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if export_cls is not None and isinstance(obj, export_cls):
        raise ValueError(
            "rewrite_vdn does not rewrite an ExportedProgram in place (its signature fixes the "
            "graph's shapes); pass ep.module(), an aten-level GraphModule"
        )
    traced = isinstance(obj, nn.Module) and not isinstance(obj, fx.GraphModule)
    if isinstance(obj, fx.GraphModule):
        gm = obj if inplace else _copy_graph_module(obj)
        source_training = obj.training
    elif isinstance(obj, nn.Module):
        # Never the model's own modules, even with inplace=True: a VDN layer outside the VDN graph
        # would take the last real rows for virtual ones (the trap convert_ refuses).
        model = share_structure(obj)
        if isinstance(model, nn.modules.batchnorm._BatchNorm):
            model = BatchNormRoot(model)
        captured = capture_model(
            model, example_inputs=example_inputs, tracer_kwargs=tracer_kwargs, mode=capture
        )
        if not isinstance(captured, fx.GraphModule):  # torch.export: VDN on its aten graph
            gm, report = rewrite_vdn(
                captured.module(),
                cfg,
                include=include,
                exclude=exclude,
                overrides=overrides,
                return_report=True,
                batch_inputs=batch_inputs,
                virtual_moments=virtual_moments,
            )
            result = CapturedModel(model, gm, None, report.bn)
            result.meta["bnrewrite_vdn"] = report
            return (result, report) if return_report else result
        gm = captured
        gm.training = model.training
        source_training = model.training
    else:
        raise ValueError(
            f"rewrite_vdn expects an nn.Module or a torch.fx.GraphModule, got {type(obj).__name__}"
        )
    if example_inputs is not None and not any(
        _val(n) is not None for n in gm.graph.nodes if n.op == "placeholder"
    ):
        shape_prop(gm, example_inputs)  # meta only; parameters and buffers are restored
    analysis = analyze(
        gm,
        cfg,
        batch_inputs=batch_inputs,
        traced=traced,
        include=include,
        exclude=exclude,
        overrides=overrides,
    )
    names = [site.name for site, _ in analysis.bn] + [name for name, _ in analysis.skipped]
    unknown: list[tuple[str, SamplingConfig]] = []
    batch = example_size(analysis.batch_size)
    batch = batch if isinstance(batch, int) else None
    v_batch = virtual_rows_for_batch(cfg, batch)
    batch_unknown = bool(cfg.vdn_per_row or cfg.vdn_min_rows) and batch is None
    v, raised = _virtual_rows_for_floor(analysis, v_batch, unknown)
    if v_batch != cfg.vdn_samples:
        log.info(
            "rewrite_vdn: %d virtual row(s) for a batch of %d (vdn_per_row=%g, vdn_min_rows=%d)",
            v_batch,
            batch,
            cfg.vdn_per_row,
            cfg.vdn_min_rows,
        )
    if v != cfg.vdn_samples:
        analysis.bn = [(site, c.replace(vdn_samples=v) if c else c) for site, c in analysis.bn]
    if raised:
        log.info(
            "rewrite_vdn: %d virtual row(s) instead of %d, for the floor of %s",
            v,
            v_batch,
            ", ".join(f"{n} ({a} -> {b} values)" for n, a, b in raised),
        )
    warn_unmatched(
        names, _as_patterns(include), _as_patterns(exclude), overrides, type(obj).__name__
    )
    # -- from here on the graph is modified (the analysis proved it is batch-independent) --------
    report = VDNReport(virtual_rows=v, sampling=cfg.sampling)
    report.bn.raised.extend(raised)
    uses_rows = analysis.bn or any(r.startswith("already rewritten") for _, r in analysis.skipped)
    if not uses_rows:
        # No BN takes statistics from virtual rows (an eval-mode graph, as Dynamo compiles after
        # .eval()): the graph already treats samples independently and needs no virtual rows.
        report.virtual_rows = 0
        report.bn.skipped.extend(analysis.skipped)
        gm.meta["bnrewrite"] = report.bn
        gm.meta["bnrewrite_vdn"] = report
        log.info("rewrite_vdn: no training-mode BatchNorm; graph left as it is")
        return (gm, report) if return_report else gm
    aten_level = _is_aten_graph(gm)
    graph = gm.graph
    conditional = not analysis.specialized  # symbolic_trace graphs follow self.training
    placeholders = [p for p in graph.nodes if p.op == "placeholder"]
    emitter = _Emitter(gm, aten_level, analysis)
    with graph.inserting_after(placeholders[-1]):
        anchor = graph.call_function(operator.is_not, (None, None))  # insertion cursor
    with graph.inserting_before(anchor):
        rows = emitter.rows(conditional, v)
    # outputs first: a returned batch input is then cut from the joined tensor like any other
    output = next(n for n in graph.nodes if n.op == "output")
    stripped: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(output):
        for leaf in analysis.outputs:
            stripped[leaf] = emitter.strip(leaf, rows)
    output.args = fx.node.map_arg(output.args, lambda a: stripped.get(a, a))
    report.sliced_outputs = len(stripped)
    with graph.inserting_before(anchor):
        for i, x in enumerate(analysis.batch_inputs):
            old_users = {u for u in x.users if not _is_guard(u)}
            seed = (cfg.seed or 0) + i
            virt = emitter.virtual(x, rows, cfg, seed)
            moments = _moments_for(virtual_moments, x.name, i)
            if moments is not None:
                virt = emitter.affine(virt, moments, i)
            elif cfg.virtual in ("running", "memory"):
                virt = emitter.running(x, virt, rows, i, cfg.virtual)
            joined = emitter.cat(x, virt)
            x.replace_all_uses_with(joined, delete_user_cb=lambda u, o=old_users: u in o)
            report.batch_inputs.append(x.name)
        for s in analysis.size_placeholders:
            old_users = set(s.users)
            plus = graph.call_function(operator.add, (s, rows))
            s.replace_all_uses_with(plus, delete_user_cb=lambda u, o=old_users: u in o)
    graph.erase_node(anchor)
    for site, chosen in analysis.bn:
        assert chosen is not None
        k = analysis.rows_of(site.node)
        if k != 1:  # the input merges each sample into k rows: the virtual ones are the last V * k
            chosen = chosen.replace(vdn_samples=chosen.vdn_samples * k)
            report.merged_rows.append((site.name, k))
        rewrite_node(gm, site, chosen, follow_module_training=traced)
        report.bn.rewritten.append((site.name, chosen.method))
    report.bn.skipped.extend(analysis.skipped)
    n = analysis.batch_size
    for node, edit in analysis.edits:
        edit(n + v)
        report.literal_sizes.append(node.name)
    _clear_stale_meta(gm, analysis)
    graph.lint()
    gm.recompile()
    gm.training = source_training
    gm.meta["bnrewrite"] = report.bn
    gm.meta["bnrewrite_vdn"] = report
    unknown = unknown if traced else []  # probing shapes runs the original model
    if (unknown or batch_unknown) and isinstance(rows, fx.Node):
        function_form = [
            n.name
            for n in graph.nodes
            if n.op == "call_function" and is_sampled_batch_norm_op(n.target)
        ]
        if function_form:  # their configs are graph constants: the first call cannot raise them
            what = (
                f"the input shapes of {[n for n, _ in unknown]} are unknown, so the floor"
                if unknown
                else "the batch size is unknown, so vdn_per_row / vdn_min_rows"
            )
            warn_user(
                f"bnrewrite VDN: {what} cannot size the virtual rows ({v} are used); pass "
                f"example_inputs= to rewrite"
            )
        else:
            placeholders = [p.name for p in graph.nodes if p.op == "placeholder"]
            first = placeholders.index(analysis.batch_inputs[0].name)
            rule = cfg if batch_unknown else None
            _size_rows_on_first_call(gm, model if traced else None, v, unknown, rule, first)
    log.info("%s", report)
    return (gm, report) if return_report else gm


def _virtual_rows_for_floor(
    analysis: Analysis, v: int, unknown: list[tuple[str, SamplingConfig]] | None = None
) -> tuple[int, list[tuple[str, int, int]]]:
    """The virtual rows a graph needs so that no ``vdn`` layer's statistics come from fewer values
    than its floor, and ``(layer, values before, values after)`` for each layer raised.

    A ``vdn`` layer reads only virtual rows (VDN's guarantee), so the floor cannot take more real
    values there: the graph carries more virtual rows instead, ``ceil(min_count / positions)``
    for the layer with the fewest positions per row (a ``(N, C)`` layer: ``min_count`` rows).
    Positions come from the input's shape where the graph knows it (Dynamo graphs,
    ``example_inputs=``); a ``BatchNorm1d`` module of unknown input shape is taken as ``(N, C)``.
    ``fs_vdn`` layers also read the ``fs`` sample of the real rows, which the plan's floor raises.
    Module-form ``vdn`` layers of unknown shape are appended to ``unknown`` (sized at the first
    call by :func:`_size_rows_on_first_call`).
    """
    need, per_layer = v, []
    for site, cfg in analysis.bn:
        if cfg is None or cfg.method != "vdn":
            continue
        shape = input_shape(site)
        if shape is not None and all(isinstance(d, int) for d in shape[2:]):
            per_row = math.prod(shape[2:]) * analysis.rows_of(site.node)  # values per sample
        elif site.form == "module" and isinstance(
            site.node.graph.owning_module.get_submodule(str(site.node.target)), nn.BatchNorm1d
        ):
            per_row = 1
        else:
            if unknown is not None and site.form == "module":
                unknown.append((str(site.node.target), cfg))
            continue
        rows = virtual_rows_for_floor(cfg, per_row)
        if rows > v:
            per_layer.append((site.name, per_row))
        need = max(need, rows)
    raised = [(name, v * per_row, need * per_row) for name, per_row in per_layer]
    return need, raised


def _size_rows_on_first_call(
    gm: fx.GraphModule,
    model: nn.Module | None,
    v: int,
    unknown: list[tuple[str, SamplingConfig]],
    batch_rule: SamplingConfig | None = None,
    batch_arg: int = 0,
) -> None:
    """Shapes were unknown at rewrite time (an ``nn.Module`` without ``example_inputs``): on the
    first training call, take the batch size from the call's batch input (argument
    ``batch_arg``) when ``batch_rule`` (the config whose ``vdn_per_row`` / ``vdn_min_rows`` size
    the rows) is given, probe the model's BN input shapes of ``unknown`` on one sample of the real batch (the
    original modules, eval mode, no gradient: nothing is updated) and, if the graph needs more
    virtual rows than it has, raise them before the call runs: the graph reads its row count from
    ``gm._vdn_rows`` and its sampled modules read ``config`` at run time."""
    handle = None

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            return
        assert handle is not None
        handle.remove()
        v_batch = v
        x = args[batch_arg] if batch_arg < len(args) else None
        if batch_rule is not None and isinstance(x, Tensor) and x.dim() > 0:
            v_batch = max(v, virtual_rows_for_batch(batch_rule, x.shape[0]))
        positions: dict[str, int] = {}

        def record(name: str) -> Any:
            def pre_hook(_m: nn.Module, a: tuple[Any, ...]) -> None:  # returns None: input kept
                positions.setdefault(name, a[0][0, 0].numel())

            return pre_hook

        wanted = dict(unknown)
        if wanted and model is not None:
            hooks = [
                m.register_forward_pre_hook(record(name))
                for name, m in model.named_modules()
                if name in wanted
            ]
            modes = {m: m.training for m in model.modules()}
            try:
                model.eval()
                with torch.no_grad():
                    model(*[a[:1] if isinstance(a, Tensor) and a.dim() > 0 else a for a in args])
            finally:
                for h in hooks:
                    h.remove()
                for m, mode in modes.items():
                    m.training = mode
        per_layer = {
            n: virtual_rows_for_floor(c, positions[n]) for n, c in unknown if n in positions
        }
        need = max([v_batch, *per_layer.values()])
        if need <= v:
            return
        for m in module.modules():
            cfg = getattr(m, "config", None)
            if isinstance(cfg, SamplingConfig) and cfg.uses_virtual_rows:
                k = max(1, cfg.vdn_samples // v)  # a BN over merged rows reads V * k of them
                m.config = cfg.replace(vdn_samples=need * k)
        module._vdn_rows = need
        report = module.meta.get("bnrewrite_vdn")
        if report is not None:
            report.virtual_rows = need
            report.bn.raised.extend(
                (n, v_batch * positions[n], need * positions[n])
                for n, r in per_layer.items()
                if r > v_batch
            )
        log.info(
            "rewrite_vdn: %d virtual row(s) instead of %d (first call: batch %s, floor)",
            need,
            v,
            None if x is None or not isinstance(x, Tensor) else x.shape[0],
        )

    handle = gm.register_forward_pre_hook(hook)


def _moments_for(moments: Any, name: str, index: int) -> tuple[Tensor, Tensor] | None:
    if moments is None:
        return None
    if isinstance(moments, Mapping):
        return moments.get(name)
    if index > 0:
        raise ValueError(
            "virtual_moments given as one (mean, std) pair but the graph has several batch "
            "inputs; pass a dict {input name: (mean, std)}"
        )
    mean, std = moments
    return mean, std


def _clear_stale_meta(gm: fx.GraphModule, analysis: Analysis) -> None:
    """Batch-carrying nodes now have N + V rows: drop their recorded example values."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        for key in ("val", "example_value", "tensor_meta"):
            if key in node.meta and (
                analysis.state.get(node) or node.meta[key] is None or key == "tensor_meta"
            ):
                del node.meta[key]
