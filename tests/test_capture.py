"""``rewrite(model, example_inputs=...)`` on models ``symbolic_trace`` cannot trace (issue 24).

The models here do what real model code does and ``torch.fx.symbolic_trace`` refuses: Python
control flow on a size, ``int()`` of a size, unpacking a size, assigning into a tensor. They are
captured with ``torch.export`` and come back as :class:`bnrewrite.passes.capture.CapturedModel`;
the reference is ``tests/zoo.reference_model`` (float64, fixed sampling, written from DESIGN.md).
The ownership contract (DESIGN.md): an optimizer on ``model.parameters()`` trains the result, the
running statistics it updates are the model's, and the model's own modules are not modified.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))

from bnrewrite.passes.capture import CapturedModel, UntraceableModelError  # noqa: E402
from zoo import assert_close_results, reference_model, run_steps  # noqa: E402

import bnrewrite  # noqa: E402
from bnrewrite import SamplingConfig  # noqa: E402


class SizeCheck(nn.Module):
    """A data-dependent check on a size, as in many model libraries' embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.channels = 3
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:  # STOPS-HERE
            raise ValueError("wrong number of channels")
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc((h + self.block(h)).mean((2, 3)))


class IntOfSize(SizeCheck):
    """``int()`` of a size (padding computed from the input's width)."""

    def forward(self, x: Tensor) -> Tensor:
        pad = int(x.shape[-1]) % 2  # STOPS-HERE
        h = torch.relu(self.bn(self.conv(nn.functional.pad(x, (0, pad)))))
        return self.fc((h + self.block(h)).mean((2, 3)))


class UnpackAndAssign(SizeCheck):
    """Iterating over a size, unpacking one, then assigning into a tensor."""

    def forward(self, x: Tensor) -> Tensor:
        spatial = [int(d) for d in x.shape[2:]]  # STOPS-HERE
        n, c, height, width = x.shape
        h = torch.relu(self.bn(self.conv(x))).clone()
        h[:, :1] = 0.0
        return self.fc((h + self.block(h)).view(n, 8, spatial[0] * width).mean(2))


MODELS = [SizeCheck, IntOfSize, UnpackAndAssign]


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().train()


def _input(n: int = 8, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)


def _stop_line(cls: type[nn.Module]) -> int:
    import inspect

    lines, first = inspect.getsourcelines(cls.forward)
    return first + next(i for i, line in enumerate(lines) if "STOPS-HERE" in line)


# -- acceptance 2: without example_inputs, one error naming the line and the routes -------------
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_untraceable_without_example_inputs_names_line_and_routes(cls):
    model = _model(cls)
    before = copy.deepcopy(model.state_dict())
    children = dict(model.named_modules())
    with pytest.raises(UntraceableModelError) as info:
        bnrewrite.rewrite(model, "bs")
    text = str(info.value)
    assert f"test_capture.py:{_stop_line(cls)}" in text
    for route in ("example_inputs=(x,)", "bnrewrite.convert_(model, cfg)", "backend='bnrewrite'"):
        assert route in text
    assert info.value.__suppress_context__  # one error, not the tracer's traceback under it
    assert dict(model.named_modules()) == children
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_capture_fx_only_refuses_and_export_needs_inputs():
    with pytest.raises(UntraceableModelError, match="capture='export'"):
        bnrewrite.rewrite(_model(SizeCheck), "bs", example_inputs=(_input(),), capture="fx")
    with pytest.raises(ValueError, match="needs example_inputs"):
        bnrewrite.rewrite(_model(SizeCheck), "bs", capture="export")
    with pytest.raises(ValueError, match="capture must be one of"):
        bnrewrite.rewrite(_model(SizeCheck), "bs", capture="dynamo")


