"""The automatic per-layer budget: for each BatchNorm layer, the cheapest sample whose estimate of
the statistics stays under an error target on calibration batches.

For a BN input ``x`` of shape ``(N, C, *S)`` with full-batch statistics ``mu_c``, ``var_c`` and a
sample plan ``P`` (:func:`bnrewrite.plan.sample_plan`, floor included) whose random draws give
``mu^_c``, ``var^_c`` (:func:`bnrewrite.estimators.sample_statistics`), the errors are

    mean err = E_draws mean_c |mu^_c - mu_c| / sqrt(var_c)      (standardised: BN's own scale)
    var err  = E_draws mean_c |var^_c - var_c| / var_c
    shared   = sqrt(E_draws (mean_c (var^_c - var_c) / var_c)^2)  (the part common to all channels)

averaged over the calibration batches (``bnrewrite diagnose`` reports the same numbers). The
*cost* of a plan is the fraction of the layer's elements its statistics read, ``P.count() / (N *
prod(S))``. :func:`choose_budget` tries the candidates from the cheapest up and keeps the first
whose mean and variance errors are both at most ``margin * target`` (the margin leaves room for
batches it has not seen); ``full`` (error 0) when none is. The result holds per-layer
``overrides`` for :func:`bnrewrite.rewrite`, :func:`bnrewrite.convert_`, the ``torch.compile``
backend's options and ``bnrewrite onnx --overrides``, and round-trips through JSON.

Names are module paths (``"layer1.0.bn1"``), as ``rewrite`` and ``convert_`` name layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import SamplingConfig, select_config
from .estimators import draw_offsets, sample_statistics
from .plan import SamplePlan, sample_plan

__all__ = [
    "Budget",
    "LayerBudget",
    "DEFAULT_CANDIDATES",
    "choose_budget",
    "estimator_errors",
    "load_overrides",
    "fraction_read",
    "record_bn_inputs",
]

#: The candidates tried for every layer (besides ``full``): ``fs`` and ``bs`` from 1/64 to 1/2.
DEFAULT_CANDIDATES: tuple[SamplingConfig, ...] = tuple(
    SamplingConfig(method, ratio=1 / d) for d in (64, 32, 16, 8, 4, 2) for method in ("fs", "bs")
)
_FORMAT = "bnrewrite-budget/1"


def record_bn_inputs(model: nn.Module, batches: Sequence[Tensor]) -> dict[str, list[Tensor]]:
    """The input of every BatchNorm layer for each batch (training mode, full-batch BN), by module
    path. ``model`` is not changed: the forward runs on a copy, so running statistics stay put."""
    work = copy.deepcopy(model).train()
    acts: dict[str, list[Tensor]] = {}
    hooks = []
    for name, mod in work.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):

            def hook(_m: nn.Module, inp: tuple[Tensor, ...], name: str = name) -> None:
                acts.setdefault(name, []).append(inp[0].detach().clone())

            hooks.append(mod.register_forward_pre_hook(hook))
    if not hooks:
        raise ValueError("the model has no BatchNorm layers")
    try:
        with torch.no_grad():
            for x in batches:
                work(x)
    finally:
        for h in hooks:
            h.remove()
    return acts


def estimator_errors(
    xs: Sequence[Tensor], plan_of: Callable[[tuple[int, ...]], SamplePlan], draws: int
) -> tuple[float, float, float]:
    """``(mean err, var err, shared err)`` of the module docstring over ``xs`` and ``draws``
    random draws each, in float64."""
    mean_errs: list[Tensor] = []
    var_errs: list[Tensor] = []
    shared: list[Tensor] = []
    for x in xs:
        x64 = x.double()
        dims = [0, *range(2, x64.dim())]
        var, mu = torch.var_mean(x64, dims, unbiased=False)
        var = var.clamp_min(1e-12)
        plan = plan_of(tuple(x64.shape))
        for _ in range(draws if plan.random else 1):
            m_hat, v_hat = sample_statistics(x64, plan, draw_offsets(plan, x64.device))
            rel_v = (v_hat - var) / var
            mean_errs.append(((m_hat - mu).abs() / var.sqrt()).mean())
            var_errs.append(rel_v.abs().mean())
            shared.append(rel_v.mean().square())
    return (
        float(torch.stack(mean_errs).mean()),
        float(torch.stack(var_errs).mean()),
        float(torch.stack(shared).mean().sqrt()),
    )


@dataclasses.dataclass
class LayerBudget:
    """The sample chosen for one layer, what it reads and its measured errors."""

    name: str
    shape: tuple[int, ...]
    config: SamplingConfig
    count: int  # values per channel the statistics read
    full_count: int  # values per channel of the whole input
    mean_err: float
    var_err: float

    @property
    def fraction(self) -> float:
        return self.count / self.full_count


@dataclasses.dataclass
class Budget:
    """Per-layer choices of :func:`choose_budget`."""

    target: float
    layers: list[LayerBudget]

    @property
    def overrides(self) -> dict[str, dict[str, Any] | None]:
        """``{module path: config dict}`` for ``rewrite`` / ``convert_`` / backend / ONNX CLI;
        ``None`` for a layer that keeps its plain BatchNorm (nothing cheaper met the target)."""
        return {
            la.name: None if la.config.method == "full" else la.config.to_dict()
            for la in self.layers
        }

    def fraction_read(self) -> float:
        """Activation elements the statistics read, over those full BN reads (all layers)."""
        read = sum(layer.count * layer.shape[1] for layer in self.layers)
        full = sum(layer.full_count * layer.shape[1] for layer in self.layers)
        return read / full

    def table(self) -> str:
        lines = [
            f"error target {self.target:g}: statistics read {100 * self.fraction_read():.2f}% "
            f"of the activation elements full BN reads",
            "| layer | shape | chosen | values/channel | read | mean err | var err |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for la in self.layers:
            chosen = la.config.method
            if la.config.method != "full":
                chosen += f" 1/{round(1 / la.config.ratio)}"
            lines.append(
                f"| {la.name} | {'x'.join(map(str, la.shape))} | {chosen} | {la.count} | "
                f"{100 * la.fraction:.1f}% | {la.mean_err:.4f} | {la.var_err:.4f} |"
            )
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The budget as JSON (``overrides`` plus what was measured); written to ``path`` if
        given (atomically: a temporary file, then a rename)."""
        data = {
            "format": _FORMAT,
            "target": self.target,
            "fraction_read": self.fraction_read(),
            "overrides": self.overrides,
            "layers": [
                {
                    "name": la.name,
                    "shape": list(la.shape),
                    "count": la.count,
                    "full_count": la.full_count,
                    "mean_err": la.mean_err,
                    "var_err": la.var_err,
                }
                for la in self.layers
            ],
        }
        text = json.dumps(data, indent=2)
        if path is not None:
            target = Path(path)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, target)
        return text


