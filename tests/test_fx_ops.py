"""The custom ops the passes emit: schema, autograd, fake tensors, AOT dispatch (opcheck)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnrewrite import SamplingConfig
from bnrewrite.ops import (
    config_from_str,
    config_to_str,
    sampled_batch_norm_functional_op,
    sampled_batch_norm_op,
)

CONFIGS = [
    SamplingConfig(),
    SamplingConfig("bs", ratio=0.5, sampling="fixed"),
    SamplingConfig("fs", ratio=0.25, sampling="fixed"),
]


def _args(cfg: SamplingConfig, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=dtype).add_(0.5).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    return (x, w, b, rm, rv, True, 0.1, 1e-5, config_to_str(cfg))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("op", [sampled_batch_norm_op, sampled_batch_norm_functional_op])
def test_opcheck(op, cfg: SamplingConfig) -> None:
    result = torch.library.opcheck(op, _args(cfg))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_full_equals_batch_norm_and_functional_form() -> None:
    x, w, b, rm, rv, *rest = _args(SamplingConfig(), torch.float64)
    y = sampled_batch_norm_op(x, w, b, rm, rv, *rest)
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    torch.testing.assert_close(y, F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close((rm, rv), (rm2, rv2))
    rm3, rv3 = torch.zeros_like(rm), torch.ones_like(rv)
    y3, new_rm, new_rv = sampled_batch_norm_functional_op(x, w, b, rm3, rv3, *rest)
    torch.testing.assert_close((y3, new_rm, new_rv), (y, rm, rv))
    assert torch.equal(rm3, torch.zeros_like(rm))  # the functional form does not mutate


def test_config_string_round_trip() -> None:
    for cfg in CONFIGS:
        text = config_to_str(cfg)
        assert config_from_str(text) == cfg
        assert text == config_to_str(SamplingConfig.from_dict(cfg.to_dict()))
