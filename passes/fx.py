"""The FX pass: replace the statistics of training-mode BatchNorm with sampled estimators.

For a BatchNorm node with input ``x (N, C, *S)`` in training mode, the pass makes the graph compute

    y = (x - mu_hat) * rsqrt(var_hat + eps) * w + b
    rm <- (1 - m) * rm + m * mu_hat,   rv <- (1 - m) * rv + m * var_hat * n / (n - 1)

with ``mu_hat``, ``var_hat`` the biased statistics over the sample set of the config (see
:mod:`bnrewrite.estimators`, the only place this math is written). Graph forms, one case each:

1. ``call_module`` on ``nn.BatchNorm1d/2d/3d`` (``symbolic_trace``): the submodule is swapped for
   its ``SampledBatchNormNd`` twin (:func:`bnrewrite.modules.from_batch_norm`), which shares the
   parameters and buffers. The graph is unchanged, ``.train()`` / ``.eval()`` keep working and the
   ``state_dict`` keys are the original ones.
2. ``call_function`` on ``F.batch_norm`` / ``torch.batch_norm`` / ``aten.batch_norm`` (Python-level,
   Dynamo and export graphs), and the mutating aten forms ``aten.native_batch_norm``,
   ``aten._native_batch_norm_legit(.no_stats)``, ``aten._batch_norm_with_update``,
   ``aten.cudnn_batch_norm``: replaced by the custom op ``bnrewrite::sampled_batch_norm`` (mutates
   the running statistics in place, like the op it replaces).
3. The functional aten forms ``aten._native_batch_norm_legit_functional`` and
   ``aten._batch_norm_with_update_functional``: replaced by
   ``bnrewrite::sampled_batch_norm_functional``, whose outputs 1 and 2 are the updated running
   statistics; the original's running-statistics outputs are rewired to them.

Synchronised BN: a ``call_module`` ``nn.SyncBatchNorm`` becomes its
:class:`~bnrewrite.distributed.SampledSyncBatchNorm` twin (every rank's sample pooled across the
process group); in a Dynamo graph a one-process ``nn.SyncBatchNorm`` is an ``F.batch_norm`` call
(form 2), an inlined ``SampledSyncBatchNorm`` is already sampled, and both are listed in the
report by their ``nn_module_stack`` (:func:`sync_scopes`).

Declined with a logged reason (the node is left as it is): eval-mode BN (``training=False``,
``aten._native_batch_norm_legit_no_training``, ``aten._batch_norm_no_update``), a BN filtered by
name, a ``nn.SyncBatchNorm`` that Dynamo traced across processes (PyTorch's CUDA
``sync_batch_norm``: convert the model first), a tuple form whose saved
statistics are used (a joint forward/backward graph: rewrite before autograd), non-constant
``training`` / ``momentum`` / ``eps``. Already rewritten nodes are skipped, so a second rewrite
changes nothing. The structure is ``find_batch_norm_nodes`` (match) then ``rewrite_node`` (one
node, one config), so whole-graph passes such as VDN can reuse both.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import operator
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bnrewrite.config import SamplingConfig, select_config
from bnrewrite.modules import SampledBatchNormMixin, from_batch_norm, share_structure
from bnrewrite.ops import (
    config_to_str,
    fused_sampled_batch_norm_op,
    is_sampled_batch_norm_op,
    sampled_batch_norm_functional_op,
    sampled_batch_norm_op,
)
from bnrewrite.plan import sample_plan

from .capture import CapturedModel
from .capture import capture as capture_model

__all__ = [
    "LOWERINGS",
    "BatchNormSite",
    "RewriteReport",
    "find_batch_norm_nodes",
    "rewrite_node",
    "rewrite_graph",
    "rewrite",
    "select_config",
    "sync_scopes",
    "UNTOUCHED_SYNC",
    "shape_prop",
    "input_shape",
    "mode_following_nodes",
    "warn_unmatched",
    "warn_user",
    "BatchNormRoot",
]

log = logging.getLogger("bnrewrite")

aten = torch.ops.aten

#: How a rewritten BN is computed: ``"torch"`` -- the estimator as aten ops (Inductor fuses them);
#: ``"kernels"`` -- the fused Triton kernels (:mod:`bnrewrite.kernels`) with ReLU and
#: residual-add + ReLU epilogues folded in (:mod:`bnrewrite.passes.epilogue`).
LOWERINGS: tuple[str, ...] = ("torch", "kernels")


def check_lowering(lowering: str, config: SamplingConfig | None = None) -> str:
    """Validate a ``lowering`` value (and that ``config`` supports it); returns it."""
    if lowering not in LOWERINGS:
        raise ValueError(
            f"lowering must be one of {', '.join(map(repr, LOWERINGS))}, got {lowering!r}"
        )
    if lowering == "kernels" and config is not None and config.uses_virtual_rows:
        raise ValueError(
            f"lowering='kernels' is not available for method {config.method!r} in the graph "
            "passes (virtual rows run the torch lowering); use lowering='torch'"
        )
    return lowering


# -- the forms --------------------------------------------------------------------------------
# Each call_function form: argument names in order (missing trailing ones take defaults), whether it
# returns a tuple, and for functional forms the output indices of the new running statistics.
_F_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
)
_DEFAULTS: dict[str, Any] = {
    "running_mean": None,
    "running_var": None,
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


@dataclasses.dataclass(frozen=True)
class _Form:
    args: tuple[str, ...]
    tuple_out: bool = False
    functional_stats: tuple[int, int] | None = None  # outputs holding the new rm, rv
    training: bool | None = None  # fixed by the op itself (None: an argument)


def _aten_forms() -> dict[Any, _Form]:
    forms: dict[Any, _Form] = {
        F.batch_norm: _Form(_F_ARGS),
        torch.batch_norm: _Form(_ATEN_ARGS),
    }

    def add(packet: str, overload: str, form: _Form) -> None:
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload):
            forms[getattr(op, overload)] = form

    add("batch_norm", "default", _Form(_ATEN_ARGS))
    add("native_batch_norm", "default", _Form(_ATEN_ARGS, tuple_out=True))
    add("_native_batch_norm_legit", "default", _Form(_ATEN_ARGS, tuple_out=True))
    no_stats = ("input", "weight", "bias", "training", "momentum", "eps")
    add("_native_batch_norm_legit", "no_stats", _Form(no_stats, tuple_out=True))
    add(
        "_native_batch_norm_legit_functional",
        "default",
        _Form(_ATEN_ARGS, tuple_out=True, functional_stats=(3, 4)),
    )
    with_update = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
    add("_batch_norm_with_update", "default", _Form(with_update, tuple_out=True, training=True))
    add(
        "_batch_norm_with_update_functional",
        "default",
        _Form(with_update, tuple_out=True, functional_stats=(4, 5), training=True),
    )
    add("cudnn_batch_norm", "default", _Form(_ATEN_ARGS, tuple_out=True))
    eval_args = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
    add("_native_batch_norm_legit_no_training", "default", _Form(eval_args, True, None, False))
    add("_batch_norm_no_update", "default", _Form(eval_args, True, None, False))
    return forms


_FORMS = _aten_forms()
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- report -----------------------------------------------------------------------------------
@dataclasses.dataclass
class RewriteReport:
    """What a rewrite did: the BN nodes rewritten and those skipped, with a reason each."""

    rewritten: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, method)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
    lowering: str = "torch"
    #: (name, "relu" | "residual+relu") for each epilogue folded into a fused BN call
    epilogues: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (name, why) for BN lowered to the kernels whose input will run the torch estimator instead
    fallbacks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (name, values before, values after) for each BN whose sample the floor raised (where the
    #: graph knows the input's shape: Dynamo, export, make_fx graphs; else at run time only)
    raised: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    #: names of the ``nn.SyncBatchNorm`` layers rewritten: their samples are pooled across ranks
    synchronised: list[str] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.rewritten)

    def skipped_for(self, reason_prefix: str) -> list[str]:
        return [name for name, reason in self.skipped if reason.startswith(reason_prefix)]

    def __str__(self) -> str:
        head = f"bnrewrite: rewrote {self.count} BatchNorm node(s)"
        if self.lowering != "torch":
            head += f" (lowering {self.lowering}, {len(self.epilogues)} epilogue(s) fused)"
        lines = [head]
        lines += [f"  rewritten {name} ({method})" for name, method in self.rewritten]
        lines += [f"  fused {kind} into {name}" for name, kind in self.epilogues]
        lines += [
            f"  {name}: lowering kernels falls back to the torch estimator: {why}"
            for name, why in self.fallbacks
        ]
        lines += [
            f"  {name}: the floor raised the sample from {a} to {b} values per channel"
            for name, a, b in self.raised
        ]
        lines += [f"  {name}: synchronised across its process group" for name in self.synchronised]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


#: Why a ``nn.SyncBatchNorm`` traced across processes (CUDA, more than one rank) is left alone.
UNTOUCHED_SYNC = (
    "unsupported form: nn.SyncBatchNorm traced across processes (PyTorch's sync_batch_norm); "
    "convert the model with bnrewrite.convert_ before wrapping it in DDP and torch.compile"
)


# -- matching ---------------------------------------------------------------------------------
@dataclasses.dataclass
class BatchNormSite:
    """One BatchNorm node of a graph, its arguments normalised to aten order.

    ``form`` is ``"module"`` (call_module), ``"function"`` (call_function, mutating or plain) or
    ``"functional"`` (returns the new running statistics). ``reason`` is set when the node cannot
    be rewritten whatever the config (eval mode, unsupported form, already rewritten).
    """

    node: fx.Node
    form: str
    name: str
    args: dict[str, Any]
    reason: str | None = None
    spec: _Form | None = None


_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?")


def _normalize_qualname(text: str) -> str:
    """``L['self'].layer1[0]._modules['bn']`` -> ``layer1.0.bn``."""
    text = _DYNAMO_ROOT.sub("", text)
    text = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", text)
    text = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", text)
    return text.strip(".")


def _buffer_owner(arg: Any, gm: fx.GraphModule | None) -> str | None:
    """Qualified module name from a ``get_attr`` or Dynamo placeholder of a BN parameter/buffer."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr" and "." in str(arg.target):
        return str(arg.target).rsplit(".", 1)[0]
    if arg.op == "placeholder":
        sig = getattr(gm, "_bnrewrite_signature", None) if gm is not None else None
        if sig and arg.name in sig:
            owner, dot, _ = sig[arg.name].rpartition(".")
            return owner if dot else None
        # Dynamo: L_self_modules_layer1_modules_0_modules_bn1_buffers_running_mean_
        m = re.match(r"^L_[a-zA-Z0-9]+((?:_modules_.+?)+)_(?:buffers|parameters)_", str(arg.target))
        if m:
            return m.group(1).replace("_modules_", ".").strip(".")
    return None