def test_export_failure_is_one_error_naming_both_exporters():
    class ValueBranch(SizeCheck):
        def forward(self, x: Tensor) -> Tensor:
            h = self.bn(self.conv(x))
            if h.sum() > 0:  # data-dependent: neither exporter can capture it
                h = -h
            return self.fc(h.mean((2, 3)))

    with pytest.raises(UntraceableModelError, match="non-strict torch.export") as info:
        bnrewrite.rewrite(_model(ValueBranch), "bs", example_inputs=(_input(),))
    assert "strict torch.export" in str(info.value) and "convert_" in str(info.value)


# -- acceptance 1: equal to the original (full) and to the reference (fixed bs, fs) -------------
CASES = [("full", 1.0), ("bs", 0.5), ("fs", 0.25)]


@pytest.mark.parametrize("method,ratio", CASES)
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_captured_matches_reference(cls, method, ratio):
    """Two SGD steps and an eval call: outputs, input and parameter gradients, running stats."""
    cfg = SamplingConfig(method=method, ratio=ratio, sampling="fixed")
    model = _model(cls)
    ref = reference_model(_model(cls), method, ratio)
    new = bnrewrite.rewrite(model, cfg, example_inputs=(_input(),))
    assert isinstance(new, CapturedModel)
    assert new.meta["bnrewrite"].count == 2
    got = run_steps(new, _input)
    want = run_steps(ref, _input)
    assert_close_results(got, want, atol=1e-10, rtol=1e-9)
    if method == "full":  # and PyTorch's own BatchNorm
        assert_close_results(got, run_steps(_model(cls), _input), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_optimizer_on_model_parameters_trains_the_captured_model(cls):
    """An optimizer built on ``model.parameters()`` before the rewrite: one SGD step through the
    captured model changes the model's parameters and running statistics as the reference's."""
    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")
    model, ref = _model(cls), reference_model(_model(cls), "bs", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    new = bnrewrite.rewrite(model, cfg, example_inputs=(_input(),))
    for step in range(2):
        for m, o in ((new, opt), (ref, ref_opt)):
            o.zero_grad()
            m(_input(seed=10 + step)).square().mean().backward()
            o.step()
    got, want = model.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-10, rtol=1e-9, msg=key)


def test_captured_model_owns_nothing():
    model = _model(SizeCheck)
    flags = {name: m.training for name, m in model.named_modules()}
    new = bnrewrite.rewrite(model, "bs", example_inputs=(_input(),))
    # the model's tensors, under the model's keys
    assert list(new.state_dict()) == list(model.state_dict())
    for (k, a), (_, b) in zip(
        new.state_dict(keep_vars=True).items(), model.state_dict(keep_vars=True).items()
    ):
        assert a is b, k
    assert {id(p) for p in new.parameters()} == {id(p) for p in model.parameters()}
    # the model's modules and flags are its own: not swapped, not switched
    assert all(type(m) is not CapturedModel for m in model.modules())
    assert isinstance(model.bn, nn.BatchNorm2d)
    new.eval()
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert not new.training and not new.bn.training
    new.train()
    before = model.bn.running_mean.clone()
    new(_input())
    assert not torch.equal(model.bn.running_mean, before)  # the model's running statistics
    assert new(_input(n=5)).shape == (5, 4)  # another batch size (the batch dim is dynamic)


def test_eval_mode_is_the_model_itself():
    model = _model(UnpackAndAssign)
    new = bnrewrite.rewrite(model, "fs", example_inputs=(_input(),))
    new(_input())
    new.eval()
    plain = _model(UnpackAndAssign)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    x = _input(n=3, seed=7)  # any shape in eval mode
    torch.testing.assert_close(new(x), plain(x), rtol=0, atol=0)


def test_model_in_eval_mode_is_captured_for_training():
    model = _model(SizeCheck).eval()
    new = bnrewrite.rewrite(model, "bs", example_inputs=(_input(),))
    assert not new.training and new.meta["bnrewrite"].count == 2
    assert not model.training  # untouched
    new.train()
    before = model.bn.running_mean.clone()
    new(_input())
    assert not torch.equal(model.bn.running_mean, before)


def test_report_filters_overrides_and_floor():
    model = _model(SizeCheck)
    with pytest.warns(UserWarning, match="matches no BatchNorm layer"):
        new, report = bnrewrite.rewrite(
            model,
            SamplingConfig(method="bs", ratio=0.125),
            example_inputs=(_input(n=16),),
            exclude="block.*",
            overrides={"bn": "fs", "nothing.*": "fs"},
            return_report=True,
        )
    assert new.meta["bnrewrite"] is report
    assert dict(report.rewritten) == {"bn": "fs"}
    assert report.skipped == [("block.1", "filtered by name")]
    # the floor's report: at bs 1/8, 4 rows of 4 x 4 give 1 row = 16 < 32 values per channel
    _, small = bnrewrite.rewrite(
        _model(SizeCheck),
        SamplingConfig(method="bs", ratio=0.125),
        example_inputs=(torch.randn(4, 3, 4, 4, dtype=torch.float64),),
        return_report=True,
    )
    assert {name for name, _, _ in small.raised} == {"bn", "block.1"}
    assert all(before < after for _, before, after in small.raised)


def test_inplace_with_capture_is_refused():
    with pytest.raises(ValueError, match="convert_"):
        bnrewrite.rewrite(_model(SizeCheck), "bs", example_inputs=(_input(),), inplace=True)


def test_capture_export_on_a_traceable_model():
    from zoo import zoo_entry

    entry = zoo_entry("resnet_basic")
    model = entry.factory()
    new = bnrewrite.rewrite(
        model, "full", example_inputs=(entry.example_input(),), capture="export"
    )
    assert isinstance(new, CapturedModel)
    assert_close_results(
        run_steps(new, entry.example_input), run_steps(entry.factory(), entry.example_input)
    )


@pytest.mark.parametrize("method", ["vdn", "fs_vdn"])
def test_vdn_through_capture(method):
    """VDN on an untraceable model: the captured program's aten graph; against the VDN reference."""
    from test_vdn import RefVDNModel, _steps

    cfg = SamplingConfig(method=method, ratio=0.25, sampling="fixed", vdn_samples=2, seed=5)
    model = _model(SizeCheck)
    ref = RefVDNModel(_model(SizeCheck), method, 0.25, seed=5)
    new = bnrewrite.rewrite(model, cfg, example_inputs=(_input(),))
    assert isinstance(new, CapturedModel)
    got, want = _steps(new, _input()), _steps(ref, _input())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=key)


