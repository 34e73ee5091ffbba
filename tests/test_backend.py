"""torch.compile backend ``"bnrewrite"`` and the Inductor pre-grad pass (issue 4).

Acceptance lines of issue 4 and the tests that show them:

1. registered through the entry point: ``test_entry_point_registered`` (fresh interpreter that does
   not import bnrewrite; and the built wheel's ``entry_points.txt``).
2. fixed sampling: compiled == eager FX rewrite == independent reference:
   ``test_compiled_zoo_matches_reference`` (aot_eager, whole zoo) and
   ``test_inductor_matches_eager_rewrite_and_reference`` (Inductor, slow).
3. compiles once: ``test_random_sampling_compiles_once`` (aot_eager and Inductor) and
   ``test_dynamic_batch_sizes_compile_once``.
4. options: ``test_options_unknown_key_and_bad_value``, ``test_mode_passed_to_inductor``.
5. pre-grad pass: ``test_pre_grad_pass_matches_backend`` (Inductor, slow), ``test_pass_uuid_stable``.
6. test time: everything but the ``slow`` tests uses ``aot_eager``.
Cache hits in a second process: ``test_second_process_hits_caches`` (slow).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from zoo import (
    ZOO,
    SmallResNet,
    ZooEntry,
    assert_close_results,
    reference_model,
    run_steps,
    zoo_entry,
)

import bnrewrite
from bnrewrite import SamplingConfig
from bnrewrite.backend import (
    SampledBatchNormPass,
    _cpp_workarounds,
    bnrewrite_backend,
    make_backend,
    parse_options,
)

ROOT = Path(__file__).resolve().parents[1]
IDS = [e.name for e in ZOO]
FIXED = {
    "full": SamplingConfig("full"),
    "bs": SamplingConfig("bs", ratio=0.5, sampling="fixed"),
    "fs": SamplingConfig("fs", ratio=0.25, sampling="fixed"),
}
# PyTorch's BatchNorm(momentum=None) graph-breaks in Dynamo; that call runs eagerly as full BN.
GRAPH_BREAK_FULL = {"mlp_bn1d": ("bn2",)}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> str:
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout
    )
    errors = [line for line in out.stderr.splitlines() if "Error" in line]
    assert out.returncode == 0, "\n".join(errors[-10:]) or out.stderr[-3000:]
    return out.stdout


# -- 1 ------------------------------------------------------------------------------------------
def test_entry_point_registered() -> None:
    code = (
        "import sys, torch, torch._dynamo\n"
        "names = torch._dynamo.list_backends()\n"
        "assert 'bnrewrite' not in sys.modules\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
        "c = torch.compile(m, backend='bnrewrite', options={'method': 'bs', 'ratio': 0.5,"
        " 'inner': 'eager'})\n"
        "c(torch.randn(4, 3, 6, 6))\n"
        "print('bnrewrite' in names)\n"
    )
    assert _run([sys.executable, "-c", code]).strip() == "True"


@pytest.mark.slow
def test_wheel_declares_entry_point(tmp_path: Path) -> None:
    """The built wheel (what ``pip install`` installs) carries the entry point."""
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ]
    )
    wheel = next(tmp_path.glob("bnrewrite-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        text = zf.read(name).decode()
        assert "bnrewrite/backend.py" in zf.namelist()
    assert "[torch_dynamo_backends]" in text
    assert "bnrewrite = bnrewrite.backend:bnrewrite_backend" in text


# -- 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bs", "fs"])
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_compiled_zoo_matches_reference(entry: ZooEntry, method: str) -> None:
    model = entry.factory()
    cfg = FIXED[method]
    backend = make_backend(cfg, inner="aot_eager")
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    got = run_steps(compiled, entry.example_input, eval_call=False)
    broken = GRAPH_BREAK_FULL.get(entry.name, ())
    keep = broken if method != "full" else ()
    ref = reference_model(model, method, cfg.ratio, keep)
    expected = run_steps(ref, entry.example_input, eval_call=False)
    assert_close_results(got, expected)
    assert sum(r.count for r in backend.reports) == entry.bn_count - len(broken)
    # eval after training: the recompiled eval graph is not rewritten (a BN without running
    # statistics normalises with batch statistics in eval mode too, and its Dynamo graph cannot
    # tell eval from training, so on this route it stays sampled: README, "torch.compile")
    n_train = len(backend.reports)
    compiled.eval()
    ref.eval()
    for layer in ref.modules():
        if hasattr(layer, "sample_in_eval"):
            layer.sample_in_eval = True
    with torch.no_grad():
        torch.testing.assert_close(compiled(entry.example_input()), ref(entry.example_input()))
    eval_rewritten = sum(r.count for r in backend.reports[n_train:])
    assert eval_rewritten == (1 if entry.name == "no_running_stats" else 0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), [("resnet_basic", "fs"), ("mlp_bn1d", "bs")])
def test_inductor_matches_eager_rewrite_and_reference(name: str, method: str) -> None:
    """backend="bnrewrite" (Inductor, via the entry point) == eager FX rewrite == reference."""
    entry = zoo_entry(name)
    model = entry.factory()
    cfg = FIXED[method]
    options = {"method": method, "ratio": cfg.ratio, "sampling": "fixed"}
    compiled = torch.compile(copy.deepcopy(model), backend="bnrewrite", options=options)
    got = run_steps(compiled, entry.example_input, eval_call=False)  # eval: aot_eager tests
    keep = GRAPH_BREAK_FULL.get(name, ())
    ref = reference_model(model, method, cfg.ratio, keep)
    expected = run_steps(ref, entry.example_input, eval_call=False)
    assert_close_results(got, expected, atol=1e-6, rtol=1e-5)
    eager = bnrewrite.rewrite(model, cfg, exclude=list(keep))
    assert_close_results(
        run_steps(eager, entry.example_input, eval_call=False), got, atol=1e-6, rtol=1e-5
    )


def test_fullgraph_autocast_bf16_and_eval() -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    x = torch.randn(16, 3, 8, 8)
    cfg = FIXED["bs"]
    eager = bnrewrite.rewrite(model, cfg)
    backend = make_backend(cfg, inner="aot_eager")
    inner = copy.deepcopy(model)
    compiled = torch.compile(inner, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(x)
        want = eager(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert backend.reports[-1].count == 7
    got.float().sum().backward()
    # eval after training: the recompiled eval graph is not rewritten, outputs are PyTorch's
    compiled.eval()
    eager.eval()
    model.load_state_dict(inner.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert backend.reports[-1].count == 0
    assert len(backend.reports[-1].skipped_for("eval mode")) == 7


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


# -- 3 ------------------------------------------------------------------------------------------
def _train(compiled: nn.Module, batches: list[int], steps: int = 4) -> list[float]:
    opt = torch.optim.SGD(compiled.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        n = batches[step % len(batches)]
        x = torch.randn(n, 3, 8, 8)
        y = torch.randint(0, 4, (n,))
        loss = nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("method", "inner"),
    [("bs", "aot_eager"), pytest.param("fs", "inductor", marks=pytest.mark.slow)],
)
def test_random_sampling_compiles_once(method: str, inner: str) -> None:
    """Also issue 2, line 5: random sampling under torch.compile (CPU, Inductor), several steps,
    ``error_on_recompile=True`` from the very first step."""
    torch.manual_seed(0)
    backend = make_backend(SamplingConfig(method, ratio=0.25), inner=inner)
    compiled = torch.compile(_tiny_net(), backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = _train(compiled, [16], steps=5)
    assert len(backend.reports) == 1 and backend.reports[0].count == 2
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_inductor_random_bs_channels_last_matches_eager() -> None:
    """Random grouped BS on a channels-last input with 32 channels under Inductor (CPU) equals the
    eager FX rewrite with the same RNG stream (``fallback_random``): the case torch 2.11's C++
    backend miscompiles without ``_cpp_workarounds``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 4, 1)).to(
        memory_format=torch.channels_last
    )
    cfg = SamplingConfig("bs", ratio=0.25)
    eager = bnrewrite.rewrite(model, cfg)
    compiled = torch.compile(copy.deepcopy(model), backend=make_backend(cfg), fullgraph=True)
    x = torch.randn(8, 32, 8, 8).to(memory_format=torch.channels_last)
    outs = []
    with torch._inductor.config.patch(fallback_random=True):
        for net in (eager, compiled):
            xr = x.clone().requires_grad_()
            torch.manual_seed(5)
            y = net(xr)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append((y.detach(), xr.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)


def test_dynamic_batch_sizes_compile_once() -> None:
    """``dynamic=True``: batch sizes 16, 24, 32 share one compiled graph (``error_on_recompile``
    from the first step). Sizes below 16 are avoided: PyTorch's CPU conv fake kernel guards on
    ``16 <= N`` and recompiles there with or without bnrewrite. The first compile may restart
    Dynamo's analysis once (``_tensorify_python_scalars`` specialises the float ``eps``), which is
    not a recompile."""
    torch.manual_seed(0)
    backend = make_backend(SamplingConfig("fs", ratio=0.25), inner="aot_eager")
    compiled = torch.compile(_tiny_net(), backend=backend, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(compiled, [16, 24, 32], steps=6)
    assert all(r.count == 2 for r in backend.reports)


# -- 4 ------------------------------------------------------------------------------------------
def test_options_unknown_key_and_bad_value() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(Exception, match="ratoi"):
        torch.compile(model, backend="bnrewrite", options={"method": "bs", "ratoi": 0.5})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="ratio must be in"):
        torch.compile(model, backend="bnrewrite", options={"method": "bs", "ratio": 2})(x)
    with pytest.raises(ValueError, match="'ratoi'"):
        parse_options({"ratoi": 1})
    with pytest.raises(ValueError, match="method must be one of"):
        parse_options({"method": "nope"})
    with pytest.raises(ValueError, match="unknown Inductor mode"):
        make_backend("bs", mode="fastest")
    with pytest.raises(ValueError, match="inner must be"):
        make_backend("bs", inner="tvm")
    cfg, settings = parse_options(
        {"method": "fs", "ratio": "1/16", "mode": "max-autotune", "exclude": ["stem.*"]}
    )
    assert cfg == SamplingConfig("fs", ratio=1 / 16)
    assert settings == {"mode": "max-autotune", "exclude": ["stem.*"]}


def test_mode_passed_to_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen["patches"] = config_patches
        seen["targets"] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    options = {"method": "bs", "ratio": 0.5, "mode": "max-autotune-no-cudagraphs"}
    torch.compile(model, backend="bnrewrite", options=options)(torch.randn(4, 3, 6, 6))
    assert seen["patches"]["max_autotune"] is True
    assert "bnrewrite.sampled_batch_norm.default" in seen["targets"]
    # mode passed by torch.compile(mode=...) reaches the backend as a keyword
    fn = bnrewrite_backend
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    fn(gm, [torch.randn(2, 2)], mode="reduce-overhead")
    assert seen["patches"]["triton.cudagraphs"] is True
    # and the source-keyed post-grad pass (the caches see the lowering's source)
    allowed = {"triton.cudagraphs", "post_grad_custom_pre_pass", *_cpp_workarounds()}
    assert set(seen["patches"]) <= allowed


# -- 5 ------------------------------------------------------------------------------------------
def test_pass_uuid_stable() -> None:
    a = SampledBatchNormPass(SamplingConfig("bs", ratio=0.25))
    b = SampledBatchNormPass({"method": "bs", "ratio": "1/4"})
    c = SampledBatchNormPass(SamplingConfig("fs", ratio=0.25))
    assert a.uuid() == b.uuid() != c.uuid()
    code = (
        "from bnrewrite.backend import SampledBatchNormPass\n"
        "print(SampledBatchNormPass({'method': 'bs', 'ratio': 0.25}).uuid())"
    )
    assert _run([sys.executable, "-c", code]).strip() == a.uuid()
    from torch._inductor.custom_graph_pass import CustomGraphPass

    assert isinstance(a, CustomGraphPass)
    with pytest.raises(ValueError, match="backend='bnrewrite'"):
        SampledBatchNormPass(SamplingConfig("vdn"))


@pytest.mark.slow
def test_pre_grad_pass_matches_backend() -> None:
    entry = zoo_entry("resnet_bottleneck")
    model = entry.factory()
    cfg = FIXED["fs"]
    via_backend = run_steps(
        torch.compile(copy.deepcopy(model), backend=make_backend(cfg)), entry.example_input
    )
    torch._dynamo.reset()
    the_pass = SampledBatchNormPass(cfg)
    with torch._inductor.config.patch(pre_grad_custom_pass=the_pass):
        compiled = torch.compile(copy.deepcopy(model), backend="inductor")
        via_pass = run_steps(compiled, entry.example_input)
    # the pass runs after Inductor's cache lookup ("late" timing, allowed by its uuid): on a warm
    # cache it does not run at all, so its report may be None; the numbers below show the rewrite
    # (the eval graph of run_steps is compiled too: its report rewrites nothing, "eval mode")
    assert [r.count for r in the_pass.reports] in ([], [3], [3, 0])
    assert_close_results(via_pass, via_backend, atol=1e-6, rtol=1e-5)
    expected = run_steps(reference_model(model, "fs", cfg.ratio), entry.example_input)
    assert_close_results(via_pass, expected, atol=1e-6, rtol=1e-5)


# -- caches -------------------------------------------------------------------------------------
_CACHE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {root!r} + "/tests")
    from bnrewrite.backend import SampledBatchNormPass, _cpp_workarounds
    from test_backend import _tiny_net
    KEYS = [("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
            ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
            ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass")]
    def snapshot():
        return {{k: counters[g][k] for g, k in KEYS}}
    def step(compiled):
        compiled(torch.randn(8, 3, 8, 8)).sum().backward()
    torch.manual_seed(0)
    opts = {{"method": "bs", "ratio": 0.25}}
    step(torch.compile(_tiny_net(), backend="bnrewrite", options=opts))
    via_backend = snapshot()
    counters.clear()
    torch._dynamo.reset()
    # backend="inductor" gets no bnrewrite workarounds: set what _cpp_workarounds() says
    with torch._inductor.config.patch(pre_grad_custom_pass=SampledBatchNormPass(opts),
                                      **_cpp_workarounds()):
        step(torch.compile(_tiny_net(), backend="inductor"))
    print(json.dumps({{"backend": via_backend, "pre_grad_pass": snapshot()}}))
    """
)


@pytest.mark.slow
def test_second_process_hits_caches(tmp_path: Path) -> None:
    script = tmp_path / "compile_once.py"
    script.write_text(_CACHE_SCRIPT.format(root=str(ROOT)))
    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    first = json.loads(_run([sys.executable, str(script)], env).strip().splitlines()[-1])
    second = json.loads(_run([sys.executable, str(script)], env).strip().splitlines()[-1])
    print("cache counters, first process:", first, "second process:", second)
    for route in ("backend", "pre_grad_pass"):
        assert first[route]["autograd_cache_bypass"] == 0, (route, first)
        assert first[route]["fxgraph_cache_bypass"] == 0, (route, first)
        assert second[route]["autograd_cache_hit"] >= 1, (route, second)
        assert second[route]["autograd_cache_miss"] == 0, (route, second)
        assert second[route]["fxgraph_cache_miss"] == 0, (route, second)
    assert first["backend"]["autograd_cache_miss"] >= 1


def test_backend_names_filters_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    """Dynamo graphs name BN sites by module path (nn_module_stack); include/exclude apply."""
    import logging

    backend = make_backend(SamplingConfig("bs", ratio=0.5), inner="eager", exclude=["1"])
    with caplog.at_level(logging.INFO, logger="bnrewrite"):
        torch.compile(_tiny_net(), backend=backend)(torch.randn(8, 3, 6, 6))
    (report,) = backend.reports
    assert report.rewritten == [("4", "bs")]
    assert report.skipped == [("1", "filtered by name")]
    assert "rewrote 1 BatchNorm" in caplog.text


# -- issue 18: dynamic shapes and empty batches on the compiled route ---------------------------
def _net_with_head() -> nn.Module:
    """Conv BN (sampled spatial axes; a strided conv reads the first one's output, which is where
    Inductor met ``Max(1, Min(s, ...))`` in a stride) and a BatchNorm1d head (sampled rows)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "ns", "bs", "fs", "vdn", "fs_vdn"])
