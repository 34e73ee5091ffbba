"""``bnrewrite demo``: does a model trained with sampled BN statistics still reach BN's accuracy?

Trains a small ResNet (:mod:`bnrewrite.apps.models`) on real data that needs no download --
scikit-learn's bundled 8x8 digits (:mod:`bnrewrite.apps.datasets`), or CIFAR-10 from ``--data-dir`` --
once with plain BatchNorm and once per method, for several seeds, and writes:

* ``table.md``  -- method, final test accuracy (mean +- std over seeds), gap to BN in points,
  training steps per second (this machine, eager CPU), and the acceptance target of the gap;
* ``summary.csv`` / ``results.json`` -- the same numbers, plus every run's curve;
* ``curves.csv`` -- per method, seed and epoch: test accuracy and mean training loss;
* ``convergence.png`` -- test accuracy and training loss per epoch (mean over seeds, +- std band);
* ``bn_model.pt`` -- the BN model of the first seed, for ``bnrewrite diagnose --checkpoint``.

Methods: ``bn`` (full BatchNorm, PyTorch's own), ``ns``, ``bs``, ``fs``, ``vdn``, ``fs_vdn``
(BatchNorm with sampled statistics, :class:`bnrewrite.SamplingConfig`), ``budget`` (the automatic
per-layer budget, :func:`bnrewrite.budget.choose_budget`, on ``budget_batches`` training batches of
the freshly initialised model, error target ``--budget-target``) and ``gn`` (the same network with
GroupNorm). The ``reads`` column is the fraction of activation elements the BN statistics read
(all layers, against full BN). ``--head bn1d`` swaps the linear classifier for
``Linear -> BatchNorm1d(128) -> ReLU -> Linear``: a BN over ``(N, C)`` inputs, where the floor
(``SamplingConfig.min_count``) matters. :func:`apply_method` is the one place that turns a method into a model: ``ns``/
``bs``/``fs`` go through the FX pass ``bnrewrite.rewrite`` (``--via module``: ``bnrewrite.convert_``,
the module form with the same estimator math); ``vdn``/``fs_vdn`` through the VDN whole-graph pass
(``bnrewrite.passes.vdn``), which appends the virtual rows to the input and strips them from the
outputs, and are reported as "not available yet" when that pass is missing.

Default ratios (why): the digits are 8x8 and the ResNet's stages see 8x8, 4x4 and 2x2 maps, with a
batch of 64.

* ``ns``, ``bs``: 1/8 of the batch = 8 images (the paper uses 4/128 on ImageNet; with only 64 images
  per batch 8 keeps ``n >= 32`` values per channel in the 2x2 stage).
* ``fs``, ``fs_vdn``: 1/4 of the positions = a 4x4 lattice with stride 2 at 8x8, 2x2 at 4x4 and one
  position per map at 2x2 (``take`` never goes below one). The paper's 1/64 or 1/32 assume 56x56
  maps; at 8x8 they would leave a single position per image in every layer.
* ``vdn``: ``max(2, ceil(N / 4))`` virtual rows (16 at batch 64; ``SamplingConfig``'s default),
  raised by the floor where a layer needs more; ``fs_vdn``: ``max(2, 6 - N)``.

``--batch-size`` of 4 or less is the micro-batch mode: by default BN vs VDN vs FS+VDN vs GroupNorm.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import choose_budget, fraction_read, record_bn_inputs
from ..config import SamplingConfig, parse_ratio
from .datasets import Dataset, load_dataset

__all__ = [
    "HELP",
    "METHODS",
    "DEFAULT_METHODS",
    "MICRO_METHODS",
    "DEFAULT_RATIOS",
    "GAP_TARGETS",
    "MethodUnavailable",
    "DemoOptions",
    "RunResult",
    "add_arguments",
    "apply_method",
    "build_model",
    "method_config",
    "run",
    "run_demo",
    "summarize",
    "train_one",
    "vdn_available",
]

HELP = (
    "train a small ResNet on embedded real data (8x8 digits) with BN and each sampled method; "
    "writes a table, a convergence plot, CSV and JSON"
)

METHODS: tuple[str, ...] = ("bn", "ns", "bs", "fs", "vdn", "fs_vdn", "budget", "gn")
ALIASES: dict[str, str] = {"full": "bn", "groupnorm": "gn", "fs+vdn": "fs_vdn"}
DEFAULT_METHODS: tuple[str, ...] = METHODS
MICRO_METHODS: tuple[str, ...] = ("bn", "vdn", "fs_vdn", "gn")
MICRO_BATCH = 4  # batch sizes up to this select MICRO_METHODS by default
DEFAULT_RATIOS: dict[str, float] = {"ns": 1 / 8, "bs": 1 / 8, "fs": 1 / 4, "fs_vdn": 1 / 4}
#: Acceptance: largest gap to BN (points, mean over seeds) that issue 7 asks of each method.
GAP_TARGETS: dict[str, float] = {"bs": 1.0, "fs": 1.0, "ns": 3.0, "vdn": 3.0}
LABELS: dict[str, str] = {
    "bn": "BN (full batch)",
    "ns": "NS",
    "bs": "BS",
    "fs": "FS",
    "vdn": "VDN",
    "fs_vdn": "FS+VDN",
    "budget": "auto budget",
    "gn": "GroupNorm",
}
VDN_MODULE = "bnrewrite.passes.vdn"


class MethodUnavailable(RuntimeError):
    """The method needs a part of bnrewrite that this version does not have yet."""


def vdn_available() -> bool:
    """True when the VDN whole-graph pass (``bnrewrite.passes.vdn``) is importable."""
    try:
        return importlib.util.find_spec(VDN_MODULE) is not None
    except ModuleNotFoundError:
        return False


def canonical_method(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; choose from {', '.join(METHODS)} (full = bn, groupnorm = gn)"
        )
    return key


def method_config(
    method: str,
    ratios: dict[str, float] | None = None,
    groups: int | None = None,
    vdn_samples: int | None = None,
) -> SamplingConfig | None:
    """The :class:`SamplingConfig` of a sampled method (``None`` for ``bn``, ``gn`` and
    ``budget``, whose per-layer configs come from calibration batches in :func:`train_one`).

    ``sampling="random"`` with ``seed=None``: offsets come from torch's global RNG, which
    :func:`train_one` seeds, so a run is reproducible without per-config generators.
    """
    if method in ("bn", "gn", "budget"):
        return None
    ratio = (ratios or {}).get(method, DEFAULT_RATIOS.get(method))
    return SamplingConfig(
        method=method, ratio=ratio, groups=groups, sampling="random", vdn_samples=vdn_samples
    )


VIAS: tuple[str, ...] = ("fx", "module")


def fx_available() -> bool:
    """True when the FX pass (``bnrewrite.passes.fx``, behind ``bnrewrite.rewrite``) is importable."""
    try:
        return importlib.util.find_spec("bnrewrite.passes.fx") is not None
    except ModuleNotFoundError:
        return False


def apply_method(
    model: nn.Module,
    config: SamplingConfig | None,
    via: str = "fx",
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """A model whose BatchNorm layers take the sampled statistics of ``config``.

    The single place where a method meets a model. ``ns``/``bs``/``fs``: ``via="fx"`` (default)
    uses the FX pass ``bnrewrite.rewrite`` (a new ``GraphModule``; ``model`` is left as it was),
    ``via="module"`` -- or ``fx`` when the pass is not installed -- ``bnrewrite.convert_`` (the
    module form, the same estimators, ``model`` changed in place). ``vdn``/``fs_vdn``: the VDN
    whole-graph pass (``bnrewrite.passes.vdn.rewrite_vdn``), which appends the virtual rows to the
    input and strips them from the outputs; :class:`MethodUnavailable` when it is missing.
    ``overrides``: per-layer configs (the automatic budget) on top of ``config``.
    Build the optimiser from the returned model's parameters.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
    if (config is None or config.method == "full") and not overrides:
        return model
    config = config or SamplingConfig("full")
    if config.uses_virtual_rows:
        if not vdn_available():
            raise MethodUnavailable(f"not available yet ({VDN_MODULE} is not importable)")
        from ..passes.vdn import rewrite_vdn

        return rewrite_vdn(model, config)
    if via == "fx" and fx_available():
        from .. import rewrite

        return rewrite(model, config, overrides=overrides)
    from ..modules import convert_

    return convert_(model, config, overrides=overrides)


