"""The floor (issue 16): no channel's statistics come from fewer than ``min_count`` values, or
from all of them when there are fewer, in every lowering -- the plan, the torch estimator, the ONNX
rule run in onnxruntime, the fused kernels under the Triton interpreter -- and the reports name
the layers it raised. The reference (``tests/reference.py``) applies the same documented rule on
its own."""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch
from reference import REF_MIN_COUNT, ref_batch_norm, ref_sample
from test_onnx_support import make_bn_model, ort_run
from test_onnx_support import ref_batch_norm as onnx_ref_batch_norm
from torch import nn

import bnrewrite
import bnrewrite.onnx as bo
from bnrewrite import SamplingConfig, sampled_batch_norm
from bnrewrite.config import DEFAULT_MIN_COUNT
from bnrewrite.plan import sample_plan

SHAPES = [
    (64, 16),
    (8, 4),
    (2, 4, 3, 3),
    (16, 8, 2, 2),
    (4, 3, 5, 7),
    (3, 2, 2, 2, 2),
    (64, 8, 14, 14),
]
CONFIGS = [
    SamplingConfig("bs", ratio=1 / 16, sampling="fixed"),
    SamplingConfig("ns", ratio=1 / 8, sampling="fixed"),
    SamplingConfig("fs", ratio=1 / 16, sampling="fixed"),
    SamplingConfig("fs", ratio=1 / 64, sampling="fixed", min_count=100),
    SamplingConfig("bs", ratio=1 / 16, sampling="fixed", min_count=1),
]


def test_the_default_is_the_documented_one():
    assert DEFAULT_MIN_COUNT == REF_MIN_COUNT == SamplingConfig().min_count == 32
    with pytest.raises(ValueError, match="min_count must be a positive integer"):
        SamplingConfig("bs", min_count=0)


@pytest.mark.parametrize(("shape", "cfg"), list(itertools.product(SHAPES, CONFIGS)))
def test_plan_count_is_at_least_the_floor_and_equals_the_reference(shape, cfg):
    plan = sample_plan(shape, cfg)
    available = math.prod(shape) // shape[1]
    assert plan.count() >= min(cfg.min_count, available)
    x = torch.zeros(shape)
    ref = ref_sample(x, cfg.method, cfg.ratio, cfg.min_count)
    assert plan.count() == ref.numel() // shape[1]
    assert plan.raised == (plan.unfloored_count < min(cfg.min_count, available))


@pytest.mark.parametrize("random", [False, True])
@pytest.mark.parametrize(("shape", "cfg"), list(itertools.product(SHAPES[:5], CONFIGS[:3])))
def test_torch_estimator_uses_the_floored_sample(shape, cfg, random):
    """Fixed: equals the float64 reference with the floor. Random: the running variance update
    ``rv = (1-m) rv0 + m var n/(n-1)`` with ``rv0 = 0`` tells ``n``: the plan's count."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if not random:
        rm, rv = (
            torch.zeros(shape[1], dtype=torch.float64),
            torch.ones(shape[1], dtype=torch.float64),
        )
        rm2, rv2 = rm.clone(), rv.clone()
        y = sampled_batch_norm(x, rm, rv, None, None, True, 0.3, 1e-5, config=cfg)
        want = ref_batch_norm(x, None, None, rm2, rv2, cfg.method, cfg.ratio, 0.3, 1e-5)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(rv, rv2)
        return
    cfg = cfg.replace(sampling="random", seed=3)
    n = sample_plan(shape, cfg).count()
    x = torch.randn(shape, dtype=torch.float64)
    rv = torch.zeros(shape[1], dtype=torch.float64)
    from bnrewrite.estimators import draw_offsets, sample_statistics

    bnrewrite.estimators.reset_generators()
    sampled_batch_norm(x, None, rv, None, None, True, 1.0, 1e-5, config=cfg)
    bnrewrite.estimators.reset_generators()
    plan = sample_plan(shape, cfg)
    _, var = sample_statistics(x, plan, draw_offsets(plan, x.device, cfg.seed))
    torch.testing.assert_close(rv, var * n / (n - 1))


def test_onnx_rule_obeys_the_floor_and_reports_it():
    """A BatchNorm1d-like node at batch 64, ``bs`` 1/16: 4 rows raised to 32, in onnxruntime."""
    shape = (64, 8)
    proto, p = make_bn_model(shape)
    cfg = SamplingConfig("bs", ratio=1 / 16, sampling="fixed")
    out, report = bo.rewrite_with_report(proto, cfg)
    assert report.raised == [("bn", 4, 32)]
    assert "the floor raised bn from 4 to 32 values" in report.summary()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    got = ort_run(out, x)
    want = onnx_ref_batch_norm(x, p["scale"], p["B"], p["mean"], p["var"], 1e-5, 0.9, "bs", 1 / 16)
    np.testing.assert_allclose(got["Y"], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["running_var"], want[2], rtol=1e-4, atol=1e-5)
    assert ref_sample(x, "bs", 1 / 16).shape[0] == 32  # the reference's floor: 32 of 64 rows


def test_report_names_the_raised_layers():
    """Graphs that know their shapes (torch.export here) list each raised BN, from what to what."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16))  # fmt: skip
    ep = torch.export.export(model.train(), (torch.randn(64, 3, 6, 6),))
    _, report = bnrewrite.rewrite(ep, SamplingConfig("bs", ratio=1 / 16), return_report=True)
    assert report.raised == [("4", 4, 32)]  # the conv BN: 4 rows x 36 = 144 values, not raised
    assert "4: the floor raised the sample from 4 to 32 values per channel" in str(report)


