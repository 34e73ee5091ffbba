"""``bnrewrite diagnose``: how good is each sampled estimate of BN's statistics on real activations?

For a trained BN model (the demo's ``bn_model.pt``, or one trained here for a few epochs) and real
training batches, every BatchNorm layer's input ``x`` of shape ``(N, C, H, W)`` is recorded (model in
training mode, full-batch BN). For each estimator and each of many random draws the sample mean
``mu^`` and variance ``var^`` come from :func:`bnrewrite.estimators.sample_statistics` on the sample
plan of :func:`bnrewrite.plan.sample_plan` (with offsets from
:func:`bnrewrite.estimators.draw_offsets`), and are compared with the full-batch ``mu``, ``var``:

* ``mean err``   = mean over channels and draws of ``|mu^_c - mu_c| / sqrt(var_c)``
  (standardised: BN subtracts ``mu`` from data of scale ``sqrt(var)``);
* ``var err``    = mean over channels and draws of ``|var^_c - var_c| / var_c``;
* ``shared err`` = RMS over draws of the channel-averaged signed ``(var^_c - var_c) / var_c``:
  how much the channels of a layer err *together*. A conv after BN sums over channels, so an error
  common to all channels reaches the next layer whole, while independent errors partly cancel.
* ``network err`` = ``||z^ - z|| / ||z||`` for the logits ``z`` of a training-mode forward of the
  batch, with every BN layer normalising with the estimator's statistics (``z^``) or with the
  full-batch ones (``z``); mean over draws.

Estimators, all at the same budget (``--ratio``, default 1/4, which gives the *same* count ``n`` per
channel for every estimator in every layer of the demo's ResNet: 1/4 of the batch, or a 2x-strided
lattice of 1/4 of the positions):

* ``ns``  -- ``k`` whole samples, the same for all channels;
* ``bs``  -- ``k`` whole samples, each of ``--groups`` channel groups its own (multi-way);
* ``fs``  -- the plan's FS layout: a strided lattice spread over each feature map, per group;
* ``fs_patch`` (*baseline, written here, not a bnrewrite method*) -- one contiguous patch of the
  same size ``m_i`` per axis at a random (cyclic) offset, shared by all channels: the plan with
  ``step = 1`` and one group, fed to the same estimator functions.

Per channel, ``ns`` and ``bs`` take the same distribution of samples, so their per-channel errors
(``mean err``, ``var err``) agree in expectation; multi-way sampling decorrelates the channels, which
shows in ``shared err`` and ``network err``. The FS lattice and the single patch differ per channel
(neighbouring positions are correlated) wherever the lattice's step exceeds 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import estimator_errors, record_bn_inputs
from ..config import SamplingConfig, parse_ratio
from ..estimators import draw_offsets, normalize, sample_statistics
from ..plan import SamplePlan, sample_plan
from .datasets import Dataset, load_dataset

__all__ = [
    "HELP",
    "ESTIMATORS",
    "LayerStats",
    "add_arguments",
    "estimator_plan",
    "layer_errors",
    "network_errors",
    "record_bn_inputs",
    "run",
    "run_diagnostics",
]

HELP = (
    "per-layer error of each sampled mean/variance estimate against full-batch statistics on real "
    "activations (NS vs BS, FS lattice vs a single patch); table and plot"
)

ESTIMATORS: tuple[str, ...] = ("ns", "bs", "fs", "fs_patch")
LABELS: dict[str, str] = {
    "ns": "NS",
    "bs": "BS",
    "fs": "FS lattice",
    "fs_patch": "single patch (baseline)",
}


def estimator_plan(name: str, shape: Sequence[int], ratio: float, groups: int) -> SamplePlan:
    """The sample plan of an estimator (``fs_patch``: the FS plan with step 1 and one group)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    method = "fs" if name == "fs_patch" else name
    cfg = SamplingConfig(method=method, ratio=ratio, groups=None if method == "ns" else groups)
    plan = sample_plan(tuple(shape), cfg)
    if name == "fs_patch":  # baseline: one contiguous patch of the same size, shared by channels
        axes = tuple(dataclasses.replace(ax, step=1) for ax in plan.axes)
        plan = dataclasses.replace(plan, axes=axes, groups=1)
    return plan


@dataclasses.dataclass
class LayerStats:
    layer: str
    shape: tuple[int, ...]
    estimator: str
    count: int  # per-channel sample count n
    full_count: int
    mean_err: float
    var_err: float
    shared_err: float