def applied_via(method: str, via: str, nproc: int = 1) -> str:
    """How :func:`apply_method` applies ``method`` (for the results' metadata)."""
    if nproc > 1 and method not in ("gn", "vdn", "fs_vdn"):
        what = "full" if method == "bn" else method
        return (
            f"nn.SyncBatchNorm.convert_sync_batchnorm + bnrewrite.convert_ -> "
            f"SampledSyncBatchNorm ({what}), DDP over {nproc} gloo ranks"
        )
    if method == "bn":
        return "torch.nn.BatchNorm2d"
    if method == "gn":
        return "torch.nn.GroupNorm"
    if method == "budget":
        pass_name = "bnrewrite.rewrite" if via == "fx" and fx_available() else "bnrewrite.convert_"
        return f"bnrewrite.budget.choose_budget + {pass_name}(overrides=)"
    if method in ("vdn", "fs_vdn"):
        return "bnrewrite.passes.vdn.rewrite_vdn"
    return "bnrewrite.rewrite (FX pass)" if via == "fx" and fx_available() else "bnrewrite.convert_"


def build_model(
    method: str, dataset: Dataset, width: int = 16, blocks: int = 1, head: str = "linear"
) -> nn.Module:
    from .models import small_resnet

    norm = "gn" if method == "gn" else "bn"
    return small_resnet(dataset.in_channels, dataset.num_classes, norm, width, blocks, head)


