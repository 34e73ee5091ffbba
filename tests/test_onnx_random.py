"""Random sampling in ONNX (issue 5, acceptance 3): fresh samples at every run unless seeded, the
in-graph index arithmetic is the plan's, and the estimates are unbiased over many runs.

Bound: over ``T`` runs the average of ``mu_hat`` is within ``4 * sd(mu_hat) / sqrt(T)`` (plus
float32 rounding) of the full-batch mean, channel by channel -- a 4-sigma z-test, false alarm
rate about 6e-5 per channel. Every element is sampled with the same probability, so the sample
means of ``x`` and ``x**2`` are unbiased and the biased sample variance has expectation
``E[var_hat] = var - Var(mu_hat)`` exactly; its average is checked against that with the same
4-sigma bound (plus the error of the estimated ``Var(mu_hat)``). The seed is fixed so that the
test is reproducible.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_onnx_support import make_bn_model, ort_session

import bnrewrite.onnx as bo
from bnrewrite import SamplingConfig


def _stats_model(shape, cfg):
    """BN with momentum 0: the running-statistics outputs are ``mu_hat`` and ``var_hat``."""
    model, p = make_bn_model(shape, momentum=0.0)
    return bo.rewrite(model, cfg), p


def _runs(sess, x, times: int) -> list[list[np.ndarray]]:
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x}) for _ in range(times)]


def test_outputs_differ_between_runs_unless_seeded() -> None:
    shape = (8, 8, 8, 8)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    unseeded = bo.rewrite(make_bn_model(shape)[0], SamplingConfig(method="fs", ratio=1 / 16))
    ort.set_seed(12345)
    a = _runs(ort_session(unseeded), x, 3)
    assert not np.array_equal(a[0][0], a[1][0]) and not np.array_equal(a[1][0], a[2][0])
    # Unseeded kernels start from onnxruntime's process-wide seed: a new value, new samples.
    ort.set_seed(54321)
    b = _runs(ort_session(unseeded), x, 1)
    assert not np.array_equal(a[0][0], b[0][0])

    seeded = bo.rewrite(make_bn_model(shape)[0], SamplingConfig(method="fs", ratio=1 / 16, seed=7))
    s1, s2 = _runs(ort_session(seeded), x, 3), _runs(ort_session(seeded), x, 3)
    for r1, r2 in zip(s1, s2):  # every new session replays the same sequence of samples
        for o1, o2 in zip(r1, r2):
            np.testing.assert_array_equal(o1, o2)
    assert not np.array_equal(s1[0][0], s1[1][0])  # ... and runs within a session still differ
    ort.set_seed(999)  # the node's own seed wins over onnxruntime's global one
    np.testing.assert_array_equal(_runs(ort_session(seeded), x, 1)[0][0], s1[0][0])
    other = bo.rewrite(make_bn_model(shape)[0], SamplingConfig(method="fs", ratio=1 / 16, seed=8))
    assert not np.array_equal(_runs(ort_session(other), x, 1)[0][0], s1[0][0])


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_random_batch_sampling_takes_cyclic_windows_per_group(groups: int) -> None:
    """Every mu_hat is the mean of rows ``(o + j) mod N``, with one ``o`` per channel group."""
    n, c, k = 8, 6, 3
    x = np.random.default_rng(2).standard_normal((n, c, 3, 3)).astype(np.float32)
    # min_count=1: the windows themselves are under test (the floor would take every row)
    cfg = SamplingConfig(method="bs", ratio=k / n, groups=groups, min_count=1)
    model, _ = _stats_model((n, c, 3, 3), cfg)
    row_means = x.astype(np.float64).mean(axis=(2, 3))  # (N, C)
    windows = np.stack(
        [row_means[[(o + j) % n for j in range(k)]].mean(axis=0) for o in range(n)]
    )  # (offset, C)
    group_of = [ch * groups // c for ch in range(c)]
    seen = set()
    for _y, mu, _var in _runs(ort_session(model), x, 40):
        offsets = [int(np.argmin(np.abs(windows[:, ch] - mu[ch]))) for ch in range(c)]
        for ch in range(c):
            assert abs(windows[offsets[ch], ch] - mu[ch]) < 1e-5
        for ch in range(c):  # one offset per group
            assert offsets[ch] == offsets[group_of.index(group_of[ch])]
        seen.update(offsets)
    assert len(seen) == n  # every offset in [0, N) occurs


@pytest.mark.parametrize(
    "shape,method,ratio",
    # (32, 6) takes rows: "fs" on a (N, C) input takes every row (DESIGN.md), "bs" samples them
    [((4, 8, 16, 16), "fs", 1 / 16), ((16, 8, 4, 4), "bs", 1 / 4), ((32, 6), "bs", 1 / 8)],
)
def test_random_estimates_are_unbiased(shape, method, ratio) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 2 + rng.standard_normal(
        (1, shape[1]) + (1,) * (len(shape) - 2)
    )
    if (
        len(shape) == 4 and shape[2] >= 16
    ):  # an image with empty borders: the estimate must not be biased by them
        x[:, :, :4, :] = 0
        x[:, :, -4:, :] = 0
        x[:, :, :, :4] = 0
        x[:, :, :, -4:] = 0
    x = x.astype(np.float32)
    model, _ = _stats_model(shape, SamplingConfig(method=method, ratio=ratio, seed=11))
    runs = 3000
    outs = _runs(ort_session(model), x, runs)
    mu = np.stack([o[1] for o in outs]).astype(np.float64)
    var = np.stack([o[2] for o in outs]).astype(np.float64)
    axes = (0, *range(2, len(shape)))
    full_mu, full_var = x.astype(np.float64).mean(axis=axes), x.astype(np.float64).var(axis=axes)
    bound = 4 * mu.std(axis=0) / np.sqrt(runs) + 1e-6
    assert np.all(np.abs(mu.mean(axis=0) - full_mu) <= bound), (mu.mean(axis=0) - full_mu, bound)
    assert np.all(mu.std(axis=0) > 0)  # the samples really vary
    # The sample means of x and of x**2 are both unbiased, so E[var_hat] = var - Var(mu_hat).
    expected_var = full_var - mu.var(axis=0)
    bound = 4 * var.std(axis=0) / np.sqrt(runs) + 4 * np.sqrt(2 / runs) * mu.var(axis=0) + 1e-5
    assert np.all(np.abs(var.mean(axis=0) - expected_var) <= bound)


def test_unseeded_layers_draw_different_positions() -> None:
    """Two identical unseeded BN layers in one graph must not take the same sample."""
    import onnx

    shape = (8, 4, 8, 8)
    model, _ = make_bn_model(shape, momentum=0.0)
    second = onnx.helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "mean", "var"],
        ["Y2", "rm2", "rv2"],
        name="bn2",
        training_mode=1,
        momentum=0.0,
    )
    model.graph.node.append(second)
    for name, ref in (("rm2", "running_mean"), ("rv2", "running_var")):
        info = onnx.ValueInfoProto()
        info.CopyFrom(next(o for o in model.graph.output if o.name == ref))
        info.name = name
        model.graph.output.append(info)
    out, report = bo.rewrite_with_report(model, SamplingConfig(method="bs", ratio=1 / 4))
    assert report.rewritten == ["bn", "bn2"]
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    runs = _runs(ort_session(out), x, 20)
    same = sum(np.array_equal(r[1], r[4]) for r in runs)  # mu_hat of bn vs bn2
    assert same < 10


@pytest.mark.parametrize("opset,outputs", [(11, 5), (13, 5), (15, 3), (18, 3)])
@pytest.mark.parametrize("method,groups", [("bs", 4), ("fs", 4), ("ns", 1), ("fs", 1)])
def test_random_sampling_at_every_opset(opset, outputs, method, groups) -> None:
    """The random subgraph is valid ONNX at each opset form and mu_hat stays a sample mean."""
    import onnx

    shape = (8, 6, 6, 6)
    model, _ = make_bn_model(shape, opset=opset, outputs=outputs, momentum=0.0)
    out = bo.rewrite(model, SamplingConfig(method=method, ratio=0.25, groups=groups, seed=3))
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    for y, mu, *_ in _runs(ort_session(out), x, 3):
        assert y.shape == shape and np.all(np.isfinite(y))
        assert np.all(mu >= x.min(axis=(0, 2, 3))) and np.all(mu <= x.max(axis=(0, 2, 3)))


def test_random_feature_sampling_lattice_per_row_and_group() -> None:
    """fs on (2, C, 6, 6) with ratio 1/4: per axis 3 of 6 positions with step 2, so a row's
    lattice is the even or the odd positions of each axis. Row 0 holds ``h * 6 + w``, row 1 the
    same times 100, every channel alike: ``mu_hat`` decodes the lattice of both rows. Channels of
    one group take the same lattice; rows draw their own (both equal and different phases occur)."""
    h = np.arange(6, dtype=np.float64)
    base = h[:, None] * 6 + h[None, :]
    c, groups = 4, 2
    x = np.stack([np.broadcast_to(base, (c, 6, 6)), np.broadcast_to(base * 100, (c, 6, 6))])
    x = x.astype(np.float32)
    lattice = {(ph, pw): base[ph::2, pw::2].mean() for ph in (0, 1) for pw in (0, 1)}
    decode = {
        (a, b): (lattice[a] + 100 * lattice[b]) / 2 for a in lattice for b in lattice
    }  # (row-0 phase, row-1 phase) -> mu_hat
    cfg = SamplingConfig(method="fs", ratio=1 / 4, groups=groups, seed=1, min_count=1)
    model, _ = _stats_model(x.shape, cfg)
    same_phase = other_phase = 0
    for _y, mu, _var in _runs(ort_session(model), x, 30):
        phases = []
        for ch in range(c):
            key = min(decode, key=lambda k: abs(decode[k] - mu[ch]))
            assert abs(decode[key] - mu[ch]) < 1e-3
            phases.append(key)
        assert phases[0] == phases[1] and phases[2] == phases[3]  # groups {0, 1}, {2, 3}
        for key in (phases[0], phases[2]):
            same_phase += key[0] == key[1]
            other_phase += key[0] != key[1]
    assert same_phase and other_phase
