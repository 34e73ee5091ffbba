"""FX pass (issue 3): parity over the zoo, graph kinds, report, options, training loop.

Acceptance lines of issue 3 and the tests that show them:

1. ``method="full"`` equals the unrewritten model: ``test_zoo_full_matches_unrewritten``.
2. fixed ``bs`` / ``fs`` equal the independent reference of ``tests/zoo.py``:
   ``test_zoo_fixed_matches_reference``.
3. the same through ``torch.export`` (training IR and decomposed/functional IR) and ``make_fx``
   (plain and functionalized): ``test_export_zoo``, ``test_make_fx_zoo``.
4. counts, idempotence, input untouched: ``test_counts_idempotent_input_untouched`` (and the count
   asserts in every parity test).
5. a small ResNet trains with random ``bs`` / ``fs``: ``test_small_resnet_trains``.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from bnrewrite.passes.fx import RewriteReport, find_batch_norm_nodes
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp
from zoo import (
    ZOO,
    SmallResNet,
    ZooEntry,
    assert_close_results,
    reference_batch_norm,
    reference_model,
    run_steps,
    zoo_entry,
)

import bnrewrite
from bnrewrite import SamplingConfig

IDS = [e.name for e in ZOO]
FIXED = {
    "full": SamplingConfig("full"),
    "bs": SamplingConfig("bs", ratio=0.5, sampling="fixed"),
    "fs": SamplingConfig("fs", ratio=0.25, sampling="fixed"),
}


def _op_count(gm: fx.GraphModule) -> int:
    return sum(
        1 for n in gm.graph.nodes if n.op == "call_function" and "bnrewrite" in str(n.target)
    )


# -- 1, 2: symbolic_trace ---------------------------------------------------------------------
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_zoo_full_matches_unrewritten(entry: ZooEntry) -> None:
    model = entry.factory()
    gm, report = bnrewrite.rewrite(model, FIXED["full"], return_report=True)
    gm.graph.lint()
    assert isinstance(gm, fx.GraphModule)
    # module-form BN are rewritten in any mode (a frozen one follows its flag at run time)
    assert report.count == entry.bn_count + entry.skipped
    assert len(report.skipped_for("eval mode")) == 0
    # the reference of tests/zoo.py agrees with PyTorch for "full" (it validates the reference)
    reference = reference_model(model)
    expected = run_steps(copy.deepcopy(model), entry.example_input)
    assert_close_results(run_steps(reference, entry.example_input), expected)
    assert_close_results(run_steps(gm, entry.example_input), expected)  # trains `model` (shared)


@pytest.mark.parametrize("method", ["bs", "fs"])
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_zoo_fixed_matches_reference(entry: ZooEntry, method: str) -> None:
    model = entry.factory()
    cfg = FIXED[method]
    gm, report = bnrewrite.rewrite(model, cfg, return_report=True)
    gm.graph.lint()
    assert report.count == entry.bn_count + entry.skipped
    assert all(m == method for _, m in report.rewritten)
    expected = run_steps(reference_model(model, method, cfg.ratio), entry.example_input)
    assert_close_results(run_steps(gm, entry.example_input), expected)


# -- 3: export and make_fx --------------------------------------------------------------------
def _exportable(entry: ZooEntry) -> nn.Module:
    """The model of ``entry``; ``momentum=None`` set to 0.1 (torch.export cannot trace the
    data-dependent ``float(num_batches_tracked)`` of PyTorch's own BatchNorm)."""
    model = entry.factory()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            m.momentum = 0.1
    return model


@functools.cache
def _exported(name: str, decomposed: bool) -> torch.export.ExportedProgram:
    entry = zoo_entry(name)
    ep = torch.export.export(_exportable(entry), (entry.example_input(),))
    return ep.run_decompositions() if decomposed else ep


@pytest.mark.parametrize("decomposed", [False, True], ids=["training_ir", "functional_ir"])
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_export_zoo(entry: ZooEntry, decomposed: bool) -> None:
    """ExportedProgram in -> ExportedProgram out; ``aten.batch_norm`` (training IR) and
    ``aten._native_batch_norm_legit_functional`` with BUFFER_MUTATION outputs (decomposed IR)."""
    ep = _exported(entry.name, decomposed)
    before = ep.graph_module.code
    model = _exportable(entry)
    for method, cfg in FIXED.items():
        ep2, report = bnrewrite.rewrite(ep, cfg, return_report=True)
        assert isinstance(ep2, torch.export.ExportedProgram)
        ep2.graph_module.graph.lint()
        assert ep2.graph_module.meta["bnrewrite"] is report
        assert report.count == entry.bn_count == _op_count(ep2.graph_module)
        assert len(report.skipped_for("eval mode")) == entry.skipped
        for node in ep2.graph_module.graph.nodes:
            if node.op == "call_function" and "bnrewrite" in str(node.target):
                assert isinstance(node.meta["val"], (torch.Tensor, tuple))
        got = run_steps(ep2.module(), entry.example_input, eval_call=False)
        ratio = cfg.ratio
        expected = run_steps(
            reference_model(model, method, ratio), entry.example_input, eval_call=False
        )
        assert_close_results(got, expected)
    assert ep.graph_module.code == before  # the input program is untouched


def _make_fx(model: nn.Module, x: torch.Tensor, functionalize: bool) -> fx.GraphModule:
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def f(p, b, inp):
        return torch.func.functional_call(model, (p, b), (inp,))

    if functionalize:
        f = torch.func.functionalize(f, remove="mutations_and_views")
    return make_fx(f, tracing_mode="fake")(params, buffers, x)


@pytest.mark.parametrize("functionalize", [False, True], ids=["plain", "functionalized"])
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_make_fx_zoo(entry: ZooEntry, functionalize: bool) -> None:
    """Aten-level graphs (``aten.native_batch_norm`` on placeholder buffers)."""
    model = _exportable(entry)
    traced = _make_fx(copy.deepcopy(model), entry.example_input(), functionalize)
    for method, cfg in FIXED.items():
        gm, report = bnrewrite.rewrite(traced, cfg, return_report=True)
        gm.graph.lint()
        assert report.count == entry.bn_count == _op_count(gm)
        state = copy.deepcopy(model)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in state.named_parameters()}
        buffers = {k: v.clone() for k, v in state.named_buffers()}
        got = run_steps(
            state,
            entry.example_input,
            eval_call=False,
            call=lambda x, gm=gm, p=params, b=buffers: gm(p, b, x),
            params=params,
            buffers=buffers,
        )
        expected = run_steps(
            reference_model(model, method, cfg.ratio), entry.example_input, eval_call=False
        )
        assert_close_results(got, expected)