@dataclasses.dataclass
class DemoOptions:
    epochs: int = 15
    batch_size: int = 64
    lr: float | None = None  # None: 0.1 * min(1, batch_size / 64)
    weight_decay: float = 5e-4
    width: int = 16
    blocks: int = 1
    groups: int | None = None
    vdn_samples: int | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    progress: bool = True
    eval_batch: int = 512
    via: str = "fx"
    head: str = "linear"  # "bn1d": an MLP head with a BatchNorm1d over (N, C)
    budget_target: float = 0.05  # error target of the automatic budget
    budget_batches: int = 4  # calibration batches of the automatic budget
    nproc: int = 1  # data-parallel CPU processes (DDP over gloo, synchronised BN)
    threads: int = 1  # torch CPU threads per process of --nproc

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 0.1 * min(1.0, self.batch_size / 64)


@dataclasses.dataclass
class RunResult:
    method: str
    seed: int
    status: str  # "ok" or why the method did not run
    test_acc: list[float] = dataclasses.field(default_factory=list)  # per epoch, percent
    train_loss: list[float] = dataclasses.field(default_factory=list)  # per epoch, mean
    steps: int = 0
    train_seconds: float = 0.0
    config: dict[str, Any] | None = None
    via: str = ""
    #: activation elements the BN statistics read, over those full BN reads (None: GroupNorm, VDN)
    reads: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds > 0 else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Test accuracy in percent, eval mode (running statistics)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / max(1, len(x))


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n - batch + 1, batch):  # drop the last partial batch (BN needs a full one)
        yield perm[i : i + batch]


def _bn_input_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """BN input shapes by module path (empty for a model without BatchNorm)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    return {name: tuple(a[0].shape) for name, a in record_bn_inputs(model, [x]).items()}


def _calibration(dataset: Dataset, opts: DemoOptions, seed: int) -> list[torch.Tensor]:
    """``opts.budget_batches`` training batches for the automatic budget (seeded apart from the
    training order), of one rank's share with ``--nproc``: the budget bounds each rank's sample
    (the pooled sample is ``nproc`` times larger)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    per_rank = opts.batch_size // opts.nproc
    idx = list(_batches(len(dataset.x_train), per_rank, gen))[: opts.budget_batches]
    return [dataset.x_train[i] for i in idx]


