"""``SamplingConfig``: which few data a BatchNorm layer takes its statistics from.

A config names a method and its budget; it holds no tensors and knows no shapes. The sample plan
(:mod:`bnrewrite.plan`) turns a config and an input shape into concrete sizes.

Methods (Chen et al., TNNLS 2021):

* ``full``   -- every element (equals PyTorch's BatchNorm).
* ``ns``     -- naive sampling: ``k = take(N, ratio)`` whole samples, the same for every channel.
* ``bs``     -- batch sampling: ``k`` whole samples; each of ``groups`` channel groups draws its own.
* ``fs``     -- feature sampling: about ``ratio`` of every feature map's positions, for all samples;
  each channel group draws its own positions.
* ``vdn``    -- virtual dataset normalisation: statistics from the virtual rows only; the graph
  carries ``max(vdn_samples, ceil(N * vdn_per_row), vdn_min_rows - N)`` of them for a batch of
  ``N`` (default ``max(2, ceil(N / 4))``: each is one more sample through the whole network).
* ``fs_vdn`` -- the ``fs`` elements of the real rows together with every element of the virtual rows
  (default ``max(2, 6 - N)`` virtual rows).

``take(size, f) = max(1, min(size, ceil(size * f - 1e-9)))``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "METHODS",
    "SAMPLINGS",
    "VIRTUALS",
    "DEFAULT_VDN_MIN_ROWS",
    "DEFAULT_VDN_PER_ROW",
    "SamplingConfig",
    "parse_ratio",
    "select_config",
    "take",
]

METHODS: tuple[str, ...] = ("full", "ns", "bs", "fs", "vdn", "fs_vdn")
SAMPLINGS: tuple[str, ...] = ("random", "fixed")
#: Where ``vdn`` / ``fs_vdn`` virtual rows come from: ``memory`` -- real inputs of earlier calls,
#: drawn from a ring of the last 64 (standard normal until one was seen); ``running`` --
#: ``mean + std * z`` with the per-feature moments of the real inputs of earlier calls;
#: ``normal`` -- plain standard normal ``z``. Default: ``running`` for random sampling (measured
#: best on MNIST and Fashion-MNIST at batch 64 and batch 2, docs/results.md "VDN at its
#: defaults"; it replaced ``memory``, chosen on 8x8 digits), ``normal`` for fixed sampling (its
#: rows are the same on every call).
VIRTUALS: tuple[str, ...] = ("memory", "running", "normal")

#: Default ratio per method: 1/8 of the batch for ns/bs, 1/16 of the spatial extent for fs/fs_vdn.
DEFAULT_RATIO: dict[str, float] = {
    "full": 1.0,
    "ns": 0.125,
    "bs": 0.125,
    "fs": 0.0625,
    "vdn": 1.0,
    "fs_vdn": 0.0625,
}
#: Default number of channel groups that sample independently (multi-way decorrelation).
DEFAULT_GROUPS = 4
#: Default number of virtual rows for vdn / fs_vdn (at least; see ``DEFAULT_VDN_PER_ROW``).
DEFAULT_VDN_SAMPLES = 2
#: Default virtual rows per real row when ``vdn_samples`` is left to its default: ``vdn`` carries
#: ``max(2, ceil(N / 4))`` rows for a batch of ``N`` (16 at batch 64: within 0.4 and 1.0 points of
#: BN on MNIST and Fashion-MNIST where 2 rows lost 0.6 and 2.0; docs/results.md "VDN at its
#: defaults"); ``fs_vdn`` keeps 2 (its real rows' ``fs`` sample already gives the statistics most
#: of their values; more rows measured no better).
DEFAULT_VDN_PER_ROW: dict[str, float] = {"vdn": 0.25}
#: Default least number of rows, real and virtual together, when ``vdn_samples`` is left to its
#: default: ``fs_vdn`` carries ``max(2, 6 - N)`` virtual rows (4 at batch 2, where its 2 rows were
#: 0.06 points below BN on MNIST and 4 rows 0.30 above; from batch 4 on 2 rows, which at batch 64
#: were within 0.2 of BN where 3 or 4 rows lost 0.8-1.3 on Fashion-MNIST).
DEFAULT_VDN_MIN_ROWS: dict[str, int] = {"fs_vdn": 6}
#: Default floor: no channel's statistics from fewer values than this (or from all of them, when
#: there are fewer). Chosen from measurements on real data (docs/results.md, "The floor").
DEFAULT_MIN_COUNT = 32


def take(size: Any, fraction: float) -> Any:
    """``max(1, min(size, ceil(size * fraction - 1e-9)))``; works on ints and on SymInts."""
    if isinstance(size, int):
        return max(1, min(size, math.ceil(size * fraction - 1e-9)))
    # Symbolic sizes (torch.compile with dynamic shapes): exact integer arithmetic on the ratio's
    # fraction, which equals the float formula for every ratio whose fraction has a small
    # denominator (all ratios users type, such as 1/8 or 0.125).

    # No min/max: for 0 < fraction <= 1 and size >= 1, ceil(size * fraction) already lies in
    # [1, size], and a Min/Max in a tensor's symbolic shape defeats Inductor's stride ordering
    # (``cannot determine truth value of Relational``) under dynamic=True.
    frac = Fraction(fraction).limit_denominator(1 << 20)
    if frac == 1:
        return size
    return (size * frac.numerator + frac.denominator - 1) // frac.denominator


def parse_ratio(value: Any) -> float:
    """Parse ``0.125``, ``"0.125"``, ``"1/8"`` or ``Fraction(1, 8)`` into a float.

    Raises ``ValueError`` (never ``TypeError``) for anything else, so that CLI and option-dict users
    get one clear message.
    """
    if isinstance(value, bool):
        raise ValueError(f"ratio must be a number in (0, 1] such as 0.125 or '1/8', got {value!r}")
    if isinstance(value, (int, float, Fraction)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(Fraction(int(num.strip()), int(den.strip())))
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"ratio must be a number in (0, 1] such as 0.125 or '1/8', got {value!r}")


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a BatchNorm layer estimates its statistics. Frozen and validated on construction.

    ``ratio``, ``groups``, ``vdn_samples``, ``min_count``, ``virtual`` and ``vdn_per_row`` left as
    ``None`` take the defaults (``DEFAULT_RATIO``, 4 groups -- 1 for ``ns`` --, 2 virtual samples, a floor of
    ``DEFAULT_MIN_COUNT`` values per channel, ``running`` virtual rows for random sampling and
    ``normal`` ones for fixed sampling, ``DEFAULT_VDN_PER_ROW``, ``DEFAULT_VDN_MIN_ROWS``), so that
    ``SamplingConfig(method="fs")`` is a complete config and ``to_dict`` shows concrete values.

    Virtual rows (``vdn`` / ``fs_vdn``): a graph carries
    ``max(vdn_samples, ceil(N * vdn_per_row), vdn_min_rows - N)`` rows for a batch of ``N`` (a
    term with its field 0 is left out: exactly ``vdn_samples``), raised further by the floor for
    ``vdn``. Defaults: ``vdn`` ``max(2, ceil(N / 4))``, ``fs_vdn`` ``max(2, 6 - N)``. ``N`` is the batch the VDN pass first sees: the example inputs, the graph's
    example values, the ONNX input's batch dim, or the first training call of a traced module;
    the count then stays fixed (the graph's shapes do not change from call to call). An explicit
    ``vdn_samples`` means exactly that many rows unless ``vdn_per_row`` / ``vdn_min_rows`` are
    given too.
    """

    method: str = "full"
    ratio: float | None = None
    groups: int | None = None
    sampling: str = "random"
    seed: int | None = None
    vdn_samples: int | None = None
    min_count: int | None = None
    virtual: str | None = None
    vdn_per_row: float | None = None
    vdn_min_rows: int | None = None

    def __post_init__(self) -> None:
        method = self.method.lower() if isinstance(self.method, str) else self.method
        if method not in METHODS:
            raise ValueError(f"method must be one of {_choices(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "method", method)

        ratio = DEFAULT_RATIO[method] if self.ratio is None else parse_ratio(self.ratio)
        if method == "full" and ratio != 1.0:
            raise ValueError(
                f"ratio={self.ratio!r} contradicts method 'full', which takes every element; "
                f"drop ratio (or ratio=1), or use a sampling method ('bs', 'fs', 'ns')"
            )
        if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
            raise ValueError(
                f"ratio must be in (0, 1] (a fraction of the batch or of the spatial extent, "
                f"such as 0.125 or '1/8'), got {self.ratio!r}"
            )
        object.__setattr__(self, "ratio", ratio)

        groups = (1 if method == "ns" else DEFAULT_GROUPS) if self.groups is None else self.groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer (e.g. 4), got {self.groups!r}")
        if method == "ns" and groups != 1:
            raise ValueError(
                "groups must be 1 for method 'ns' (naive sampling shares one sample across all "
                "channels); use method='bs' for per-group samples"
            )
        object.__setattr__(self, "groups", groups)

        sampling = self.sampling.lower() if isinstance(self.sampling, str) else self.sampling
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"sampling must be one of {_choices(SAMPLINGS)}, got {self.sampling!r}"
            )
        object.__setattr__(self, "sampling", sampling)

        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed!r}")

        vdn_given = self.vdn_samples is not None
        vdn = DEFAULT_VDN_SAMPLES if self.vdn_samples is None else self.vdn_samples
        if isinstance(vdn, bool) or not isinstance(vdn, int) or vdn < 1:
            raise ValueError(
                f"vdn_samples must be a positive integer (e.g. 2), got {self.vdn_samples!r}"
            )
        object.__setattr__(self, "vdn_samples", vdn)

        per_row = self.vdn_per_row
        if per_row is None:
            per_row = 0.0 if vdn_given else DEFAULT_VDN_PER_ROW.get(method, 0.0)
        if isinstance(per_row, bool) or not isinstance(per_row, (int, float)):
            raise ValueError(
                f"vdn_per_row must be a number >= 0 (virtual rows per real row, e.g. 0.25), got "
                f"{self.vdn_per_row!r}"
            )
        per_row = float(per_row)
        if not (0.0 <= per_row <= 16.0) or math.isnan(per_row):
            raise ValueError(
                f"vdn_per_row must be in [0, 16] (virtual rows per real row, e.g. 0.25; 0 keeps "
                f"exactly vdn_samples rows), got {self.vdn_per_row!r}"
            )
        object.__setattr__(self, "vdn_per_row", per_row)

        min_rows = 0 if vdn_given else DEFAULT_VDN_MIN_ROWS.get(method, 0)
        self._set_int(
            "vdn_min_rows",
            min_rows,
            0,
            "an integer >= 0 (rows, real and virtual together, that the statistics see at least, "
            "e.g. 6; 0 turns it off)",
        )
        self._set_int(
            "min_count",
            DEFAULT_MIN_COUNT,
            1,
            f"a positive integer (values per channel at least; 1 turns the floor off, default "
            f"{DEFAULT_MIN_COUNT})",
        )

        virtual = self.virtual
        if virtual is None:
            virtual = "normal" if sampling == "fixed" else "running"
        virtual = virtual.lower() if isinstance(virtual, str) else virtual
        if virtual not in VIRTUALS:
            raise ValueError(
                f"virtual must be one of {_choices(VIRTUALS)} (where vdn / fs_vdn virtual rows come "
                f"from), got {self.virtual!r}"
            )
        object.__setattr__(self, "virtual", virtual)

    def _set_int(self, name: str, default: int, minimum: int, what: str) -> None:
        """Validate the int field ``name`` (``None`` takes ``default``): ``ValueError`` saying it
        must be ``what`` unless it is an int (not a bool) of at least ``minimum``."""
        given = getattr(self, name)
        value = default if given is None else given
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be {what}, got {given!r}")
        object.__setattr__(self, name, value)

    # -- derived properties -------------------------------------------------------------------
    @property
    def uses_virtual_rows(self) -> bool:
        """True for ``vdn`` and ``fs_vdn``: the graph must carry virtual rows."""
        return self.method in ("vdn", "fs_vdn")

    @property
    def is_random(self) -> bool:
        return self.sampling == "random" and self.method != "full"

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- dict round trip ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> SamplingConfig:
        """Build a config from a dict (``torch.compile`` options, CLI flags, a JSON file).

        An unknown key is a ``ValueError`` that names it and lists the known ones.
        """
        options = dict(options or {})
        known = cls.field_names()
        unknown = [k for k in options if k not in known]
        if unknown:
            raise ValueError(
                f"unknown sampling option {unknown[0]!r}; known options are {_choices(known)}"
            )
        return cls(**options)

    @classmethod
    def coerce(cls, config: SamplingConfig | Mapping[str, Any] | str | None) -> SamplingConfig:
        """Accept a config, an options dict, a method name, or ``None`` (``full``)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, str):
            return cls(method=config)
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise ValueError(
            f"config must be a SamplingConfig, a dict of its fields or a method name, "
            f"got {type(config).__name__}"
        )


def _matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def select_config(
    name: str | Sequence[str],
    config: SamplingConfig,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    overrides: Mapping[str, Any] | None,
) -> SamplingConfig | None:
    """The config of the BN layer called ``name`` (or any of several names: an ONNX node's name
    and its module path); ``None`` when it is filtered out. ``include`` / ``exclude``: ``fnmatch``
    patterns; ``overrides``: ``{name or pattern: config, dict or None}``, an exact name first,
    then the first matching pattern; ``None`` keeps the layer's BatchNorm."""
    names = [name] if isinstance(name, str) else [n for n in name if n]
    if include is not None and not _matches(names, include):
        return None
    if exclude and _matches(names, exclude):
        return None
    if overrides:
        for n in names:
            if n in overrides:
                value = overrides[n]
                return None if value is None else SamplingConfig.coerce(value)
        for pattern, value in overrides.items():
            if _matches(names, [pattern]):
                return None if value is None else SamplingConfig.coerce(value)
    return config