def test_shape_prop_and_export_roundtrip(tmp_path) -> None:
    entry = zoo_entry("resnet_basic")
    x = entry.example_input()
    traced = _make_fx(_exportable(entry), x, functionalize=False)
    gm = bnrewrite.rewrite(traced, FIXED["bs"])
    model = _exportable(entry)
    ShapeProp(gm).propagate(
        dict(model.named_parameters()), {k: v.clone() for k, v in model.named_buffers()}, x
    )
    for node in gm.graph.nodes:
        if "bnrewrite" in str(node.target):
            assert node.meta["tensor_meta"].shape == x.shape[:1] + (8, 4, 4)
    # ExportedProgram: save / load keeps the custom op; re-export of the unlifted module too
    ep = bnrewrite.rewrite(_exported(entry.name, False), FIXED["bs"])
    path = tmp_path / "bs.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert _op_count(loaded.graph_module) == 3
    torch.manual_seed(0)
    m1, m2 = ep.module(), loaded.module()
    torch.testing.assert_close(m1(x), m2(x))
    again = torch.export.export(ep.module(), (x,))
    assert _op_count(again.graph_module) == 3  # the custom op survives a second export


# -- 4: counts, idempotence, input untouched, state_dict ----------------------------------------
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_counts_idempotent_input_untouched(entry: ZooEntry) -> None:
    model = entry.factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    gm, report = bnrewrite.rewrite(model, FIXED["fs"], return_report=True)
    assert report.count == entry.bn_count + entry.skipped
    assert gm.meta["bnrewrite"] is report
    # the input model's structure is unmodified (same module types), its state untouched by the
    # rewrite, and its parameters and buffers are the graph's own (as symbolic_trace shares them)
    assert [type(m) for m in model.modules()] == kinds
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    shared = dict(gm.state_dict(keep_vars=True))
    for k, v in model.state_dict(keep_vars=True).items():
        assert shared[k] is v, k
    run_steps(gm, entry.example_input)
    assert [type(m) for m in model.modules()] == kinds
    # a second rewrite changes nothing
    code = gm.code
    again, report2 = bnrewrite.rewrite(gm, FIXED["bs"], return_report=True)
    assert again.code == code
    assert report2.count == 0
    assert len(report2.skipped_for("already rewritten")) == entry.bn_count + entry.skipped
    methods = {getattr(m, "config", None) for m in again.modules()} - {None}
    assert methods <= {FIXED["fs"]}
    # aten level too
    ep = bnrewrite.rewrite(_exported(entry.name, True), FIXED["fs"])
    ep_again, report3 = bnrewrite.rewrite(ep, FIXED["bs"], return_report=True)
    assert report3.count == 0 and ep_again.graph_module.code == ep.graph_module.code


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_state_dict_compatible(entry: ZooEntry) -> None:
    model = entry.factory()
    gm = bnrewrite.rewrite(model, FIXED["bs"])
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    run_steps(gm, entry.example_input)
    fresh = entry.factory()
    fresh.load_state_dict(gm.state_dict())  # rewritten -> original
    gm2 = bnrewrite.rewrite(entry.factory(), FIXED["bs"])
    gm2.load_state_dict(model.state_dict())  # original -> rewritten
    for k, v in gm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_train_eval_toggle_honoured() -> None:
    entry = zoo_entry("functional_bn")  # F.batch_norm(..., self.training, ...) in forward
    model = entry.factory()
    gm = bnrewrite.rewrite(model, FIXED["bs"])
    x = entry.example_input()
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    model.train()
    ref = reference_model(model, "bs", 0.5)
    torch.testing.assert_close(gm(x), ref(x))