def _site_name(node: fx.Node, args: Mapping[str, Any], gm: fx.GraphModule | None) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1][:2]
        kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
        if "BatchNorm" in kind_name:
            return _normalize_qualname(str(path))
    for key in ("running_mean", "weight", "running_var", "bias"):
        owner = _buffer_owner(args.get(key), gm)
        if owner:
            return owner
    return node.name


def _normalize_args(node: fx.Node, names: Sequence[str]) -> dict[str, Any]:
    values = dict(_DEFAULTS)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _is_float_arg(value: Any) -> bool:
    """A Python number, or a node whose value is a ``SymFloat`` (Dynamo with ``dynamic=True``
    turns float arguments into graph inputs)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if isinstance(value, fx.Node):
        meta = value.meta.get("example_value", value.meta.get("val"))
        return isinstance(meta, (float, torch.SymFloat))
    return False


def _match(node: fx.Node, gm: fx.GraphModule | None) -> BatchNormSite | None:
    if node.op == "call_module" and gm is not None:
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return None
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return None
        name = str(node.target)
        site = BatchNormSite(node, "module", name, {})
        if isinstance(mod, SampledBatchNormMixin) or type(mod).__name__ == "SampledSyncBatchNorm":
            site.reason = "already rewritten"
        elif isinstance(mod, nn.SyncBatchNorm):
            site.reason = "eval mode" if not mod.training else None  # -> SampledSyncBatchNorm
        elif type(mod) not in _BN_MODULES:
            site.reason = f"unsupported form: {type(mod).__name__}"
        elif not mod.training:
            site.reason = "eval mode"
        return site
    if node.op != "call_function":
        return None
    if is_sampled_batch_norm_op(node.target):
        return BatchNormSite(node, "function", node.name, {}, reason="already rewritten")
    spec = _FORMS.get(node.target)
    if spec is None:
        return None
    args = _normalize_args(node, spec.args)
    if spec.training is not None:
        args["training"] = spec.training
    form = "functional" if spec.functional_stats else "function"
    site = BatchNormSite(node, form, _site_name(node, args, gm), args, spec=spec)
    training = args["training"]
    if not isinstance(training, bool):
        site.reason = "unsupported form: training is not a constant"
    elif not training:
        site.reason = "eval mode"
    elif not _is_float_arg(args["eps"]):
        site.reason = "unsupported form: eps is not a float"
    elif not _is_float_arg(args["momentum"]):
        site.reason = "unsupported form: momentum is not a float"
    elif spec.tuple_out:
        used = {u.args[1] for u in node.users if u.target is operator.getitem and u.users}
        if any(u.target is not operator.getitem for u in node.users):
            site.reason = "unsupported form: tuple output used whole"
        else:
            allowed = {0, *(spec.functional_stats or ())}
            if used - allowed:
                site.reason = (
                    "unsupported form: saved statistics are used (a joint forward/backward "
                    "graph); rewrite before autograd"
                )
    return site


def _module_type_name(kind: Any) -> str:
    return kind.rpartition(".")[2] if isinstance(kind, str) else getattr(kind, "__name__", "")


def sync_scopes(graph: fx.Graph, sites: Sequence[BatchNormSite]) -> tuple[list[str], list[str]]:
    """The synchronised layers a Dynamo graph inlined, by each node's ``nn_module_stack``.

    Returns ``(sampled, untouched)``: the paths of the ``SampledSyncBatchNorm`` layers (already
    sampled, pooled across their process group: nothing to rewrite) and of the
    ``nn.SyncBatchNorm`` layers traced in their cross-process form (PyTorch's CUDA
    ``sync_batch_norm`` function, not a ``batch_norm`` call this pass could rewrite). A
    ``nn.SyncBatchNorm`` of one process traces as ``F.batch_norm`` and is a plain site."""
    sampled: dict[str, None] = {}
    sync: dict[str, None] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        path, kind = list(stack.values())[-1][:2]
        name = _module_type_name(kind)
        if name == "SampledSyncBatchNorm":
            sampled[_normalize_qualname(str(path))] = None
        elif name == "SyncBatchNorm":
            sync[_normalize_qualname(str(path))] = None
    with_sites = {site.name for site in sites}
    return list(sampled), [name for name in sync if name not in with_sites]


def find_batch_norm_nodes(
    graph_or_module: fx.Graph | fx.GraphModule,
) -> list[BatchNormSite]:
    """Every BatchNorm node of the graph in order, with ``reason`` set where it cannot be rewritten."""
    if isinstance(graph_or_module, fx.GraphModule):
        graph, gm = graph_or_module.graph, graph_or_module
    else:
        graph, gm = graph_or_module, graph_or_module.owning_module
    sites = []
    for node in graph.nodes:
        site = _match(node, gm)
        if site is not None:
            sites.append(site)
    return sites


# -- rewriting one node -----------------------------------------------------------------------
_VALUE_META = ("val", "tensor_meta", "example_value")


def _copy_meta(src: fx.Node, dst: fx.Node, index: int | None = None) -> None:
    """Copy provenance meta; value meta as is (``index=None``) or element ``index`` of a tuple."""
    for key, value in src.meta.items():
        if key in _VALUE_META and index is not None:
            if isinstance(value, (tuple, list)) and len(value) > index:
                dst.meta[key] = value[index]
            continue
        dst.meta[key] = value


def _set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def _training_attr(gm: fx.GraphModule | None, site: BatchNormSite) -> fx.Node | bool:
    """A ``get_attr`` of the owning module's ``training`` flag, for ``symbolic_trace`` graphs.

    ``symbolic_trace`` bakes ``self.training`` into ``F.batch_norm`` calls as a constant; reading
    the flag of the module that owns the BN's buffers keeps ``.train()`` / ``.eval()`` honoured.
    Falls back to the constant ``True`` when the owner is unknown or the BN has no running stats.
    """
    rm = site.args.get("running_mean")
    if gm is None or not isinstance(rm, fx.Node) or rm.op != "get_attr":
        return True
    owner = str(rm.target).rpartition(".")[0]
    try:
        gm.get_submodule(owner)
    except AttributeError:
        return True
    graph = site.node.graph
    with graph.inserting_before(site.node), warnings.catch_warnings():
        # ``training`` is a plain attribute, not a parameter/buffer/submodule: FX warns, codegen
        # emits ``self.<owner>.training`` all the same.
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        return graph.get_attr(f"{owner}.training" if owner else "training")


def rewrite_node(
    gm: fx.GraphModule | None,
    site: BatchNormSite,
    config: SamplingConfig,
    *,
    follow_module_training: bool = False,
    lowering: str = "torch",
) -> fx.Node | None:
    """Rewrite one matched BatchNorm node (``site.reason`` must be ``None``) to ``config``.

    ``follow_module_training``: for ``symbolic_trace`` graphs, read the ``training`` argument of a
    ``call_function`` BN from its owning module at run time (see :func:`_training_attr`).
    ``lowering="kernels"``: emit ``bnrewrite::fused_sampled_batch_norm`` (mutating forms) or a
    ``FusedSampledBatchNormNd`` (module form) instead; the functional forms keep the torch op.
    Returns the new node (``None`` for the module form, whose node is kept).
    """
    if site.reason is not None:
        raise ValueError(f"cannot rewrite {site.name}: {site.reason}")
    check_lowering(lowering, config)
    node = site.node
    graph = node.graph
    if site.form == "module":
        assert gm is not None
        bn = gm.get_submodule(str(node.target))
        if isinstance(bn, nn.SyncBatchNorm):  # pooled across its process group
            from bnrewrite.distributed import sync_twin

            _set_module(gm, str(node.target), sync_twin(bn, config))
            return None
        module = from_batch_norm(bn, config)
        if lowering == "kernels":
            from bnrewrite.kernels.modules import fused_twin

            module = fused_twin(module)
        _set_module(gm, str(node.target), module)
        return None
    a = site.args
    training = _training_attr(gm, site) if follow_module_training else True
    op_args = (
        a["input"],
        a["weight"],
        a["bias"],
        a.get("running_mean"),
        a.get("running_var"),
        training,
        float(a["momentum"]) if isinstance(a["momentum"], int) else a["momentum"],
        float(a["eps"]) if isinstance(a["eps"], int) else a["eps"],
        config_to_str(config),
    )
    spec = site.spec
    assert spec is not None
    with graph.inserting_before(node):
        if site.form == "functional":
            new = graph.call_function(sampled_batch_norm_functional_op, op_args)
            _copy_meta(node, new, index=None)
            val_keys = [k for k in _VALUE_META if k in node.meta]
            stats = spec.functional_stats
            assert stats is not None
            for key in val_keys:
                old = node.meta[key]
                new.meta[key] = (old[0], old[stats[0]], old[stats[1]])
            remap = {0: 0, stats[0]: 1, stats[1]: 2}
        else:
            target = sampled_batch_norm_op if lowering == "torch" else fused_sampled_batch_norm_op
            new = graph.call_function(target, op_args)
            _copy_meta(node, new, index=0 if spec.tuple_out else None)
            remap = {0: 0}
    if not spec.tuple_out:
        node.replace_all_uses_with(new)
    else:
        for user in list(node.users):
            idx = user.args[1]
            if not user.users:  # a dead getitem (saved statistics nobody reads)
                graph.erase_node(user)
            elif site.form == "functional":
                user.args = (new, remap[idx])
            else:
                user.replace_all_uses_with(new)
                graph.erase_node(user)
    graph.erase_node(node)
    return new


def _input_value(site: BatchNormSite) -> Any:
    """The example value of the BN's input (Dynamo, export, make_fx graphs), else ``None``."""
    x = site.args.get("input") if site.form != "module" else site.node.args[0]
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None


