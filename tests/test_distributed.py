"""Sampled SyncBatchNorm across 2 gloo ranks (issue 13, first part): spawned processes on this
machine, loopback only, bounded time. Fixed sampling against an independent single-process
reference that pools the ranks' samples (tests/reference.py's fixed sample set of each shard);
``method="full"`` against PyTorch's BN over the concatenated batch; uneven shards."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import dist_worker  # noqa: E402
from reference import ref_sample  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built"
)


def _spawn(case: dict, tmp_path: Path, world: int = 2, timeout: float = 120.0) -> list[dict]:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    )
    init = tmp_path / "init"
    ctx = mp.start_processes(
        dist_worker.run,
        args=(world, str(init), str(tmp_path), case),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish in {timeout:.0f} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(case: dict):
    """Float64 BN over all ranks' inputs whose statistics pool each shard's fixed sample."""
    sizes = case["sizes"]
    x, dy, w, b = dist_worker.batch(sizes, case["channels"], tuple(case["spatial"]))
    x = x.clone().requires_grad_(True)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    cfg = case["config"]
    shards = torch.split(x, sizes)
    if cfg["method"] == "full":
        y = F.batch_norm(x, torch.zeros(x.shape[1], dtype=x.dtype),
                         torch.ones(x.shape[1], dtype=x.dtype), w, b, True, 0.1, 1e-5)  # fmt: skip
        n = x.numel() // x.shape[1]
        dims = [0, *range(2, x.dim())]
        mean, var = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
    else:
        parts = [ref_sample(s, cfg["method"], cfg["ratio"]) for s in shards]
        flat = torch.cat([p.transpose(0, 1).reshape(p.shape[1], -1) for p in parts], 1)
        n = flat.shape[1]
        mean = flat.mean(1)
        var = (flat - mean[:, None]).square().mean(1)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * w.view(shape)
        y = y + b.view(shape)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    rm = 0.1 * mean.detach()
    rv = 0.9 + 0.1 * var.detach() * n / (n - 1)
    return y.detach(), grads, rm, rv


CASES = {
    "bs-even": {"sizes": [8, 8], "channels": 4, "spatial": [3, 3],
                "config": {"method": "bs", "ratio": 0.5, "sampling": "fixed"}},
    "fs-uneven": {"sizes": [6, 10], "channels": 3, "spatial": [8, 8],
                  "config": {"method": "fs", "ratio": 0.25, "sampling": "fixed"}},
    "full-uneven": {"sizes": [5, 11], "channels": 4, "spatial": [2, 3],
                    "config": {"method": "full"}},
    # one sample per rank, a BatchNorm1d input: only the pooled set has 2 values per channel
    "full-one-per-rank": {"sizes": [1, 1], "channels": 4, "spatial": [],
                          "config": {"method": "full"}},
    "bs-convert": {"sizes": [8, 8], "channels": 4, "spatial": [3, 3], "convert": True,
                   "config": {"method": "bs", "ratio": 0.5, "sampling": "fixed"}},
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_the_pooled_reference(name, tmp_path):
    case = CASES[name]
    ranks = _spawn(case, tmp_path)
    y, (dx, dw, db), rm, rv = _reference(case)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), dx)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], dw)  # DDP sums (then averages)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], db)
    for r in ranks:  # every rank holds the same running statistics, from the global n
        torch.testing.assert_close(r["rm"], rm)
        torch.testing.assert_close(r["rv"], rv)


@pytest.mark.parametrize("seeded", [False, True])
def test_random_sampling_ranks_draw_their_own_positions(seeded, tmp_path):
    """Random ``bs``: every rank draws its own offsets -- from torch's RNG (seeded differently per
    rank by the user, as with DDP), or, with ``seed=`` in the config, from a stream of its own even
    when both ranks' global RNG states are equal; the outputs stay finite and every rank holds the
    same (global) running statistics."""
    config = {"method": "bs", "ratio": 0.25, "min_count": 1}
    case = {"sizes": [8, 8], "channels": 4, "spatial": [4, 4], "config": config}
    if seeded:
        case = {**case, "config": {**config, "seed": 5}, "rng_seed": 0}  # same global RNG state
    ranks = _spawn(case, tmp_path)
    offsets = [r["offsets"][0] for r in ranks]
    assert offsets[0] is not None and not torch.equal(offsets[0], offsets[1])
    for r in ranks:
        assert torch.isfinite(r["y"]).all() and torch.isfinite(r["dx"]).all()
    torch.testing.assert_close(ranks[0]["rm"], ranks[1]["rm"])


class PooledBN(torch.nn.Module):
    """Reference BN: statistics from the first ``k`` rows of each shard (fixed ``bs``), pooled."""

    def __init__(self, bn, sizes, ratio):
        super().__init__()
        self.bn, self.sizes, self.ratio = bn, sizes, ratio

    def forward(self, x):
        parts = [ref_sample(s, "bs", self.ratio) for s in torch.split(x, self.sizes)]
        flat = torch.cat([p.transpose(0, 1).reshape(p.shape[1], -1) for p in parts], 1)
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
        n = flat.shape[1]
        with torch.no_grad():
            self.bn.running_mean.mul_(0.9).add_(0.1 * mean)
            self.bn.running_var.mul_(0.9).add_(0.1 * var * n / (n - 1))
            self.bn.num_batches_tracked.add_(1)
        shape = [1, -1, 1, 1]
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.bn.eps)
        return y * self.bn.weight.view(shape) + self.bn.bias.view(shape)


def test_ddp_on_cpu_trains_like_one_process_with_pooled_samples(tmp_path):
    """DDP (gloo, CPU) over a model whose nn.SyncBatchNorm went through ``convert_`` -- which
    PyTorch's own SyncBatchNorm cannot do on CPU: three SGD steps on uneven shards give, on every
    rank, the parameters and buffers of a single process whose BN pools the shards' samples and
    whose loss is the mean of the ranks' losses (DDP averages gradients)."""
    case = {"ddp": True, "sizes": [6, 10], "steps": 3,
            "config": {"method": "bs", "ratio": 0.5, "sampling": "fixed"}}  # fmt: skip
    ranks = _spawn(case, tmp_path)
    ref = dist_worker.ddp_model()
    ref[1] = PooledBN(torch.nn.BatchNorm2d(8).double(), case["sizes"], 0.5)
    ref[1].bn.load_state_dict(dist_worker.ddp_model()[1].state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    xs, ws = dist_worker.ddp_data(case["sizes"], case["steps"])
    for x, w in zip(xs, ws):
        opt.zero_grad()
        out = ref(x)
        losses = [(o * wi).sum() for o, wi in zip(torch.split(out, case["sizes"]),
                                                   torch.split(w, case["sizes"]))]  # fmt: skip
        (sum(losses) / len(losses)).backward()
        opt.step()
    want = {k.replace("1.bn.", "1."): v for k, v in ref.state_dict().items()}
    for r in ranks:
        assert set(r["state"]) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(r["state"][k], v, msg=k)


@pytest.mark.parametrize(
    "inner, method",
    [
        ("aot_eager", "bs"),
        ("aot_eager", "fs"),
        ("aot_eager", "full"),
        ("inductor", "bs"),
        ("aot_eager", "bs-random"),
    ],
)
def test_compiled_ddp_matches_eager_ddp_without_recompiling(inner, method, tmp_path):
    """``torch.compile(DDP(model), backend="bnrewrite")`` on 2 gloo ranks (uneven shards) over a
    ``convert_``-ed model: four SGD steps give the eager DDP run's losses and final parameters and
    buffers on every rank (fixed sampling); one graph, no recompile (Dynamo's
    ``error_on_recompile`` is on in the ranks); the model alone compiles with ``fullgraph=True``.
    Random sampling (fresh offsets every step, device tensors): no recompile either, and the
    ranks end with equal parameters and (pooled) running statistics."""
    random = method.endswith("-random")
    method = method.removesuffix("-random")
    config = {"method": method, "sampling": "random" if random else "fixed"}
    if method != "full":
        config["ratio"] = 0.5
    case = {"compiled": True, "sizes": [6, 10], "steps": 4, "inner": inner, "config": config}
    ranks = _spawn(case, tmp_path, timeout=240)
    for r in ranks:
        assert r["frames"].get("unique_graphs") == 1, r["frames"]
        assert torch.isfinite(r["compiled"]["losses"]).all()
        # DDP's own wrapper breaks the frame around the model (as around a plain BN model);
        # the model's graph -- the sampled sync layers included -- is one graph without a break
        assert r["graph_breaks"] == r["baseline_breaks"]
        if random:
            continue
        torch.testing.assert_close(r["compiled"]["losses"], r["eager"]["losses"])
        for k, v in r["eager"]["state"].items():
            torch.testing.assert_close(r["compiled"]["state"][k], v, msg=k)
        torch.testing.assert_close(r["fullgraph_loss"], r["eager"]["losses"][0])
    torch.testing.assert_close(ranks[0]["compiled"]["state"], ranks[1]["compiled"]["state"])


_NCCL = torch.cuda.is_available() and torch.distributed.is_nccl_available()


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(
                not _NCCL, reason="needs CUDA and NCCL (bench/run_gpu.sh runs it on the H200)"
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", ["bs-even", "fs-uneven"])
def test_one_rank_with_collectives_equals_the_reference(backend, name, tmp_path):
    """NCCL puts one rank on a device and the GPU machine has one: a world of one rank with the
    collectives forced on (``COLLECTIVES_WITH_ONE_RANK``), eager and compiled, float32 (NCCL on
    CUDA; gloo on CPU, the same path), against the float64 CPU reference of the whole batch as
    one shard."""
    device = "cuda" if backend == "nccl" else "cpu"
    case = {**CASES[name], "backend": backend, "device": device, "one_rank": True}
    case["sizes"] = [sum(case["sizes"])]
    (result,) = _spawn(case, tmp_path, world=1, timeout=180)
    y, (dx, dw, db), rm, rv = _reference(case)
    for run in ("eager", "compiled"):
        got = result[run]
        for key, want in (("y", y), ("dx", dx), ("dw", dw), ("db", db), ("rm", rm), ("rv", rv)):
            torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-4, msg=f"{run} {key}")


def test_mismatched_channels_across_ranks_is_a_clear_error_on_every_rank(tmp_path):
    case = {"mismatch": True, "channels": 4, "config": {"method": "bs", "ratio": 0.5}}
    ranks = _spawn(case, tmp_path, timeout=60)
    for r in ranks:
        assert r["error"] and "disagree on the number of channels ([4, 5] by rank)" in r["error"]


def test_vdn_is_refused_with_a_clear_error():
    from bnrewrite.distributed import SampledSyncBatchNorm

    with pytest.raises(ValueError, match="not supported across processes"):
        SampledSyncBatchNorm(4, config="vdn")


def test_without_a_process_group_it_is_the_local_sampled_bn():
    from bnrewrite import sampled_batch_norm
    from bnrewrite.distributed import SampledSyncBatchNorm

    bn = SampledSyncBatchNorm(4, config={"method": "bs", "ratio": 0.5, "sampling": "fixed"})
    x = torch.randn(8, 4, 3, 3)
    want = sampled_batch_norm(x, torch.zeros(4), torch.ones(4), bn.weight, bn.bias, True, 0.1,
                              1e-5, config=bn.config)  # fmt: skip
    torch.testing.assert_close(bn(x), want)


def test_process_group_errors_are_clear_and_do_not_hang(tmp_path):
    """A rank outside the layer's process group, and a layer (built directly or by ``convert_``)
    whose group was destroyed: a ValueError that says what to do, on every rank, within the
    test's time bound -- never local statistics in silence."""
    case = {"group_errors": True, "config": {"method": "bs", "ratio": 0.5}}
    ranks = _spawn(case, tmp_path, timeout=60)
    assert ranks[0]["non_member"] is None  # rank 0 is the group: one rank, local statistics
    assert "rank 1 is not a member of the layer's process group" in ranks[1]["non_member"]
    for r in ranks:
        for key in ("destroyed", "destroyed_converted"):
            assert "its process_group is not initialised" in r[key]
            assert "destroy_process_group" in r[key]


def test_world_size_without_init_process_group_is_an_error(monkeypatch):
    """``torchrun`` sets WORLD_SIZE; a script that forgets ``init_process_group`` gets an error
    at the first training step instead of per-process statistics."""
    from bnrewrite.distributed import SampledSyncBatchNorm

    monkeypatch.setenv("WORLD_SIZE", "2")
    bn = SampledSyncBatchNorm(4, config="bs")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 .* call torch.distributed.init_process"):
        bn(torch.randn(8, 4, 3, 3))
    bn.eval()  # eval mode needs no process group
    assert bn(torch.randn(8, 4, 3, 3)).shape == (8, 4, 3, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    bn.train()
    assert bn(torch.randn(8, 4, 3, 3)).shape == (8, 4, 3, 3)


def _sync_model():
    torch.manual_seed(0)
    from bnrewrite.distributed import SampledSyncBatchNorm

    fixed = {"method": "bs", "ratio": 0.5, "sampling": "fixed"}
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), SampledSyncBatchNorm(4, config=fixed), torch.nn.ReLU(),
        torch.nn.SyncBatchNorm(4),
    )  # fmt: skip