def load_overrides(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer overrides from a budget JSON file (``Budget.to_json``), a plain JSON object
    ``{name or pattern: config dict, method name or null}``, or such a mapping. Every config is
    validated here, so a bad file fails before any model is touched."""
    if isinstance(source, Mapping):
        data: Any = dict(source)
        where = "overrides"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise ValueError(f"overrides file not found: {where}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {where} as JSON overrides ({e})") from None
    if isinstance(data, Mapping) and data.get("format") == _FORMAT:
        data = data.get("overrides")
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object {{layer name: config}} or a budget file, got "
            f"{type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for name, value in data.items():
        try:
            out[str(name)] = None if value is None else SamplingConfig.coerce(value)
        except ValueError as e:
            raise ValueError(f"{where}: layer {name!r}: {e}") from None
    return out


def fraction_read(
    shapes: Mapping[str, Sequence[int]],
    config: SamplingConfig | Mapping[str, Any] | str | None,
    overrides: Mapping[str, Any] | None = None,
) -> float:
    """Activation elements the statistics of all BN layers read, over those full BN reads, for
    ``config`` (with per-layer ``overrides``; a layer they map to ``None`` reads everything).
    ``shapes``: BN input shapes by module path (``record_bn_inputs``). Per-node methods only."""
    cfg = SamplingConfig.coerce(config)
    read = full = 0
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        per_channel = math.prod(shape) // shape[1]
        chosen = select_config(name, cfg, None, None, overrides) or SamplingConfig("full")
        if chosen.uses_virtual_rows:
            raise ValueError("fraction_read counts per-node methods; vdn / fs_vdn add rows")
        read += int(sample_plan(shape, chosen).count()) * shape[1]
        full += per_channel * shape[1]
    return read / full


def _cost(shape: tuple[int, ...], cfg: SamplingConfig) -> tuple[int, int]:
    plan = sample_plan(shape, cfg)
    return int(plan.count()), int(math.prod(shape) // shape[1])


def choose_budget(
    model: nn.Module,
    calibration: Sequence[Tensor],
    target: float = 0.05,
    *,
    candidates: Sequence[SamplingConfig | Mapping[str, Any] | str] | None = None,
    draws: int = 16,
    margin: float = 0.8,
    seed: int = 0,
) -> Budget:
    """The cheapest candidate per BN layer whose mean and variance errors on ``calibration``
    (input batches of the model) are at most ``margin * target``; ``full`` where none is.

    ``candidates``: configs (default :data:`DEFAULT_CANDIDATES`); ``draws``: random draws per
    batch. ``model`` is not changed (activations come from a copy, in training mode).
    """
    if not calibration:
        raise ValueError("choose_budget needs at least one calibration batch")
    if not (target > 0):
        raise ValueError(f"target must be a positive relative error such as 0.05, got {target!r}")
    cands = [SamplingConfig.coerce(c) for c in (candidates or DEFAULT_CANDIDATES)]
    bad = [c.method for c in cands if c.uses_virtual_rows]
    if bad:
        raise ValueError(f"budget candidates take statistics per layer; {bad[0]!r} is not one")
    torch.manual_seed(seed)
    acts = record_bn_inputs(model, calibration)
    layers: list[LayerBudget] = []
    for name, xs in acts.items():
        shape = tuple(int(d) for d in xs[0].shape)
        scored = sorted(
            ((_cost(shape, c), i, c) for i, c in enumerate(cands)),
            key=lambda t: (t[0][0], t[1]),
        )
        chosen = None
        for (count, full), _, cfg in scored:
            if count >= full:
                break  # reads everything: full BN is as cheap and exact
            m_err, v_err, _shared = estimator_errors(xs, lambda s, c=cfg: sample_plan(s, c), draws)
            if m_err <= margin * target and v_err <= margin * target:
                chosen = LayerBudget(name, shape, cfg, count, full, m_err, v_err)
                break
        if chosen is None:
            full = int(math.prod(shape) // shape[1])
            chosen = LayerBudget(name, shape, SamplingConfig("full"), full, full, 0.0, 0.0)
        layers.append(chosen)
    return Budget(target, layers)