class ListHeld(nn.Module):
    """Submodules kept in a plain list beside ``add_module`` (as some model libraries do): the
    structure-sharing copy the routes trace must run the copies, or the capture loses them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)]
        for i, block in enumerate(self.blocks):
            self.add_module(str(i), block)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3:
            raise ValueError("three channels")
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("capture", ["export", "auto"])
def test_list_held_submodules_are_captured_with_their_parameters(capture):
    cfg = SamplingConfig(method="bs", ratio=0.5, sampling="fixed")
    model = _model(ListHeld)
    new = bnrewrite.rewrite(model, cfg, example_inputs=(_input(),), capture=capture)
    assert new.meta["bnrewrite"].count == 1
    assert model.blocks[1] is model.get_submodule("1")  # the model's own list is untouched
    ref = reference_model(_model(ListHeld), "bs", 0.5)
    ref.blocks = [ref.get_submodule("0"), ref.get_submodule("1")]  # the reference's own list too
    assert_close_results(run_steps(new, _input), run_steps(ref, _input), atol=1e-10, rtol=1e-9)


def test_to_after_the_rewrite_keeps_the_program_on_the_module_tensors():
    """``.float()`` replaces the buffers with new tensors; the next training call runs on them
    and updates them (the program's attributes are re-pointed before each call)."""
    new = bnrewrite.rewrite(_model(SizeCheck), "bs", example_inputs=(_input(),)).float()
    before = new.bn.running_mean.clone()
    assert new(_input().float()).dtype == torch.float32
    assert new.bn.running_mean.dtype == torch.float32
    assert not torch.equal(new.bn.running_mean, before)
