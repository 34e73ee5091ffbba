"""VDN through reshapes that merge the batch with other dims (issue 24, acceptance 3).

A row-major merge of the batch with the dims after it -- ``flatten(0, 1)`` of ``(N, T, C)``,
``reshape(N * T, C)``, ``view(-1, C)``, ``nn.Flatten(0, 1)`` -- keeps each sample's values in ``T``
consecutive rows, so samples stay independent; a BatchNorm over such a tensor takes its VDN
statistics from the last ``V * T`` rows (the virtual samples' rows). The reference is
``test_vdn.RefVDNModel`` (written from docs/vdn.md: virtual samples at the end of the batch, a BN
whose input holds ``(N + V) * k`` rows reads the last ``V * k``), run on every form through the
three routes: ``rewrite(model, example_inputs=...)`` (``symbolic_trace`` + shapes),
``rewrite(torch.export.export(model, ...))`` and ``rewrite(..., capture="export")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

from bnrewrite.passes.vdn import BatchMixingError  # noqa: E402
from test_vdn import RefVDNModel, V, _other_batch, _steps  # noqa: E402

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig  # noqa: E402

T, C = 16, 6  # tokens per sample (a 4 x 4 map), channels


class _Tokens(nn.Module):
    """conv -> (N, T, C) tokens -> a merged BatchNorm1d -> (N, T, C) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1, stride=2)
        self.bn0 = nn.BatchNorm2d(C)
        self.norm = nn.BatchNorm1d(C)
        self.fc = nn.Linear(C, 3)

    def tokens(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn0(self.conv(x))).flatten(2).transpose(1, 2)  # (N, T, C)

    def merged(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        h = self.merged(self.tokens(x))
        return self.fc(h.mean(1))


class Flatten01(_Tokens):
    """LeViT: ``bn(h.flatten(0, 1)).reshape_as(h)``."""

    def merged(self, h: Tensor) -> Tensor:
        return self.norm(h.flatten(0, 1)).reshape_as(h)


class ReshapeTimes(_Tokens):
    """PatchTST / MobileViT: ``reshape(batch_size * T, C)`` and ``view(batch_size, T, C)``."""

    def merged(self, h: Tensor) -> Tensor:
        b, t, c = h.shape
        return self.norm(h.reshape(b * t, c)).view(b, t, c)


class ViewMinusOne(_Tokens):
    """``view(-1, C)`` and back with ``view(x.size(0), -1, C)``."""

    def merged(self, h: Tensor) -> Tensor:
        return self.norm(h.reshape(-1, C)).view(h.size(0), -1, C)


class Unflatten0(_Tokens):
    """``flatten(0, 1)`` then ``unflatten(0, (-1, T))``."""

    def merged(self, h: Tensor) -> Tensor:
        return self.norm(h.flatten(0, 1)).unflatten(0, (-1, T))


class ModuleFlatten(_Tokens):
    """``nn.Flatten(0, 1)`` and ``nn.Unflatten(0, (-1, T))`` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.merge, self.split = nn.Flatten(0, 1), nn.Unflatten(0, (-1, T))

    def merged(self, h: Tensor) -> Tensor:
        return self.split(self.norm(self.merge(h)))


class MergedConv(nn.Module):
    """Two views per sample ``(N, 2, 3, H, W)`` merged for a conv + BatchNorm2d, split back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.fc = nn.Linear(2 * C, 3)

    def forward(self, x: Tensor) -> Tensor:
        n = x.size(0)
        h = torch.relu(self.bn(self.conv(x.flatten(0, 1))))  # (N * 2, C, H, W)
        return self.fc(h.mean((2, 3)).view(n, 2 * C))


FORMS = [Flatten01, ReshapeTimes, ViewMinusOne, Unflatten0, ModuleFlatten, MergedConv]


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().train()


def _input(cls: type[nn.Module], n: int = 4) -> Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n, 2, 3, 4, 4) if cls is MergedConv else (n, 3, 8, 8)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _rewrite(route: str, model: nn.Module, cfg: SamplingConfig, x: Tensor) -> nn.Module:
    if route == "symbolic_trace":
        return bnrewrite.rewrite(model, cfg, example_inputs=(x,))
    if route == "capture_export":
        return bnrewrite.rewrite(model, cfg, example_inputs=(x,), capture="export")
    return bnrewrite.rewrite(torch.export.export(model, (x,)), cfg).module()


