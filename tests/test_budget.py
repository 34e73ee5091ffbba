"""The automatic per-layer budget (issue 16): the chosen plans meet the error target on held-out
batches (errors measured with an independent sampler written here), the JSON round trip into
``rewrite``, ``convert_``, the backend options and the ONNX CLI, and bad input.

The independent sampler follows DESIGN.md / docs/architecture.md: ``bs`` takes, per channel group
(``c * G // C``), ``k`` cyclically consecutive rows from a uniform offset; ``fs`` takes, per group
and per row, a lattice ``(o_i + step_i * j) mod S_i`` (``step_i = S_i // m_i``) from uniform
offsets ``o_i``; ``k`` and ``m_i`` are the plan's counts (the floor included).
"""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import bnrewrite
from bnrewrite import SamplingConfig, sample_plan
from bnrewrite.apps.datasets import load_digits
from bnrewrite.apps.models import small_resnet
from bnrewrite.budget import choose_budget, fraction_read, load_overrides, record_bn_inputs


def _ref_statistics(x: Tensor, cfg: SamplingConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    plan = sample_plan(tuple(x.shape), cfg)
    n, c = x.shape[:2]
    groups = plan.groups
    means, variances = [], []
    for g in range(groups):
        chans = [ch for ch in range(c) if ch * groups // c == g]
        xg = x[:, chans]
        if cfg.method == "bs" and plan.axes:
            k = int(plan.axes[0].count)
            o = int(torch.randint(n, (1,), generator=gen))
            part = xg[[(o + j) % n for j in range(k)]]
            flat = part.transpose(0, 1).reshape(len(chans), -1)
        elif cfg.method == "fs" and plan.axes:
            pieces = []
            for r in range(n):
                row = xg[r]
                for ax in plan.axes:
                    size, m = int(ax.size), int(ax.count)
                    step = size // m
                    o = int(torch.randint(size, (1,), generator=gen))
                    idx = torch.tensor([(o + step * j) % size for j in range(m)])
                    row = row.index_select(ax.axis - 1, idx)
                pieces.append(row.reshape(len(chans), -1))
            flat = torch.cat(pieces, 1)
        else:
            flat = xg.transpose(0, 1).reshape(len(chans), -1)
        means.append(flat.mean(1))
        variances.append(flat.var(1, unbiased=False))
    return torch.cat(means), torch.cat(variances)


def _ref_errors(
    xs: list[Tensor], cfg: SamplingConfig, draws: int, seed: int
) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    m_errs, v_errs = [], []
    for x in xs:
        x = x.double()
        dims = [0, *range(2, x.dim())]
        mu, var = x.mean(dims), x.var(dims, unbiased=False)
        for _ in range(draws):
            m_hat, v_hat = _ref_statistics(x, cfg, gen)
            m_errs.append(float(((m_hat - mu).abs() / var.sqrt()).mean()))
            v_errs.append(float(((v_hat - var).abs() / var).mean()))
    return sum(m_errs) / len(m_errs), sum(v_errs) / len(v_errs)


def _digits_batches(count: int, start: int, batch: int = 64) -> list[Tensor]:
    data = load_digits()
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    return [data.x_train[perm[(start + i) * batch : (start + i + 1) * batch]] for i in range(count)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return small_resnet(1, 10, head="bn1d")


@pytest.mark.parametrize("target", [0.05, 0.1])
def test_chosen_plans_meet_the_target_on_held_out_batches(model, target):
    budget = choose_budget(model, _digits_batches(4, 0), target=target, draws=8)
    held_out = record_bn_inputs(model, _digits_batches(4, 4))
    assert [la.name for la in budget.layers] == list(held_out)
    sampled = 0
    for la in budget.layers:
        if la.config.method == "full":
            continue
        sampled += 1
        m_err, v_err = _ref_errors(held_out[la.name], la.config, draws=6, seed=1)
        assert m_err <= target and v_err <= target, (la.name, la.config, m_err, v_err)
    assert sampled >= 5  # the budget does sample most layers at these targets
    assert 0 < budget.fraction_read() < 1


def test_budget_is_cheapest_meeting_the_target(model):
    """A looser target never reads more; the cheapest candidate that meets a target is chosen
    (the next cheaper one does not meet it on the calibration batches)."""
    batches = _digits_batches(3, 0)
    tight = choose_budget(model, batches, target=0.03, draws=4)
    loose = choose_budget(model, batches, target=0.2, draws=4)
    assert loose.fraction_read() <= tight.fraction_read()
    for a, b in zip(loose.layers, tight.layers, strict=True):
        assert a.count <= b.count


def test_json_round_trip_into_every_entry_point(model, tmp_path):
    budget = choose_budget(model, _digits_batches(2, 0), target=0.1, draws=4)
    path = tmp_path / "budget.json"
    budget.to_json(path)
    overrides = load_overrides(path)
    assert set(overrides) == {la.name for la in budget.layers}
    chosen = {la.name: la.config for la in budget.layers if la.config.method != "full"}
    for name, cfg in chosen.items():
        assert overrides[name] == cfg
    x = _digits_batches(1, 0)[0]

    # rewrite (FX pass): every layer's method as the budget chose
    gm, report = bnrewrite.rewrite(model, "full", overrides=overrides, return_report=True)
    assert dict(report.rewritten) == {n: c.method for n, c in chosen.items()}
    gm(x)

    # convert_: the sampled twins carry the chosen configs; layers mapped to None stay BN
    twin = small_resnet(1, 10, head="bn1d")
    bnrewrite.convert_(twin, "full", overrides=overrides)
    for name, mod in twin.named_modules():
        if name in chosen:
            assert mod.config == chosen[name]
        elif name in overrides:
            assert type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d)

    # the torch.compile backend's options
    from bnrewrite.backend import make_backend, parse_options

    cfg, settings = parse_options({"method": "full", "overrides": str(path)})  # as options=
    assert settings["overrides"] == overrides and cfg.method == "full"
    backend = make_backend(cfg, overrides=settings["overrides"], inner="aot_eager")
    compiled = torch.compile(small_resnet(1, 10, head="bn1d"), backend=backend)
    compiled(x)
    torch._dynamo.reset()
    assert dict(backend.reports[0].rewritten) == {n: c.method for n, c in chosen.items()}

    # the ONNX CLI: nodes named by module path get the chosen configs
    pytest.importorskip("onnxruntime")
    import onnx

    import bnrewrite.onnx as bonnx
    from bnrewrite.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = bonnx.export(small_resnet(1, 10, head="bn1d"), (x,), io.BytesIO())
    onnx.save(proto, src)
    assert main(["onnx", str(src), str(dst), "--method", "bs", "--overrides", str(path)]) == 0
    out = onnx.load(dst)
    kept = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert len(kept) == len(overrides) - len(chosen)


def test_fraction_read_counts_plans():
    shapes = {"a": (64, 8, 8, 8), "b": (64, 128)}
    # fs 1/16 on 8x8: a 2x2 lattice of 4 of 64 positions; (N, C): every row
    want = (64 * 4 * 8 + 64 * 128) / (64 * 64 * 8 + 64 * 128)
    assert fraction_read(shapes, "fs") == pytest.approx(want)
    assert fraction_read(shapes, "fs", {"b": None}) == pytest.approx(want)
    assert fraction_read(shapes, "full") == 1.0


def test_bad_overrides_files(tmp_path):
    with pytest.raises(ValueError, match="overrides file not found"):
        load_overrides(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_overrides(bad)
    bad.write_text(json.dumps({"layer1": {"method": "fss"}}))
    with pytest.raises(ValueError, match="layer 'layer1': method must be one of"):
        load_overrides(bad)
    with pytest.raises(ValueError, match="needs at least one calibration batch"):
        choose_budget(nn.Sequential(nn.BatchNorm1d(3)), [])
    assert math.isfinite(fraction_read({"a": (4, 3)}, "bs"))


def test_budget_cli_writes_overrides_and_checks_held_out(tmp_path, capsys):
    from bnrewrite.cli import main

    out = tmp_path / "budget.json"
    assert main(["budget", "--quick", "--target", "0.08", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "-> target 0.08 met" in printed and "fs 1/16" in printed
    overrides = load_overrides(out)
    assert "layers.0.bn1" in overrides
    assert main(["budget", "--quick", "--target", "0", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--target must be a positive" in err and not (tmp_path / "x.json").exists()
    missing = tmp_path / "nowhere" / "b.json"
    assert main(["budget", "--quick", "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_onnx_cli_bad_overrides_file_is_one_line_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    import bnrewrite.onnx as bonnx
    from bnrewrite.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = bonnx.export(small_resnet(1, 10, width=4), (torch.randn(8, 1, 8, 8),), io.BytesIO())
    onnx.save(proto, src)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bn": {"method": "vdn"}}))
    for path, message in [(tmp_path / "none.json", "not found"), (bad, "needs virtual rows")]:
        rc = main(["onnx", str(src), str(dst), "--method", "bs", "--overrides", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not dst.exists()
