"""``bnrewrite demo``: a seconds-long run writes the table, plot, CSV and JSON (issue 7, acceptance 1
and 4); the CIFAR-10 pickle loader on a fake local copy; CLI errors; the summary arithmetic."""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnrewrite import SampledBatchNorm2d, SamplingConfig
from bnrewrite.apps.datasets import CIFAR10_FILES, load_cifar10, load_digits
from bnrewrite.apps.demo import (
    DEFAULT_METHODS,
    GAP_TARGETS,
    MICRO_METHODS,
    MethodUnavailable,
    RunResult,
    apply_method,
    build_model,
    format_table,
    fx_available,
    method_config,
    parse_methods,
    summarize,
    vdn_available,
)
from bnrewrite.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(out: Path, methods: list[str], epochs: int, seeds: int) -> dict:
    for name in ("table.md", "summary.csv", "curves.csv", "results.json", "convergence.png"):
        assert (out / name).is_file(), name
    png = (out / "convergence.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    summary = _read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == methods
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["summary"]] == methods
    assert data["meta"]["epochs"] == epochs and len(data["meta"]["seeds"]) == seeds
    assert data["meta"]["date_utc"] and data["meta"]["machine"]
    table = (out / "table.md").read_text()
    curves = _read_csv(out / "curves.csv")
    for row in data["summary"]:
        m = row["method"]
        runs = [r for r in data["runs"] if r["method"] == m]
        assert len(runs) == seeds
        if m in ("vdn", "fs_vdn") and not vdn_available():
            assert "not available yet" in row["status"] and row["acc_mean"] is None
            assert "not available yet" in table
            continue
        assert row["status"] == "ok", row
        assert 0.0 <= row["acc_mean"] <= 100.0 and row["steps_per_s"] > 0
        assert (row["gap_to_bn"] == 0.0) if m == "bn" else math.isfinite(row["gap_to_bn"])
        for r in runs:
            assert len(r["test_acc"]) == epochs and len(r["train_loss"]) == epochs
            assert r["final_test_acc"] == r["test_acc"][-1]
        assert len([c for c in curves if c["method"] == m]) == epochs * seeds
        assert f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}" in table
    return data