def layer_errors(
    acts: dict[str, list[Tensor]],
    ratio: float,
    groups: int,
    draws: int,
    estimators: Sequence[str] = ESTIMATORS,
) -> list[LayerStats]:
    """Per layer and estimator: the errors of the module docstring, over ``draws`` per batch."""
    rows: list[LayerStats] = []
    for layer, xs in acts.items():
        for est in estimators:
            mean_err, var_err, shared_err = estimator_errors(
                xs, lambda shape, est=est: estimator_plan(est, shape, ratio, groups), draws
            )
            plan = estimator_plan(est, xs[0].shape, ratio, groups)
            full = int(math.prod(xs[0].shape) // xs[0].shape[1])
            shape = tuple(int(s) for s in xs[0].shape)
            rows.append(
                LayerStats(
                    layer, shape, est, int(plan.count()), full, mean_err, var_err, shared_err
                )
            )
    return rows


@contextlib.contextmanager
def _sampled_bn(model: nn.Module, plan_of: Callable[[Tensor], SamplePlan]):
    """Every BN layer of ``model`` normalises with the statistics of ``plan_of(x)`` (no updates)."""
    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):

            def hook(m: nn.Module, inp: tuple[Tensor, ...], _out: Tensor) -> Tensor:
                x = inp[0]
                plan = plan_of(x)
                mean, var = sample_statistics(x, plan, draw_offsets(plan, x.device))
                return normalize(x, mean, var, m.weight, m.bias, m.eps)

            hooks.append(mod.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def network_errors(
    model: nn.Module,
    batches: Sequence[Tensor],
    ratio: float,
    groups: int,
    draws: int,
    estimators: Sequence[str] = ESTIMATORS,
) -> dict[str, float]:
    """Mean over batches and draws of ``||z^ - z|| / ||z||`` (logits, training-mode forward)."""
    import copy

    work = copy.deepcopy(model).train()
    for mod in work.modules():  # leave running statistics alone
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.0
    out: dict[str, float] = {}
    with torch.no_grad():
        refs = [work(x) for x in batches]
        for est in estimators:
            errs: list[float] = []
            with _sampled_bn(work, lambda t, est=est: estimator_plan(est, t.shape, ratio, groups)):
                for x, z in zip(batches, refs):
                    for _ in range(draws):
                        errs.append(float((work(x) - z).norm() / z.norm()))
            out[est] = sum(errs) / len(errs)
    return out


def train_bn_model(dataset: Dataset, epochs: int, seed: int, width: int) -> nn.Module:
    """A BN SmallResNet trained with full BatchNorm (the demo's training loop)."""
    from .demo import DemoOptions, train_one

    keep: list[nn.Module] = []
    train_one(dataset, "bn", seed, DemoOptions(epochs=epochs, width=width, progress=False), keep)
    return keep[0]


def load_checkpoint(path: str | Path) -> nn.Module:
    """A BN model from the demo's ``bn_model.pt``."""
    from .models import small_resnet

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        model = small_resnet(
            ckpt["in_channels"],
            ckpt["num_classes"],
            "bn",
            ckpt["width"],
            ckpt["blocks"],
            head=ckpt.get("head", "linear"),
        )
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--checkpoint {str(p)!r} is not a bn_model.pt written by bnrewrite demo ({first})"
        ) from None
    return model


