"""Worker of tests/test_distributed.py: one rank of a gloo process group on this machine.

Every rank builds the same full batch from a seed, takes its shard, runs a SampledSyncBatchNorm
forward and backward, and saves what it computed for the parent test to compare."""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist


def batch(sizes: list[int], channels: int, spatial: tuple[int, ...]):
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x = torch.randn((n, channels, *spatial), generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn((n, channels, *spatial), generator=g, dtype=torch.float64)
    w = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(channels, generator=g, dtype=torch.float64)
    return x, dy, w, b


def run(rank: int, world: int, init_file: str, out: str, case: dict) -> None:
    import bnrewrite.distributed as bd
    from bnrewrite.distributed import SampledSyncBatchNorm

    drawn: list = []
    draw = bd.draw_offsets

    def recording(*args, **kwargs):  # the offsets this rank drew
        out = draw(*args, **kwargs)
        drawn.append(out)
        return out

    bd.draw_offsets = recording

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        if case.get("mismatch"):  # rank r has channels + r: a clear error on every rank
            c = case["channels"] + rank
            try:
                SampledSyncBatchNorm(c, config=case["config"])(torch.randn(4, c, 2, 2))
                error = None
            except ValueError as e:
                error = str(e)
            torch.save({"error": error}, f"{out}/rank{rank}.pt")
            return
        sizes = case["sizes"]
        x, dy, w, b = batch(sizes, case["channels"], tuple(case["spatial"]))
        start = sum(sizes[:rank])
        xs = x[start : start + sizes[rank]].clone().requires_grad_(True)
        dys = dy[start : start + sizes[rank]]
        if case.get("convert"):  # nn.SyncBatchNorm through bnrewrite.convert_
            from torch import nn

            from bnrewrite import convert_

            holder = convert_(nn.Sequential(nn.SyncBatchNorm(case["channels"])), case["config"])
            bn = holder[0].double()
            assert isinstance(bn, SampledSyncBatchNorm)
        else:
            bn = SampledSyncBatchNorm(case["channels"], config=case["config"]).double()
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        torch.manual_seed(case.get("rng_seed", 100 + rank))
        y = bn(xs)
        y.backward(dys)
        torch.save(
            {
                "y": y.detach(),
                "dx": xs.grad,
                "dw": bn.weight.grad,
                "db": bn.bias.grad,
                "rm": bn.running_mean,
                "rv": bn.running_var,
                "offsets": drawn,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit("run through tests/test_distributed.py")
