"""The floor's default, measured: a conv net with a BatchNorm1d head on real data (scikit-learn's
8x8 digits, and the breast-cancer table through an MLP with BatchNorm1d), batch 64, several seeds,
``bs`` 1/16 at floors 1 (off), 8, 16, 32, 64. Prints a Markdown table of test accuracy.

    python bench/floor_study.py [--seeds 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite
from bnrewrite import SamplingConfig
from bnrewrite.apps.datasets import load_digits


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def mlp(inputs: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes),
    )  # fmt: skip


def cancer():
    import numpy as np
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    b = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(
        b.data.astype(np.float32), b.target.astype(np.int64), test_size=0.3, random_state=0,
        stratify=b.target,
    )  # fmt: skip
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    t = torch.from_numpy
    return t((x_tr - mu) / sd), t(y_tr), t((x_te - mu) / sd), t(y_te)


def train(model, x, y, xt, yt, seed, epochs, batch=64, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(xt).argmax(1) == yt).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_digits()
    sets = {
        "digits, conv + BatchNorm1d(128) head": (
            conv_net,
            d.x_train,
            d.y_train,
            d.x_test,
            d.y_test,
        ),
        "breast cancer, MLP with 2 BatchNorm1d(64)": (lambda: mlp(30, 2), *cancer()),
    }
    floors = [1, 8, 16, 32, 64]
    print("| data | config | " + " | ".join(f"floor {f}" for f in floors) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in floors) + " |")
    for name, (make, x, y, xt, yt) in sets.items():
        bn = [train(bnrewrite.rewrite(torch.manual_seed(s) and make(), "full"), x, y, xt, yt, s,
                    args.epochs) for s in range(args.seeds)]  # fmt: skip
        base = statistics.fmean(bn)
        print(f"| {name} | BN | {base:.2f} (all floors) |" + " |" * (len(floors) - 1))
        for method in ("bs", "ns"):
            cells = []
            for floor in floors:
                cfg = SamplingConfig(method, ratio=1 / 16, min_count=floor)
                accs = [train(bnrewrite.rewrite((torch.manual_seed(s), make())[1], cfg), x, y, xt,
                              yt, s, args.epochs) for s in range(args.seeds)]  # fmt: skip
                cells.append(f"{statistics.fmean(accs) - base:+.2f}")
            print(f"| {name} | {method} 1/16 | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
