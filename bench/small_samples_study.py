"""Small samples on real data (issue 16): every method on a conv net with a BatchNorm1d head, and
VDN's virtual-row distribution at batch 2.

Two data sets that ship with scikit-learn (no download): the 8x8 digits (1x8x8) and the
breast-cancer table as 1x3x10 images (:func:`bnrewrite.apps.datasets.load_breast_cancer`).

* ``table``: ``small_resnet(head="bn1d")`` (7 conv BNs and a ``BatchNorm1d(128)`` head), batch 64,
  SGD, each method at its defaults and at ``bs``/``fs`` 1/16 and ``vdn_samples=4``; test accuracy,
  mean and min over seeds, and the gap to BN.
* ``micro``: the conv-only ``small_resnet`` (7 BNs) at batch 2: BN, GroupNorm, and ``vdn`` /
  ``fs_vdn`` with ``virtual="normal"`` (standard-normal rows), ``"running"`` (rows from the running
  moments of the inputs seen before) and ``"memory"`` (real inputs of earlier steps); the accuracy
  of every seed, so a diverged run shows.

    python bench/small_samples_study.py table [--seeds 3]
    python bench/small_samples_study.py micro [--seeds 3] [--epochs 1] [--lr 0.02]

Prints Markdown tables (docs/results.md, "Small samples").
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite
from bnrewrite import SamplingConfig
from bnrewrite.apps.datasets import Dataset, load_breast_cancer, load_digits
from bnrewrite.apps.models import small_resnet


def train(
    make: Callable[[], nn.Module],
    config: SamplingConfig | None,
    data: Dataset,
    seed: int,
    epochs: int,
    batch: int,
    lr: float,
) -> float:
    """Test accuracy (%) after ``epochs`` of SGD; ``nan`` when the loss diverged."""
    torch.manual_seed(seed)
    model = make()
    net = model if config is None else bnrewrite.rewrite(model, config)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if not math.isfinite(loss.item()):
                return float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return 100.0 * (net(data.x_test).argmax(1) == data.y_test).float().mean().item()


def _sets() -> dict[str, Dataset]:
    return {"digits": load_digits(), "breast cancer": load_breast_cancer()}


#: Epochs of the batch-64 table: about 180 SGD steps on each data set (digits 1437 train
#: images, 22 steps an epoch; breast cancer 398 rows, 6 steps an epoch).
TABLE_EPOCHS = {"digits": 8, "breast cancer": 30}


def table(seeds: int, methods: tuple[str, ...]) -> None:
    configs: list[tuple[str, SamplingConfig | None]] = [
        ("BN", None),
        ("bs (1/8)", SamplingConfig("bs")),
        ("fs (1/16)", SamplingConfig("fs")),
        ("ns (1/8)", SamplingConfig("ns")),
        ("vdn (2 rows)", SamplingConfig("vdn")),
        ("fs_vdn (1/16, 2 rows)", SamplingConfig("fs_vdn")),
        ("bs 1/16", SamplingConfig("bs", ratio=1 / 16)),
        ("ns 1/16", SamplingConfig("ns", ratio=1 / 16)),
        ("vdn, vdn_samples=4", SamplingConfig("vdn", vdn_samples=4)),
        ("fs_vdn, vdn_samples=4", SamplingConfig("fs_vdn", vdn_samples=4)),
    ]
    print("| data | config | mean | min | gap to BN |")
    print("| --- | --- | --- | --- | --- |")
    for name, data in _sets().items():
        make = lambda d=data: small_resnet(d.in_channels, d.num_classes, head="bn1d")  # noqa: E731
        base = None
        for label, cfg in configs:
            if cfg is not None and cfg.method not in methods:
                continue
            accs = [train(make, cfg, data, s, TABLE_EPOCHS[name], 64, 0.05) for s in range(seeds)]
            mean = statistics.fmean(accs)
            base = mean if base is None else base
            print(f"| {name} | {label} | {mean:.2f} | {min(accs):.2f} | {mean - base:+.2f} |",
                  flush=True)  # fmt: skip


def micro(
    seeds: int,
    epochs_digits: int,
    lr: float,
    only: str | None,
    methods: tuple[str, ...],
    first_seed: int = 0,
    virtuals: tuple[str, ...] = ("normal", "running", "memory"),
) -> None:
    epochs = {"digits": epochs_digits, "breast cancer": 3 * epochs_digits}
    rows: list[tuple[str, str, SamplingConfig | None]] = []
    if "bn" in methods:
        rows.append(("BN", "bn", None))
    if "gn" in methods:
        rows.append(("GroupNorm", "gn", None))
    for method in [m for m in ("vdn", "fs_vdn") if m in methods]:
        for virtual in virtuals:
            rows.append((f"{method}, {virtual}", "bn", SamplingConfig(method, virtual=virtual)))
    seed_list = range(first_seed, first_seed + seeds)
    print("| data | config | " + " | ".join(f"seed {s}" for s in seed_list) + " | mean |")
    print("| --- | --- | " + " | ".join("---" for _ in range(seeds)) + " | --- |")
    for name, data in _sets().items():
        if only and only != name:
            continue
        for label, norm, cfg in rows:
            make = lambda d=data, n=norm: small_resnet(d.in_channels, d.num_classes, norm=n)  # noqa: E731
            accs = [train(make, cfg, data, s, epochs[name], 2, lr) for s in seed_list]
            cells = " | ".join("diverged" if math.isnan(a) else f"{a:.1f}" for a in accs)
            mean = statistics.fmean(0.0 if math.isnan(a) else a for a in accs)
            print(f"| {name} ({epochs[name]} ep.) | {label} | {cells} | {mean:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("table", "micro"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="micro: digits epochs (cancer: 3x)")
    ap.add_argument("--lr", type=float, default=0.02, help="micro: SGD learning rate")
    ap.add_argument("--only", default=None, help="micro: one data set ('digits')")
    ap.add_argument("--first-seed", type=int, default=0, help="micro: seeds from this one")
    ap.add_argument("--virtual", default="normal,running,memory", help="micro: virtual rows")
    ap.add_argument(
        "--methods",
        default="bn,gn,ns,bs,fs,vdn,fs_vdn",
        help="rows to run (BN is always the table's baseline; micro: bn, gn, vdn, fs_vdn)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.part == "table":
        table(args.seeds, tuple(args.methods.split(",")))
    else:
        micro(
            args.seeds,
            args.epochs,
            args.lr,
            args.only,
            tuple(args.methods.split(",")),
            args.first_seed,
            tuple(args.virtual.split(",")),
        )


if __name__ == "__main__":
    main()
