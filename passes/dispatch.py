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

from bnrewrite.config import SamplingConfig

from .fx import check_lowering
from .fx import rewrite as rewrite_nodes
from .vdn import rewrite_vdn

__all__ = ["rewrite"]

_NODE_OPTIONS = set(inspect.signature(rewrite_nodes).parameters) - {"obj", "config", "lowering"}


def rewrite(
    obj: Any,
    config: SamplingConfig | Mapping[str, Any] | str | None = None,
    *,
    lowering: str = "torch",
    **options: Any,
) -> Any:
    """Rewrite the training-mode BatchNorm of ``obj`` with ``config`` (see the two passes).

    ``options`` are those of the pass the config selects; options that only VDN takes
    (``batch_inputs``, ``example_inputs``, ``virtual_moments``) are refused for the other methods.
    """
    cfg = SamplingConfig.coerce(config)
    check_lowering(lowering, cfg)
    if cfg.uses_virtual_rows:
        return rewrite_vdn(obj, cfg, **options)
    vdn_only = sorted(set(options) - _NODE_OPTIONS)
    if vdn_only:
        raise ValueError(
            f"options {vdn_only} apply to method 'vdn' / 'fs_vdn' only, not to {cfg.method!r}"
        )
    return rewrite_nodes(obj, cfg, lowering=lowering, **options)
