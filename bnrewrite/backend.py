"""The ``torch.compile`` backend ``"bnrewrite"`` and an Inductor pre-grad pass.

Inductor decomposes BatchNorm before its joint and post-grad passes, so the sampled statistics must
be in the graph *before* autograd: the backend rewrites the Dynamo graph (``F.batch_norm`` calls
with the module's buffers as placeholders) with the FX pass (:mod:`bnrewrite.passes.fx`), then
hands it to Inductor (or to ``aot_eager`` / ``eager``). The emitted node is the registered custom
op ``bnrewrite::sampled_batch_norm`` (CompositeImplicitAutograd), so AOTAutograd decomposes it into
aten ops -- the compiled lowering (:mod:`bnrewrite.compiled`): the estimator's forward and a
hand-written backward of one reduction pass, ``dx = w * rstd * dy`` and a fix-up of the sampled
elements -- and both the AOTAutograd cache and the FX graph cache can hit.

Entry points:

* ``torch.compile(model, backend="bnrewrite", options={...})`` -- registered through the
  ``torch_dynamo_backends`` entry point (``bnrewrite.backend:bnrewrite_backend``), no import
  needed. ``options`` holds :class:`bnrewrite.SamplingConfig` fields plus ``mode`` (an Inductor
  mode, passed on), ``include`` / ``exclude`` (fnmatch patterns over module names), ``overrides``
  (``{module path or pattern: config or None}``, or the path of a ``bnrewrite budget`` JSON file),
  ``inner`` (``"inductor"`` default, ``"aot_eager"``, ``"eager"``) and ``lowering``
  (``"torch"`` default: the estimator as aten ops, which Inductor fuses; ``"kernels"``: the fused
  Triton kernels of :mod:`bnrewrite.kernels` with ReLU / residual-add + ReLU epilogues folded in,
  on CUDA inputs). An unknown key is a ``ValueError`` that names it.
* ``make_backend(config, inner="aot_eager")`` -- a backend callable for code that builds its
  config (``torch.compile(model, backend=make_backend(cfg))``).
* ``SampledBatchNormPass(config)`` -- for ``torch._inductor.config.pre_grad_custom_pass``, for
  users who keep ``backend="inductor"``; its ``uuid()`` covers the config and the source of the
  math, so Inductor's caches stay valid.

``vdn`` / ``fs_vdn`` configs run the whole-graph VDN pass (:mod:`bnrewrite.passes.vdn`) on the
Dynamo graph instead of the per-node rewrite. Eval-mode graphs (``training=False`` in every BN
call) are compiled unchanged. A
``BatchNorm(momentum=None)`` makes Dynamo graph-break on ``float(num_batches_tracked)``; the BN
call then runs eagerly as PyTorch's BatchNorm (correct full-batch statistics, not sampled). Convert
such layers with :func:`bnrewrite.convert_` first (``SampledBatchNormNd`` computes the cumulative
factor as a tensor: no graph break) to sample them under ``torch.compile``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import fx

from .config import SamplingConfig
from .ops import config_to_str

__all__ = [
    "BACKEND_OPTIONS",
    "SampledBatchNormPass",
    "bnrewrite_backend",
    "make_backend",
    "parse_options",
    "refuse_graph_break",
]

log = logging.getLogger("bnrewrite")

#: Option keys the backend accepts besides the SamplingConfig fields.
BACKEND_OPTIONS: tuple[str, ...] = (
    "mode",
    "include",
    "exclude",
    "overrides",
    "inner",
    "lowering",
)
_INNER = ("inductor", "aot_eager", "eager")


def parse_options(options: Mapping[str, Any] | None) -> tuple[SamplingConfig, dict[str, Any]]:
    """Split ``torch.compile`` options into a config and backend settings.

    An unknown key raises ``ValueError`` naming it; bad values raise the config's ``ValueError``.
    """
    options = dict(options or {})
    known = (*SamplingConfig.field_names(), *BACKEND_OPTIONS)
    for key in options:
        if key not in known:
            raise ValueError(
                f"unknown bnrewrite backend option {key!r}; known options are "
                + ", ".join(repr(k) for k in known)
            )
    settings = {k: options.pop(k) for k in BACKEND_OPTIONS if k in options}
    if settings.get("overrides") is not None:
        # a path to a JSON file (``bnrewrite budget``) or a mapping; validated here, once
        from .budget import load_overrides

        settings["overrides"] = load_overrides(settings["overrides"])
    return SamplingConfig.from_dict(options), settings


def _mode_patches(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode not in modes:
        raise ValueError(
            f"unknown Inductor mode {mode!r}; use one of {', '.join(map(repr, modes))}"
        )
    return dict(list_mode_options(mode))


def _compile_inner(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    inner: str,
    mode: str | None,
    configs: Sequence[SamplingConfig] | None = None,
) -> Callable[..., Any]:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {**_cpp_workarounds(configs), **_mode_patches(mode), **_cache_key_patch()}
    return compile_fx(gm, example_inputs, config_patches=patches)


def _cache_key_patch() -> dict[str, Any]:
    """Key Inductor's FX-graph and AOTAutograd caches on the source of the lowering.

    The rewritten graph calls ``bnrewrite::sampled_batch_norm``, whose implementation (the
    compiled lowering, traced by AOTAutograd) is not part of the graph's cache key: after a
    change to it -- an upgrade of bnrewrite -- the caches returned the code compiled from the
    earlier version (seen: an ``fs`` layer 3x slower than the current code). The user's
    ``post_grad_custom_pre_pass`` (if any) is wrapped by :class:`_SourceKeyedPass`, whose
    ``uuid()`` adds :func:`_source_digest`; both caches hash that ``uuid()``."""
    from torch._inductor import config

    user = config.post_grad_custom_pre_pass
    if isinstance(user, _SourceKeyedPass):
        return {}
    return {"post_grad_custom_pre_pass": _SourceKeyedPass(user)}


def _cpp_workarounds(configs: Sequence[SamplingConfig] | None = None) -> dict[str, Any]:
    """Inductor config patches for a C++ (CPU) code-generation bug of older torch releases.

    torch 2.11's C++ backend tiles the random BS gather of a channels-last tensor (row index
    depends on the channel's group) as a 2-D transpose whose indirect row index is declared in an
    inner loop (``'tmpN' was not declared in this scope``); torch 2.13 compiles it. Vectorisation
    off (``cpp.simdlen=1``) avoids the tiling. Applied on torch < 2.13 when one of ``configs``
    (all, when ``None``) samples rows in groups at random; it slows the CPU code of that graph
    and does not touch GPU (Triton) code. Users of ``SampledBatchNormPass`` or ``convert_`` +
    ``torch.compile`` on such a torch set ``torch._inductor.config.cpp.simdlen = 1`` themselves
    (docs/architecture.md).
    """
    import torch
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) >= (2, 13):
        return {}
    if configs is not None and not any(
        c.method == "bs" and c.sampling == "random" and c.groups > 1 for c in configs
    ):
        return {}
    return {"cpp.simdlen": 1}


def refuse_graph_break(gm: fx.GraphModule) -> None:
    """VDN under the backend needs the model's forward in one Dynamo graph: the virtual rows must
    enter with the inputs and leave with the outputs. A graph that ends at a graph break (Dynamo's
    ``compile_subgraph_reason``) is refused, naming the user's line where Dynamo broke it."""
    from .passes.vdn import BatchMixingError

    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return
    stack = list(getattr(reason, "user_stack", None) or [])
    where = (
        f" at {stack[-1].filename}:{stack[-1].lineno} ({(stack[-1].line or '').strip()})"
        if stack
        else ""
    )
    why = (str(reason.reason).strip().splitlines() or [""])[0]
    raise BatchMixingError(
        "graph break",
        "torch.compile",
        f"is where Dynamo broke the model's graph{where}: {why}. VDN carries virtual "
        f"rows through one whole graph, and after a break they would start again from an "
        f"intermediate tensor. Remove the graph break (torch._dynamo.explain(model)(x) lists "
        f"them), or rewrite the model with bnrewrite.rewrite(model, cfg, example_inputs=(x,)), "
        f"which captures it in one graph with torch.export; with 'fs_vdn', method 'fs' needs "
        f"no whole graph",
    )


