"""``lowering="kernels"``: the FX pass, the backend and the pre-grad pass emit the fused op.

The rewritten graphs call ``bnrewrite::fused_sampled_batch_norm`` (the Triton kernels; under
``TRITON_INTERPRET=1`` on CPU tensors here, compiled on CUDA) with ``relu(BN)`` and
``relu(BN + z)`` folded in. Every numerical check is against the independent reference of
``tests/zoo.py`` (fixed sampling), in float32 (the kernels' dtypes), over two SGD steps: outputs,
input and parameter gradients, running statistics. A counter on the kernels' forward checks that
they really ran (no silent fallback to the torch estimator).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(  # conftest.py sets it before any import; only a foreign runner gets here
        "triton was imported without TRITON_INTERPRET=1; run this file with it set",
        allow_module_level=True,
    )
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from bnrewrite.passes.fx import rewrite_graph  # noqa: E402
from zoo import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    SmallResNet,
    assert_close_results,
    reference_model,
    run_steps,
)

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig  # noqa: E402
from bnrewrite.backend import SampledBatchNormPass, make_backend, parse_options  # noqa: E402
from bnrewrite.kernels import ops as kernel_ops  # noqa: E402
from bnrewrite.kernels.modules import FusedSampledBatchNorm2d  # noqa: E402
from bnrewrite.ops import fused_sampled_batch_norm_op  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
FIXED = {
    "bs": SamplingConfig("bs", ratio=0.5, sampling="fixed"),
    "fs": SamplingConfig("fs", ratio=0.25, sampling="fixed"),
}
TOL = {"atol": 2e-4, "rtol": 2e-4}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts forward launches of the kernels (the op's implementation looks it up per call)."""
    calls: list[int] = []
    real = kernel_ops._forward_impl

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_ops, "_forward_impl", counted)
    return calls


def _float_model(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    for m in model.modules():  # non-trivial affine parameters, as in the zoo
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.float().to(DEVICE)


def _input(*shape: int) -> Callable[[], Tensor]:
    def make() -> Tensor:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(*shape, generator=g) * 2 + 0.5).to(DEVICE)

    return make