@pytest.mark.parametrize("entry", ["backend", "pre_grad_pass"])
def test_compiled_entry_points_report_sync_layers(entry):
    """In a Dynamo graph (one process): the inlined SampledSyncBatchNorm is already sampled and
    listed as synchronised; the one-process nn.SyncBatchNorm is an F.batch_norm call and is
    rewritten. Outputs and running statistics equal ``convert_`` of the same model, eagerly."""
    import copy

    from bnrewrite import convert_
    from bnrewrite.backend import SampledBatchNormPass, make_backend

    cfg = {"method": "bs", "ratio": 0.5, "sampling": "fixed"}
    model = _sync_model()
    reference = convert_(copy.deepcopy(model), cfg)
    x = torch.randn(8, 3, 6, 6)
    if entry == "backend":
        backend = make_backend(cfg, inner="eager")
        y = torch.compile(model, backend=backend)(x)
        (report,) = backend.reports
    else:  # what Inductor's pre_grad_custom_pass hook does with the Dynamo graph
        hook = SampledBatchNormPass(cfg)

        def backend(gm, example_inputs):
            hook(gm.graph)
            gm.recompile()
            return gm.forward

        y = torch.compile(model, backend=backend)(x)
        report = hook.last_report
    assert report.synchronised == ["1"]
    assert report.rewritten == [("3", "bs")]
    torch.testing.assert_close(y, reference(x))
    for name in ("1.running_mean", "1.running_var", "3.running_mean", "3.running_var"):
        torch.testing.assert_close(model.state_dict()[name], reference.state_dict()[name])