def input_shape(site: BatchNormSite) -> tuple[Any, ...] | None:
    """The shape of the BN's input: from its example value or ``shape_prop``'s ``tensor_meta``."""
    meta = _input_value(site)
    if isinstance(meta, torch.Tensor):
        return tuple(meta.shape)
    x = site.args.get("input") if site.form != "module" else site.node.args[0]
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def example_size(d: Any) -> Any:
    """A size at its example value: a ``SymInt`` with a hint as that int (no guard is added),
    anything else (an int, ``None``, a SymInt without a hint) as it is."""
    if isinstance(d, torch.SymInt) and d.node.has_hint():
        return int(d.node.hint)
    return d


def floor_raise(site: BatchNormSite, config: SamplingConfig) -> tuple[int, int] | None:
    """``(before, after)`` when the floor raises this BN's sample, if the input shape is known
    (a symbolic size, such as the batch dim of a program exported with ``Dim.AUTO``, at its
    example value: the floor itself is decided at run time for each call's shape)."""
    shape = input_shape(site)
    if shape is not None:
        shape = tuple(example_size(d) for d in shape)
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return None
    plan = sample_plan(shape, config)
    return (plan.unfloored_count, plan.count()) if plan.raised else None


def _kernels_refusal(site: BatchNormSite) -> str | None:
    """Why the kernels will not run this BN, judged from the input's value meta (if known)."""
    meta = _input_value(site)
    if not isinstance(meta, torch.Tensor):
        return None  # unknown until run time (symbolic_trace graphs)
    from bnrewrite.kernels.ops import kernels_refusal

    return kernels_refusal(meta.device, meta.dtype, meta.dim())


