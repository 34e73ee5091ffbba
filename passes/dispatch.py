"""``rewrite``: the one entry point over the graph passes, picking the pass a config needs.

Per-node methods (``full``, ``ns``, ``bs``, ``fs``) rewrite each BatchNorm where it stands
(:func:`bnrewrite.passes.fx.rewrite`); ``vdn`` / ``fs_vdn`` carry virtual rows through the whole
graph (:func:`bnrewrite.passes.vdn.rewrite_vdn`). The dispatch sits above both passes, so the
dependency runs one way: ``dispatch -> vdn -> fx``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from bnrewrite.config import SamplingConfig

from .fx import check_lowering
from .fx import rewrite as rewrite_nodes
from .vdn import rewrite_vdn

__all__ = ["rewrite"]

_NODE_OPTIONS = set(inspect.signature(rewrite_nodes).parameters) - {"obj", "config", "lowering"}


def _is_exported_program(obj: Any) -> bool:
    cls = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    return cls is not None and isinstance(obj, cls)


def _rewrite_vdn_exported(ep: Any, cfg: SamplingConfig, options: dict[str, Any]) -> Any:
    """VDN on an ExportedProgram: the whole-graph pass on ``ep.module()``, then exported again
    with the program's example inputs. The signature is the program's own (the virtual rows are
    appended and removed inside the graph); the new program has static shapes."""
    if ep.example_inputs is None:
        raise ValueError(
            "rewrite of an ExportedProgram with method 'vdn'/'fs_vdn' exports the rewritten graph "
            "again and needs the program's example inputs; export with torch.export.export(model, "
            "args) (which keeps them), or pass ep.module() to get a GraphModule"
        )
    return_report = options.pop("return_report", False)
    options.pop("inplace", None)  # a program is never rewritten in place
    gm, report = rewrite_vdn(ep.module(), cfg, return_report=True, **options)
    args, kwargs = ep.example_inputs
    new = torch.export.export(gm, tuple(args), dict(kwargs or {}))
    new.graph_module.meta["bnrewrite"] = report.bn
    new.graph_module.meta["bnrewrite_vdn"] = report
    return (new, report) if return_report else new


def rewrite(
    obj: Any,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    lowering: str = "torch",
    **options: Any,
) -> Any:
    """Rewrite the training-mode BatchNorm of ``obj`` with ``config`` (see the two passes).

    An ExportedProgram with a VDN config comes back as an ExportedProgram, exported again from
    the rewritten graph (:func:`_rewrite_vdn_exported`).

    ``options`` are those of the pass the config selects; options that only VDN takes
    (``batch_inputs``, ``example_inputs``, ``virtual_moments``) are refused for the other methods.
    """
    cfg = SamplingConfig.coerce(config)
    check_lowering(lowering, cfg)
    if cfg.uses_virtual_rows:
        if _is_exported_program(obj):
            return _rewrite_vdn_exported(obj, cfg, options)
        return rewrite_vdn(obj, cfg, **options)
    vdn_only = sorted(set(options) - _NODE_OPTIONS)
    if vdn_only:
        raise ValueError(
            f"options {vdn_only} apply to method 'vdn' / 'fs_vdn' only, not to {cfg.method!r}"
        )
    return rewrite_nodes(obj, cfg, lowering=lowering, **options)