def run_diagnostics(
    model: nn.Module,
    dataset: Dataset,
    ratio: float = 0.25,
    groups: int = 4,
    batch_size: int = 64,
    batches: int = 4,
    draws: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Layer and network errors of every estimator on ``batches`` real training batches."""
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset.x_train)
    if batch_size > n:
        raise ValueError(f"--batch-size {batch_size} exceeds the {n} training images")
    perm = torch.randperm(n, generator=gen)
    xs = [dataset.x_train[perm.roll(-i * batch_size)[:batch_size]] for i in range(batches)]
    torch.manual_seed(seed)
    acts = record_bn_inputs(model, xs)
    layers = layer_errors(acts, ratio, groups, draws)
    network = network_errors(model, xs, ratio, groups, draws)
    return {
        "ratio": ratio,
        "groups": groups,
        "batch_size": batch_size,
        "batches": batches,
        "draws": draws,
        "layers": [dataclasses.asdict(r) for r in layers],
        "network": network,
    }


SHORT: dict[str, str] = {"ns": "NS", "bs": "BS", "fs": "FS", "fs_patch": "patch*"}
METRICS: tuple[tuple[str, str], ...] = (
    ("mean_err", "mean err"),
    ("var_err", "var err"),
    ("shared_err", "shared err"),
)


def format_table(result: dict[str, Any]) -> str:
    """Per-layer errors: one row per layer; per metric one column per estimator; then the network.

    ``patch*`` is the single-shared-patch baseline (not a bnrewrite method).
    """
    rows = result["layers"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    by = {(r["layer"], r["estimator"]): r for r in rows}
    head = ["layer", "BN input", "n (all estimators) / full"]
    for _key, name in METRICS:
        head += [f"{name} {SHORT[e]}" for e in ests]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for layer in layers:
        first = by[(layer, ests[0])]
        counts = sorted({by[(layer, e)]["count"] for e in ests})
        cells = [
            layer,
            "×".join(str(s) for s in first["shape"]),
            f"{'/'.join(str(c) for c in counts)} / {first['full_count']}",
        ]
        for key, _name in METRICS:
            cells += [f"{by[(layer, e)][key]:.4f}" for e in ests]
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**mean over layers**", "", ""]
    for key, _name in METRICS:
        for e in ests:
            sel = [by[(layer, e)][key] for layer in layers]
            avg.append(f"**{sum(sel) / len(sel):.4f}**")
    lines.append("| " + " | ".join(avg) + " |")
    net = result["network"]
    lines.append("")
    lines.append(
        "| network err (logits, every BN layer sampled) | "
        + " | ".join(SHORT[e] for e in ests if e in net)
        + " |"
    )
    lines.append("|" + " --- |" * (1 + len(net)))
    lines.append(
        "| ‖ẑ−z‖/‖z‖, mean over draws | "
        + " | ".join(f"{net[e]:.4f}" for e in ests if e in net)
        + " |"
    )
    lines.append("")
    lines.append(
        "patch* = baseline: one contiguous patch of the FS lattice's size, shared by all channels."
    )
    return "\n".join(lines)


def _plot(path: Path, result: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    ests = list(dict.fromkeys(r["estimator"] for r in rows))
    by = {(r["layer"], r["estimator"]): r for r in rows}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4), gridspec_kw={"width_ratios": [3, 3, 3, 1.4]})
    xs = list(range(len(layers)))
    styles = {"ns": "o--", "bs": "o-", "fs": "s-", "fs_patch": "s--"}
    for ax, key, name in zip(
        axes[:3],
        ("mean_err", "var_err", "shared_err"),
        ("mean: |μ̂−μ|/σ", "variance: |σ̂²−σ²|/σ²", "shared (channel-averaged) variance error"),
    ):
        for e in ests:
            ax.plot(xs, [by[(la, e)][key] for la in layers], styles.get(e, "o-"), label=LABELS[e])
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    net = result["network"]
    axes[3].bar(range(len(ests)), [net[e] for e in ests], color=[f"C{i}" for i in range(len(ests))])
    axes[3].set_xticks(range(len(ests)))
    axes[3].set_xticklabels([LABELS[e] for e in ests], rotation=60, ha="right", fontsize=7)
    axes[3].set_title("network: ‖ẑ−z‖/‖z‖ (logits)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, result: dict[str, Any], title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": out / "diagnose.md",
        "csv": out / "diagnose.csv",
        "json": out / "diagnose.json",
        "plot": out / "diagnose.png",
    }
    paths["table"].write_text(f"{title}\n\n{format_table(result)}\n")
    with paths["csv"].open("w", newline="") as f:
        fields = list(result["layers"][0].keys())
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result["layers"]:
            w.writerow({**r, "shape": "x".join(str(s) for s in r["shape"])})
        for e, v in result["network"].items():
            w.writerow({"layer": "<network logits>", "estimator": e, "mean_err": v})
    paths["json"].write_text(json.dumps({"title": title, **result}, indent=2) + "\n")
    _plot(paths["plot"], result, title)
    return paths


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", default=None, help="bn_model.pt from bnrewrite demo (default: train one)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs to train when no checkpoint (default 5)"
    )
    p.add_argument("--ratio", default="1/4", help="sample budget, as in SamplingConfig (1/4)")
    p.add_argument("--groups", type=int, default=4, help="channel groups of bs / fs (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--batches", type=int, default=None, help="real batches (default 4)")
    p.add_argument("--draws", type=int, default=None, help="random draws per batch (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", default="bnrewrite-diagnose", help="output folder")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (python-pickle layout)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    ratio = parse_ratio(args.ratio)
    SamplingConfig(method="bs", ratio=ratio, groups=args.groups)  # validates ratio and groups
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    batches = args.batches if args.batches is not None else (1 if args.quick else 4)
    draws = args.draws if args.draws is not None else (10 if args.quick else 100)
    if min(epochs, batches, draws, args.threads) < 1 or args.batch_size < 2:
        raise CLIError("--epochs, --batches, --draws, --threads must be >= 1; --batch-size >= 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a folder")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data_dir)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        data = dataset.subset(train=512, test=128) if args.quick else dataset
        width = 8 if args.quick else 16
        print(f"training a BN SmallResNet (width {width}) for {epochs} epoch(s) ...", flush=True)
        model = train_bn_model(data, epochs, args.seed, width)
        source = f"BN SmallResNet trained {epochs} epoch(s) here"
    t0 = time.perf_counter()
    result = run_diagnostics(
        model, dataset, ratio, args.groups, args.batch_size, batches, draws, args.seed
    )
    title = (
        f"bnrewrite diagnose — {dataset.describe()}; {source}; budget ratio {args.ratio}, "
        f"{args.groups} groups; {batches} batch(es) of {args.batch_size} × {draws} draws"
    )
    paths = write_outputs(out, result, title)
    print(title)
    print()
    print(format_table(result))
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0