@pytest.mark.parametrize("shapes", ["known", "unknown"])
def test_vdn_carries_the_virtual_rows_the_floor_needs(shapes):
    """A (N, C) ``vdn`` layer reads only virtual rows: the graph carries ``min_count`` of them
    (32 by default; 8 positions per row: 4), the report names the layer, and every layer's
    statistics come from the last 32 rows of its input (checked against BN over those rows)."""
    from bnrewrite.passes.vdn import rewrite_vdn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    example = {"example_inputs": (torch.randn(16, 6),)} if shapes == "known" else {}
    cfg = {"method": "vdn", "vdn_samples": 4, "sampling": "fixed", "seed": 3}
    gm, report = rewrite_vdn(model, cfg, return_report=True, **example)
    assert report.virtual_rows == 32
    assert report.bn.raised == [("1", 4, 32)]
    x = torch.randn(16, 6)
    z = torch.randn((32, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = model[0](torch.cat([x, z.float()]))
    virt = h[16:]
    want = model[3](torch.relu((h[:16] - virt.mean(0)) / torch.sqrt(virt.var(0, False) + 1e-5)
                     * model[1].weight + model[1].bias))  # fmt: skip
    torch.testing.assert_close(gm(x), want)
    _, report = rewrite_vdn(model, {**cfg, "min_count": 4}, return_report=True, **example)
    assert report.virtual_rows == 4 and report.bn.raised == []


def test_fused_kernels_obey_the_floor():
    """Under the Triton interpreter (CPU) or on CUDA: (16, 4, 2, 2) ``bs`` 1/8 takes 2 rows (8
    values) unfloored, 8 rows (32 values) with the floor; the kernels equal the reference."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            pytest.skip("triton imported without TRITON_INTERPRET (test_kernels.py runs it)")
        os.environ["TRITON_INTERPRET"] = "1"
    from bnrewrite.kernels import can_use_kernels, fused_sampled_batch_norm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SamplingConfig("bs", ratio=1 / 8, sampling="fixed")
    shape = (16, 4, 2, 2)
    assert sample_plan(shape, cfg).count() == 32 and sample_plan(shape, cfg).unfloored_count == 8
    x = (torch.randn(shape) * 2 + 1).to(dev)
    if not can_use_kernels(x, cfg):
        pytest.skip("the kernels do not run here")
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    rv2 = rv.double().cpu().clone()
    y = fused_sampled_batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, config=cfg)
    want = ref_batch_norm(x.double().cpu(), None, None, torch.zeros(4, dtype=torch.float64), rv2,
                          "bs", 1 / 8, 0.1, 1e-5)  # fmt: skip
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rv.double().cpu(), rv2, rtol=1e-5, atol=1e-6)


def test_module_report_names_raised_layers_given_example_inputs():
    """``rewrite(model, cfg, example_inputs=...)``: the traced graph learns its shapes (state
    restored), so module-form BN are reported too."""
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 6)
    _, report = bnrewrite.rewrite(
        model, SamplingConfig("bs", ratio=1 / 16), example_inputs=(x,), return_report=True
    )
    assert report.raised == [("1", 4, 32)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, plain = bnrewrite.rewrite(model, SamplingConfig("bs", ratio=1 / 16), return_report=True)
    assert plain.raised == []  # without shapes the graph cannot know


def test_vdn_sizes_its_virtual_rows_on_the_first_call_when_shapes_were_unknown():
    """An ``nn.Module`` rewritten without ``example_inputs``: the conv layers' positions are
    learnt on the first training call (2x2 maps: 4 positions, 8 rows for the floor of 32) and the
    result equals a rewrite told the shapes up front (fixed rows, same parameters)."""
    from bnrewrite.passes.vdn import rewrite_vdn

    from bnrewrite.apps.models import small_resnet

    torch.manual_seed(0)
    model = small_resnet(1, 10, width=8)
    x = torch.randn(3, 1, 8, 8)
    cfg = {"method": "vdn", "sampling": "fixed", "seed": 1}
    lazy = rewrite_vdn(copy.deepcopy(model), cfg)
    assert lazy.meta["bnrewrite_vdn"].virtual_rows == 2  # not known yet
    told = rewrite_vdn(copy.deepcopy(model), cfg, example_inputs=(x,))
    assert told.meta["bnrewrite_vdn"].virtual_rows == 8
    torch.testing.assert_close(lazy(x), told(x))
    report = lazy.meta["bnrewrite_vdn"]
    assert report.virtual_rows == 8 and ("layers.2.bn1", 8, 32) in report.bn.raised
    torch.testing.assert_close(lazy(x * 2), told(x * 2))