def test_every_method_compiles_with_dynamic_true(method: str) -> None:
    """Issue 18, item 13: Inductor with ``dynamic=True`` (sampled sizes are symbolic: no Min/Max
    in tensor shapes), one graph for batch sizes 16, 24 and 32."""
    torch.manual_seed(0)
    cfg = (
        SamplingConfig(method) if method in ("full", "vdn") else SamplingConfig(method, ratio=0.25)
    )
    backend = make_backend(cfg)
    compiled = torch.compile(_net_with_head(), backend=backend, dynamic=True)
    # no cached artefacts: a cache entry brings back the guards of the graph that stored it
    with (
        torch._functorch.config.patch(enable_autograd_cache=False),
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._dynamo.config.patch(error_on_recompile=True),
    ):
        losses = _train(compiled, [16, 24, 32], steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(getattr(r, "bn", r).count == 3 for r in backend.reports)  # VDN reports hold .bn


@pytest.mark.slow
def test_automatic_dynamic_batch_recompiles_once() -> None:
    """Issue 18, item 13: without ``dynamic=``, a new batch size recompiles once (marking the
    batch dynamic); later sizes, such as a smaller last batch, reuse that graph."""
    torch.manual_seed(0)
    backend = make_backend(SamplingConfig("fs"))
    compiled = torch.compile(_net_with_head(), backend=backend)
    # no cached artefacts: a cache entry brings back the guards of the graph that stored it
    with (
        torch._functorch.config.patch(enable_autograd_cache=False),
        torch._inductor.config.patch(fx_graph_cache=False),
    ):
        _train(compiled, [32, 24], steps=2)  # the second size recompiles with a dynamic batch
        with torch._dynamo.config.patch(error_on_recompile=True):
            _train(compiled, [20, 17, 28], steps=3)


def test_backend_runs_an_empty_batch_like_pytorch() -> None:
    """Issue 18, item 15 (the compiled route): an empty batch compiles and runs as PyTorch's BN
    does; the running statistics stay and ``num_batches_tracked`` counts it."""
    torch.manual_seed(0)
    model = _tiny_net()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=make_backend(SamplingConfig("bs"), inner="aot_eager"))
    x = torch.randn(0, 3, 8, 8)
    assert compiled(x).shape == reference(x).shape == (0, 4)
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_inductor_caches_are_keyed_on_the_lowering_source(monkeypatch):
    """``backend="bnrewrite"`` hands Inductor a ``post_grad_custom_pre_pass`` whose ``uuid()``
    (hashed by the FX-graph and AOTAutograd caches) changes with the lowering's source and keeps
    the user's own pass running and keyed."""
    import bnrewrite.backend as B

    ran: list[int] = []

    class UserPass(B._custom_graph_pass_base()):
        def __call__(self, graph):
            ran.append(len(graph.nodes))

        def uuid(self):
            return "user-v1"

    # caches off: a cache hit would skip the post-grad passes (a hit is the point elsewhere)
    with (
        torch._inductor.config.patch(post_grad_custom_pre_pass=UserPass(), fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        keyed = B._cache_key_patch()["post_grad_custom_pre_pass"]
        before = keyed.uuid()
        monkeypatch.setattr(B, "_source_digest", lambda lowering="torch": "edited")
        assert keyed.uuid() != before
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        torch._dynamo.reset()
        torch.compile(model, backend="bnrewrite")(torch.randn(4, 3, 6, 6)).sum().backward()
    assert ran, "the user's post-grad pass did not run"
    assert B._SourceKeyedPass(None).uuid() != B._SourceKeyedPass(UserPass()).uuid()
