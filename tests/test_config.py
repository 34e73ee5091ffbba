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
        "method", "ratio", "groups", "sampling", "seed", "vdn_samples", "min_count", "virtual",
        "vdn_per_row", "vdn_min_rows",
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


def test_virtual_rows_follow_the_batch_by_default():
    """At their defaults ``vdn`` carries ``max(2, ceil(N / 4))`` virtual rows and ``fs_vdn``
    ``max(2, 6 - N)``; an explicit ``vdn_samples`` is exactly that many unless ``vdn_per_row`` /
    ``vdn_min_rows`` are given too (docs/results.md, "VDN at its defaults")."""
    from bnrewrite.plan import virtual_rows_for_batch

    vdn = SamplingConfig("vdn")
    assert (vdn.vdn_samples, vdn.vdn_per_row, vdn.vdn_min_rows) == (2, 0.25, 0)
    for n, want in [(1, 2), (2, 2), (8, 2), (9, 3), (16, 4), (64, 16), (65, 17), (256, 64)]:
        assert virtual_rows_for_batch(vdn, n) == want, n
    assert virtual_rows_for_batch(vdn, None) == 2  # batch unknown: the minimum
    assert SamplingConfig.from_dict(vdn.to_dict()) == vdn
    assert vdn.replace(seed=1).vdn_per_row == 0.25  # replace keeps the resolved fields
    fs_vdn = SamplingConfig("fs_vdn")
    assert (fs_vdn.vdn_samples, fs_vdn.vdn_per_row, fs_vdn.vdn_min_rows) == (2, 0.0, 6)
    for n, want in [(1, 5), (2, 4), (3, 3), (4, 2), (64, 2)]:
        assert virtual_rows_for_batch(fs_vdn, n) == want, n
    exact = SamplingConfig("vdn", vdn_samples=3)
    assert (exact.vdn_per_row, exact.vdn_min_rows) == (0.0, 0)
    assert virtual_rows_for_batch(exact, 64) == 3 == virtual_rows_for_batch(exact, 1)
    both = SamplingConfig("fs_vdn", vdn_samples=3, vdn_per_row=0.5, vdn_min_rows=8)
    assert [virtual_rows_for_batch(both, n) for n in (1, 4, 6, 64)] == [7, 4, 3, 32]
    assert SamplingConfig("bs").vdn_per_row == 0.0 and SamplingConfig("bs").vdn_min_rows == 0
    assert virtual_rows_for_batch(SamplingConfig("bs"), 64) == 2  # no virtual rows: untouched
    for bad in (-0.1, float("nan"), 17.0, "1/4", True):
        with pytest.raises(ValueError, match="vdn_per_row must be"):
            SamplingConfig("vdn", vdn_per_row=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="vdn_min_rows must be"):
            SamplingConfig("fs_vdn", vdn_min_rows=bad)