def make_backend(
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    inner: str = "inductor",
    mode: str | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    lowering: str = "torch",
) -> Callable[..., Any]:
    """A ``torch.compile`` backend that rewrites BatchNorm to ``config`` and compiles with ``inner``.

    ``lowering``: ``"torch"`` or ``"kernels"`` (see :data:`bnrewrite.passes.fx.LOWERINGS`).
    """
    from .passes.fx import check_lowering

    cfg = SamplingConfig.coerce(config)
    check_lowering(lowering, cfg)
    if inner not in _INNER:
        raise ValueError(f"inner must be one of {', '.join(map(repr, _INNER))}, got {inner!r}")
    if inner == "inductor":
        _mode_patches(mode)  # validate early

    def bnrewrite_compile(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        filters = {"include": include, "exclude": exclude, "overrides": overrides}
        if cfg.uses_virtual_rows:  # virtual rows travel through the whole graph
            from .passes.vdn import rewrite_vdn

            refuse_graph_break(gm)

            gm, report = rewrite_vdn(gm, cfg, inplace=True, return_report=True, **filters)
        else:
            from .passes.fx import rewrite_graph

            report = rewrite_graph(gm, cfg, **filters, lowering=lowering)
            gm.meta["bnrewrite"] = report
        reports.append(report)
        configs = [cfg] + [SamplingConfig.coerce(v) for v in (overrides or {}).values() if v]
        return _compile_inner(gm, example_inputs, inner, mode, configs)

    reports: list[Any] = []
    bnrewrite_compile.config = cfg  # type: ignore[attr-defined]
    bnrewrite_compile.lowering = lowering  # type: ignore[attr-defined]
    bnrewrite_compile.reports = reports  # type: ignore[attr-defined]  # one per compiled graph
    return bnrewrite_compile


def bnrewrite_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The registered backend: ``torch.compile(model, backend="bnrewrite", options={...})``.

    ``torch.compile`` refuses ``mode`` and ``options`` together, so ``mode`` may also be given as an
    option key.
    """
    cfg, settings = parse_options(options)
    if mode is not None and settings.get("mode") not in (None, mode):
        raise ValueError(f"mode given twice: {mode!r} and options['mode']={settings['mode']!r}")
    settings.setdefault("mode", mode)
    return make_backend(cfg, **settings)(gm, example_inputs)


# -- Inductor pre-grad pass ---------------------------------------------------------------------
def _custom_graph_pass_base() -> type:
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - older torch: a plain callable still works (early)
        return object
    return CustomGraphPass


_SOURCES = (
    "config.py",
    "plan.py",
    "estimators.py",
    "eager.py",
    "compiled.py",
    "modules.py",
    "ops.py",
    "backend.py",
)
_KERNEL_SOURCES = ("kernels/ops.py", "kernels/triton_kernels.py", "kernels/modules.py")


def _source_digest(lowering: str = "torch") -> str:
    """Digest of the files that define the rewrite and its math (the pass is as stable as they)."""
    here = Path(__file__).resolve().parent
    from .passes import epilogue
    from .passes import fx as fx_pass

    names = _SOURCES + (_KERNEL_SOURCES if lowering == "kernels" else ())
    paths = [*(here / name for name in names), Path(fx_pass.__file__)]
    if lowering == "kernels":
        paths.append(Path(epilogue.__file__))
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _SourceKeyedPass(_custom_graph_pass_base()):  # type: ignore[misc]
    """A ``post_grad_custom_pre_pass`` that runs the user's own pass (if any) and whose
    ``uuid()`` is the user's and :func:`_source_digest` together (:func:`_cache_key_patch`)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> str:
        inner = None
        if self.inner is not None:
            get = getattr(self.inner, "uuid", None)
            inner = get() if callable(get) else None
            if inner is None:  # a plain callable: Inductor bypasses its caches for it anyway
                return None  # type: ignore[return-value]
        return hashlib.sha256(repr((inner, _source_digest())).encode()).hexdigest()


class SampledBatchNormPass(_custom_graph_pass_base()):  # type: ignore[misc]
    """``torch._inductor.config.pre_grad_custom_pass``: rewrite BatchNorm before autograd.

    ``torch._inductor.config.pre_grad_custom_pass = SampledBatchNormPass(SamplingConfig("bs"))``
    with ``backend="inductor"`` gives the same graph as ``backend="bnrewrite"``. ``uuid()`` is a
    hash of the config, the filters and the source files of the rewrite: stable across processes,
    so the FX graph cache and the AOTAutograd cache can hit.
    """

    def __init__(
        self,
        config: SamplingConfig | Mapping[str, Any] | str | None = None,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        lowering: str = "torch",
    ) -> None:
        from .passes.fx import check_lowering

        self.config = SamplingConfig.coerce(config)
        if self.config.uses_virtual_rows:
            raise ValueError(
                f"method {self.config.method!r} changes the graph's batch size (virtual rows); "
                "use torch.compile(model, backend='bnrewrite', options=...) for VDN"
            )
        self.lowering = check_lowering(lowering, self.config)
        self.include, self.exclude, self.overrides = include, exclude, overrides
        self.last_report: Any = None
        self.reports: list[Any] = []  # one per graph the pass ran on (none on a cache hit)

    def __call__(self, graph: fx.Graph) -> None:
        from .passes.fx import rewrite_graph

        self.last_report = rewrite_graph(
            graph,
            self.config,
            include=self.include,
            exclude=self.exclude,
            overrides=self.overrides,
            lowering=self.lowering,
        )
        self.reports.append(self.last_report)

    def uuid(self) -> str:
        overrides = sorted(
            (k, None if v is None else config_to_str(SamplingConfig.coerce(v)))
            for k, v in (self.overrides or {}).items()
        )
        key = repr(
            (
                config_to_str(self.config),
                self.include,
                self.exclude,
                overrides,
                self.lowering,
                _source_digest(self.lowering),
            )
        )
        return hashlib.sha256(key.encode()).hexdigest()
