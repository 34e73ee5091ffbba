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

from zoo import zoo_entry  # noqa: E402

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


class ReduceOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.bn(h - h.mean(0, keepdim=True))


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
    with pytest.raises(ValueError, match="fs_vdn with random sampling"):
        rewrite_vdn_onnx(proto, {"method": "fs_vdn"})
    with pytest.raises(ValueError, match="applies 'vdn' or 'fs_vdn'"):
        rewrite_vdn_onnx(proto, {"method": "fs"})
