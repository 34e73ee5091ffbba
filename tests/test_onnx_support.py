"""Shared helpers of the ONNX tests (no tests here): onnxruntime sessions, an independent reference.

The reference is written from DESIGN.md's contract, not from bnrewrite: ``take``, the fixed sample
set (first ``k`` rows / top-left patch), biased mean and variance in float64, normalisation of the
whole tensor, and ONNX's running-statistics rule (``momentum`` weights the old value; the running
variance takes the *biased* variance).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import torch
from reference import ref_sample
from torch import nn
from zoo import BasicBlock

__all__ = [
    "ort_session",
    "ort_run",
    "ref_sample",
    "ref_batch_norm",
    "RefBatchNorm",
    "reference_model",
    "make_bn_model",
    "ResNetish",
    "DenseNetish",
    "mlp",
    "count_ops",
]


def ort_session(
    model: onnx.ModelProto | str,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    disable: str | None = None,
) -> ort.InferenceSession:
    """A CPU session; ``ORT_DISABLE_ALL`` by default (see docs/onnx.md, onnxruntime pitfalls)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if disable:
        so.add_session_config_entry("optimization.disable_specified_optimizers", disable)
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_run(model, feeds: dict | np.ndarray, **kw) -> dict[str, np.ndarray]:
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model, **kw)
    if not isinstance(feeds, dict):
        feeds = {sess.get_inputs()[0].name: feeds}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def ref_batch_norm(x, w, b, rm, rv, eps, onnx_momentum, method="full", ratio=1.0):
    """numpy float64: ``(y, running_mean, running_var, mu, var)`` with ONNX's running rule."""
    x = np.asarray(x, np.float64)
    sample = ref_sample(x, method, ratio)
    axes = (0, *range(2, x.ndim))
    mu, var = sample.mean(axis=axes), sample.var(axis=axes)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    y = y * np.asarray(w, np.float64).reshape(shape) + np.asarray(b, np.float64).reshape(shape)
    m = onnx_momentum
    return y, rm * m + mu * (1 - m), rv * m + var * (1 - m), mu, var


class RefBatchNorm(nn.Module):
    """float64 torch twin of a trained-mode BN with the fixed sample set and ONNX's running rule."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, method: str, ratio: float) -> None:
        super().__init__()
        self.weight = bn.weight.detach().double()
        self.bias = bn.bias.detach().double()
        c = bn.num_features
        rm, rv = bn.running_mean, bn.running_var  # None for track_running_stats=False
        self.rm = torch.zeros(c, dtype=torch.float64) if rm is None else rm.detach().double()
        self.rv = torch.ones(c, dtype=torch.float64) if rv is None else rv.detach().double()
        self.eps, self.m = bn.eps, 1.0 - bn.momentum  # ONNX momentum weights the old value
        self.method, self.ratio = method, ratio
        self.new_rm = self.new_rv = None
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sample = ref_sample(x, self.method, self.ratio)
        self.count = sample.numel() // x.shape[1]  # n, per channel
        dims = [0, *range(2, x.dim())]
        mu = sample.mean(dim=dims)
        var = ((sample - mu.view([1, -1] + [1] * (x.dim() - 2))) ** 2).mean(dim=dims)
        self.new_rm = self.rm * self.m + mu * (1 - self.m)
        self.new_rv = self.rv * self.m + var * (1 - self.m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mu.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def reference_model(model: nn.Module, method: str, ratio: float) -> tuple[nn.Module, list]:
    """A float64 copy of ``model`` whose BN layers are ``RefBatchNorm``; also the list of them."""
    ref = copy.deepcopy(model).double().train()
    refs = []
    for name, child in list(ref.named_modules()):
        for attr, sub in list(child._modules.items()):
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                r = RefBatchNorm(sub.float(), method, ratio)
                child._modules[attr] = r
                refs.append((f"{name}.{attr}" if name else attr, r))
    return ref, refs


# -- models ------------------------------------------------------------------------------------


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block = BasicBlock(8, 12, 2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class DenseNetish(nn.Module):
    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layers = nn.ModuleList()
        c = 8
        for _ in range(2):
            self.layers.append(
                nn.Sequential(
                    nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, 1, 1, bias=False)
                )
            )
            c += growth
        self.trans = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1), nn.AvgPool2d(2)
        )
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        x = torch.relu(self.norm(self.trans(x)))
        return self.fc(x.mean(dim=(2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 3),
    )  # fmt: skip


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that every term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=gen))
                mod.running_mean.copy_(torch.randn(c, generator=gen))
                mod.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def make_bn_model(
    shape: tuple[int, ...],
    *,
    opset: int = 15,
    training: bool = True,
    outputs: int = 3,
    momentum: float = 0.9,
    eps: float = 1e-5,
    seed: int = 0,
    dynamic_batch: bool = False,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One ``BatchNormalization`` node ``X -> Y (, running_mean, running_var, saved...)``.

    Returns the model (all node outputs declared as graph outputs) and its parameters.
    """
    rng = np.random.default_rng(seed)
    c = shape[1]
    params = {
        "scale": (rng.random(c) + 0.5).astype(np.float32),
        "B": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": (rng.random(c) + 0.5).astype(np.float32),
    }
    names = ["Y", "running_mean", "running_var", "saved_mean", "saved_var"][:outputs]
    attrs = {"epsilon": eps, "momentum": momentum}
    if opset >= 14:
        attrs["training_mode"] = int(training)
    node = onnx.helper.make_node(
        "BatchNormalization", ["X", "scale", "B", "mean", "var"], names, name="bn", **attrs
    )
    in_shape = ["N", *shape[1:]] if dynamic_batch else list(shape)
    graph = onnx.helper.make_graph(
        [node],
        "bn",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, in_shape)],
        [
            onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)
            for n, s in zip(names, [in_shape, [c], [c], [c], [c]])
        ],
        [onnx.numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, params


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """Nodes of ``op_type`` in the main graph, its subgraphs and its functions."""

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(attr.g)
                for g in attr.graphs:
                    yield from nodes(g)

    total = sum(n.op_type == op_type for n in nodes(model.graph))
    for f in model.functions:
        total += sum(n.op_type == op_type for n in f.node)
    return total
