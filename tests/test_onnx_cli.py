"""``bnrewrite onnx IN OUT ...`` through ``python -m bnrewrite`` (issue 5, acceptances 2 and 4).

Acceptance 2: a model exported by torch's TorchScript exporter (``dynamo=False``,
``training=TRAINING``, opset 15) and rewritten by the CLI runs in onnxruntime and equals the
independent reference; the original file still computes full BN. Acceptance 4: every bad input is
one line on stderr, a non-zero exit, no traceback and no output file. Also: external data.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from test_onnx_support import (
    ResNetish,
    count_ops,
    make_bn_model,
    ort_run,
    randomize_bn,
    reference_model,
)

import bnrewrite.onnx as bo


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnrewrite", "onnx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _legacy_export(model: torch.nn.Module, x: torch.Tensor, path, **save_kw) -> None:
    """torch's own legacy export, then the BN running-statistics outputs declared as graph outputs
    (the exporter leaves them dangling) so that the test can read them."""
    tmp = str(path) + ".tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            tmp,
            dynamo=False,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            opset_version=15,
            input_names=["x"],
        )
    proto = onnx.load(tmp)
    os.unlink(tmp)
    bo.declare_running_stats_outputs(proto)
    onnx.save_model(proto, str(path), **save_kw)


def _model_and_reference_input():
    torch.manual_seed(3)
    model = randomize_bn(ResNetish())
    x = torch.randn(8, 3, 12, 12)
    return model, x


def _reference(model, proto: onnx.ModelProto, x, method: str, ratio: float):
    """float64 reference whose running statistics start from the file's initializers (the
    legacy exporter stores the buffers after its tracing step)."""
    model = copy.deepcopy(model)
    inits = {i.name: onnx.numpy_helper.to_array(i).copy() for i in proto.graph.initializer}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in inits:
                buf.copy_(torch.from_numpy(inits[name]))
    ref, refs = reference_model(model, method, ratio)
    with torch.no_grad():
        y = ref(x.double()).numpy()
    return y, dict(refs)


def _check_stats(outputs: dict, proto: onnx.ModelProto, refs: dict) -> None:
    """Running-statistics outputs (ONNX rule, biased variance) against the reference layers."""
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        layer = refs[node.input[3].rsplit(".", 1)[0]]
        np.testing.assert_allclose(outputs[node.output[1]], layer.new_rm.numpy(), atol=1e-5)
        np.testing.assert_allclose(outputs[node.output[2]], layer.new_rv.numpy(), atol=1e-5)
        checked += 1
    assert checked == len(refs) == 4


def test_legacy_export_rewritten_by_cli_equals_reference(tmp_path) -> None:
    model, x = _model_and_reference_input()
    src, dst = tmp_path / "train.onnx", tmp_path / "sampled.onnx"
    _legacy_export(model, x, src)
    original = onnx.load(str(src))
    original_bytes = src.read_bytes()

    done = _cli(src, dst, "--method", "fs", "--ratio", "1/4", "--sampling", "fixed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("\n") == 0
    assert "rewrote 4 BatchNormalization node(s), skipped 0" in done.stdout
    assert src.read_bytes() == original_bytes  # the input file is untouched
    assert sorted(os.listdir(tmp_path)) == ["sampled.onnx", "train.onnx"]

    rewritten = onnx.load(str(dst))
    assert count_ops(rewritten, "BatchNormalization") == 0
    onnx.checker.check_model(rewritten, full_check=True)
    onnx.shape_inference.infer_shapes(rewritten, strict_mode=True)

    y_ref, refs = _reference(model, original, x, "fs", 0.25)
    got = ort_run(str(dst), x.numpy())
    np.testing.assert_allclose(got[original.graph.output[0].name], y_ref, rtol=1e-4, atol=1e-4)
    _check_stats(got, original, refs)

    # the original file still computes full BN (onnxruntime's own training BN)
    y_full, refs_full = _reference(model, original, x, "full", 1.0)
    got = ort_run(str(src), x.numpy())
    np.testing.assert_allclose(got[original.graph.output[0].name], y_full, rtol=1e-4, atol=1e-4)
    _check_stats(got, original, refs_full)
    assert not np.allclose(y_full, y_ref, atol=1e-3)  # and the sampled model is not full BN


def test_external_data_model(tmp_path) -> None:
    model, x = _model_and_reference_input()
    src, dst = tmp_path / "ext.onnx", tmp_path / "out.onnx"
    _legacy_export(
        model,
        x,
        src,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    original = onnx.load(str(src))
    done = _cli(src, dst, "--method", "bs", "--ratio", "0.25", "--sampling", "fixed")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == [
        "ext.onnx",
        "ext.onnx.data",
        "out.onnx",
        "out.onnx.data",
    ]
    header = onnx.load(str(dst), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in header.graph.initializer)
    y_ref, refs = _reference(model, original, x, "bs", 0.25)
    got = ort_run(str(dst), x.numpy())
    np.testing.assert_allclose(got[original.graph.output[0].name], y_ref, rtol=1e-4, atol=1e-4)
    _check_stats(got, original, refs)


def _inference_only(path) -> None:
    onnx.save_model(make_bn_model((4, 3, 5, 5), training=False, outputs=1)[0], str(path))


def _corrupt(path) -> None:
    path.write_bytes(b"this is not an ONNX model \x00\x01\x02\xff" * 10)


def _training(path) -> None:
    onnx.save_model(make_bn_model((4, 3, 5, 5))[0], str(path))


BAD = {
    "missing file": (None, ["--method", "bs"], "not found"),
    "corrupt file": (_corrupt, ["--method", "bs"], "ONNX model"),
    "no training BN": (_inference_only, ["--method", "bs"], "inference mode"),
    "bad ratio": (_training, ["--method", "bs", "--ratio", "2"], "ratio must be in (0, 1]"),
    "unknown method": (_training, ["--method", "foo"], "method must be one of"),
}
#: More bad inputs, run in-process through ``bnrewrite.cli.main`` (same code path, no start-up).
MORE_BAD = {
    "unparsable ratio": (_training, ["--method", "fs", "--ratio", "1/x"], "ratio must be"),
    "no method": (_training, [], "--method is required"),
    "no BN at all": (
        lambda p: onnx.save_model(
            onnx.helper.make_model(
                onnx.helper.make_graph(
                    [onnx.helper.make_node("Relu", ["x"], ["y"])],
                    "g",
                    [onnx.helper.make_tensor_value_info("x", 1, [2])],
                    [onnx.helper.make_tensor_value_info("y", 1, [2])],
                )
            ),
            str(p),
        ),
        ["--method", "bs"],
        "has no BatchNormalization",
    ),
    "dynamic shape": (
        lambda p: onnx.save_model(make_bn_model((4, 3, 5, 5), dynamic_batch=True)[0], str(p)),
        ["--method", "bs"],
        "not static",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict:
    """Run every bad case through the CLI at once (each start imports torch: seconds)."""
    procs = {}
    for case, (make, flags, _) in BAD.items():
        folder = tmp_path_factory.mktemp(case.replace(" ", "_"))
        src, dst = folder / "in.onnx", folder / "out.onnx"
        if make is not None:
            make(src)
        before = sorted(os.listdir(folder))
        proc = subprocess.Popen(
            [sys.executable, "-m", "bnrewrite", "onnx", str(src), str(dst), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[case] = (proc, folder, dst, before)
    results = {}
    for case, (proc, folder, dst, before) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, out, err, folder, dst, before)
    return results


@pytest.mark.parametrize("case", list(BAD))
def test_cli_errors(case: str, bad_runs: dict) -> None:
    message = BAD[case][2]
    returncode, out, err, folder, dst, before = bad_runs[case]
    assert returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert lines[0].startswith("bnrewrite onnx: error:")
    assert "Traceback" not in err + out
    assert not dst.exists()
    assert sorted(os.listdir(folder)) == before  # no temporary file left either


@pytest.mark.parametrize("case", list(MORE_BAD))
def test_cli_errors_in_process(case: str, tmp_path, capsys) -> None:
    from bnrewrite.cli import main

    make, flags, message = MORE_BAD[case]
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    make(src)
    assert main(["onnx", str(src), str(dst), *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


@pytest.mark.parametrize(("method", "sampling"), [("vdn", "fixed"), ("fs_vdn", "random")])
def test_cli_vdn_rewrites_the_whole_graph(method: str, sampling: str, tmp_path, capsys) -> None:
    from bnrewrite.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _training(src)
    assert main(["onnx", str(src), str(dst), "--method", method, "--sampling", sampling]) == 0
    assert "rewrote 1 BatchNormalization node(s), skipped 0" in capsys.readouterr().out
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert any(n.op_type == "Concat" for n in out.graph.node)  # virtual rows appended


def test_cli_output_in_a_missing_directory_and_file_mode(tmp_path, capsys) -> None:
    """Issue 18, item 12, for the CLI: one line naming the user's output path, nothing left
    behind; the written model follows the umask (0644 under 022), not 0600."""
    from bnrewrite.cli import main

    src = tmp_path / "in.onnx"
    _training(src)
    assert main(["onnx", str(src), str(tmp_path / "nodir" / "out.onnx"), "--method", "bs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nodir/out.onnx" in err[0] and ".bnrewrite-" not in err[0]
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
    old = os.umask(0o022)
    try:
        assert main(["onnx", str(src), str(tmp_path / "out.onnx"), "--method", "bs"]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "out.onnx").st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize(
    ("flags", "rows"),
    [
        (["--method", "fs_vdn"], 2),  # max(2, 6 - 4)
        (["--method", "vdn"], 2),  # max(2, ceil(4 / 4))
        (["--method", "vdn", "--vdn-per-row", "1.5"], 6),
        (["--method", "fs_vdn", "--vdn-min-rows", "9"], 5),
        (["--method", "vdn", "--vdn-samples", "3"], 3),
    ],
)
def test_cli_virtual_rows_follow_the_batch(flags, rows, tmp_path, capsys) -> None:
    """The CLI's row flags reach the ONNX VDN pass: the ``RandomNormal`` rows it appends to the
    batch of 4 are ``max(vdn_samples, ceil(vdn_per_row * 4), vdn_min_rows - 4)``."""
    from bnrewrite.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _training(src)
    assert main(["onnx", str(src), str(dst), *flags, "--min-count", "1"]) == 0
    out = onnx.load(str(dst))
    randoms = [n for n in out.graph.node if n.op_type == "RandomNormal"]
    assert randoms and all(
        next(a for a in n.attribute if a.name == "shape").ints[0] == rows for n in randoms
    )


def test_cli_bad_vdn_per_row(tmp_path, capsys) -> None:
    from bnrewrite.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _training(src)
    assert main(["onnx", str(src), str(dst), "--method", "vdn", "--vdn-per-row", "-1"]) == 2
    assert "vdn_per_row must be in [0, 16]" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
