"""The ONNX rule on single-node models: exact tier (full / fixed sampling vs an independent numpy
reference and vs onnxruntime's own training BN), forms (opset 9-13 five outputs, opset 14+,
subgraphs, functions), declines with reasons, checker and shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bnrewrite.passes.onnx_sampled_batchnorm import RewriteReport, sampled_batchnorm_rules
from test_onnx_support import count_ops, make_bn_model, ort_run, ref_batch_norm

import bnrewrite.onnx as bo
from bnrewrite import SamplingConfig

RNG = np.random.default_rng(0)


def _check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)


@pytest.mark.parametrize(
    "opset,outputs", [(15, 3), (14, 3), (17, 3), (18, 3), (13, 5), (9, 5), (11, 5)]
)
def test_full_equals_onnxruntime_training_bn(opset: int, outputs: int) -> None:
    model, _ = make_bn_model((6, 5, 4, 3), opset=opset, outputs=outputs)
    x = RNG.standard_normal((6, 5, 4, 3)).astype(np.float32) * 3 + 1
    expected = ort_run(model, x)
    before = model.SerializeToString()
    out, report = bo.rewrite_with_report(model, "full")
    assert model.SerializeToString() == before  # a ModelProto is not modified
    assert report.rewritten == ["bn"] and report.skipped == []
    assert count_ops(out, "BatchNormalization") == 0
    _check(out)
    got = ort_run(out, x)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


CASES = [
    ((8, 6, 5, 7), "bs", 0.25),
    ((8, 6, 5, 7), "ns", 0.5),
    ((8, 6, 5, 7), "fs", 1 / 4),
    ((3, 4, 9, 10), "fs", 1 / 16),
    ((16, 12), "bs", 0.25),
    ((16, 12), "fs", 0.125),  # (N, C): fs is bs
    ((4, 3, 4, 5, 6), "fs", 1 / 8),
    ((5, 4, 11), "fs", 0.3),
    ((6, 5, 4, 3), "full", 1.0),
]


@pytest.mark.parametrize("shape,method,ratio", CASES)
@pytest.mark.parametrize("opset,outputs", [(15, 3), (13, 5)])
def test_fixed_sampling_equals_reference(shape, method, ratio, opset, outputs) -> None:
    model, p = make_bn_model(shape, opset=opset, outputs=outputs, momentum=0.8, eps=1e-3)
    x = RNG.standard_normal(shape).astype(np.float32) * 2 + 0.5
    cfg = SamplingConfig(method=method, ratio=ratio, sampling="fixed")
    out = bo.rewrite(model, cfg)
    _check(out)
    got = ort_run(out, x)
    y, rm, rv, mu, var = ref_batch_norm(
        x, p["scale"], p["B"], p["mean"], p["var"], 1e-3, 0.8, method, ratio
    )
    np.testing.assert_allclose(got["Y"], y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["running_mean"], rm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["running_var"], rv, rtol=1e-5, atol=1e-5)  # biased: ONNX rule
    if outputs == 5:  # saved_mean, saved_var = inverse std (as onnxruntime's training BN)
        np.testing.assert_allclose(got["saved_mean"], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["saved_var"], 1 / np.sqrt(var + 1e-3), rtol=1e-5)


def test_fixed_sampling_float64_and_fewer_outputs() -> None:
    model, p = make_bn_model((8, 4, 6, 6), outputs=1)
    out = bo.rewrite(model, SamplingConfig(method="fs", ratio=0.25, sampling="fixed"))
    _check(out)
    x = RNG.standard_normal((8, 4, 6, 6)).astype(np.float32)
    got = ort_run(out, x)
    y = ref_batch_norm(x, p["scale"], p["B"], p["mean"], p["var"], 1e-5, 0.9, "fs", 0.25)[0]
    np.testing.assert_allclose(got["Y"], y, rtol=1e-4, atol=1e-4)


def test_inference_bn_untouched_and_reported() -> None:
    for model in (
        make_bn_model((4, 3, 5, 5), training=False, outputs=1)[0],
        make_bn_model((4, 3, 5, 5), opset=13, outputs=1)[0],
    ):
        out, report = bo.rewrite_with_report(model, SamplingConfig(method="bs", ratio=0.5))
        assert report.rewritten == []
        assert len(report.skipped) == 1 and "inference mode" in report.skipped[0][1]
        assert count_ops(out, "BatchNormalization") == 1
        assert "skipped 1" in report.summary()


def test_dynamic_shape_is_skipped_with_reason() -> None:
    model, _ = make_bn_model((4, 3, 5, 5), dynamic_batch=True)
    out, report = bo.rewrite_with_report(model, SamplingConfig(method="bs", ratio=0.5))
    assert report.rewritten == []
    assert "not static" in report.skipped[0][1] and "fixed input shapes" in report.skipped[0][1]
    assert count_ops(out, "BatchNormalization") == 1


def test_too_small_sample_and_old_opset_random_are_skipped() -> None:
    model, _ = make_bn_model((1, 3, 1, 1))
    report = bo.rewrite_with_report(model, SamplingConfig(method="bs", ratio=0.5))[1]
    assert "1 element per channel" in report.skipped[0][1]
    model, _ = make_bn_model((4, 3, 5, 5), opset=10, outputs=5)
    report = bo.rewrite_with_report(model, SamplingConfig(method="bs", ratio=0.5))[1]
    assert "GatherElements" in report.skipped[0][1]


def test_vdn_goes_through_the_whole_graph_pass() -> None:
    model, _ = make_bn_model((4, 3, 5, 5))
    out, report = bo.rewrite_with_report(model, SamplingConfig(method="vdn"))
    assert len(report.rewritten) == 1 and not report.skipped
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    out, report = bo.rewrite_with_report(model, "fs_vdn")  # random fs_vdn: the rule's gather
    assert len(report.rewritten) == 1 and not report.skipped
    assert {"RandomUniform", "RandomNormal"} <= {n.op_type for n in out.graph.node}
    with pytest.raises(ValueError, match="whole graph"):  # the per-node rule alone refuses VDN
        sampled_batchnorm_rules(SamplingConfig(method="vdn"), RewriteReport())


def test_ir_model_in_ir_model_out() -> None:
    model, _ = make_bn_model((4, 3, 5, 5))
    model_ir = ir.serde.deserialize_model(model)
    out = bo.rewrite(model_ir, SamplingConfig(method="bs", ratio=0.5, sampling="fixed"))
    assert isinstance(out, ir.Model)
    assert not any(n.op_type == "BatchNormalization" for n in out.graph)
    with pytest.raises(ValueError, match="ModelProto or an onnx_ir.Model"):
        bo.rewrite("model.onnx", "bs")  # type: ignore[arg-type]


def _bn_graph(name: str, x: str, shape, params: dict, prefix: str) -> tuple[list, list]:
    """BN nodes of a subgraph: Constant parameters (subgraphs and functions have no initializers
    in our models) and a training BN with its three outputs."""
    nodes = [
        onnx.helper.make_node(
            "Constant", [], [prefix + k], value=onnx.numpy_helper.from_array(v, prefix + k)
        )
        for k, v in params.items()
    ]
    nodes.append(
        onnx.helper.make_node(
            "BatchNormalization",
            [x, *(prefix + k for k in params)],
            [name, prefix + "rm", prefix + "rv"],
            name=prefix + "bn",
            training_mode=1,
            momentum=0.9,
        )
    )
    return nodes, [prefix + "rm", prefix + "rv"]


def test_bn_in_if_subgraph_and_in_function() -> None:
    shape = (8, 4, 5, 5)
    _, p = make_bn_model(shape)
    then_nodes, _ = _bn_graph("then_y", "X", shape, p, "t_")
    then_g = onnx.helper.make_graph(
        then_nodes, "then", [], [onnx.helper.make_tensor_value_info("then_y", 1, list(shape))]
    )
    else_g = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["X"], ["else_y"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("else_y", 1, list(shape))],
    )
    fn_nodes, _ = _bn_graph("fy", "fx", shape, p, "f_")
    fn = onnx.helper.make_function(
        "local", "BNBlock", ["fx"], ["fy"], fn_nodes, [onnx.helper.make_opsetid("", 15)]
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("If", ["cond"], ["a"], then_branch=then_g, else_branch=else_g),
            onnx.helper.make_node("BNBlock", ["X"], ["b"], domain="local"),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("X", 1, list(shape)),
            onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [
            onnx.helper.make_tensor_value_info("a", 1, list(shape)),
            onnx.helper.make_tensor_value_info("b", 1, list(shape)),
        ],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 15), onnx.helper.make_opsetid("local", 1)],
        functions=[fn],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    cfg = SamplingConfig(method="fs", ratio=0.25, sampling="fixed")
    out, report = bo.rewrite_with_report(model, cfg)
    assert sorted(report.rewritten) == ["f_bn", "t_bn"], report
    assert count_ops(out, "BatchNormalization") == 0
    _check(out)
    x = RNG.standard_normal(shape).astype(np.float32)
    got = ort_run(out, {"X": x, "cond": np.array(True)})
    y = ref_batch_norm(x, p["scale"], p["B"], p["mean"], p["var"], 1e-5, 0.9, "fs", 0.25)[0]
    np.testing.assert_allclose(got["a"], y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["b"], y, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ort_run(out, {"X": x, "cond": np.array(False)})["a"], x)


def test_float16_accumulates_in_float32() -> None:
    shape = (8, 4, 6, 6)
    model, p = make_bn_model(shape, outputs=1)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for init in model.graph.initializer:
        init.CopyFrom(onnx.numpy_helper.from_array(p[init.name].astype(np.float16), init.name))
    out = bo.rewrite(model, SamplingConfig(method="bs", ratio=0.5, sampling="fixed"))
    _check(out)
    x = (RNG.standard_normal(shape) * 4 + 100).astype(
        np.float16
    )  # large mean: fp16 sums would lose it
    got = ort_run(out, x)["Y"]
    assert got.dtype == np.float16
    pf = {k: v.astype(np.float16).astype(np.float64) for k, v in p.items()}
    y = ref_batch_norm(x, pf["scale"], pf["B"], pf["mean"], pf["var"], 1e-5, 0.9, "bs", 0.5)[0]
    np.testing.assert_allclose(got.astype(np.float64), y, rtol=1e-2, atol=2e-2)