def train_one(
    dataset: Dataset,
    method: str,
    seed: int,
    opts: DemoOptions,
    keep_model: list[nn.Module] | None = None,
    rank: int = 0,
) -> RunResult:
    """Train one (method, seed) and evaluate after every epoch.

    With ``opts.nproc > 1`` this is one rank of a data-parallel run (the process group is
    initialised by :func:`run_ranks`): the model's BN layers become synchronised
    (:func:`synchronised_model`), DDP wraps it, every rank takes its ``1/nproc`` share of each
    batch, and rank 0 evaluates and times."""
    cfg = method_config(method, opts.ratios, opts.groups, opts.vdn_samples)
    result = RunResult(method, seed, "ok", config=cfg.to_dict() if cfg else None)
    result.via = applied_via(method, opts.via, opts.nproc)
    n = len(dataset.x_train)
    if n < opts.batch_size:
        raise ValueError(
            f"--batch-size {opts.batch_size} is larger than the {n} training images; use a "
            f"smaller batch"
        )
    torch.manual_seed(seed)
    model = build_model(method, dataset, opts.width, opts.blocks, opts.head)
    # the shapes each process sees: the plan (and the floor) is per rank with --nproc
    shapes = _bn_input_shapes(model, dataset.x_train[: opts.batch_size // opts.nproc])
    overrides = None
    if method == "budget":
        rng = torch.get_rng_state()
        budget = choose_budget(
            model, _calibration(dataset, opts, seed), opts.budget_target, draws=8, seed=seed
        )
        torch.set_rng_state(rng)  # training starts from the same RNG state as the other methods
        overrides = budget.overrides
        result.reads = budget.fraction_read()
        result.config = {"method": "budget", "target": opts.budget_target, "overrides": overrides}
    elif method == "bn":
        result.reads = 1.0
    elif cfg is not None and not cfg.uses_virtual_rows and shapes:
        result.reads = fraction_read(shapes, cfg)
    try:
        if opts.nproc > 1:
            model = synchronised_model(model, method, cfg, overrides)
        else:
            model = apply_method(model, cfg, opts.via, overrides)
    except MethodUnavailable as e:
        result.status = str(e)
        return result
    step_model: nn.Module = model
    share = slice(None)
    if opts.nproc > 1:
        from torch.nn.parallel import DistributedDataParallel

        # running statistics are equal on every rank (pooled): no buffer broadcast per step
        step_model = DistributedDataParallel(model, **_no_buffer_sync())
        per_rank = opts.batch_size // opts.nproc
        share = slice(rank * per_rank, (rank + 1) * per_rank)
    steps_per_epoch = n // opts.batch_size
    total = steps_per_epoch * opts.epochs
    opt = torch.optim.SGD(
        model.parameters(),
        lr=opts.learning_rate,
        momentum=0.9,
        nesterov=True,
        weight_decay=opts.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opts.learning_rate, total_steps=total)
    gen = torch.Generator().manual_seed(seed)
    bar = _progress(total, f"{LABELS[method]:>15} seed {seed}", opts.progress and rank == 0)
    with bar:
        for _epoch in range(opts.epochs):
            model.train()
            losses: list[float] = []
            for batch in _batches(n, opts.batch_size, gen):
                idx = batch[share]  # this rank's share of the batch (all of it in one process)
                t0 = time.perf_counter()
                loss = F.cross_entropy(step_model(dataset.x_train[idx]), dataset.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                result.train_seconds += time.perf_counter() - t0
                result.steps += 1
                losses.append(float(loss.detach()))
                bar.update(1)
            result.train_loss.append(_mean_over_ranks(losses, opts.nproc))
            if rank != 0:  # rank 0 evaluates (every rank holds the same model)
                continue
            acc = evaluate(model, dataset.x_test, dataset.y_test, opts.eval_batch)
            result.test_acc.append(acc)
            bar.set_postfix(loss=f"{result.train_loss[-1]:.3f}", test_acc=f"{acc:.1f}")
    if not all(math.isfinite(v) for v in result.train_loss):
        result.status = "diverged (non-finite training loss)"
    vdn_report = getattr(model, "meta", {}).get("bnrewrite_vdn")
    if vdn_report is not None and result.config is not None:
        # the rows the graph carried: the floor may raise vdn_samples (at the first call)
        result.config["virtual_rows"] = vdn_report.virtual_rows
    if keep_model is not None:
        keep_model.append(model)
    return result


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "do not broadcast buffers before every forward" (renamed in torch 2.13)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def _mean_over_ranks(losses: Sequence[float], nproc: int) -> float:
    """The epoch's mean training loss over the whole batches (each rank's loss is its share's)."""
    if not losses:
        return math.nan
    local = statistics.fmean(losses)
    if nproc == 1:
        return local
    import torch.distributed as dist

    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / nproc


def synchronised_model(
    model: nn.Module,
    method: str,
    config: SamplingConfig | None,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """The model of one rank of ``--nproc``: every BatchNorm a
    :class:`~bnrewrite.distributed.SampledSyncBatchNorm` (``bn``: ``method="full"``, the exact
    SyncBatchNorm, which also runs on CPU; ``ns``/``bs``/``fs``/``budget``: each rank samples its
    share and the samples are pooled); GroupNorm as it is. ``vdn``/``fs_vdn``: the layer's
    refusal, as :class:`MethodUnavailable`."""
    if method == "gn":
        return model
    from ..distributed import SampledSyncBatchNorm
    from ..modules import convert_

    cfg = config or SamplingConfig("full")
    try:
        SampledSyncBatchNorm(1, config=cfg)  # vdn / fs_vdn: its error says why
    except ValueError as e:
        raise MethodUnavailable(str(e)) from None
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    convert_(model, cfg, overrides=overrides)
    return convert_(model, "full")  # a layer an override kept as BatchNorm: the exact sync BN


class _NoBar(contextlib.nullcontext):
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass


class _EpochLines(_NoBar):
    """Progress for a file or CI log: one plain line per epoch on stderr, no carriage returns."""

    def __init__(self, total: int, desc: str, stream: Any) -> None:
        super().__init__()
        self.total, self.desc, self.stream, self.steps = total, desc, stream, 0

    def update(self, n: int = 1) -> None:
        self.steps += n

    def set_postfix(self, **kw: Any) -> None:
        fields = " ".join(f"{k}={v}" for k, v in kw.items())
        print(f"{self.desc.strip()}: step {self.steps}/{self.total} {fields}", file=self.stream)
        self.stream.flush()


def _progress(total: int, desc: str, enabled: bool, stream: Any = None) -> Any:
    """A tqdm bar on a terminal; one line per epoch when stderr is a file or a pipe."""
    if not enabled:
        return _NoBar()
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _EpochLines(total, desc, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True, file=stream)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: Sequence[RunResult], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method: accuracy mean/std over seeds, gap to BN, steps/s, target, verdict."""
    by_method = {m: [r for r in results if r.method == m] for m in methods}
    bn_ok = [r.final_acc for r in by_method.get("bn", []) if r.ok]
    bn_mean = statistics.fmean(bn_ok) if bn_ok else math.nan
    rows: list[dict[str, Any]] = []
    for m in methods:
        runs = by_method[m]
        ok = [r for r in runs if r.ok]
        mean, std = _mean_std([r.final_acc for r in ok])
        sps, _ = _mean_std([r.steps_per_s for r in ok])
        reads = [r.reads for r in ok if r.reads is not None]
        gap = mean - bn_mean if ok and m != "bn" else (0.0 if m == "bn" and ok else math.nan)
        target = GAP_TARGETS.get(m)
        within = None
        if target is not None and ok and math.isfinite(gap):
            within = bool(gap >= -target)
        status = "ok" if ok else (runs[0].status if runs else "not run")
        if ok and len(ok) < len(runs):
            status = f"{len(runs) - len(ok)} of {len(runs)} runs failed: {runs[0].status}"
        cfg = ok[0].config if ok else (runs[0].config if runs else None)
        rows.append(
            {
                "method": m,
                "label": LABELS[m],
                "ratio": cfg.get("ratio") if cfg else None,
                "groups": cfg.get("groups") if cfg else None,
                "vdn_samples": (cfg.get("virtual_rows") or cfg.get("vdn_samples"))
                if cfg and m in ("vdn", "fs_vdn")
                else None,
                "target": cfg.get("target") if cfg and m == "budget" else None,
                "reads": statistics.fmean(reads) if reads else None,
                "seeds": len(ok),
                "acc_mean": mean,
                "acc_std": std,
                "gap_to_bn": gap,
                "steps_per_s": sps,
                "target_gap": target,
                "within_target": within,
                "status": status,
            }
        )
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _budget(row: dict[str, Any]) -> str:
    m = row["method"]
    if m in ("bn", "gn"):
        return "all"
    if m == "budget":
        return f"per layer, error ≤ {row['target']:g}" if row.get("target") else "per layer"
    if row["ratio"] is None:
        return "-"
    from fractions import Fraction

    r = str(Fraction(row["ratio"]).limit_denominator(1024))
    if m in ("ns", "bs"):
        return f"{r} of batch"
    if m == "fs":
        return f"{r} of H*W"
    if m == "vdn":
        return f"{row['vdn_samples']} virtual rows"
    return f"{r} of H*W + {row['vdn_samples']} virtual"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| method | statistics from | reads | test accuracy % (mean ± std) | gap to BN (points) "
        "| steps/s | target | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        acc = f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}" if ok else "n/a"
        gap = "—" if r["method"] == "bn" else (f"{r['gap_to_bn']:+.2f}" if ok else "n/a")
        target = f"≥ −{r['target_gap']:g}" if r["target_gap"] is not None else ""
        if r["within_target"] is True:
            target += " ✓"
        elif r["within_target"] is False:
            target += " ✗ missed"
        reads = "—" if r.get("reads") is None else f"{100 * r['reads']:.1f}%"
        lines.append(
            f"| {r['label']} | {_budget(r)} | {reads} | {acc} | {gap} | "
            f"{_fmt(r['steps_per_s'], '.1f')} | {target} | {r['status']} |"
        )
    return "\n".join(lines)


def _plot(path: Path, results: Sequence[RunResult], methods: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        runs = [r for r in results if r.method == m and r.ok]
        if not runs:
            continue
        epochs = min(len(r.test_acc) for r in runs)
        xs = list(range(1, epochs + 1))
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "train_loss")):
            per_epoch = [[getattr(r, key)[e] for r in runs] for e in range(epochs)]
            mean = [statistics.fmean(v) for v in per_epoch]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]
            line = ax.plot(xs, mean, marker="o", ms=3, label=LABELS[m])[0]
            ax.fill_between(
                xs,
                [a - b for a, b in zip(mean, std)],
                [a + b for a, b in zip(mean, std)],
                color=line.get_color(),
                alpha=0.15,
            )
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("test accuracy (mean ± std over seeds)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.set_title("mean training loss per epoch")
    ax_acc.legend(fontsize=8)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)"


def write_outputs(
    out: Path,
    rows: Sequence[dict[str, Any]],
    results: Sequence[RunResult],
    methods: Sequence[str],
    meta: dict[str, Any],
) -> dict[str, Path]:
    """Write table.md, summary.csv, curves.csv, results.json and convergence.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": out / "table.md",
        "summary_csv": out / "summary.csv",
        "curves_csv": out / "curves.csv",
        "json": out / "results.json",
        "plot": out / "convergence.png",
    }
    table = format_table(rows)
    paths["table"].write_text(f"{meta['title']}\n\n{table}\n")
    fields = list(rows[0].keys()) if rows else []
    with paths["summary_csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with paths["curves_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "epoch", "test_acc", "train_loss"])
        for r in results:
            for e, (acc, loss) in enumerate(zip(r.test_acc, r.train_loss), start=1):
                w.writerow([r.method, r.seed, e, f"{acc:.4f}", f"{loss:.6f}"])
    payload = {
        "meta": meta,
        "summary": list(rows),
        "runs": [
            {
                "method": r.method,
                "seed": r.seed,
                "status": r.status,
                "config": r.config,
                "via": r.via,
                "final_test_acc": r.final_acc,
                "test_acc": r.test_acc,
                "train_loss": r.train_loss,
                "steps": r.steps,
                "train_seconds": r.train_seconds,
                "steps_per_s": r.steps_per_s,
            }
            for r in results
        ],
    }
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    _plot(paths["plot"], results, methods, meta["title"])
    return paths


def _train_all(
    dataset: Dataset,
    methods: Sequence[str],
    seeds: Sequence[int],
    opts: DemoOptions,
    rank: int = 0,
) -> tuple[list[RunResult], dict[str, torch.Tensor] | None]:
    """Every (method, seed) in order; the results and the first BN model's ``state_dict``."""
    results: list[RunResult] = []
    bn_model: list[nn.Module] = []
    for method in methods:
        for seed in seeds:
            keep = bn_model if method == "bn" and not bn_model else None
            results.append(train_one(dataset, method, seed, opts, keep, rank))
    return results, (copy.deepcopy(bn_model[0].state_dict()) if bn_model else None)


def _rank_main(
    rank: int,
    init_file: str,
    out_file: str,
    dataset: Dataset,
    methods: Sequence[str],
    seeds: Sequence[int],
    opts: DemoOptions,
) -> None:
    """One process of :func:`run_ranks`."""
    import datetime
    import gc
    import pickle

    import torch.distributed as dist

    torch.set_num_threads(opts.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=opts.nproc,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        results, bn_state = _train_all(dataset, methods, seeds, opts, rank)
        if rank == 0:
            with open(out_file, "wb") as f:
                pickle.dump((results, bn_state), f)
        # free the DDP objects (reference cycles that hold the group) before the teardown: left
        # to interpreter exit, gloo's threads can abort the process (docs/distributed.md)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    dataset: Dataset,
    methods: Sequence[str],
    seeds: Sequence[int],
    opts: DemoOptions,
) -> tuple[list[RunResult], dict[str, torch.Tensor] | None]:
    """:func:`_train_all` in ``opts.nproc`` processes (``torch.multiprocessing``, spawn; a gloo
    process group on this machine, rendezvous through a file in a temporary folder): DDP, each
    rank a ``1/nproc`` share of every batch, synchronised BN. Rank 0's results."""
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bnrewrite-demo-") as tmp:
        out_file = str(Path(tmp) / "results.pkl")
        args = (str(Path(tmp) / "init"), out_file, dataset, list(methods), list(seeds), opts)
        mp.start_processes(_rank_main, args=args, nprocs=opts.nproc, start_method="spawn")
        with open(out_file, "rb") as f:
            return pickle.load(f)  # noqa: S301 - written by our own ranks just now


def run_demo(
    dataset: Dataset,
    methods: Sequence[str],
    seeds: Sequence[int],
    opts: DemoOptions,
    out: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[RunResult], dict[str, Path]]:
    """Train every (method, seed); summarise; write the files when ``out`` is given.

    ``opts.nproc > 1``: :func:`run_ranks` trains them data-parallel in that many processes."""
    t0 = time.perf_counter()
    if opts.nproc > 1:
        results, bn_state = run_ranks(dataset, methods, seeds, opts)
    else:
        results, bn_state = _train_all(dataset, methods, seeds, opts)
    rows = summarize(results, methods)
    paths: dict[str, Path] = {}
    if out is not None:
        meta = dict(meta or {})
        meta.setdefault("title", f"bnrewrite demo: {dataset.describe()}")
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        paths = write_outputs(out, rows, results, methods, meta)
        if bn_state is not None:
            paths["bn_model"] = out / "bn_model.pt"
            torch.save(
                {
                    "state_dict": bn_state,
                    "dataset": dataset.name,
                    "width": opts.width,
                    "blocks": opts.blocks,
                    "head": opts.head,
                    "in_channels": dataset.in_channels,
                    "num_classes": dataset.num_classes,
                },
                paths["bn_model"],
            )
    return rows, results, paths


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 15)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per method (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from {','.join(METHODS)} (default: all; with --batch-size <= "
        f"{MICRO_BATCH}: {','.join(MICRO_METHODS)})",
    )
    p.add_argument(
        "--ratio",
        action="append",
        default=[],
        metavar="METHOD=R",
        help="sampling ratio of a method, e.g. --ratio bs=1/4 (repeatable; defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_RATIOS.items())
        + ")",
    )
    p.add_argument("--groups", type=int, default=None, help="channel groups (default 4)")
    p.add_argument(
        "--vdn-samples",
        type=int,
        default=None,
        help="virtual rows, exactly (default: vdn max(2, ceil(N/4)), fs_vdn max(2, 6 - N))",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1*B/64)")
    p.add_argument("--width", type=int, default=None, help="ResNet base width (default 16)")
    p.add_argument("--out", default="bnrewrite-demo", help="output folder (default bnrewrite-demo)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="use CIFAR-10 from this folder (python-pickle layout; never downloaded)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: small ops run fastest single-threaded)",
    )
    p.add_argument(
        "--via",
        choices=VIAS,
        default="fx",
        help="apply ns/bs/fs with the FX pass bnrewrite.rewrite (default) or bnrewrite.convert_",
    )
    p.add_argument(
        "--head",
        choices=("linear", "bn1d"),
        default="linear",
        help="classifier head: linear (default) or bn1d (Linear-BatchNorm1d-ReLU-Linear, a BN "
        "over (N, C) inputs)",
    )
    p.add_argument(
        "--budget-target",
        type=float,
        default=0.05,
        help="error target of the 'budget' method (automatic per-layer budget, default 0.05)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train data-parallel in N CPU processes (DDP over gloo; each rank 1/N of every "
        "batch; BN synchronised: bn = exact SyncBatchNorm, ns/bs/fs/budget = SampledSyncBatchNorm)",
    )
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_methods(text: str | None, batch_size: int) -> list[str]:
    if text is None:
        return list(MICRO_METHODS if batch_size <= MICRO_BATCH else DEFAULT_METHODS)
    methods: list[str] = []
    for part in text.split(","):
        if part.strip():
            m = canonical_method(part)
            if m not in methods:
                methods.append(m)
    if not methods:
        raise ValueError("--methods is empty; give e.g. --methods bn,bs,fs")
    return methods


def parse_ratio_flags(flags: Sequence[str]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for flag in flags:
        if "=" not in flag:
            raise ValueError(f"--ratio expects METHOD=R such as bs=1/8, got {flag!r}")
        name, value = flag.split("=", 1)
        m = canonical_method(name)
        if m in ("bn", "gn", "vdn"):
            raise ValueError(
                f"--ratio {flag!r}: method {m!r} has no ratio (vdn uses --vdn-samples)"
            )
        ratios[m] = parse_ratio(value)
    return ratios


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    batch = args.batch_size
    if batch < 2:
        raise CLIError("--batch-size must be at least 2 (BatchNorm needs 2 samples)")
    methods = parse_methods(args.methods, batch)
    ratios = parse_ratio_flags(args.ratio)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 15)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if epochs < 1 or n_seeds < 1:
        raise CLIError("--epochs and --seeds must be at least 1")
    if args.threads < 1:
        raise CLIError("--threads must be at least 1")
    if args.nproc < 1:
        raise CLIError("--nproc must be at least 1")
    if args.nproc > 1 and (batch % args.nproc or batch // args.nproc < 2):
        raise CLIError(
            f"--batch-size {batch} must split into --nproc {args.nproc} equal shares of at least "
            f"2 images (e.g. --batch-size {max(2, batch // args.nproc) * args.nproc})"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a folder")
    opts = DemoOptions(
        epochs=epochs,
        batch_size=batch,
        lr=args.lr,
        width=args.width if args.width is not None else (8 if args.quick else 16),
        groups=args.groups,
        vdn_samples=args.vdn_samples,
        ratios=ratios,
        progress=not args.no_progress,
        via=args.via,
        head=args.head,
        budget_target=args.budget_target,
        nproc=args.nproc,
        threads=args.threads,
    )
    if not args.budget_target > 0:
        raise CLIError(f"--budget-target must be positive (e.g. 0.05), got {args.budget_target}")
    for m in methods:  # validate every config before training anything
        method_config(m, opts.ratios, opts.groups, opts.vdn_samples)
    dataset = load_dataset(args.data_dir)
    if args.quick:
        train = 64 if batch <= MICRO_BATCH else max(256, 4 * batch)
        dataset = dataset.subset(train=train, test=128)
    torch.set_num_threads(args.threads)
    seeds = list(range(n_seeds))
    started = datetime.now(timezone.utc)
    title = (
        f"bnrewrite demo — {dataset.describe()}; SmallResNet width {opts.width}"
        f"{', BatchNorm1d head' if opts.head == 'bn1d' else ''}; "
        f"batch {batch}, {epochs} epochs, {n_seeds} seed(s)"
    )
    if opts.nproc > 1:
        title += f"; {opts.nproc} processes (DDP over gloo, {batch // opts.nproc} images per rank)"
    print(title, flush=True)
    if any(m in ("vdn", "fs_vdn") for m in methods) and not vdn_available():
        print(f"note: vdn and fs_vdn are not available yet ({VDN_MODULE} is not importable)")
    t0 = time.perf_counter()
    meta = {
        "title": title,
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "torch": torch.__version__,
        "dataset": dataset.describe(),
        "methods": methods,
        "seeds": seeds,
        "epochs": epochs,
        "batch_size": batch,
        "lr": opts.learning_rate,
        "width": opts.width,
        "head": opts.head,
        "quick": bool(args.quick),
        "via": {m: applied_via(m, opts.via, opts.nproc) for m in methods},
        "nproc": opts.nproc,
    }
    rows, _results, paths = run_demo(dataset, methods, seeds, opts, out, meta)
    elapsed = time.perf_counter() - t0
    print()
    print(format_table(rows))
    print(f"\n{elapsed:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
