"""The model zoo of the graph-pass tests and an independent reference of the DESIGN.md contract.

``ZOO`` is a list of :class:`ZooEntry` ``(name, factory, example_input, bn_count)``: ``factory()``
builds the model in training mode (float64, seeded), ``example_input()`` a fresh input and
``bn_count`` the number of training-mode BatchNorm layers a rewrite must replace.

``reference_model(model, method, ratio)`` swaps each BatchNorm of a copy of ``model`` for
:class:`ReferenceBatchNorm`, a plain re-implementation of the contract for **fixed** sampling, written
here without importing bnrewrite:

* ``take(size, f) = max(1, min(size, ceil(size * f - 1e-9)))``;
* ``bs``/``ns`` (and ``fs`` on ``(N, C)`` inputs): the first ``k = take(N, ratio)`` rows;
* ``fs``: the top-left patch of side ``take(S_i, ratio ** (1/d))`` in each spatial dim;
* biased mean/variance of the sample (float32 accumulation for half inputs), normalise the whole
  tensor, running stats with the unbiased factor ``n / (n - 1)``, ``momentum=None`` cumulative.

``run_steps`` drives a model through two SGD steps and an eval call and returns everything the
tests compare (outputs, input and parameter gradients, buffers).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from reference import ref_sample
from torch import Tensor, nn

__all__ = [
    "ZOO",
    "ZooEntry",
    "ReferenceBatchNorm",
    "reference_batch_norm",
    "reference_model",
    "run_steps",
    "assert_close_results",
    "zoo_entry",
    "SmallResNet",
    "ReduceOverBatch",
]


# -- the reference ------------------------------------------------------------------------------
def reference_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    method: str = "full",
    ratio: float = 1.0,
) -> Tensor:
    """``F.batch_norm`` with training statistics from the fixed sample of ``method``/``ratio``."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sample = ref_sample(x, method, ratio).to(acc)
    dims = [0, *range(2, x.dim())]
    mean = sample.mean(dim=dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    var = (sample - mean.view(shape)).square().mean(dim=dims)
    n = sample.numel() // sample.shape[1]
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    y = (x.to(acc) - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(x.dtype)


class ReferenceBatchNorm(nn.Module):
    """A BatchNorm layer (PyTorch's bookkeeping) whose statistics follow the reference.

    It takes over the parameters and buffers of the layer it replaces (same ``state_dict`` keys).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, method: str, ratio: float) -> None:
        super().__init__()
        self._parameters = dict(bn._parameters)
        self._buffers = dict(bn._buffers)
        self.momentum, self.eps = bn.momentum, bn.eps
        self.track_running_stats = bn.track_running_stats
        self.method, self.ratio = method, ratio
        self.training = bn.training
        #: the torch.compile route's documented limit (README): in a Dynamo graph a BN without
        #: running statistics passes training=True in eval mode too, so it keeps sampling there
        self.sample_in_eval = False

    def forward(self, x: Tensor) -> Tensor:
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        nbt = self._buffers.get("num_batches_tracked")
        if self.training and self.track_running_stats and nbt is not None:
            nbt.add_(1)
            if self.momentum is None:
                momentum = 1.0 / nbt.item()
        rm, rv = self._buffers.get("running_mean"), self._buffers.get("running_var")
        training = self.training or (rm is None and rv is None)
        use_running = not self.training or self.track_running_stats
        # eval mode is exactly PyTorch's BN: a BN without running statistics uses the statistics
        # of the whole batch there, never a sample (DESIGN.md, "Eval mode is untouched")
        sampled = self.training or self.sample_in_eval
        method, ratio = (self.method, self.ratio) if sampled else ("full", 1.0)
        return reference_batch_norm(
            x,
            rm if use_running else None,
            rv if use_running else None,
            self._parameters.get("weight"),
            self._parameters.get("bias"),
            training,
            momentum,
            self.eps,
            method,
            ratio,
        )


def reference_model(
    model: nn.Module, method: str = "full", ratio: float = 1.0, keep_full: tuple[str, ...] = ()
) -> nn.Module:
    """A deep copy of ``model`` whose BatchNorm layers (and ``bn_fn`` hooks) follow the reference.

    Layers named in ``keep_full`` use ``method="full"``. The ``state_dict`` keys are unchanged.
    """
    ref = copy.deepcopy(model)
    for name, child in list(ref.named_modules()):
        for attr, sub in list(child._modules.items()):
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                qual = f"{name}.{attr}" if name else attr
                full = qual in keep_full
                child._modules[attr] = ReferenceBatchNorm(
                    sub, "full" if full else method, 1.0 if full else ratio
                )
        if isinstance(child, FunctionalBN):
            child.bn_fn = _functional_reference(method, ratio)
    return ref


def _functional_reference(method: str, ratio: float) -> Callable[..., Tensor]:
    def fn(x: Tensor, rm: Any, rv: Any, w: Any, b: Any, training: bool, m: float, eps: float):
        return reference_batch_norm(x, rm, rv, w, b, training, m, eps, method, ratio)

    return fn


# -- the zoo ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block with a projection shortcut (residual add)."""

    def __init__(self, cin: int = 3, cout: int = 8, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.down(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block with an identity shortcut."""

    def __init__(self, c: int = 8, mid: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + x)


class DenseBlock(nn.Module):
    """DenseNet block: BN-ReLU-Conv layers whose outputs are concatenated."""

    def __init__(self, c: int = 4, growth: int = 3, layers: int = 3) -> None:
        super().__init__()
        self.bns = nn.ModuleList()
        self.convs = nn.ModuleList()
        for i in range(layers):
            self.bns.append(nn.BatchNorm2d(c + i * growth))
            self.convs.append(nn.Conv2d(c + i * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for bn, conv in zip(self.bns, self.convs, strict=True):
            feats.append(conv(F.relu(bn(torch.cat(feats, 1)))))
        return torch.cat(feats, 1)


class MLP(nn.Module):
    """Linear-BatchNorm1d MLP; the second BN uses ``momentum=None`` (cumulative average)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.bn1 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 5)
        self.bn2 = nn.BatchNorm1d(5, momentum=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))


class Conv1dNet(nn.Module):
    """Conv1d net with ``affine=False`` BatchNorm1d on ``(N, C, L)`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6, affine=False)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(4, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class FunctionalBN(nn.Module):
    """BN called through ``F.batch_norm`` with the model's own parameters and buffers."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.bn_fn: Callable[..., Tensor] = F.batch_norm

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.bn_fn(
            h, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5
        )


class NoRunningStats(nn.Module):
    """``track_running_stats=False``: batch statistics in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class FrozenBN(nn.Module):
    """A training model with its first BN frozen in eval mode (fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
        self.bn1.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class SmallResNet(nn.Module):
    """A tiny ResNet (stem, basic block, bottleneck, pooled head) for training-loop tests."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = Bottleneck(8, 4)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


class ReduceOverBatch(nn.Module):
    """Mixes samples (a mean over the batch dim before the BN): VDN must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.bn(h - h.mean(0, keepdim=True))  # a reduction over the batch dim


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    example_input: Callable[[], Tensor]
    bn_count: int  # training-mode BN layers a rewrite replaces
    skipped: int = 0  # BN layers left alone (eval mode)


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = cls().double()
        for m in model.modules():  # non-trivial affine parameters
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return model

    return make


def _input(*shape: int) -> Callable[[], Tensor]:
    def make() -> Tensor:
        g = torch.Generator().manual_seed(1)
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5

    return make


ZOO: list[ZooEntry] = [
    ZooEntry("resnet_basic", _seeded(BasicBlock), _input(8, 3, 8, 8), 3),
    ZooEntry("resnet_bottleneck", _seeded(Bottleneck), _input(8, 8, 6, 6), 3),
    ZooEntry("densenet_block", _seeded(DenseBlock), _input(8, 4, 6, 6), 3),
    ZooEntry("mlp_bn1d", _seeded(MLP), _input(16, 6), 2),
    ZooEntry("conv1d_affine_false", _seeded(Conv1dNet), _input(8, 3, 12), 2),
    ZooEntry("conv3d", _seeded(Conv3dNet), _input(4, 2, 4, 5, 6), 1),
    ZooEntry("functional_bn", _seeded(FunctionalBN), _input(8, 3, 6, 6), 1),
    ZooEntry("no_running_stats", _seeded(NoRunningStats), _input(8, 3, 6, 6), 1),
    ZooEntry("frozen_bn", _seeded(FrozenBN), _input(8, 3, 6, 6), 1, skipped=1),
]


def zoo_entry(name: str) -> ZooEntry:
    return next(e for e in ZOO if e.name == name)


# -- driving and comparing --------------------------------------------------------------------
def _canonical(name: str) -> str:
    """Map compiled-module state names (``_orig_mod.x``) back to the original model's."""
    return name.removeprefix("_orig_mod.")


def run_steps(
    model: nn.Module,
    make_input: Callable[[], Tensor],
    steps: int = 2,
    lr: float = 0.1,
    call: Callable[[Tensor], Tensor] | None = None,
    params: dict[str, Tensor] | None = None,
    buffers: dict[str, Tensor] | None = None,
    eval_call: bool = True,
) -> dict[str, Tensor]:
    """Two SGD steps (training mode) then one eval call; everything a parity test compares.

    ``eval_call=False`` skips the eval call (graphs that bake the training flag).

    ``call`` runs the model (default ``model(x)``); ``params`` / ``buffers`` default to the model's
    own (pass them for graphs that take them as inputs).
    """
    call = call or model
    params = params if params is not None else dict(model.named_parameters())
    results: dict[str, Tensor] = {}
    for step in range(steps):
        x = make_input().requires_grad_(True)
        out = call(x)
        g = torch.Generator().manual_seed(100 + step)
        weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
        (out * weights).sum().backward()
        results[f"out{step}"] = out.detach().clone()
        results[f"dx{step}"] = x.grad.detach().clone()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is not None:
                    results[f"grad{step}.{_canonical(name)}"] = p.grad.detach().clone()
                    p -= lr * p.grad
                    p.grad = None
    if eval_call:
        model.eval()
        with torch.no_grad():
            results["eval"] = call(make_input()).detach().clone()
    bufs = buffers if buffers is not None else dict(model.named_buffers())
    for name, b in bufs.items():
        results[f"buffer.{_canonical(name)}"] = b.detach().clone()
    return results


def assert_close_results(
    actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-7, rtol: float = 1e-6
) -> None:
    """Same keys and close values (float64 models: tight tolerances)."""
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for key in expected:
        torch.testing.assert_close(
            actual[key].to(expected[key].dtype),
            expected[key],
            atol=atol,
            rtol=rtol,
            msg=lambda m, k=key: f"{k}: {m}",
        )