# -- options and report -----------------------------------------------------------------------
def test_include_exclude_overrides_and_log(caplog: pytest.LogCaptureFixture) -> None:
    model = zoo_entry("resnet_basic").factory()
    with caplog.at_level(logging.INFO, logger="bnrewrite"):
        gm, report = bnrewrite.rewrite(model, FIXED["bs"], exclude="bn1", return_report=True)
    assert report.count == 2
    assert report.skipped == [("bn1", "filtered by name")]
    assert "rewrote 2 BatchNorm" in caplog.text and "filtered by name" in caplog.text
    assert type(gm.bn1) is nn.BatchNorm2d
    _, report = bnrewrite.rewrite(model, FIXED["bs"], include=["down.*"], return_report=True)
    assert [n for n, _ in report.rewritten] == ["down.1"]
    gm, report = bnrewrite.rewrite(
        model,
        FIXED["bs"],
        overrides={"bn2": {"method": "fs", "ratio": 0.25}, "down.*": None},
        return_report=True,
    )
    assert report.rewritten == [("bn1", "bs"), ("bn2", "fs")]
    assert report.skipped == [("down.1", "filtered by name")]
    assert gm.bn2.config.method == "fs" and gm.bn1.config.method == "bs"
    assert "rewrote 2" in str(report) and isinstance(report, RewriteReport)
    # the same filters on an aten graph (names from nn_module_stack)
    ep = _exported("resnet_basic", False)
    _, report = bnrewrite.rewrite(ep, FIXED["bs"], exclude=["bn1"], return_report=True)
    assert report.count == 2 and report.skipped == [("bn1", "filtered by name")]


def test_unsupported_forms_declined() -> None:
    from bnrewrite.distributed import SampledSyncBatchNorm

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.BatchNorm2d(4))
    gm, report = bnrewrite.rewrite(model, FIXED["bs"], return_report=True)
    assert report.count == 2 and report.synchronised == ["1"]  # SyncBatchNorm: pooled across ranks
    assert (
        type(gm.get_submodule("1")) is SampledSyncBatchNorm and type(model[1]) is nn.SyncBatchNorm
    )
    assert "synchronised across its process group" in str(report)
    # no process group: the local sampled BN, i.e. what the same rewrite gives a plain BatchNorm2d
    plain = copy.deepcopy(model)
    plain[1] = nn.BatchNorm2d(4)
    plain[1].load_state_dict(model[1].state_dict())
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(gm(x), bnrewrite.rewrite(plain, FIXED["bs"])(x))
    with pytest.raises(ValueError, match="not supported across processes"):
        bnrewrite.rewrite(model, "vdn")
    with pytest.raises(ValueError, match="apply to method 'vdn'"):
        bnrewrite.rewrite(model, FIXED["bs"], batch_inputs=["x"])
    with pytest.raises(ValueError, match="nn.Module"):
        bnrewrite.rewrite(42, FIXED["bs"])
    # a joint forward/backward graph (saved statistics used by the backward) is declined
    graph = fx.Graph()
    x, w, b, rm, rv = (graph.placeholder(n) for n in ("x", "w", "b", "rm", "rv"))
    bn = graph.call_function(
        torch.ops.aten.native_batch_norm.default, (x, w, b, rm, rv, True, 0.1, 1e-5)
    )
    outs = [graph.call_function(__import__("operator").getitem, (bn, i)) for i in range(3)]
    graph.output(tuple(outs))
    sites = find_batch_norm_nodes(fx.GraphModule(nn.Module(), graph))
    assert len(sites) == 1 and "saved statistics" in sites[0].reason


