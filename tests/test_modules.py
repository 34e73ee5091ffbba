"""Module form: SampledBatchNorm1d/2d/3d and convert_ against PyTorch's BatchNorm modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnrewrite import SampledBatchNorm1d, SampledBatchNorm2d, SampledBatchNorm3d, convert_

CASES = [
    (nn.BatchNorm1d, SampledBatchNorm1d, (8, 5)),
    (nn.BatchNorm1d, SampledBatchNorm1d, (8, 5, 6)),
    (nn.BatchNorm2d, SampledBatchNorm2d, (8, 5, 4, 6)),
    (nn.BatchNorm3d, SampledBatchNorm3d, (4, 5, 3, 4, 2)),
]
KWARGS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": 0.3, "eps": 1e-3},
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=[str(k) for k in KWARGS])
@pytest.mark.parametrize(
    "bn_cls,sampled_cls,shape", CASES, ids=[c[0].__name__ + str(c[2]) for c in CASES]
)
def test_full_module_equals_pytorch(bn_cls, sampled_cls, shape, kwargs):
    torch.manual_seed(0)
    ref = bn_cls(shape[1], **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    mod = sampled_cls(shape[1], **kwargs, config="full")
    mod.load_state_dict(ref.state_dict())
    for step in range(3):  # three training steps (momentum=None averages over them), then eval
        x = torch.randn(shape) * (step + 1) + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = mod(x1), ref(x2)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
        g = torch.randn(shape)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for (k1, v1), (k2, v2) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    if ref.affine:
        torch.testing.assert_close(mod.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)
    mod.eval()
    ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-4)


def test_state_dict_round_trips_both_ways():
    ref = nn.BatchNorm2d(7)
    ref.train()
    ref(torch.randn(4, 7, 3, 3))
    mod = SampledBatchNorm2d(7, config={"method": "fs", "ratio": "1/4"})
    mod.load_state_dict(ref.state_dict())
    mod(torch.randn(4, 7, 4, 4))
    back = nn.BatchNorm2d(7)
    back.load_state_dict(mod.state_dict())
    assert int(back.num_batches_tracked) == 2
    assert "method='fs'" in repr(mod)


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None)),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10),
    )


def test_convert_in_place_shares_parameters_and_keeps_results():
    torch.manual_seed(0)
    model = _net()
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = convert_(model, "full")
    assert out is model
    assert [id(p) for p in model.parameters()] == params  # optimiser built before still works
    kinds = [
        type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    assert kinds == ["SampledBatchNorm2d", "SampledBatchNorm2d", "SampledBatchNorm1d"]
    assert model.state_dict().keys() == ref.state_dict().keys()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(6, 3, 6, 6)
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (k, v1), v2 in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4, msg=k)


def test_convert_with_sampling_trains_and_synchronises_sync_bn(caplog):
    from bnrewrite.distributed import SampledSyncBatchNorm

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SyncBatchNorm(4))
    sync_weight = model[2].weight
    with caplog.at_level("INFO", logger="bnrewrite"):
        convert_(model, {"method": "bs", "ratio": 0.5})
    assert isinstance(model[1], SampledBatchNorm2d)
    assert type(model[2]) is SampledSyncBatchNorm and model[2].weight is sync_weight
    assert "2 BatchNorm layer(s) converted" in caplog.text and "1 SyncBatchNorm" in caplog.text
    model[1](torch.randn(8, 4, 3, 3))
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("method", ["vdn", "fs_vdn"])
def test_convert_refuses_vdn_and_names_the_whole_graph_route(method):
    """Issue 18, item 4: layer by layer, virtual rows cannot travel from one BN to the next; the
    model is left as it was."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"bnrewrite\.rewrite\(model, cfg\)"):
        convert_(model, {"method": method})
    assert type(model[1]) is nn.BatchNorm2d
    from bnrewrite.kernels import convert_fused_

    with pytest.raises(ValueError, match="whole-graph route"):
        convert_fused_(model, {"method": method})


def test_empty_batch_counts_the_step_and_keeps_running_stats():
    """Issue 18, item 15 (module form): as PyTorch's BN."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    sampled = convert_(nn.Sequential(copy.deepcopy(bn)), "bs")[0]
    x = torch.randn(0, 3, 4, 4)
    want, got = bn(x), sampled(x)
    assert got.shape == want.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sampled, name), getattr(bn, name)), name
    assert int(sampled.num_batches_tracked) == 1
