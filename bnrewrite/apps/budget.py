"""``bnrewrite budget``: the automatic per-layer sample budget of the demo's ResNet, as JSON.

On calibration batches of real training data, :func:`bnrewrite.budget.choose_budget` picks for
every BatchNorm layer the cheapest ``fs`` / ``bs`` sample whose mean and variance errors stay under
``--target``; the command then measures the chosen plans on *held-out* batches, prints the table
and the fraction of activation elements the statistics read (against full BN and ``fs`` 1/16),
and writes the overrides file that ``bnrewrite onnx --overrides``, the backend option
``overrides`` and :func:`bnrewrite.budget.load_overrides` (for ``rewrite`` / ``convert_``) read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..budget import choose_budget, estimator_errors, fraction_read, record_bn_inputs
from ..config import SamplingConfig
from ..plan import sample_plan
from .datasets import load_dataset
from .diagnose import load_checkpoint, train_bn_model

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "choose per-layer sampling for the demo's ResNet from an error target on real calibration "
    "batches; checks it on held-out batches and writes the overrides as JSON"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=0.05, help="relative error target (0.05)")
    p.add_argument("--checkpoint", default=None, help="bn_model.pt from bnrewrite demo")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train without checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--held-out", type=int, default=4, help="held-out batches (default 4)")
    p.add_argument("--draws", type=int, default=16, help="random draws per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", default="budget.json", help="where to write the overrides JSON")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (python-pickle layout)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tests)")


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    if not args.target > 0:
        raise CLIError(
            f"--target must be a positive relative error such as 0.05, got {args.target}"
        )
    if args.batches < 1 or args.held_out < 1 or args.draws < 1:
        raise CLIError("--batches, --held-out and --draws must be at least 1")
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give a file name such as budget.json")
    if not out.parent.is_dir():
        raise CLIError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data_dir)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        epochs = args.epochs if args.epochs is not None else (1 if args.quick else 3)
        data = dataset.subset(train=512, test=128) if args.quick else dataset
        width = 8 if args.quick else 16
        print(f"training a BN SmallResNet (width {width}) for {epochs} epoch(s) ...", flush=True)
        model = train_bn_model(data, epochs, args.seed, width)
        source = f"BN SmallResNet trained {epochs} epoch(s) here"
    need = (args.batches + args.held_out) * args.batch_size
    if need > len(dataset.x_train):
        raise CLIError(
            f"--batches + --held-out of --batch-size {args.batch_size} need {need} training "
            f"images; the data set has {len(dataset.x_train)}"
        )
    t0 = time.perf_counter()
    perm = torch.randperm(len(dataset.x_train), generator=torch.Generator().manual_seed(args.seed))
    xs = [
        dataset.x_train[perm[i * args.batch_size : (i + 1) * args.batch_size]]
        for i in range(args.batches + args.held_out)
    ]
    calibration, held_out = xs[: args.batches], xs[args.batches :]
    budget = choose_budget(model, calibration, args.target, draws=args.draws, seed=args.seed)
    acts = record_bn_inputs(model, held_out)
    worst_m = worst_v = 0.0
    for la in budget.layers:
        if la.config.method != "full":
            m, v, _ = estimator_errors(
                acts[la.name], lambda s, c=la.config: sample_plan(s, c), args.draws
            )
            worst_m, worst_v = max(worst_m, m), max(worst_v, v)
    shapes = {name: tuple(x[0].shape) for name, x in acts.items()}
    fs16 = fraction_read(shapes, SamplingConfig("fs", ratio=1 / 16))
    print(f"bnrewrite budget — {dataset.describe()}; {source}")
    print()
    print(budget.table())
    print()
    print(
        f"statistics read: budget {100 * budget.fraction_read():.2f}%, fs 1/16 "
        f"{100 * fs16:.2f}%, full BN 100% of the activation elements"
    )
    met = worst_m <= args.target and worst_v <= args.target
    print(
        f"held-out ({args.held_out} batch(es)): worst mean err {worst_m:.4f}, worst var err "
        f"{worst_v:.4f} -> target {args.target:g} {'met' if met else 'NOT met'}"
    )
    budget.to_json(out)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0
