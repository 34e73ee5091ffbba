"""``bnrewrite diagnose`` on real activations (issue 7, acceptance 3).

A BN ResNet trained for a few epochs on the embedded 8x8 digits; its BatchNorm inputs on real
training batches; estimates from the library's plan and estimators. Asserted:

* BS beats NS: the error that the channels of a layer share (``shared err``, mean over layers) and
  the error of the network's logits with every BN layer sampled. (Per channel, NS and BS draw from
  the same distribution, so their per-channel errors agree in expectation: checked too.)
* The FS lattice beats a single shared contiguous patch at the same sample count: per channel in
  every 8x8 layer (where the lattice's step is 2), on average over layers, and at the logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from bnrewrite.apps.datasets import load_digits
from bnrewrite.apps.diagnose import ESTIMATORS, estimator_plan, run_diagnostics, train_bn_model
from bnrewrite.cli import main
from bnrewrite.plan import sample_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    ds = load_digits()
    model = train_bn_model(ds, epochs=3, seed=0, width=16)
    return run_diagnostics(model, ds, ratio=0.25, groups=4, batch_size=64, batches=2, draws=30)


def _by(result, estimator):
    return {r["layer"]: r for r in result["layers"] if r["estimator"] == estimator}


def _avg(result, estimator, key):
    rows = _by(result, estimator).values()
    return sum(r[key] for r in rows) / len(rows)


def test_equal_sample_budget_in_every_layer(result):
    layers = _by(result, "ns")
    assert len(layers) == 9  # stem + 3 blocks x 2 + 2 shortcuts
    for layer in layers:
        counts = {_by(result, e)[layer]["count"] for e in ESTIMATORS}
        assert len(counts) == 1, (layer, counts)
        r = layers[layer]
        assert r["count"] * 4 == r["full_count"]


def test_bs_estimates_better_than_ns(result):
    net = result["network"]
    assert net["bs"] < 0.9 * net["ns"], net
    assert _avg(result, "bs", "shared_err") < 0.8 * _avg(result, "ns", "shared_err")
    # per channel the two take the same distribution of samples: same error up to noise
    for key in ("mean_err", "var_err"):
        ns, bs = _avg(result, "ns", key), _avg(result, "bs", key)
        assert abs(ns - bs) < 0.1 * ns, (key, ns, bs)


def test_fs_lattice_estimates_better_than_single_patch(result):
    fs, patch = _by(result, "fs"), _by(result, "fs_patch")
    wide = [layer for layer, r in fs.items() if r["shape"][2] == 8]
    assert len(wide) == 3
    for layer in wide:
        assert fs[layer]["mean_err"] < 0.6 * patch[layer]["mean_err"], layer
        assert fs[layer]["var_err"] < 0.9 * patch[layer]["var_err"], layer
    for key in ("mean_err", "var_err", "shared_err"):
        assert _avg(result, "fs", key) < _avg(result, "fs_patch", key), key
    assert result["network"]["fs"] < result["network"]["fs_patch"], result["network"]


def test_patch_baseline_is_the_fs_plan_with_step_one():
    fs = sample_plan((64, 16, 8, 8), __import__("bnrewrite").SamplingConfig("fs", 0.25))
    patch = estimator_plan("fs_patch", (64, 16, 8, 8), 0.25, 4)
    assert [(a.count, a.step) for a in fs.axes] == [(4, 2), (4, 2)]
    assert [(a.count, a.step) for a in patch.axes] == [(4, 1), (4, 1)]
    assert patch.groups == 1 and patch.count() == fs.count()
    with pytest.raises(ValueError, match="unknown estimator"):
        estimator_plan("xs", (64, 16, 8, 8), 0.25, 4)


def test_diagnose_cli_quick_writes_table_plot_csv_json(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--quick", "--draws", "3", "--out", str(out)]) == 0
    for name in ("diagnose.md", "diagnose.csv", "diagnose.json", "diagnose.png"):
        assert (out / name).is_file(), name
    assert (out / "diagnose.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((out / "diagnose.json").read_text())
    assert set(data["network"]) == set(ESTIMATORS)
    assert {r["estimator"] for r in data["layers"]} == set(ESTIMATORS)
    table = (out / "diagnose.md").read_text()
    assert "patch*" in table and "mean over layers" in table
    assert "network err" in capsys.readouterr().out


def test_diagnose_reads_the_demo_checkpoint(tmp_path):
    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "--methods", "bn", "--epochs", "1", "--out", str(demo)]) == 0
    out = tmp_path / "diag"
    argv = ["diagnose", "--checkpoint", str(demo / "bn_model.pt"), "--draws", "2"]
    assert main([*argv, "--batches", "1", "--out", str(out)]) == 0
    assert "checkpoint" in json.loads((out / "diagnose.json").read_text())["title"]


def test_diagnose_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["diagnose", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a bn_model.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_diagnose_on_a_local_cifar10_copy(tmp_path):
    import pickle

    import numpy as np

    from bnrewrite.apps.datasets import CIFAR10_FILES

    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        batch = {b"data": rng.integers(0, 256, (20, 3072), np.uint8), b"labels": [0, 1] * 10}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    out = tmp_path / "diag"
    argv = ["diagnose", "--quick", "--data-dir", str(tmp_path), "--draws", "2", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "diagnose.json").read_text())
    assert data["layers"][0]["shape"] == [64, 8, 32, 32]  # stem BN, 32x32 maps, quick width 8
