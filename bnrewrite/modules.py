"""Module form: ``SampledBatchNorm1d/2d/3d`` and the in-place verb ``convert_``.

A ``SampledBatchNormNd`` *is* an ``nn.BatchNormNd`` (subclass: same parameters, buffers and
``state_dict`` keys) whose training-mode forward calls :func:`bnrewrite.sampled_batch_norm` with its
``config``. Eval mode and the running-statistics bookkeeping are PyTorch's:

* ``num_batches_tracked += 1`` on every training call when ``track_running_stats``;
* ``momentum=None``: factor ``1 / num_batches_tracked``, computed as a tensor (no ``float()``, so
  Dynamo does not graph-break and compiled graphs do not specialise on the step count);
* ``track_running_stats=False``: batch statistics in eval mode too, as PyTorch does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._twin import twin_of
from .config import SamplingConfig, select_config
from .eager import sampled_batch_norm  # native kernels in eager mode, the estimator when traced

__all__ = [
    "SampledBatchNorm1d",
    "SampledBatchNorm2d",
    "SampledBatchNorm3d",
    "SampledBatchNormMixin",
    "convert_",
    "refuse_virtual_rows",
    "share_structure",
    "plain_twins",
]

log = logging.getLogger("bnrewrite")


class SampledBatchNormMixin:
    """The forward shared by the 1d/2d/3d classes."""

    config: SamplingConfig

    def batch_norm_arguments(self, input: Tensor) -> tuple[Any, ...]:  # noqa: A002
        """PyTorch's ``_BatchNorm.forward`` bookkeeping: bumps ``num_batches_tracked`` and returns
        the positional arguments of ``F.batch_norm`` (``input, running_mean, running_var, weight,
        bias, training, momentum, eps``). Lowerings (the fused kernels) reuse it."""
        self._check_input_dim(input)  # type: ignore[attr-defined]
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats:  # type: ignore[attr-defined]
            nbt = self.num_batches_tracked  # type: ignore[attr-defined]
            if nbt is not None:
                nbt.add_(1)
                if self.momentum is None:  # type: ignore[attr-defined]
                    momentum = 1.0 / nbt.to(torch.float32)
        # ``training`` is the module's mode (PyTorch passes ``training or no running stats``): in
        # eval mode a BN without running statistics uses batch statistics of the whole input,
        # which the estimator does for ``training=False`` without running statistics.
        use_running = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        return (
            input,
            self.running_mean if use_running else None,  # type: ignore[attr-defined]
            self.running_var if use_running else None,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            self.training,  # type: ignore[attr-defined]
            momentum,
            self.eps,  # type: ignore[attr-defined]
        )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - PyTorch's name
        return sampled_batch_norm(*self.batch_norm_arguments(input), config=self.config)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        cfg = self.config
        return f"{base}, method={cfg.method!r}, ratio={cfg.ratio}, sampling={cfg.sampling!r}"


def _init(self: Any, config: SamplingConfig | dict[str, Any] | str | None) -> None:
    self.config = SamplingConfig.coerce(config)


class SampledBatchNorm1d(SampledBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with sampled training statistics."""

    def __init__(self, num_features: int, *args: Any, config: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        _init(self, config)


class SampledBatchNorm2d(SampledBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with sampled training statistics."""

    def __init__(self, num_features: int, *args: Any, config: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        _init(self, config)


class SampledBatchNorm3d(SampledBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with sampled training statistics."""

    def __init__(self, num_features: int, *args: Any, config: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        _init(self, config)


_SAMPLED = {
    nn.BatchNorm1d: SampledBatchNorm1d,
    nn.BatchNorm2d: SampledBatchNorm2d,
    nn.BatchNorm3d: SampledBatchNorm3d,
}


def from_batch_norm(bn: nn.modules.batchnorm._BatchNorm, config: Any) -> nn.Module:
    """A sampled twin of ``bn`` that shares its parameters and buffers (no copies)."""
    cls = next((s for b, s in _SAMPLED.items() if type(bn) is b or type(bn) is s), None)
    if cls is None:
        raise ValueError(f"cannot convert {type(bn).__name__}; expected nn.BatchNorm1d/2d/3d")
    new = twin_of(bn, cls)
    _init(new, config)
    return new


def share_structure(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer (no tensor copied).

    Rewriting the copy swaps BN submodules without touching ``model``'s own modules, while an
    optimizer built on ``model.parameters()`` trains what the rewritten graph uses and the running
    statistics it updates are ``model``'s -- as ``torch.fx.symbolic_trace`` and ``torch.compile``
    share them.

    A module that also keeps submodules in a plain attribute (``self.blocks = [conv, bn]`` beside
    ``add_module``, a common pattern in model libraries) gets that attribute re-pointed at the
    copies (a new list, tuple or dict; the model's own is untouched), so that the copy's forward
    runs the copies.
    """
    copies: dict[int, nn.Module] = {}
    new = _share(model, copies)
    for module in copies.values():
        for key, value in list(module.__dict__.items()):
            if key.startswith("_") or key == "training":
                continue
            mapped = _remap(value, copies)
            if mapped is not value:
                module.__dict__[key] = mapped
    return new


def _share(model: nn.Module, copies: dict[int, nn.Module]) -> nn.Module:
    if id(model) in copies:
        return copies[id(model)]
    new = copy.copy(model)
    copies[id(model)] = new
    for key, value in list(new.__dict__.items()):
        if key.startswith("_") and isinstance(value, (dict, set)):
            new.__dict__[key] = copy.copy(value)  # hooks, parameter/buffer tables: own containers
    new._modules = {
        name: None if child is None else _share(child, copies)
        for name, child in model._modules.items()
    }
    return new


def _remap(value: Any, copies: dict[int, nn.Module]) -> Any:
    """``value`` with every module of the copied tree replaced by its copy (``value`` itself when
    nothing changes)."""
    if isinstance(value, nn.Module):
        return copies.get(id(value), value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value):
        items = [_remap(v, copies) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict) and any(isinstance(v, nn.Module) for v in value.values()):
        mapped = {k: _remap(v, copies) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else mapped
    return value


def plain_twins(model: nn.Module) -> tuple[nn.Module, list[SamplingConfig]]:
    """A structure-sharing copy of ``model`` (:func:`share_structure`) whose sampled BN layers are
    plain ``nn.BatchNormNd`` again (same parameters and buffers), and the configs they had, in
    module order. For tools that must see PyTorch's BatchNorm, such as the ONNX export."""
    view = share_structure(model)
    configs: list[SamplingConfig] = []
    for parent in view.modules():
        for attr, sub in list(parent._modules.items()):
            if isinstance(sub, SampledBatchNormMixin):
                if getattr(sub, "fuse_relu", False):
                    raise ValueError(
                        f"{attr} has a ReLU fused into it (bnrewrite.kernels.fuse_relu); use the "
                        f"model from before fuse_relu"
                    )
                base = next(b for b, s in _SAMPLED.items() if isinstance(sub, s))
                plain = base.__new__(base)
                plain.__dict__.update(sub.__dict__)
                plain.__dict__.pop("config", None)
                plain.__dict__.pop("fuse_relu", None)
                parent._modules[attr] = plain
                configs.append(sub.config)
    return view, configs


def refuse_virtual_rows(cfg: SamplingConfig, where: str) -> None:
    """Module-by-module conversion cannot carry virtual rows from layer to layer: refuse VDN."""
    if cfg.uses_virtual_rows:
        raise ValueError(
            f"{where} converts layer by layer and cannot carry the virtual rows of method "
            f"{cfg.method!r} through the network; use the whole-graph route, "
            f"bnrewrite.rewrite(model, cfg) (or bnrewrite.passes.vdn.rewrite_vdn)"
        )


def convert_(
    model: nn.Module,
    config: SamplingConfig | dict[str, Any] | str | None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` of ``model`` for its sampled twin, in place.

    Parameters and buffers are shared, so optimisers built before the call keep working and the
    ``state_dict`` is unchanged. ``nn.SyncBatchNorm`` becomes
    :class:`bnrewrite.distributed.SampledSyncBatchNorm` (every rank's sample pooled across its
    process group; the same process group). ``overrides``: ``{module path or fnmatch pattern: config or
    None}`` (``None`` keeps that layer's BatchNorm), as for :func:`bnrewrite.rewrite`; an
    automatic budget's ``Budget.overrides`` or :func:`bnrewrite.budget.load_overrides`. Returns
    ``model``.
    """
    cfg = SamplingConfig.coerce(config)
    refuse_virtual_rows(cfg, "convert_")
    for value in (overrides or {}).values():
        if value is not None:
            refuse_virtual_rows(SamplingConfig.coerce(value), "convert_")
    converted = synced = 0
    for name, child in list(model.named_modules()):
        for attr, sub in list(child._modules.items()):
            if sub is None:
                continue
            qual = f"{name}.{attr}" if name else attr
            sync = isinstance(sub, nn.SyncBatchNorm)
            if not sync and type(sub) not in _SAMPLED and type(sub) not in _SAMPLED.values():
                continue
            chosen = select_config(qual, cfg, None, None, overrides)
            if chosen is None:
                log.info("convert_: kept %s (overrides: None)", qual)
                continue
            if sync:  # pooled across its process group
                from .distributed import sync_twin

                child._modules[attr] = sync_twin(sub, chosen)
                synced += 1
            else:
                child._modules[attr] = from_batch_norm(sub, chosen)
                converted += 1
    log.info(
        "convert_: %d BatchNorm layer(s) converted to method %r, %d SyncBatchNorm synchronised",
        converted + synced,
        cfg.method,
        synced,
    )
    return model