class Patterns(nn.Module):
    """Every epilogue form the pass must fuse, and forms it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(9))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        bn = self.bns
        a = F.relu(bn[0](h), inplace=True)  # fused: relu
        b = torch.relu(bn[1](h) + a)  # fused: residual + relu
        t = bn[2](h)
        t += b  # fused: in-place add into the BN output, then .relu()
        c = t.relu()
        d = bn[3](h)
        e = d * 2 + F.relu(d)  # two users: left alone
        z = c.clone()
        z += bn[4](h)  # in-place add into z (not into the BN output): left alone
        f = F.relu(z)
        g = F.relu(bn[5](h) + 1.0)  # scalar operand: left alone
        k = torch.add(bn[6](h), f, alpha=2).relu()  # alpha != 1: left alone
        m = self.act(bn[7](h))  # fused: nn.ReLU(inplace=True) (inlined by Dynamo)
        n = F.relu(torch.add(f, bn[8](h)))  # fused: z + BN, torch.add
        return a + b + c + e + f + g + k + m + n


FUSED_IN_PATTERNS = {
    0: "relu",
    1: "residual+relu",
    2: "residual+relu",
    7: "relu",
    8: "residual+relu",
}


# -- the backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bs", "fs"])
@pytest.mark.parametrize(
    ("factory", "shape", "epilogues"),
    [
        (BasicBlock, (8, 3, 8, 8), {"relu": 1, "residual+relu": 1}),
        (Bottleneck, (8, 8, 6, 6), {"relu": 2, "residual+relu": 1}),
        (Patterns, (8, 3, 6, 6), {"relu": 2, "residual+relu": 3}),
    ],
    ids=["basic", "bottleneck", "patterns"],
)
def test_backend_kernels_match_reference(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    epilogues: dict[str, int],
    method: str,
    kernel_calls: list[int],
) -> None:
    model = _float_model(factory)
    cfg = FIXED[method]
    backend = make_backend(cfg, inner="aot_eager", lowering="kernels")
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    got = run_steps(compiled, _input(*shape), eval_call=False)
    expected = run_steps(reference_model(model, method, cfg.ratio), _input(*shape), eval_call=False)
    assert_close_results(got, expected, **TOL)
    (report,) = backend.reports
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.count == bns and report.lowering == "kernels"
    kinds = [kind for _, kind in report.epilogues]
    assert {k: kinds.count(k) for k in set(kinds)} == epilogues
    assert len(kernel_calls) == 2 * bns  # every BN of both steps ran the kernels
    assert "fused relu into" in str(report)


def _dynamo_graph(model: nn.Module, x: Tensor) -> torch.fx.GraphModule:
    """The Dynamo graph of ``model(x)``; ``gm.example_inputs`` holds its inputs (x, parameters,
    buffers: the model's own tensors)."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
        gm.example_inputs = example_inputs
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(x)
    (gm,) = graphs
    return gm


def _relus(gm: torch.fx.GraphModule) -> int:
    from bnrewrite.passes.epilogue import is_relu

    return sum(is_relu(gm, n) for n in gm.graph.nodes)


def test_epilogue_names_and_left_alone_forms() -> None:
    gm = _dynamo_graph(_float_model(Patterns), _input(8, 3, 6, 6)())
    relus_before = _relus(gm)
    report = rewrite_graph(gm, FIXED["bs"], lowering="kernels")
    assert report.count == 9
    assert dict(report.epilogues) == {f"bns.{i}": kind for i, kind in FUSED_IN_PATTERNS.items()}
    ops = [n for n in gm.graph.nodes if n.target == fused_sampled_batch_norm_op]
    assert len(ops) == 9
    assert sum(len(n.args) > 9 for n in ops) == len(FUSED_IN_PATTERNS)  # relu=True (, z)
    assert _relus(gm) == relus_before - len(FUSED_IN_PATTERNS)


def test_autocast_bf16_channels_last_random_no_recompile(kernel_calls: list[int]) -> None:
    """The bench's setting (bf16 autocast, channels-last, random BS): same as the torch lowering
    with the same RNG state, gradients too; random draws never recompile.

    A bottleneck with an identity shortcut: fusing ``relu(bn3 + x)`` moves no BN past another, so
    both lowerings draw the layers' offsets in the same order (with a downsample BN between, the
    fused call runs after it and the two layers swap their draws -- equally random, not equal).
    """

    def block() -> nn.Module:  # a conv first: the shortcut is bf16 under autocast, as in ResNet
        return nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), Bottleneck())

    model = _float_model(block).to(memory_format=torch.channels_last)
    cfg = SamplingConfig("bs", ratio=0.5)
    dev = torch.device(DEVICE)
    results = {}
    for lowering in ("torch", "kernels"):
        torch._dynamo.reset()
        backend = make_backend(cfg, inner="aot_eager", lowering=lowering)
        net = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
        outs, grads = [], []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(2):
                x = _input(8, 8, 6, 6)().to(memory_format=torch.channels_last)
                torch.manual_seed(10 + step)
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    y = net(x)
                y.float().square().mean().backward()
                assert y.dtype == torch.bfloat16
                outs.append(y.detach().float())
        grads = [p.grad.detach().clone() for p in net.parameters()]
        results[lowering] = (outs, grads, backend.reports)
    (t_out, t_grad, _), (k_out, k_grad, k_reports) = results["torch"], results["kernels"]
    assert len(k_reports) == 1
    assert len(k_reports[0].epilogues) == 3 and k_reports[0].fallbacks == []
    for a, b in zip(k_out, t_out, strict=True):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    for a, b in zip(k_grad, t_grad, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert len(kernel_calls) == 2 * 3


def test_registered_backend_option_and_inductor(kernel_calls: list[int]) -> None:
    """``torch.compile(backend="bnrewrite", options={"lowering": "kernels"})`` with Inductor."""
    model = _float_model(SmallResNet)
    options = {"method": "bs", "ratio": 0.5, "sampling": "fixed", "lowering": "kernels"}
    compiled = torch.compile(copy.deepcopy(model), backend="bnrewrite", options=options)
    got = run_steps(compiled, _input(8, 3, 8, 8), eval_call=False)
    expected = run_steps(reference_model(model, "bs", 0.5), _input(8, 3, 8, 8), eval_call=False)
    assert_close_results(got, expected, **TOL)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(kernel_calls) == 2 * bns


def test_pre_grad_pass_lowering() -> None:
    torch_pass = SampledBatchNormPass(FIXED["bs"])
    kernel_pass = SampledBatchNormPass(FIXED["bs"], lowering="kernels")
    assert torch_pass.uuid() != kernel_pass.uuid()
    assert kernel_pass.uuid() == SampledBatchNormPass(FIXED["bs"], lowering="kernels").uuid()
    # the pass itself, on a Dynamo graph (what Inductor hands it)
    gm = _dynamo_graph(_float_model(Bottleneck), _input(8, 8, 6, 6)())
    kernel_pass(gm.graph)
    report = kernel_pass.last_report
    assert report.count == 3 and len(report.epilogues) == 3
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(fused_sampled_batch_norm_op) == 3
    assert F.relu not in targets


# -- the FX rewrite (symbolic_trace: module and function forms) --------------------------------------
def test_rewrite_module_form_kernels(kernel_calls: list[int]) -> None:
    model = _float_model(SmallResNet)
    gm, report = bnrewrite.rewrite(model, FIXED["fs"], lowering="kernels", return_report=True)
    fused = [m for m in gm.modules() if isinstance(m, FusedSampledBatchNorm2d)]
    assert report.count == len(fused) == 7
    # stem BN -> nn.ReLU, block1 bn1 -> F.relu and bn2 + down -> relu, block2 bn1/bn2 -> relu and
    # bn3 + x -> relu
    assert sorted(kind for _, kind in report.epilogues) == ["relu"] * 4 + ["residual+relu"] * 2
    assert all(
        isinstance(m, nn.BatchNorm2d) and not isinstance(m, FusedSampledBatchNorm2d)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )  # input untouched
    # the reference first: gm shares the model's parameters and buffers, and trains them
    expected = run_steps(reference_model(model, "fs", 0.25), _input(8, 3, 8, 8))
    got = run_steps(gm, _input(8, 3, 8, 8))
    assert_close_results(got, expected, **TOL)
    assert kernel_calls  # the training steps ran the kernels (eval runs PyTorch's BN)


def test_fallback_reported_for_inputs_the_kernels_do_not_take(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """float64 runs the torch estimator (correctly); the report and a warning say so."""
    torch.manual_seed(0)
    model = Bottleneck().double().to(DEVICE)
    x = torch.randn(8, 8, 6, 6, dtype=torch.float64, device=DEVICE)
    gm = _dynamo_graph(model, x)
    with caplog.at_level("WARNING", logger="bnrewrite"):
        report = rewrite_graph(gm, FIXED["bs"], lowering="kernels")
    assert [name for name, _ in report.fallbacks] == ["bn1", "bn2", "bn3"]
    assert all("dtype torch.float64" in why for _, why in report.fallbacks)
    assert "will run the torch estimator" in caplog.text
    expected = reference_model(model, "bs", 0.5)(x)  # a copy: gm updates the model's buffers
    (got,) = gm(*gm.example_inputs)
    torch.testing.assert_close(got, expected)
    float_gm = _dynamo_graph(_float_model(Bottleneck), _input(8, 8, 6, 6)())
    report = rewrite_graph(float_gm, FIXED["bs"], lowering="kernels")
    assert report.fallbacks == []


def test_epilogues_can_be_disabled() -> None:
    gm = torch.fx.symbolic_trace(_float_model(Bottleneck))
    report = rewrite_graph(gm, FIXED["bs"], lowering="kernels", fuse_epilogues=False)
    assert report.count == 3 and report.epilogues == []


# -- errors -----------------------------------------------------------------------------------------
def test_bad_lowering_and_vdn() -> None:
    with pytest.raises(ValueError, match="lowering must be one of 'torch', 'kernels'"):
        make_backend(FIXED["bs"], lowering="triton")
    with pytest.raises(ValueError, match="lowering must be one of"):
        bnrewrite.rewrite(BasicBlock(), FIXED["bs"], lowering="cuda")
    with pytest.raises(ValueError, match="not available for method 'vdn'"):
        make_backend(SamplingConfig("vdn"), lowering="kernels")
    with pytest.raises(ValueError, match="not available for method 'fs_vdn'"):
        bnrewrite.rewrite(BasicBlock(), "fs_vdn", lowering="kernels")
    with pytest.raises(ValueError, match="not available for method 'vdn'"):
        SampledBatchNormPass("bs", lowering="kernels", overrides={"bn1": "vdn"})(
            torch.fx.symbolic_trace(BasicBlock()).graph
        )
    cfg, settings = parse_options({"method": "bs", "lowering": "kernels"})
    assert settings == {"lowering": "kernels"} and cfg.method == "bs"
    with pytest.raises(Exception, match="lowering must be one of"):
        torch.compile(BasicBlock(), backend="bnrewrite", options={"lowering": "x"})(
            torch.randn(2, 3, 8, 8)
        )
