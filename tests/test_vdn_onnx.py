"""VDN on ONNX graphs (passes/onnx_vdn.py): same numbers as the torch pass, decoupling, refusals."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

from zoo import ReduceOverBatch, zoo_entry  # noqa: E402

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bnrewrite.passes.onnx_vdn import rewrite_vdn_onnx  # noqa: E402
from bnrewrite.passes.vdn import BatchMixingError, rewrite_vdn  # noqa: E402


def export(model: nn.Module, x: Tensor):
    import bnrewrite.onnx as bonnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bonnx.export(model, (x,), io.BytesIO(), running_stats_outputs=True)


def run(proto, x: Tensor) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("name", ["resnet_basic", "densenet_block", "mlp_bn1d"])
@pytest.mark.parametrize("method", ["vdn", "fs_vdn"])
def test_onnx_matches_torch_pass(name, method):
    entry = zoo_entry(name)
    x = entry.example_input().float()
    proto = export(entry.factory().float(), x)
    before = proto.SerializeToString()
    cfg = {"method": method, "sampling": "fixed", "ratio": 0.25, "seed": 1}
    rewritten = rewrite_vdn_onnx(proto, cfg)
    assert proto.SerializeToString() == before  # the input is not modified
    assert not any(n.op_type == "BatchNormalization" for n in rewritten.graph.node)
    outs = run(rewritten, x)
    model = entry.factory().float()
    gm = rewrite_vdn(model, cfg)
    want = gm(x).detach().numpy()
    np.testing.assert_allclose(outs[0], want, rtol=1e-4, atol=1e-5)
    # running statistics from the same estimates: the running means agree with the torch pass
    # (ONNX updates running_var with the biased variance, PyTorch with the unbiased one)
    assert len(outs) == 1 + 2 * entry.bn_count
    means = [m.running_mean for m in gm.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    for got, want_rm in zip(outs[1::2], means, strict=True):
        np.testing.assert_allclose(got, want_rm.numpy(), rtol=1e-4, atol=1e-6)
    other = x.clone()
    other[1:] = torch.randn(other[1:].shape) * 4
    same = np.array_equal(run(rewritten, other)[0][0], outs[0][0])
    assert same == (method == "vdn")


def test_onnx_random_rows_fresh_each_run():
    entry = zoo_entry("resnet_basic")
    x = entry.example_input().float()
    rewritten = rewrite_vdn_onnx(export(entry.factory().float(), x), {"method": "vdn"})
    assert any(n.op_type == "RandomNormal" for n in rewritten.graph.node)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        rewritten.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    a = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    b = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert a.shape == tuple(x.shape[:1]) + a.shape[1:] and not np.array_equal(a, b)


def test_onnx_batch_mixing_refused():
    proto = export(ReduceOverBatch(), torch.randn(4, 3, 5, 5))
    before = proto.SerializeToString()
    with pytest.raises(BatchMixingError, match="ReduceMean") as info:
        rewrite_vdn_onnx(proto, {"method": "vdn"})
    assert "batch dim" in str(info.value)
    assert proto.SerializeToString() == before


def test_onnx_refuses_unsupported_settings():
    entry = zoo_entry("mlp_bn1d")
    proto = export(entry.factory().float(), entry.example_input().float())
    with pytest.raises(ValueError, match="applies 'vdn' or 'fs_vdn'"):
        rewrite_vdn_onnx(proto, {"method": "fs"})
    # a BN the rule declines is an error, not a plain BN over N + V rows: one virtual row of a
    # (N + 1, C) input is one element per channel (with the floor off; the floor raises the rows)
    with pytest.raises(ValueError, match="not rewritten: sample set has 1 element"):
        rewrite_vdn_onnx(proto, {"method": "vdn", "vdn_samples": 1, "min_count": 1})


def _session(proto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["resnet_basic", "mlp_bn1d"])
def test_onnx_random_fs_vdn_runs_and_differs(name):
    """Random fs_vdn (random FS lattice on the real rows, RandomNormal virtual rows): the rule's
    random gather with virtual rows; finite, fresh at every run, sliced back to N rows."""
    entry = zoo_entry(name)
    x = entry.example_input().float()
    rewritten = rewrite_vdn_onnx(export(entry.factory().float(), x), {"method": "fs_vdn"})
    ops = {n.op_type for n in rewritten.graph.node}
    assert "BatchNormalization" not in ops and "RandomNormal" in ops
    # a random FS lattice on feature maps; a (N, C) BN takes every real row (DESIGN.md)
    assert ("RandomUniform" in ops) == (x.dim() > 2)
    sess = _session(rewritten)
    a = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    b = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert a[0].shape[0] == x.shape[0] and len(a) == 1 + 2 * entry.bn_count
    assert all(np.isfinite(t).all() for t in a + b)
    assert not np.array_equal(a[0], b[0])


def test_onnx_random_fs_vdn_mean_is_unbiased():
    """E[mu] of random fs_vdn over runs = (real_count * mean(h) + virtual_count * E[virtual]) / n:
    every position is on the random lattice with probability count / size, and the virtual rows
    (zero-mean normal) give the conv bias in expectation."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    cfg = {"method": "fs_vdn", "ratio": 0.25, "vdn_samples": 2}
    sess = _session(rewrite_vdn_onnx(export(model, x), cfg))
    runs = np.stack([sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[1] for _ in range(400)])
    mu = runs / 0.1  # running mean starts at 0, ONNX momentum 0.9: rm_out = 0.1 * mu
    with torch.no_grad():
        h = conv(x).double()
    real_count, virtual_count = 4 * 4 * 4, 2 * 8 * 8  # m = 4 of 8 per spatial axis
    want = (real_count * h.mean(dim=(0, 2, 3)) + virtual_count * conv.bias.detach().double()) / (
        real_count + virtual_count
    )
    assert np.isfinite(mu).all() and mu.std(axis=0).min() > 0
    err = np.abs(mu.mean(axis=0) - want.numpy())
    assert (err < 5 * mu.std(axis=0) / np.sqrt(len(mu)) + 1e-4).all(), (err, mu.std(axis=0))