def test_syncbatchnorm_traced_across_processes_is_left_with_a_warning(caplog):
    """PyTorch's cross-process SyncBatchNorm (CUDA, several ranks) traces as its own
    ``sync_batch_norm`` function, not a ``batch_norm`` call: the pass leaves it, says so in the
    report and warns (a graph with that module's nodes, built here without CUDA)."""
    import logging

    from bnrewrite.passes.fx import UNTOUCHED_SYNC, rewrite_graph

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    stats = graph.call_function(torch.batch_norm_stats, (x, 1e-5))
    stats.meta["nn_module_stack"] = {
        "bn": ("L['self'].layer1._modules['bn']", torch.nn.SyncBatchNorm)
    }
    graph.output(stats)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with caplog.at_level(logging.WARNING, logger="bnrewrite"):
        report = rewrite_graph(gm, "bs")
    assert report.skipped == [("layer1.bn", UNTOUCHED_SYNC)] and report.count == 0
    assert "bnrewrite.convert_ before wrapping it in DDP" in caplog.text


def test_torchrun_script_of_the_docs_trains_on_two_ranks(tmp_path):
    """The ``torchrun`` script of docs/distributed.md, run by torch's own launcher with two
    processes (``--standalone``: a rendezvous on localhost); tests/test_readme.py runs the same
    block as one process."""
    import re
    import subprocess

    docs = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", docs, re.S | re.M)
    (script,) = [b for b in blocks if "convert_sync_batchnorm" in b]
    path = tmp_path / "train.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(path)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        assert re.search(rf"rank {rank} of 2: loss \d+\.\d+", run.stdout), run.stdout
