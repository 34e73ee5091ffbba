"""The backend and the pre-grad pass on a GPU (Inductor/Triton); skipped without CUDA.

Run on the GPU machine (torch 2.11): compiled fixed sampling equals the eager FX rewrite, random
sampling compiles once under bf16 autocast, and the pre-grad pass works with that torch version.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from zoo import SmallResNet, zoo_entry

import bnrewrite
from bnrewrite import SamplingConfig
from bnrewrite.backend import SampledBatchNormPass, make_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _steps(model, x, steps=2):
    outs = []
    for _ in range(steps):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        outs.append((out.detach(), xi.grad, grads))
        model.zero_grad()
    return outs


def test_gpu_fixed_matches_eager_rewrite() -> None:
    torch.manual_seed(0)
    model = zoo_entry("resnet_basic").factory().float().cuda()
    x = torch.randn(16, 3, 16, 16, device="cuda")
    cfg = SamplingConfig("fs", ratio=0.25, sampling="fixed")
    eager = bnrewrite.rewrite(model, cfg)
    compiled = torch.compile(
        copy.deepcopy(model), backend="bnrewrite", options={**cfg.to_dict(), "seed": None}
    )
    for (o1, d1, g1), (o2, d2, g2) in zip(_steps(compiled, x), _steps(eager, x), strict=True):
        torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(d1, d2, atol=1e-4, rtol=1e-4)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_gpu_random_bf16_compiles_once() -> None:
    torch.manual_seed(0)
    model = SmallResNet().cuda().to(memory_format=torch.channels_last)
    backend = make_backend(SamplingConfig("bs", ratio=0.25))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,), device="cuda")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
    assert len(backend.reports) == 1 and backend.reports[0].count == 7


def test_gpu_pre_grad_pass() -> None:
    torch.manual_seed(0)
    model = zoo_entry("resnet_bottleneck").factory().float().cuda()
    x = torch.randn(8, 8, 8, 8, device="cuda")
    cfg = SamplingConfig("bs", ratio=0.5, sampling="fixed")
    the_pass = SampledBatchNormPass(cfg)
    with torch._inductor.config.patch(pre_grad_custom_pass=the_pass):
        got = torch.compile(copy.deepcopy(model))(x)
    assert the_pass.last_report is None or the_pass.last_report.count == 3  # None: cache hit
    torch.testing.assert_close(got, bnrewrite.rewrite(model, cfg)(x), atol=1e-4, rtol=1e-4)