ROUTES = ["symbolic_trace", "capture_export", "exported_program"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
def test_merged_forms_match_the_reference(cls, route):
    """Outputs, input gradients and running statistics over two SGD steps equal the reference's
    (``vdn``, fixed rows); row 0 does not depend on the other samples."""
    cfg = SamplingConfig(method="vdn", sampling="fixed", vdn_samples=V, seed=5)
    x = _input(cls)
    model = _model(cls)
    ref = RefVDNModel(model, "vdn", 1.0, seed=5)
    new = _rewrite(route, model, cfg, x)
    got, want = _steps(new, x), _steps(ref, x)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=key)
    if route != "exported_program":  # ep.module() refuses .train(); it stays in training mode
        new.train()
    assert torch.equal(new(x)[0], new(_other_batch(x))[0])


@pytest.mark.parametrize("cls", [Flatten01, ReshapeTimes, MergedConv], ids=lambda c: c.__name__)
def test_merged_forms_fs_vdn_match_the_reference(cls):
    cfg = SamplingConfig(method="fs_vdn", ratio=0.25, sampling="fixed", vdn_samples=V, seed=5)
    x = _input(cls)
    model = _model(cls)
    ref = RefVDNModel(model, "fs_vdn", 0.25, seed=5)
    new = bnrewrite.rewrite(model, cfg, example_inputs=(x,), capture="export")
    got, want = _steps(new, x), _steps(ref, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=key)


def test_merged_report_names_the_rows_per_sample():
    x = _input(Flatten01)
    _, report = bnrewrite.rewrite(
        _model(Flatten01), "vdn", example_inputs=(x,), capture="export", return_report=True
    )
    assert report.merged_rows == [("norm", T)]
    assert f"{T} rows per sample" in str(report)


def test_merged_eval_is_the_original_and_other_batch_sizes_run():
    x = _input(ReshapeTimes)
    model = _model(ReshapeTimes)
    new = bnrewrite.rewrite(model, "vdn", example_inputs=(x,), capture="export")
    assert new(_input(ReshapeTimes, n=7)).shape == (7, 3)  # batch dim is dynamic
    new.eval()
    plain = _model(ReshapeTimes)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(new(x), plain(x), rtol=0, atol=0)


# -- what still mixes samples is refused, naming the node, module and line ----------------------
class HalfBatch(_Tokens):
    def merged(self, h: Tensor) -> Tensor:
        return self.norm(h.reshape(2, -1).reshape(-1, C)).reshape_as(h)  # 2 rows for 4 samples


class ReturnsMerged(_Tokens):
    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.tokens(x).flatten(0, 1))


class MovesBatch(_Tokens):
    def merged(self, h: Tensor) -> Tensor:
        return self.norm(h.transpose(0, 1).flatten(0, 1)).view(T, -1, C).transpose(0, 1)


@pytest.mark.parametrize(
    "cls,why",
    [
        (HalfBatch, "not a whole number of rows per sample"),
        (ReturnsMerged, "merges the batch with other dims"),
        (MovesBatch, "batch dim"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_mixing_reshapes_are_refused_with_module_and_line(cls, why):
    x = _input(cls)
    model = _model(cls)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BatchMixingError, match=why) as info:
        bnrewrite.rewrite(model, "vdn", example_inputs=(x,), capture="export")
    text = str(info.value)
    assert "test_vdn_merge.py:" in text  # the user's source line
    assert "method 'fs' instead of 'fs_vdn'" in text  # what to do without editing the model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_merge_without_shapes_asks_for_example_inputs():
    with pytest.raises(BatchMixingError, match="example_inputs"):
        bnrewrite.rewrite(_model(Flatten01), "vdn")
