"""SamplingConfig: defaults, validation messages, dict round trip, ratio parsing."""

from __future__ import annotations

import dataclasses

import pytest

from bnrewrite import SamplingConfig
from bnrewrite.config import METHODS, parse_ratio, take


def test_defaults_are_concrete():
    cfg = SamplingConfig(method="fs")
    assert cfg.ratio == 1 / 16
    assert cfg.groups == 4
    assert cfg.sampling == "random"
    assert cfg.vdn_samples == 2
    assert SamplingConfig(method="ns").groups == 1
    assert SamplingConfig().method == "full"


def test_frozen():
    cfg = SamplingConfig(method="bs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("method", METHODS)
def test_dict_round_trip(method):
    cfg = SamplingConfig(method=method, sampling="fixed", seed=3)
    d = cfg.to_dict()
    assert set(d) == {
        "method", "ratio", "groups", "sampling", "seed", "vdn_samples", "min_count", "virtual"
    }  # fmt: skip
    assert SamplingConfig.from_dict(d) == cfg
    assert SamplingConfig(**d) == cfg


@pytest.mark.parametrize(
    "text,value",
    [("1/16", 1 / 16), (" 1 / 8 ", 0.125), ("0.25", 0.25), (0.5, 0.5), (1, 1.0)],
)
def test_ratio_parses(text, value):
    assert parse_ratio(text) == pytest.approx(value)
    assert SamplingConfig(method="bs", ratio=text).ratio == pytest.approx(value)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'ratoi'") as e:
        SamplingConfig.from_dict({"method": "bs", "ratoi": 0.5})
    assert "known options" in str(e.value)


@pytest.mark.parametrize(
    "kwargs,field,hint",
    [
        ({"method": "sampled"}, "method", "'bs'"),
        ({"method": "bs", "ratio": 0}, "ratio", "(0, 1]"),
        ({"method": "bs", "ratio": 1.5}, "ratio", "(0, 1]"),
        ({"method": "bs", "ratio": "1/0"}, "ratio", "'1/8'"),
        ({"method": "bs", "ratio": "half"}, "ratio", "'1/8'"),
        ({"method": "bs", "ratio": float("nan")}, "ratio", "(0, 1]"),
        ({"method": "bs", "groups": 0}, "groups", "positive integer"),
        ({"method": "bs", "groups": 2.5}, "groups", "positive integer"),
        ({"method": "ns", "groups": 4}, "groups", "method='bs'"),
        ({"method": "bs", "sampling": "stratified"}, "sampling", "'fixed'"),
        ({"method": "bs", "seed": "x"}, "seed", "integer"),
        ({"method": "bs", "seed": -1}, "seed", "[0, 2**63)"),
        ({"method": "vdn", "vdn_samples": 0}, "vdn_samples", "positive integer"),
    ],
)
def test_bad_values_name_field_and_fix(kwargs, field, hint):
    with pytest.raises(ValueError) as e:
        SamplingConfig(**kwargs)
    assert field in str(e.value)
    assert hint in str(e.value)


def test_coerce():
    assert SamplingConfig.coerce(None) == SamplingConfig()
    assert SamplingConfig.coerce("bs") == SamplingConfig(method="bs")
    assert SamplingConfig.coerce({"method": "fs", "ratio": "1/4"}).ratio == 0.25
    with pytest.raises(ValueError, match="SamplingConfig"):
        SamplingConfig.coerce(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "size,frac,expected",
    [(128, 4 / 128, 4), (10, 0.1, 1), (10, 0.05, 1), (7, 1.0, 7), (3, 1 / 3, 1), (100, 0.125, 13)],
)
def test_take(size, frac, expected):
    assert take(size, frac) == expected


def test_full_with_a_ratio_is_a_contradiction():
    """Issue 18, item 9: ``full`` takes every element; a ratio other than 1 is refused."""
    with pytest.raises(ValueError, match="contradicts method 'full'.*drop ratio"):
        SamplingConfig(method="full", ratio=0.5)
    assert SamplingConfig(method="full", ratio=1).ratio == 1.0
    assert SamplingConfig.from_dict(SamplingConfig("full").to_dict()) == SamplingConfig("full")


def test_virtual_rows_default_follows_sampling():
    assert SamplingConfig("vdn").virtual == "running"  # docs/results.md, "VDN at its defaults"
    assert SamplingConfig("vdn", sampling="fixed").virtual == "normal"
    assert SamplingConfig("fs_vdn", sampling="fixed", virtual="running").virtual == "running"
    with pytest.raises(ValueError, match="virtual must be one of 'memory', 'running', 'normal'"):
        SamplingConfig("vdn", virtual="uniform")