def test_torch_batch_norm_form() -> None:
    """``torch.batch_norm`` (aten argument order) in a Python-level graph."""

    class TorchBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bn = self.bn
            return torch.batch_norm(
                x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, 0.1, 1e-5, False
            )

    model = TorchBN()
    gm, report = bnrewrite.rewrite(model, FIXED["bs"], return_report=True)
    assert report.rewritten == [("bn", "bs")]
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    bn = model.bn
    want = reference_batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.1, 1e-5, "bs", 0.5)
    torch.testing.assert_close(gm(x), want)
    torch.testing.assert_close(gm.bn.running_var, rv)
    assert model.bn.running_var is gm.bn.running_var  # shared, as symbolic_trace shares it


# -- 5: training loop -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bs", "fs"])
def test_small_resnet_trains(method: str) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    cfg = SamplingConfig(method, ratio=0.25, seed=0)
    gm, report = bnrewrite.rewrite(model, cfg, return_report=True)
    assert report.count == 7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    gm.eval()
    assert torch.isfinite(gm(x)).all()


# -- issue 18: correctness traps --------------------------------------------------------------
class _LiteralTrainingBN(nn.Module):
    """``F.batch_norm(..., training=True)`` written as a literal: batch statistics in any mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        literal = torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True
        )
        follows = torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=self.training
        )
        return literal + follows


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_literal_training_true_is_honoured(mode: str) -> None:
    """Issue 18, item 2: a literal ``training=True`` stays batch statistics after ``.eval()``;
    a traced ``self.training`` follows the mode (whatever the mode at rewrite time)."""
    model = _LiteralTrainingBN()
    model.bn.running_mean.fill_(3.0)  # far from the batch mean: the two paths differ by ~6
    getattr(model, mode)()
    gm = bnrewrite.rewrite(model, FIXED["full"])
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    for run_mode in ("eval", "train"):
        getattr(gm, run_mode)()
        reference = copy.deepcopy(model)
        getattr(reference, run_mode)()
        with torch.no_grad():
            want = reference(x)
            got = gm(x)
        torch.testing.assert_close(got, want, msg=f"rewritten in {mode}, run in {run_mode}")


def test_model_in_eval_mode_is_rewritten_and_samples_after_train() -> None:
    """Issue 18, item 3: module-form BN are rewritten whatever the mode; after ``.train()`` they
    sample, and in eval mode they are PyTorch's eval BN."""
    model = zoo_entry("resnet_basic").factory().eval()
    gm, report = bnrewrite.rewrite(model, FIXED["bs"], return_report=True)
    assert report.count == zoo_entry("resnet_basic").bn_count and not report.skipped
    x = zoo_entry("resnet_basic").example_input()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))  # eval: PyTorch's BN, exactly
    gm.train()
    reference = reference_model(model.train(), "bs", 0.5)
    expected = run_steps(reference, lambda: x.clone(), eval_call=False)
    assert_close_results(run_steps(gm, lambda: x.clone(), eval_call=False), expected)


