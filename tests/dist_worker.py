"""Worker of tests/test_distributed.py: one rank of a gloo process group on this machine.

Every rank builds the same full batch from a seed, takes its shard, runs a SampledSyncBatchNorm
forward and backward, and saves what it computed for the parent test to compare."""

from __future__ import annotations

import datetime
import gc
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


def ddp_model():
    """Conv -> SyncBatchNorm -> ReLU -> Linear, float64, the same initial weights everywhere."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    ).double()  # fmt: skip


def ddp_data(sizes: list[int], steps: int):
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    xs = [torch.randn((n, 3, 4, 4), generator=g, dtype=torch.float64) for _ in range(steps)]
    ws = [torch.randn((n, 3), generator=g, dtype=torch.float64) for _ in range(steps)]
    return xs, ws


def run_ddp(rank: int, case: dict, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnrewrite import convert_

    model = convert_(ddp_model(), case["config"])
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sizes = case["sizes"]
    start = sum(sizes[:rank])
    xs, ws = ddp_data(sizes, case["steps"])
    for x, w in zip(xs, ws):
        opt.zero_grad()
        y = ddp(x[start : start + sizes[rank]])
        (y * w[start : start + sizes[rank]]).sum().backward()  # DDP averages over ranks
        opt.step()
    torch.save({"state": model.state_dict()}, f"{out}/rank{rank}.pt")


def run_compiled(rank: int, case: dict, out: str) -> None:
    """The same DDP training eagerly and under ``torch.compile(backend="bnrewrite")``: losses,
    final states, graph and recompile counts."""
    import copy

    import torch._dynamo
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnrewrite import convert_

    torch._dynamo.reset()
    torch._dynamo.config.error_on_recompile = True  # a recompile fails the run
    model = convert_(ddp_model(), case["config"])
    twin = copy.deepcopy(model)
    sizes = case["sizes"]
    start = sum(sizes[:rank])
    xs, ws = ddp_data(sizes, case["steps"])
    options = {**case["config"], "inner": case["inner"]}
    from torch._dynamo.utils import counters

    # the graph breaks of DDP's own wrapper: the same DDP steps over plain BatchNorm2d
    plain = ddp_model()
    plain[1] = torch.nn.BatchNorm2d(8).double()
    baseline = torch.compile(DDP(plain), backend="eager")
    for x in xs:
        baseline(x[start : start + sizes[rank]]).sum().backward()
    results = {"baseline_breaks": dict(counters["graph_break"])}
    counters.clear()
    torch._dynamo.reset()
    for name, m in (("eager", model), ("compiled", twin)):
        ddp = DDP(m)
        step = (
            torch.compile(ddp, backend="bnrewrite", options=options) if name == "compiled" else ddp
        )
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        losses = []
        for x, w in zip(xs, ws):
            opt.zero_grad()
            y = step(x[start : start + sizes[rank]])
            loss = (y * w[start : start + sizes[rank]]).sum()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results[name] = {"losses": torch.stack(losses), "state": m.state_dict()}
    results["frames"] = dict(counters["stats"])
    results["graph_breaks"] = dict(counters["graph_break"])
    # the layer alone traces as one graph: fullgraph=True, one step against the eager first step
    torch._dynamo.config.error_on_recompile = False
    alone = torch.compile(convert_(ddp_model(), case["config"]), backend="bnrewrite",
                          options=options, fullgraph=True)  # fmt: skip
    y = alone(xs[0][start : start + sizes[rank]])
    results["fullgraph_loss"] = (y * ws[0][start : start + sizes[rank]]).sum().detach()
    torch.save(results, f"{out}/rank{rank}.pt")


def run_group_errors(rank: int, case: dict, out: str) -> None:
    """The layer on a group this rank is not a member of, then on a destroyed group: the
    messages (``None`` where no error was raised)."""
    from torch import nn

    from bnrewrite import convert_
    from bnrewrite.distributed import SampledSyncBatchNorm

    def message(layer: nn.Module) -> str | None:
        try:
            layer(torch.randn(4, 3, 2, 2))
        except ValueError as e:
            return str(e)
        return None

    only_rank0 = dist.new_group([0])
    errors = {"non_member": message(SampledSyncBatchNorm(3, process_group=only_rank0,
                                                         config=case["config"]))}  # fmt: skip
    both = dist.new_group([0, 1])
    layer = SampledSyncBatchNorm(3, process_group=both, config=case["config"])
    converted = convert_(nn.Sequential(nn.SyncBatchNorm(3, process_group=both)), case["config"])
    dist.barrier()
    dist.destroy_process_group()
    errors["destroyed"] = message(layer)
    errors["destroyed_converted"] = message(converted)
    torch.save(errors, f"{out}/rank{rank}.pt")


def run_one_rank(case: dict, out: str) -> None:
    """A world of one rank (NCCL on CUDA, or gloo on CPU) with the collectives on: eager and
    compiled (``aot_eager``) forward and backward of the case's batch, float32."""
    import bnrewrite.distributed as bd
    from bnrewrite.distributed import SampledSyncBatchNorm

    bd.COLLECTIVES_WITH_ONE_RANK = True
    x, dy, w, b = batch(case["sizes"], case["channels"], tuple(case["spatial"]))
    results = {}
    for name in ("eager", "compiled"):
        dev = case["device"]
        bn = SampledSyncBatchNorm(case["channels"], config=case["config"]).to(dev)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        xs = x.float().to(dev).requires_grad_(True)
        fn = torch.compile(bn, backend="aot_eager", fullgraph=True) if name == "compiled" else bn
        y = fn(xs)
        y.backward(dy.float().to(dev))
        results[name] = {
            "y": y.detach().cpu().double(), "dx": xs.grad.cpu().double(),
            "dw": bn.weight.grad.cpu().double(), "db": bn.bias.grad.cpu().double(),
            "rm": bn.running_mean.cpu().double(), "rv": bn.running_var.cpu().double(),
        }  # fmt: skip
    torch.save(results, f"{out}/rank0.pt")


def run(rank: int, world: int, init_file: str, out: str, case: dict) -> None:
    import bnrewrite.distributed as bd
    from bnrewrite.distributed import SampledSyncBatchNorm

    drawn: list = []
    draw = bd.draw_offsets

    def recording(*args, **kwargs):  # the offsets this rank drew
        out = draw(*args, **kwargs)
        drawn.append(out)
        return out

    if not (case.get("compiled") or case.get("one_rank")):  # (no list appends in traced code)
        bd.draw_offsets = recording

    dist.init_process_group(
        case.get("backend", "gloo"),
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        if case.get("ddp"):
            run_ddp(rank, case, out)
            return
        if case.get("compiled"):
            run_compiled(rank, case, out)
            return
        if case.get("one_rank"):
            if case["device"] == "cuda":
                torch.cuda.set_device(0)
            run_one_rank(case, out)
            return
        if case.get("group_errors"):
            run_group_errors(rank, case, out)
            return
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
        if dist.is_initialized():
            # free the DDP objects (reference cycles that hold the group) before the teardown:
            # left to interpreter exit, gloo's threads can abort the process (docs/distributed.md)
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit("run through tests/test_distributed.py")