# -- selection ----------------------------------------------------------------------------------
def _as_patterns(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def rewrite_graph(
    graph_or_module: fx.Graph | fx.GraphModule,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    filter_fn: Callable[[BatchNormSite], bool] | None = None,
    follow_module_training: bool | AbstractSet[str] = False,
    lowering: str = "torch",
    fuse_epilogues: bool = True,
) -> RewriteReport:
    """Rewrite every training-mode BN node of a graph in place; returns the report.

    Works on a ``GraphModule`` (any graph kind) or a bare ``Graph`` (the Inductor pre-grad hook);
    ``call_module`` sites need the owning module; module-form BN are rewritten whatever their mode
    (the sampled twin follows its ``training`` flag at run time). ``follow_module_training``: ``True``
    for every ``call_function`` BN, or the names of the nodes whose ``training`` argument is the
    owning module's mode (:func:`mode_following_nodes`); those read the flag at run time, are
    rewritten when traced in eval mode too, and every other ``training=True`` stays a literal.
    ``lowering`` (:data:`LOWERINGS`): ``"kernels"``
    lowers to the fused Triton kernels and, with ``fuse_epilogues``, folds each ``relu(BN)`` and
    ``relu(BN + z)`` into the BN call (:func:`bnrewrite.passes.epilogue.fuse_epilogues`).
    """
    cfg = SamplingConfig.coerce(config)
    check_lowering(lowering, cfg)
    include_p, exclude_p = _as_patterns(include), _as_patterns(exclude)
    if isinstance(graph_or_module, fx.GraphModule):
        gm: fx.GraphModule | None = graph_or_module
        graph = graph_or_module.graph
    else:
        graph = graph_or_module
        gm = graph.owning_module
    report = RewriteReport(lowering=lowering)
    changed = False
    names: dict[str, str] = {}  # new node / module path -> site name, for the epilogue report
    follows = follow_module_training
    sites = find_batch_norm_nodes(graph if gm is None else gm)
    inlined_sync, untouched_sync = sync_scopes(graph, sites)
    report.synchronised += inlined_sync
    report.skipped += [(name, UNTOUCHED_SYNC) for name in untouched_sync]
    if untouched_sync:
        log.warning("bnrewrite: %s left as PyTorch's SyncBatchNorm: %s", untouched_sync[0],
                    UNTOUCHED_SYNC)  # fmt: skip
    for site in sites:
        if site.reason == "eval mode" and (
            site.form == "module"
            or (isinstance(follows, AbstractSet) and site.node.name in follows)
        ):
            site.reason = None  # follows its module's training flag at run time
        if site.reason is not None:
            report.skipped.append((site.name, site.reason))
            continue
        chosen = select_config(site.name, cfg, include_p, exclude_p, overrides)
        if chosen is None or (filter_fn is not None and not filter_fn(site)):
            report.skipped.append((site.name, "filtered by name"))
            continue
        follow = site.node.name in follows if isinstance(follows, AbstractSet) else bool(follows)
        if site.form == "module" and isinstance(
            gm.get_submodule(str(site.node.target)), nn.SyncBatchNorm
        ):
            report.synchronised.append(site.name)
        new = rewrite_node(gm, site, chosen, follow_module_training=follow, lowering=lowering)
        names[new.name if new is not None else str(site.node.target)] = site.name
        report.rewritten.append((site.name, chosen.method))
        raised = floor_raise(site, chosen)
        if raised is not None:
            report.raised.append((site.name, *raised))
        changed = changed or site.form != "module"
        if lowering == "kernels":
            why = _kernels_refusal(site)
            if why is not None:
                report.fallbacks.append((site.name, why))
    if lowering == "kernels" and fuse_epilogues and report.rewritten:
        from .epilogue import fuse_epilogues as _fuse

        fused = _fuse(graph if gm is None else gm)
        report.epilogues = [(names.get(name, name), kind) for name, kind in fused]
        changed = changed or bool(fused)
    if changed:
        graph.lint()
        if gm is not None:
            gm.recompile()
    log.info("%s", report)
    if report.fallbacks:
        log.warning(
            "bnrewrite: %d BatchNorm node(s) lowered to the kernels will run the torch estimator "
            "(%s: %s)",
            len(report.fallbacks),
            *report.fallbacks[0],
        )
    return report


# -- entry point --------------------------------------------------------------------------------
def copy_program(ep: Any) -> Any:
    """A deep copy of ``ep``: graph, parameters, buffers and constants (the returned program
    trains its own tensors; the input program is never modified). torch's own
    ``FutureWarning`` about ``LeafSpec``, raised while its tree specs are copied, is not the
    user's to act on and is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(ep)


def _rewrite_exported(
    ep: Any, cfg: SamplingConfig, kwargs: dict[str, Any], *, copy_first: bool = True
) -> Any:
    if copy_first:
        ep = copy_program(ep)
    gm = ep.graph_module
    sig = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None:
            sig[spec.arg.name] = spec.target
    gm._bnrewrite_signature = sig
    try:
        report = rewrite_graph(gm, cfg, **kwargs)
    finally:
        del gm._bnrewrite_signature
    gm.meta["bnrewrite"] = report
    return ep, report


class _ShapeAndIntProp(ShapeProp):
    """``ShapeProp`` that also keeps the value of every node computing a plain ``int`` (sizes such
    as ``x.size(1)``) in ``meta["val"]``, as Dynamo and export graphs do."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, int) and not isinstance(result, bool) and n.op != "placeholder":
            n.meta.setdefault("val", result)
        return result


def shape_prop(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``tensor_meta`` (and ``meta["val"]`` of int-valued nodes) by running ``gm`` once;
    parameters and buffers are restored after."""
    saved = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            _ShapeAndIntProp(gm).propagate(*example_inputs)
    finally:
        with torch.no_grad():
            for k, v in gm.state_dict(keep_vars=True).items():
                if k in saved:
                    v.copy_(saved[k])


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (graph, code generator, meta) whose parameters and buffers are ``gm``'s
    (torch's ``LeafSpec`` ``FutureWarning`` from copying an unlifted program's tree specs is
    silenced, as in :func:`copy_program`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        new = copy.deepcopy(gm)
    pairs = zip(
        gm.named_modules(remove_duplicate=False),
        new.named_modules(remove_duplicate=False),
        strict=True,
    )
    for (_, src), (_, dst) in pairs:
        dst._parameters = dict(src._parameters)
        dst._buffers = dict(src._buffers)
    return new


def _swap_into(model: nn.Module, gm: fx.GraphModule) -> None:
    """``inplace=True``: the model's own BN modules become the graph's sampled twins."""
    for name, module in gm.named_modules():
        if isinstance(module, SampledBatchNormMixin):
            try:
                current = model.get_submodule(name)
            except AttributeError:
                continue
            if current is not module:
                _set_module(model, name, module)


class BatchNormRoot(nn.Module):
    """A model that is one BatchNorm layer (``rewrite(nn.BatchNorm2d(C))``): ``forward`` calls it.

    ``torch.fx`` cannot trace a BN's own ``forward`` (it branches on the input's rank), so the layer
    becomes the submodule ``bn`` of this root; its parameters and buffers are shared."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn
        self.training = bn.training

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self.bn(input)


def _bn_call_training(gm: fx.GraphModule) -> list[tuple[str, Any]]:
    """``(node name, training argument)`` of each ``call_function`` BN whose op takes one."""
    out = []
    for site in find_batch_norm_nodes(gm):
        if site.form != "module" and site.spec is not None and site.spec.training is None:
            out.append((site.node.name, site.args.get("training")))
    return out


def mode_following_nodes(
    model: nn.Module, gm: fx.GraphModule, tracer_kwargs: Mapping[str, Any] | None = None
) -> set[str] | None:
    """Names of ``gm``'s ``call_function`` BN nodes whose ``training`` argument is the module mode.

    ``symbolic_trace`` bakes ``self.training`` into a constant, which looks like a literal
    ``training=True``. Tracing twice more, with every module in train mode and then in eval mode,
    tells them apart: an argument that is ``True`` in the first and ``False`` in the second follows
    the mode; one that is ``True`` in both is a literal, honoured as written. ``None`` when the
    traces do not line up (the graph's structure depends on the mode): then every BN follows.
    """
    modes = {m: m.training for m in model.modules()}
    traced: list[list[tuple[str, Any]]] = []
    try:
        for flag in (True, False):
            for m in modes:
                m.training = flag
            traced.append(_bn_call_training(fx.symbolic_trace(model, **dict(tracer_kwargs or {}))))
    finally:
        for m, flag in modes.items():
            m.training = flag
    here = _bn_call_training(gm)
    train, evals = traced
    if not (len(here) == len(train) == len(evals)):
        log.info("bnrewrite: the graph's BatchNorm calls depend on the mode; all follow it")
        return None
    return {
        name
        for (name, _), (_, t), (_, e) in zip(here, train, evals, strict=True)
        if t is True and e is False
    }


def warn_user(message: str) -> None:
    """``warnings.warn(UserWarning)`` attributed to the first caller outside bnrewrite."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("bnrewrite"):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def warn_unmatched(
    names: Sequence[str],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    overrides: Mapping[str, Any] | None,
    what: str,
) -> None:
    """``UserWarning`` for a model with no BatchNorm and for name patterns that match no layer."""
    if not names:
        warn_user(f"bnrewrite: {what} has no BatchNorm layer; nothing was rewritten")
        return
    for option, patterns in (
        ("include", include or ()),
        ("exclude", exclude or ()),
        ("overrides", list(overrides or ())),
    ):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                warn_user(
                    f"bnrewrite: {option} pattern {pattern!r} matches no BatchNorm layer; the "
                    f"layers are {sorted(names)}"
                )


def _warn_patterns(
    report: RewriteReport,
    include: Any,
    exclude: Any,
    overrides: Mapping[str, Any] | None,
    what: str,
) -> None:
    names = [n for n, _ in report.rewritten] + [n for n, _ in report.skipped]
    warn_unmatched(names, _as_patterns(include), _as_patterns(exclude), overrides, what)


def _warn_inference_only(report: RewriteReport, what: str) -> None:
    inference = report.skipped_for("eval mode")
    if report.count == 0 and inference and len(inference) == len(report.skipped):
        warn_user(
            f"bnrewrite: every BatchNorm of this {what} is an inference BatchNorm "
            f"({len(inference)} in eval mode) and none was rewritten; trace or export the model "
            f"in training mode (model.train()), or rewrite the nn.Module"
        )


def rewrite(
    obj: Any,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    inplace: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    return_report: bool = False,
    tracer_kwargs: Mapping[str, Any] | None = None,
    lowering: str = "torch",
    example_inputs: Sequence[Any] | None = None,
    capture: str = "auto",
) -> Any:
    """Rewrite the training-mode BatchNorm of a model, a GraphModule or an ExportedProgram, node by
    node (every method but ``vdn`` / ``fs_vdn``, which need the whole graph:
    :func:`bnrewrite.passes.vdn.rewrite_vdn`; :func:`bnrewrite.rewrite` picks the right one).

    * ``nn.Module`` -> ``GraphModule`` (``torch.fx.symbolic_trace``). The result shares the model's
      parameters and buffers, as ``symbolic_trace`` and ``torch.compile`` do (an optimizer built on
      ``model.parameters()`` trains it), and the model's modules are not modified. With
      ``inplace=True`` the model's own BN modules are swapped for their sampled twins (the model
      itself then samples). A model that is one BN layer is traced as ``gm.bn``.
      A model ``symbolic_trace`` cannot trace (control flow on sizes, ``int()`` of a size, ...)
      is captured with ``torch.export`` on ``example_inputs`` instead and comes back as a
      :class:`~bnrewrite.passes.capture.CapturedModel` (the rewritten program in training mode,
      the model's own forward in eval mode, the model's parameters, buffers and ``state_dict``
      keys); without ``example_inputs`` it raises
      :class:`~bnrewrite.passes.capture.UntraceableModelError`, naming the source line where
      tracing stopped and the routes that work. ``capture``: ``"auto"`` (that), ``"fx"``
      (``symbolic_trace`` only) or ``"export"`` (``torch.export`` always).
    * ``GraphModule`` -> ``GraphModule``: a new one over a copy of the graph, sharing parameters and
      buffers (``inplace=True``: the graph itself is rewritten).
    * ``torch.export.ExportedProgram`` -> ``ExportedProgram`` (always a copy: a program owns its
      state).

    Module-form BN are rewritten in whatever mode the model is: each follows its ``training`` flag
    at run time. A ``call_function`` BN whose ``training`` is ``self.training`` follows the module
    too; a literal ``training=True`` stays batch statistics (:func:`mode_following_nodes`).
    Warnings (``UserWarning``): no BatchNorm at all, name patterns that match no layer, and a graph
    that holds only inference BatchNorm.

    ``include`` / ``exclude``: fnmatch patterns over qualified module names (``"layer1.*"``).
    ``overrides``: ``{name or pattern: config or None}``, a config per layer (``None`` keeps it
    full). The report (:class:`RewriteReport`) is stored in ``result.meta["bnrewrite"]`` for
    GraphModules, in ``ep.graph_module.meta["bnrewrite"]`` for ExportedPrograms, logged on the
    ``bnrewrite`` logger and returned too with ``return_report=True``.

    ``lowering="kernels"``: the rewritten BN run the fused Triton kernels on CUDA, with ReLU and
    residual-add + ReLU epilogues fused (see :func:`rewrite_graph`); ``"torch"`` (default): the
    estimator as aten ops.

    ``example_inputs``: run the traced graph once on them (state restored) so that the report
    knows each BN's input shape and lists the layers whose sample the floor raises (and the
    inputs ``torch.export`` captures on, above).
    """
    cfg = SamplingConfig.coerce(config)
    check_lowering(lowering, cfg)
    if cfg.uses_virtual_rows:
        raise ValueError(
            f"method {cfg.method!r} carries virtual rows through the whole graph: use "
            f"bnrewrite.rewrite(model, cfg) or bnrewrite.passes.vdn.rewrite_vdn"
        )
    opts = {"include": include, "exclude": exclude, "overrides": overrides}
    export_cls = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if export_cls is not None and isinstance(obj, export_cls):
        result, report = _rewrite_exported(obj, cfg, {**opts, "lowering": lowering})
        _warn_inference_only(report, "ExportedProgram")
        _warn_patterns(report, include, exclude, overrides, "the ExportedProgram")
        return (result, report) if return_report else result
    follows: bool | set[str] = False
    if isinstance(obj, fx.GraphModule):
        gm = obj if inplace else _copy_graph_module(obj)
    elif isinstance(obj, nn.Module):
        model = obj if inplace else share_structure(obj)
        if isinstance(model, nn.modules.batchnorm._BatchNorm):
            model = BatchNormRoot(model)
        captured = capture_model(
            model, example_inputs=example_inputs, tracer_kwargs=tracer_kwargs, mode=capture
        )
        if not isinstance(captured, fx.GraphModule):  # an ExportedProgram
            if inplace:
                raise ValueError(
                    f"inplace=True swaps the BatchNorm modules of a traced model, and "
                    f"{type(obj).__name__} was captured with torch.export (symbolic_trace cannot "
                    f"trace it); use bnrewrite.convert_(model, cfg) to make the model itself "
                    f"sample, or drop inplace=True"
                )
            _, report = _rewrite_exported(
                captured, cfg, {**opts, "lowering": lowering}, copy_first=False
            )
            result = CapturedModel(model, captured.module(), captured, report)
            _warn_inference_only(report, type(obj).__name__)
            _warn_patterns(report, include, exclude, overrides, f"this {type(obj).__name__}")
            return (result, report) if return_report else result
        gm = captured
        gm.training = model.training  # the flag only: a frozen BN inside stays in eval mode
        found = mode_following_nodes(model, gm, tracer_kwargs)
        follows = True if found is None else found
    else:
        raise ValueError(
            f"rewrite expects an nn.Module, a torch.fx.GraphModule or a "
            f"torch.export.ExportedProgram, got {type(obj).__name__}"
        )
    if example_inputs is not None:
        shape_prop(gm, example_inputs)
    report = rewrite_graph(gm, cfg, **opts, follow_module_training=follows, lowering=lowering)
    gm.meta["bnrewrite"] = report
    if inplace and isinstance(obj, nn.Module) and not isinstance(obj, fx.GraphModule):
        _swap_into(obj, gm)
    if isinstance(obj, fx.GraphModule):
        _warn_inference_only(report, "graph")
    _warn_patterns(report, include, exclude, overrides, f"this {type(obj).__name__}")
    return (gm, report) if return_report else gm