def test_graph_of_inference_batchnorm_only_warns() -> None:
    """Issue 18, item 3: a graph that holds only inference BN (``make_fx`` of an eval model)
    cannot be rewritten; that is said with a ``UserWarning``, not an INFO log."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm = make_fx(model)(torch.randn(2, 3, 6, 6))
    with pytest.warns(UserWarning, match="only.*inference BatchNorm|every BatchNorm.*inference"):
        bnrewrite.rewrite(gm, FIXED["bs"])


def test_optimizer_on_model_parameters_trains_the_rewritten_graph() -> None:
    """Issue 18, item 5: the usual order -- optimizer on ``model.parameters()``, then rewrite --
    trains what the graph uses; the model's modules are not modified (``inplace=False``)."""
    torch.manual_seed(0)
    model = zoo_entry("resnet_basic").factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gm = bnrewrite.rewrite(model, FIXED["bs"])
    assert all(type(m) is not nn.BatchNorm2d for m in gm.modules())
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())  # structure untouched
    x = zoo_entry("resnet_basic").example_input()
    before = gm(x).detach()
    loss = gm(x).square().mean()
    loss.backward()
    opt.step()
    assert not torch.allclose(gm(x), before)  # the step changed what the graph computes
    for (name, p), (_, q) in zip(model.named_parameters(), gm.named_parameters(), strict=True):
        assert p is q, name
    # inplace=True swaps the model's own BN for their sampled twins
    bnrewrite.rewrite(model, FIXED["bs"], inplace=True)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_unmatched_patterns_and_models_without_batchnorm_warn() -> None:
    """Issue 18, item 10: a pattern that matches no layer, and a model with no BN at all, are
    ``UserWarning``s attributed to the caller's line (not an INFO log)."""
    model = zoo_entry("resnet_basic").factory()
    for option in ({"include": ["layer9.*"]}, {"exclude": "nope"}, {"overrides": {"x.*": None}}):
        with pytest.warns(UserWarning, match="matches no BatchNorm layer") as rec:
            bnrewrite.rewrite(model, FIXED["bs"], **option)
        assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="has no BatchNorm layer"):
        bnrewrite.rewrite(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), FIXED["bs"])
    with pytest.warns(UserWarning, match="has no BatchNorm layer"):
        bnrewrite.rewrite(nn.Sequential(nn.Linear(3, 4)), SamplingConfig("vdn"))


def test_rewrite_of_an_empty_batch_matches_pytorch() -> None:
    """Issue 18, item 15 (the FX route): an empty batch runs, as PyTorch's BN."""
    model = zoo_entry("resnet_basic").factory()
    gm = bnrewrite.rewrite(model, SamplingConfig("fs", ratio=0.25))
    reference = copy.deepcopy(model)
    x = torch.randn((0, *zoo_entry("resnet_basic").example_input().shape[1:]), dtype=torch.float64)
    y = gm(x)
    assert y.shape == reference(x).shape
    for (name, a), (_, b) in zip(gm.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_rewrite_of_a_single_batchnorm_layer(cls) -> None:
    """Issue 18, item 16: a model that is one BN layer is rewritten as the one-layer model it is
    (torch.fx cannot trace BN's own forward); it shares the layer's parameters and buffers."""
    torch.manual_seed(0)
    bn = cls(4).double()
    gm, report = bnrewrite.rewrite(bn, FIXED["bs"], return_report=True)
    assert report.rewritten == [("bn", "bs")]
    assert gm.bn.weight is bn.weight and gm.bn.running_mean is bn.running_mean
    shape = {nn.BatchNorm1d: (8, 4), nn.BatchNorm2d: (8, 4, 3, 3), nn.BatchNorm3d: (8, 4, 2, 3, 3)}
    x = torch.randn(shape[cls], dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    want = reference_batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.1, 1e-5, "bs", 0.5)
    torch.testing.assert_close(gm(x), want)
    torch.testing.assert_close(bn.running_var, rv)


def test_rewrite_of_a_program_warns_nothing_and_owns_its_tensors() -> None:
    """``rewrite(ep)`` raises no torch ``FutureWarning`` (``LeafSpec``, from copying the program)
    and returns a program with its own copy of the parameters and buffers: training it leaves
    the input program's tensors as they were (README, "What rewrite gives you")."""
    import warnings

    ep = _exported("resnet_bottleneck", False)
    before = {k: v.detach().clone() for k, v in ep.state_dict.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ep2 = bnrewrite.rewrite(ep, FIXED["bs"])
    assert all(ep2.state_dict[k] is not v for k, v in ep.state_dict.items())
    run_steps(ep2.module(), zoo_entry("resnet_bottleneck").example_input, eval_call=False)
    for k, v in ep.state_dict.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