@pytest.mark.slow
def test_demo_quick_writes_table_plot_csv_json(tmp_path, capsys, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("bnrewrite demo must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # offline: embedded data only
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = _check_outputs(out, list(DEFAULT_METHODS), epochs=2, seeds=1)
    printed = capsys.readouterr().out
    assert "| method |" in printed and "GroupNorm" in printed and "BS" in printed
    # the BN model of the first seed, for `bnrewrite diagnose --checkpoint`
    ckpt = torch.load(out / "bn_model.pt", weights_only=True)
    assert ckpt["dataset"] == "digits" and "state_dict" in ckpt
    assert data["meta"]["quick"] is True


@pytest.mark.slow
def test_demo_micro_batch_mode(tmp_path):
    """--batch-size 2: BN vs VDN vs FS+VDN vs GroupNorm by default (acceptance 4)."""
    out = tmp_path / "micro"
    rc = main(["demo", "--quick", "--batch-size", "2", "--epochs", "1", "--out", str(out)])
    assert rc == 0
    data = _check_outputs(out, list(MICRO_METHODS), epochs=1, seeds=1)
    assert data["meta"]["batch_size"] == 2
    bn = next(r for r in data["runs"] if r["method"] == "bn")
    assert bn["steps"] == 64 // 2  # quick micro-batch subset: 64 training images, batches of 2


def _fake_cifar(root: Path, per_file: int = 20) -> None:
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        d = {
            b"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=per_file)],
        }
        with (root / name).open("wb") as f:
            pickle.dump(d, f)


def test_cifar10_loader_reads_pickle_layout(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    _fake_cifar(sub)
    ds = load_cifar10(tmp_path)  # finds the standard sub-folder
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.allclose(ds.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert ds.in_channels == 3 and ds.image_size == (32, 32)


@pytest.mark.slow
def test_demo_runs_on_local_cifar10_copy(tmp_path):
    _fake_cifar(tmp_path)
    out = tmp_path / "out"
    rc = main(
        ["demo", "--quick", "--data-dir", str(tmp_path), "--methods", "bn,bs,fs", "--epochs", "1"]
        + ["--out", str(out), "--no-progress"]
    )
    assert rc == 0
    data = _check_outputs(out, ["bn", "bs", "fs"], epochs=1, seeds=1)
    assert data["meta"]["dataset"].startswith("cifar10")


def test_digits_are_embedded_and_split():
    ds = load_digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert set(ds.y_test.tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "bn,xs"], "unknown method 'xs'"),
        (["--ratio", "bs=2"], "ratio must be in (0, 1]"),
        (["--ratio", "vdn=1/2"], "has no ratio"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--data-dir", "/nonexistent/cifar"], "is not a directory"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "3"], "must split into --nproc 3 equal shares"),
    ],
)
def test_demo_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    rc = main(["demo", "--quick", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_data_dir_without_cifar_files_is_a_clear_error(tmp_path, capsys):
    rc = main(["demo", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "python-pickle layout" in err and "never downloads" in err
    assert not (tmp_path / "o").exists()


def test_default_and_micro_method_lists():
    assert parse_methods(None, 64) == list(DEFAULT_METHODS)
    assert DEFAULT_METHODS == ("bn", "ns", "bs", "fs", "vdn", "fs_vdn", "budget", "gn")
    assert parse_methods(None, 2) == ["bn", "vdn", "fs_vdn", "gn"]
    assert parse_methods("full, BS,groupnorm,bs", 64) == ["bn", "bs", "gn"]


def test_default_ratios_leave_positions_on_8x8_maps():
    """fs 1/4 keeps a 4x4 lattice (stride 2) at 8x8 and at least one position at 2x2."""
    from bnrewrite.plan import sample_plan

    cfg = method_config("fs")
    assert cfg.ratio == 0.25
    axes = sample_plan((64, 16, 8, 8), cfg).axes
    assert [(a.count, a.step) for a in axes] == [(4, 2), (4, 2)]
    assert [a.count for a in sample_plan((64, 64, 2, 2), cfg).axes] == [1, 1]
    assert sample_plan((64, 16, 8, 8), method_config("bs")).count() == 8 * 64


def test_apply_method_module_form_converts_batchnorm():
    ds = load_digits().subset(64, 16)
    model = apply_method(build_model("bs", ds), method_config("bs"), via="module")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SampledBatchNorm2d) for m in bns)
    assert all(m.config == SamplingConfig(method="bs", ratio=1 / 8) for m in bns)
    gn = build_model("gn", ds)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    with pytest.raises(ValueError, match="via must be one of"):
        apply_method(build_model("bs", ds), method_config("bs"), via="onnx")


@pytest.mark.skipif(not fx_available(), reason="FX pass not installed")
def test_apply_method_fx_pass_matches_module_form():
    """The FX pass and convert_ are the same math: same loss and gradients on the same RNG draw."""
    ds = load_digits().subset(64, 16)
    x, y = ds.x_train[:64], ds.y_train[:64]
    losses, grads = [], []
    for via in ("fx", "module"):
        torch.manual_seed(0)
        model = apply_method(build_model("fs", ds), method_config("fs"), via=via)
        assert isinstance(model, torch.fx.GraphModule) == (via == "fx")
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_apply_method_vdn():
    ds = load_digits().subset(64, 16)
    model = build_model("vdn", ds)
    if not vdn_available():
        with pytest.raises(MethodUnavailable, match="not available yet"):
            apply_method(model, method_config("vdn"))
        return
    gm = apply_method(model, method_config("vdn"))
    assert gm.train()(ds.x_train[:2]).shape == (2, 10)  # virtual rows stripped from the output
    assert gm.eval()(ds.x_train[:3]).shape == (3, 10)


def test_summary_gap_and_targets():
    def rr(method: str, accs: list[float]) -> list[RunResult]:
        return [
            RunResult(method, s, "ok", test_acc=[a], steps=10, train_seconds=1.0)
            for s, a in enumerate(accs)
        ]

    results = rr("bn", [98.0, 99.0]) + rr("bs", [97.0, 98.0]) + rr("ns", [94.0, 95.0])
    results.append(RunResult("vdn", 0, "not available yet (x)"))
    rows = {r["method"]: r for r in summarize(results, ["bn", "bs", "ns", "vdn"])}
    assert rows["bn"]["acc_mean"] == 98.5 and rows["bn"]["gap_to_bn"] == 0.0
    assert rows["bs"]["gap_to_bn"] == pytest.approx(-1.0) and rows["bs"]["within_target"] is True
    assert rows["ns"]["gap_to_bn"] == pytest.approx(-4.0) and rows["ns"]["within_target"] is False
    assert rows["vdn"]["within_target"] is None and rows["vdn"]["status"].startswith("not avail")
    assert rows["bs"]["steps_per_s"] == 10.0
    assert GAP_TARGETS == {"bs": 1.0, "fs": 1.0, "ns": 3.0, "vdn": 3.0}
    table = format_table(list(rows.values()))
    assert "✗ missed" in table and "✓" in table and "n/a" in table


def test_demo_to_a_file_writes_no_progress_bar_noise(tmp_path):
    """``bnrewrite demo > log 2>&1``: plain lines, one per epoch and run, no carriage returns."""
    import subprocess
    import sys

    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        res = subprocess.run(
            [sys.executable, "-m", "bnrewrite", "demo", "--quick", "--methods", "bn,bs",
             "--epochs", "2", "--seeds", "1", "--out", str(tmp_path / "o")],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert res.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text
    progress = [line for line in text.splitlines() if ": step " in line]
    assert len(progress) == 2 * 2  # two methods x two epochs, one seed
    assert all("test_acc=" in line for line in progress)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    import io

    from bnrewrite.apps.demo import _progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    lines = io.StringIO()
    bar = _progress(4, "bs seed 0", True, lines)
    with bar:
        bar.update(4)
        bar.set_postfix(loss="0.5", test_acc="90.0")
    assert lines.getvalue() == "bs seed 0: step 4/4 loss=0.5 test_acc=90.0\n"
    tty = Tty()
    with _progress(4, "bs seed 0", True, tty) as bar:
        bar.update(4)
    assert "\r" in tty.getvalue()  # tqdm redraws in place on a terminal


def test_demo_bn1d_head_and_automatic_budget(tmp_path, capsys):
    """``--head bn1d``: the model has a BatchNorm1d over (N, C); the ``budget`` row trains with
    per-layer overrides and reads less than full BN; ``bs`` reads what its plans say (the floor
    raises the head to 32 of 64 rows)."""
    out = tmp_path / "head"
    argv = ["demo", "--quick", "--head", "bn1d", "--methods", "bn,bs,budget", "--epochs", "1"]
    assert main([*argv, "--budget-target", "0.1", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["summary"]}
    assert rows["bn"]["reads"] == 1.0
    assert 0 < rows["budget"]["reads"] < 1 and rows["budget"]["status"] == "ok"
    assert 0 < rows["bs"]["reads"] < rows["bn"]["reads"]
    run = next(r for r in data["runs"] if r["method"] == "budget")
    assert run["config"]["target"] == 0.1 and "fc.1" in run["config"]["overrides"]
    printed = capsys.readouterr().out
    assert "BatchNorm1d head" in printed and "auto budget" in printed
    ckpt = torch.load(out / "bn_model.pt", weights_only=True)
    assert ckpt["head"] == "bn1d"


def test_demo_nproc_2_is_data_parallel_and_bn_equals_one_process(tmp_path):
    """``--nproc 2``: two spawned gloo ranks under DDP, 32 images each per batch of 64. Full BN
    (the exact SampledSyncBatchNorm, on CPU) gives the single-process BN run's per-epoch training
    loss and test accuracy (the same optimisation, data split across ranks); ``bs`` trains
    through SampledSyncBatchNorm; ``vdn`` is refused with the layer's reason; the BN checkpoint
    loads into the plain model."""
    argv = ["demo", "--quick", "--methods", "bn,bs,vdn,gn", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert main([*argv, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["meta"]["nproc"] == 2 and "2 processes" in two["meta"]["title"]
    assert "SampledSyncBatchNorm (full), DDP over 2 gloo ranks" in two["meta"]["via"]["bn"]
    runs1 = {r["method"]: r for r in one["runs"]}
    runs2 = {r["method"]: r for r in two["runs"]}
    assert runs2["bn"]["train_loss"] == pytest.approx(runs1["bn"]["train_loss"], rel=1e-5)
    assert runs2["bn"]["test_acc"] == runs1["bn"]["test_acc"]
    assert runs2["gn"]["train_loss"] == pytest.approx(runs1["gn"]["train_loss"], rel=1e-5)
    assert runs2["bs"]["status"] == "ok" and math.isfinite(runs2["bs"]["final_test_acc"])
    assert runs2["bs"]["train_loss"][-1] < runs2["bs"]["train_loss"][0]
    assert "not supported across processes" in runs2["vdn"]["status"]
    ckpt = torch.load(tmp_path / "two" / "bn_model.pt", weights_only=True)
    model = build_model("bn", load_digits(), ckpt["width"], 1, ckpt["head"])
    model.load_state_dict(ckpt["state_dict"])  # the plain model's keys
