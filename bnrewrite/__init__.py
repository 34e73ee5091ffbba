"""bnrewrite: BatchNorm with statistics from a few uncorrelated data.

Layers, from the bottom up (see ``docs/architecture.md``):

1. :mod:`bnrewrite.config`     -- ``SamplingConfig``.
2. :mod:`bnrewrite.plan`       -- the backend-neutral sample plan;
   :mod:`bnrewrite.estimators` -- the math (``sampled_batch_norm``), the single source of truth;
   its lowerings :mod:`bnrewrite.eager` (native kernels) and :mod:`bnrewrite.compiled` (for
   ``torch.compile``); ``bnrewrite.sampled_batch_norm`` picks the one for its context;
   :mod:`bnrewrite.modules`    -- ``SampledBatchNorm1d/2d/3d`` and ``convert_``.
3. :mod:`bnrewrite.passes`     -- graph passes (FX, VDN, ONNX rules), lowerings of the estimators.
4. :mod:`bnrewrite.kernels`    -- fused GPU lowering.
5. Entry points: ``rewrite``, the ``torch.compile`` backend, :mod:`bnrewrite.onnx`, the CLI.
"""

from __future__ import annotations

from typing import Any

from . import _source_checkout  # noqa: F401  (bnrewrite.passes from a plain checkout)
from .config import SamplingConfig
from .eager import sampled_batch_norm  # dispatches: eager, compiled or composite lowering
from .modules import SampledBatchNorm1d, SampledBatchNorm2d, SampledBatchNorm3d, convert_
from .plan import SamplePlan, sample_plan

__all__ = [
    "SamplingConfig",
    "SamplePlan",
    "sample_plan",
    "sampled_batch_norm",
    "SampledBatchNorm1d",
    "SampledBatchNorm2d",
    "SampledBatchNorm3d",
    "convert_",
    "rewrite",
]

__version__ = "0.1.0"


def rewrite(obj: Any, config: Any = None, **kwargs: Any) -> Any:
    """Rewrite the training-mode BatchNorm of a model or graph (see :mod:`bnrewrite.passes.dispatch`)."""
    from .passes.dispatch import rewrite as _rewrite

    return _rewrite(obj, config, **kwargs)
