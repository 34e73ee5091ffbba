"""``twin_of``: a converted layer that shares the original's parameters and buffers.

Used by :mod:`bnrewrite.modules` (``SampledBatchNormNd``) and :mod:`bnrewrite.distributed`
(``SampledSyncBatchNorm``); a module of its own so that neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["twin_of"]


def twin_of(bn: nn.Module, cls: type) -> Any:
    """An instance of ``cls`` that shares ``bn``'s parameters, buffers and public attributes (no
    tensor copied, no ``__init__`` run): the converted layers of ``convert_`` and the passes."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in bn.__dict__.items() if not k.startswith("_")})
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.training = bn.training
    return new