def test_onnx_opset13_five_outputs_unnamed_bn():
    """The opset 13 training form (five outputs) of an unnamed BN: the rule lowers it with the
    virtual rows; numbers from the VDN formula on the fixed rows."""
    from test_onnx_support import make_bn_model

    from bnrewrite.estimators import fixed_virtual_rows

    proto, p = make_bn_model((4, 3, 5, 5), opset=13, outputs=5)
    proto.graph.node[0].name = ""
    cfg = {"method": "vdn", "sampling": "fixed", "seed": 3, "vdn_samples": 2}
    rewritten = rewrite_vdn_onnx(proto, cfg)
    assert not any(n.op_type == "BatchNormalization" for n in rewritten.graph.node)
    x = np.random.default_rng(1).standard_normal((4, 3, 5, 5)).astype(np.float32)
    y, rm, rv, saved_mean, saved_inv = run(rewritten, torch.from_numpy(x))
    virt = fixed_virtual_rows((2, 3, 5, 5), 3).numpy().astype(np.float32).astype(np.float64)
    mu, var = virt.mean(axis=(0, 2, 3)), virt.var(axis=(0, 2, 3))
    inv = 1 / np.sqrt(var + 1e-5)
    want = (x - mu[:, None, None]) * (inv * p["scale"])[:, None, None] + p["B"][:, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rm, p["mean"] * 0.9 + mu * 0.1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, p["var"] * 0.9 + var * 0.1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved_mean, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved_inv, inv, rtol=1e-5, atol=1e-6)


def test_onnx_vdn_carries_the_virtual_rows_the_floor_needs():
    """As the FX pass (tests/test_floor.py): a (N, C) ``vdn`` layer makes the graph carry 32
    virtual rows; with fixed rows the result equals the torch pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 6)
    proto = rewrite_vdn_onnx(export(model, x), {"method": "vdn", "vdn_samples": 4})
    randoms = [n for n in proto.graph.node if n.op_type == "RandomNormal"]
    shape = next(a for a in randoms[0].attribute if a.name == "shape").ints
    assert shape[0] == 32
    cfg = {"method": "vdn", "vdn_samples": 4, "sampling": "fixed", "seed": 2}
    got = run(rewrite_vdn_onnx(export(model, x), cfg), x)[0]
    want = rewrite_vdn(model, cfg)(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,n,rows", [("vdn", 12, 3), ("fs_vdn", 2, 4), ("fs_vdn", 12, 2)])
def test_onnx_default_rows_follow_the_static_batch(method, n, rows):
    """The ONNX pass sizes the rows from the input's static batch dim as the torch pass does
    (``vdn`` ``max(2, ceil(N / 4))``, ``fs_vdn`` ``max(2, 6 - N)``), with the same numbers."""
    entry = zoo_entry("resnet_basic")
    model = entry.factory().float()
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    random_proto = rewrite_vdn_onnx(export(model, x), {"method": method})
    randoms = [nd for nd in random_proto.graph.node if nd.op_type == "RandomNormal"]
    assert next(a for a in randoms[0].attribute if a.name == "shape").ints[0] == rows
    cfg = {"method": method, "sampling": "fixed", "seed": 2, "ratio": 0.25}
    got = run(rewrite_vdn_onnx(export(model, x), cfg), x)[0]
    gm = rewrite_vdn(entry.factory().float(), cfg, example_inputs=(x,))
    assert gm.meta["bnrewrite_vdn"].virtual_rows == rows
    np.testing.assert_allclose(got, gm(x).detach().numpy(), rtol=1e-4, atol=1e-5)
