"""ONNX in and out: linear segments folded into one Conv each, checked under onnxruntime and onnx's own test cases."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases
from typer.testing import CliRunner

import jfactor as jf
from jfactor.cli import app
from jfactor.errors import StackError
from jfactor.interop.onnx import (
    compare_outputs,
    fold_model,
    from_onnx,
    to_onnx,
    with_constant_inputs,
    with_random_weights,
)
from jfactor.interop.onnx_examples import repvgg

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _run(model, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _nhwc(x):
    return np.moveaxis(np.asarray(x, np.float64), 1, -1)


def test_repvgg_folds_two_segments_keeps_the_padded_one_and_matches_onnxruntime():
    model = repvgg()
    folded, reports = fold_model(model)
    assert [r.folded for r in reports] == [True, True, False]
    first, second, third = reports
    assert first.ops == ("Conv", "BatchNormalization", "Conv", "BatchNormalization", "Add")
    assert first.kernel == (3, 3, 3, 8) and first.stride == (1, 1) and first.exact_region is None
    # stride-2 stage, average pool in the middle, valid 3x3 after it: one 13x13 conv of stride 4
    assert "AveragePool" in second.ops and second.kernel == (13, 13, 8, 8) and second.stride == (4, 4)
    assert third.reason.startswith("kept: inner zero padding spoils the borders")
    assert third.exact_region == [[1, 5], [1, 5]]
    assert first.certificate["max_abs_diff"] < 1e-12 and second.certificate["max_abs_diff"] < 1e-12
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu", "Conv", "Conv"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want, got = _run(model, x), _run(folded, x)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_cheaper_only_keeps_the_segment_whose_one_conv_costs_more():
    _, reports = fold_model(repvgg(), cheaper_only=True)
    assert [r.folded for r in reports] == [True, False, False]
    assert reports[1].reason == "kept: one conv costs more multiply-adds (191,008 -> 389,376)"


def test_from_onnx_split_and_errors_name_the_node():
    with pytest.raises(StackError, match=r"node relu6 \(Relu: not linear.*split=True"):
        from_onnx(repvgg())
    found = from_onnx(repvgg(), split=True)
    assert [(s.source, s.sink) for s, _ in found] == [("input", "add5"), ("relu6", "bn14"), ("relu15", "conv17")]
    assert [stack.input_shape for _, stack in found] == [(32, 32, 3), (32, 32, 8), (6, 6, 8)]


def _linear_model(rng):
    """Conv -> Pad -> AvgPool(count_include_pad) -> [Conv, Conv] Concat -> BN -> Mul, Add by constants; 11x14 input."""
    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("w1", 4, 2, 3, 2), w("b1", 4), w("w2", 3, 4, 1, 1), w("w3", 2, 2, 3, 3),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 5, 1, 1)).astype(np.float32), "scale"),
             numpy_helper.from_array(np.float32(0.25), "shift"),
             numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64), "pads")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[1, 2], pads=[1, 0, 1, 1]),
        helper.make_node("Pad", ["c1", "pads"], ["p"]),
        helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 3], strides=[2, 1], pads=[1, 1, 0, 1],
                         count_include_pad=1),
        helper.make_node("Conv", ["a", "w2"], ["left"]),
        helper.make_node("Conv", ["a", "w3"], ["right"], group=2, pads=[1, 1, 1, 1], dilations=[1, 1]),
        helper.make_node("Concat", ["left", "right"], ["cat"], axis=1),
    ]
    stats = rng.uniform(0.5, 1.5, (4, 5)).astype(np.float32)
    inits += [numpy_helper.from_array(stats[i], n) for i, n in enumerate(("g", "bb", "m", "v"))]
    nodes += [helper.make_node("BatchNormalization", ["cat", "g", "bb", "m", "v"], ["bn"], epsilon=1e-3),
              helper.make_node("Mul", ["bn", "scale"], ["mul"]),
              helper.make_node("Add", ["mul", "shift"], ["add"]),
              helper.make_node("Identity", ["add"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 11, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_linear_onnx_model_reads_as_one_stack_equal_to_onnxruntime():
    model = _linear_model(np.random.default_rng(1))
    stack = from_onnx(model)
    x = np.random.default_rng(2).standard_normal((2, 2, 11, 14)).astype(np.float32)
    want = _nhwc(_run(model, x))
    got = np.asarray(stack(_nhwc(x)))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    folded = jf.fold(stack)
    assert folded.exact_region is not None  # the Pad and padded pool inside spoil the borders
    # its output is declared without a shape (onnxruntime runs it, onnx.checker does not pass it):
    # fold_model keeps that as it was (before: onnx.checker's raw ValidationError on the folded model)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    rebuilt, reports = fold_model(model)
    assert len(reports) == 1  # one segment (left as it was: the Pad inside changes the borders)
    np.testing.assert_allclose(_run(rebuilt, x)[0], _run(model, x)[0], atol=1e-5 * np.abs(want).max())


def test_to_onnx_runs_the_folded_conv_in_onnxruntime():
    stack = jf.Stack([jf.Conv(np.random.default_rng(3).standard_normal((3, 3, 2, 4)), np.ones(4), 2, padding="same"),
                      jf.AvgPool(2), jf.Conv(np.random.default_rng(4).standard_normal((2, 1, 2, 4)), groups=2)],
                     (20, 17, 2))
    conv = jf.fold(stack).conv
    x = np.random.default_rng(5).standard_normal((2, 20, 17, 2))
    model = to_onnx(conv, (20, 17, 2))  # float32: onnxruntime has no float64 Conv
    got = _nhwc(_run(model, np.moveaxis(x, -1, 1).astype(np.float32)))
    want = np.asarray(jf.Stack([conv], (20, 17, 2))(x))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_cli_fold_onnx_writes_the_folded_model_summary_and_table(tmp_path):
    path = tmp_path / "repvgg.onnx"
    onnx.save(repvgg(), str(path))
    result = CliRunner().invoke(app, ["fold", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "3 linear segments" in result.output and "2 folded: MACs" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folded_segments"] == 2 and summary["onnxruntime"]["rel_diff"] < 1e-5
    assert {"nodes", "ops", "macs", "params", "exact_region", "certificate", "reason"} <= set(summary["segments"][0])
    folded = onnx.load(str(tmp_path / "out" / "repvgg.folded.onnx"))
    assert sum(n.op_type == "Conv" for n in folded.graph.node) == 4


def test_cli_fold_onnx_cheaper_only_keeps_the_costlier_segment_apart(tmp_path):
    path = tmp_path / "repvgg.onnx"
    onnx.save(repvgg(), str(path))
    result = CliRunner().invoke(app, ["fold", str(path), "--cheaper-only", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folded_segments"] == 1 and summary["macs"]["after"] < summary["macs"]["before"]
    assert any("multiply-adds" in (s["reason"] or "") for s in summary["segments"])
    config = Path(__file__).parent.parent / "configs" / "seed" / "section5_conv_pool_conv.yaml"
    stack = CliRunner().invoke(app, ["fold", str(config), "--cheaper-only", "--out", str(tmp_path / "stack")])
    assert stack.exit_code == 2 and "--cheaper-only: applies to ONNX models" in stack.output


def test_cli_fold_of_a_broken_onnx_file_names_it(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["fold", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "broken.onnx: cannot read an ONNX model" in result.output


def _two_convs(weight, elem_type=TensorProto.FLOAT, spatial=(8, 8)):
    """x (1, 1, *spatial) -> Conv(w) -> Conv(w) -> y, with ``weight`` (1, 1, 3, 3) as initializer ``w``."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="c0"),
             helper.make_node("Conv", ["h", "w"], ["y"], name="c1")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", elem_type, [1, 1, *spatial])],
                              [helper.make_tensor_value_info("y", elem_type, [1, 1, *(n - 4 for n in spatial)])],
                              [numpy_helper.from_array(np.asarray(weight, dtype), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold_cli(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return CliRunner().invoke(app, ["fold", str(path), "--out", str(tmp_path / "out")])


def test_cli_fold_of_an_invalid_onnx_model_names_it_and_leaves_no_directory(tmp_path):
    result = _fold_cli(tmp_path, b"", "empty.onnx")  # parses as an empty model, which onnx.checker rejects
    assert result.exit_code == 2 and "empty.onnx: not a valid ONNX model (onnx.checker:" in result.output
    assert not (tmp_path / "out").exists()
    missing = CliRunner().invoke(app, ["fold", str(tmp_path / "absent.onnx"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 2 and not (tmp_path / "out").exists()


def test_cli_fold_of_an_onnx_model_with_nan_weights_is_an_error_naming_the_initializer(tmp_path):
    result = _fold_cli(tmp_path, _two_convs(np.full((1, 1, 3, 3), np.nan)), "nan.onnx")
    assert result.exit_code == 2, result.output
    assert "nan.onnx: node c0 (Conv): " in result.output and "non-finite initializers: 'w'" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_fold_says_why_onnxruntime_could_not_compare(tmp_path):
    # onnxruntime has no float64 Conv on the CPU: the fold is written, the comparison says it was skipped
    result = _fold_cli(tmp_path, _two_convs(np.ones((1, 1, 3, 3)), TensorProto.DOUBLE), "double.onnx")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folded_segments"] == 1 and "onnxruntime cannot run" in summary["onnxruntime"]["skipped"]
    assert "skipped: onnxruntime cannot run" in " ".join(result.output.split())


def test_compare_outputs_fails_a_folded_model_that_onnxruntime_cannot_run_where_the_model_runs():
    model, broken = _two_convs(np.ones((1, 1, 3, 3))), _two_convs(np.ones((1, 1, 3, 3)), TensorProto.DOUBLE)
    with pytest.raises(jf.FoldError, match="onnxruntime runs the model but not its folded version"):
        compare_outputs(model, broken)


def test_compare_outputs_skips_a_model_whose_output_is_not_finite_on_normal_input_for_want_of_good_weights():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"], name="log")], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "non-finite value" in compare_outputs(model, model)["skipped"]  # log of negative inputs
    with pytest.raises(jf.ConfigError, match="onnxruntime comparison: the model's output"):
        compare_outputs(model, model, strict=True)


NODE_OPS = {"Conv", "AveragePool", "BatchNormalization", "Pad", "Add", "Sum", "Mul", "Concat", "Identity", "Dropout"}
NODE_CASES = [c for c in collect_testcases(None) if c.kind == "node" and len(c.model.graph.node) == 1
              and c.model.graph.node[0].op_type in NODE_OPS]


def _read_case(case):
    inputs, expected = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    return with_constant_inputs(case.model, dict(zip(names[1:], inputs[1:]))), inputs[0], expected[0]


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_onnx_node_cases_jfactor_reads_match_their_expected_outputs(case):
    model, x, expected = _read_case(case)
    try:
        stack = jf.from_onnx(model)
    except StackError as exc:  # not one linear map of one input: the reason names the node
        assert "node " in str(exc) or "data inputs" in str(exc)
        return
    got = np.moveaxis(np.asarray(stack(_nhwc(x))), -1, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_the_node_cases_jfactor_must_read_are_read():
    read = set()
    for case in NODE_CASES:
        try:
            jf.from_onnx(_read_case(case)[0])
            read.add(case.name)
        except StackError:
            pass
    assert {"test_basic_conv_with_padding", "test_conv_with_strides_and_asymmetric_padding",
            "test_conv_with_autopad_same", "test_averagepool_3d_default", "test_averagepool_2d_pads_count_include_pad",
            "test_batchnorm_epsilon", "test_averagepool_2d_strides", "test_identity", "test_dropout_default"} <= read
    assert "test_averagepool_2d_pads" not in read and "test_reflect_pad" not in read  # not one convolution


@pytest.mark.parametrize("name", ["resnet50"])
def test_light_model_with_random_weights_folds_and_matches_onnxruntime(name):
    model = with_random_weights(onnx.load(str(LIGHT / f"light_{name}.onnx")))
    folded, reports = fold_model(model)
    assert sum(r.folded for r in reports) == 53  # every Conv + BatchNormalization pair
    assert all(r.ops == ("Conv", "BatchNormalization") for r in reports if r.folded)
    check = compare_outputs(model, folded)
    assert check["rel_diff"] < 1e-4


def _nodes(*specs):
    from jfactor.interop.graph import Node

    return [Node(name, tuple(inputs), name, None if kind != "lin" else jf.Identity(),
                 "sum" if kind == "add" else None, "" if kind != "relu" else "relu")
            for name, kind, inputs in specs]


def test_segments_end_where_a_tensor_is_also_read_outside_and_skip_merges_of_two_sources():
    from jfactor.interop.graph import segments

    shared = _nodes(("a", "lin", ["x"]), ("r", "relu", ["a"]), ("b", "lin", ["a"]))
    assert [(s.nodes, s.source, s.sink) for s in segments(shared, ["b", "r"])] == [(("a",), "x", "a"),
                                                                               (("b",), "a", "b")]
    # two-node runs on each side of a tensor also read outside: before, both cones met in the first run,
    # which was cut into one-node segments ("c1" and "n1" each left unfused)
    runs = _nodes(("c1", "lin", ["x"]), ("n1", "lin", ["c1"]), ("r", "relu", ["n1"]), ("c2", "lin", ["n1"]),
                  ("n2", "lin", ["c2"]))
    assert [(s.nodes, s.source, s.sink) for s in segments(runs, ["n2", "r"])] == [(("c1", "n1"), "x", "n1"),
                                                                              (("c2", "n2"), "n1", "n2")]
    assert [s.nodes for s in segments(runs, ["n2", "n1"])] == [("c1", "n1"), ("c2", "n2")]  # n1 an output
    residual = _nodes(("c1", "lin", ["x"]), ("n1", "lin", ["c1"]), ("c2", "lin", ["y"]), ("n2", "lin", ["c2"]),
                      ("add", "add", ["n1", "n2"]), ("r", "relu", ["add"]))
    assert [s.nodes for s in segments(residual, ["r"])] == [("c1", "n1"), ("c2", "n2")]
    diamond = _nodes(("c1", "lin", ["x"]), ("c2", "lin", ["c1"]), ("c3", "lin", ["c1"]), ("add", "add", ["c2", "c3"]),
                     ("r", "relu", ["add"]))
    assert [(s.nodes, s.source, s.sink) for s in segments(diamond, ["r"])] == [(("c1", "c2", "c3", "add"), "x", "add")]


def test_fold_model_refuses_a_linear_node_with_non_finite_weights_instead_of_skipping_it():
    # before: fold_model left c0 out of every segment without a word and folded nothing
    with pytest.raises(jf.StackError, match=r"node c0 \(Conv\): .*non-finite initializers: 'w'"):
        fold_model(_two_convs(np.full((1, 1, 3, 3), np.nan)))


def test_a_model_that_is_neither_a_proto_nor_a_path_is_named():
    for bad, kind in ((b"\x08\x07", "bytes"), (3, "int")):  # before: pathlib's TypeError
        for call in (fold_model, jf.from_onnx):
            with pytest.raises(jf.ConfigError, match=f"onnx.ModelProto or the path of a .onnx file, got {kind}"):
                call(bad)


def test_fold_model_names_an_input_of_unknown_spatial_sizes():
    # before: no segment and no reason (every node read as not foldable)
    def model(spatial):
        nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="c0"),
                 helper.make_node("Conv", ["h", "w"], ["y"], name="c1")]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, *spatial])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, None, None])
        graph = helper.make_graph(nodes, "dynamic", [x], [y], [numpy_helper.from_array(np.ones((1, 1, 3, 3),
                                                                                                np.float32), "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    with pytest.raises(jf.StackError, match=r"input 'x' has shape \(None, 1, None, None\): fold_model needs"):
        fold_model(model(["H", "W"]))
    _, reports = fold_model(model([8, 8]))  # an unknown batch size alone is fine
    assert [r.folded for r in reports] == [True]


def _graph_model(nodes, initializers, outputs=None, elem=TensorProto.FLOAT, shape=(1, 2, 12, 12), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", elem, list(shape))],
                              outputs or [helper.make_tensor_value_info("output", elem, ["N", "C", "H", "W"])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _weight(name, rng, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _unusual_models():
    """(name, segments folded, model): valid models onnxruntime runs, each once broken by fold_model
    (named in the comments)."""
    rng, node = np.random.default_rng(0), helper.make_node
    weights = [_weight(f"w{i}", rng, 2, 2, 3, 3) for i in (1, 2, 3)]
    yield "a node named like an unnamed one", 1, _graph_model(  # before: the folded graph lost a tensor (invalid ONNX)
        [node("Conv", ["input", "w1"], ["t1"]), node("Conv", ["t1", "w2"], ["t2"]),
         node("Relu", ["t2"], ["t3"], name="Conv_0"), node("Conv", ["t3", "w3"], ["output"])], weights)
    yield "a Dropout's mask read", 0, _graph_model(  # before: FoldError "Graph output 'mask' is not an output"
        [node("Conv", ["input", "w1"], ["t1"]), node("Dropout", ["t1"], ["t2", "mask"]),
         node("Conv", ["t2", "w2"], ["output"])], weights[:2],
        outputs=[helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "C", "H", "W"]),
                 helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "C", "H", "W"])])
    yield "float16 pad and pool", 1, _graph_model(  # before: a float32 Conv in a float16 graph
        [node("Pad", ["input", "pads"], ["t1"]), node("AveragePool", ["t1"], ["output"], kernel_shape=[2, 2])],
        [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")], elem=TensorProto.FLOAT16)
    yield "a broadcast Add", 0, _graph_model(  # before: StackError "branch output shapes ... differ"
        [node("Conv", ["input", "w1"], ["t1"]), node("AveragePool", ["t1"], ["t2"], kernel_shape=[8, 8]),
         node("Add", ["t1", "t2"], ["t3"]), node("Relu", ["t3"], ["output"])], weights[:1], shape=(1, 2, 10, 10))
    yield "a Mul that adds axes", 0, _graph_model(  # before: folded to a 4-D output, and compare_outputs broadcast it
        [node("Conv", ["input", "w1"], ["t1"]), node("Mul", ["t1", "k"], ["output"])],
        [weights[0], _weight("k", rng, 1, 1, 2, 1, 1)],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 2, 10, 10])])
    statistics = [numpy_helper.from_array(rng.uniform(0.5, 2.0, (2, 10, 10)).astype(np.float32), name)
                  for name in ("gamma", "beta", "mean", "var")]
    yield "opset 7's BatchNormalization per position", 0, _graph_model(  # before: StackError "gamma must have 1 dims"
        [node("Conv", ["input", "w1"], ["t1"]), node("BatchNormalization", ["t1", "gamma", "beta", "mean", "var"],
                                                       ["t2"], spatial=0), node("Conv", ["t2", "w2"], ["output"])],
        weights[:2] + statistics, opset=7)
    half = [numpy_helper.from_array(w.astype(np.float16), f"h{i}") for i, w in enumerate(
        (rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))))]
    single = [numpy_helper.from_array(rng.uniform(0.5, 2.0, 2).astype(np.float32), name)
              for name in ("gamma", "beta", "mean", "var")]
    yield "float32 BatchNormalization statistics on float16 data", 1, _graph_model(  # before: float32 weights on
        [node("BatchNormalization", ["input", "gamma", "beta", "mean", "var"], ["t1"]),  # float16 data: invalid
         node("Conv", ["t1", "h0"], ["t2"]), node("Conv", ["t2", "h1"], ["output"])], half + single,
        elem=TensorProto.FLOAT16)
    unordered = _graph_model([node("Conv", ["input", "w1"], ["t1"]), node("Conv", ["t1", "w2"], ["t2"]),
                              node("Relu", ["t2"], ["output"])], weights[:2])
    unordered.graph.node.reverse()  # onnxruntime runs it, onnx.checker would not
    yield "nodes out of topological order", 1, unordered  # before: KeyError 't1'


@pytest.mark.parametrize("index", range(len(list(_unusual_models()))))
def test_unusual_valid_models_fold_to_what_onnxruntime_computes(index):
    name, expected, model = list(_unusual_models())[index]
    folded, reports = fold_model(model)
    assert sum(r.folded for r in reports) == expected, (name, reports)
    check = compare_outputs(model, folded, strict=True)  # a FoldError where the outputs' shapes differ
    x = np.ones(check["input_shape"], check["dtype"])
    assert _run(folded, x).shape == _run(model, x).shape, name
    assert check["rel_diff"] < (2e-3 if check["dtype"] == "float16" else 1e-5), (name, check)


def test_nodes_sharing_a_name_are_refused_and_compare_outputs_checks_shapes():
    rng, node = np.random.default_rng(1), helper.make_node
    weights = [_weight(f"w{i}", rng, 2, 2, 3, 3) for i in (1, 2)]
    model = _graph_model([node("Conv", ["input", "w1"], ["t1"], name="c"), node("Conv", ["t1", "w2"], ["output"],
                                                                                name="c")], weights)
    with pytest.raises(StackError, match=r"node name 'c' is given to 2 nodes; ONNX needs each node's name unique"):
        fold_model(model)  # before: KeyError 't1'
    cycle = _graph_model([node("Conv", ["input", "w1"], ["t1"], name="a"), node("Conv", ["t1", "w2"], ["output"],
                                                                                name="b")], weights)
    cycle.graph.node[0].input[0] = "output"
    with pytest.raises(StackError, match=r"nodes \['(a|b)', '(a|b)', '(a|b)'\] read each other's outputs in a cycle"):
        fold_model(cycle)
    wider = _graph_model([node("Conv", ["input", "w1"], ["t1"]), node("Unsqueeze", ["t1", "axes"], ["output"])],
                         [weights[0], numpy_helper.from_array(np.array([0], np.int64), "axes")],
                         outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 2, 10, 10])])
    single = _graph_model([node("Conv", ["input", "w1"], ["output"])], weights[:1])
    with pytest.raises(jf.FoldError, match=r"the folded model's output has shape \(1, 2, 10, 10\), the model's "
                                        r"\(1, 1, 2, 10, 10\)"):
        compare_outputs(wider, single)  # before: numpy broadcast the difference, and the check passed


def test_fold_file_makes_its_output_directory_and_refuses_a_file_in_its_place(tmp_path):
    from jfactor.interop.onnx import fold_file

    path = tmp_path / "m.onnx"
    onnx.save(_two_convs(np.ones((1, 1, 3, 3))), str(path))
    summary = fold_file(path, tmp_path / "new" / "out")  # before: FileNotFoundError on a temporary file
    assert Path(summary["folded_model"]).is_file() and (tmp_path / "new" / "out" / "summary.json").is_file()
    (tmp_path / "taken").write_text("")
    with pytest.raises(jf.ConfigError, match=r"taken: is a file, not an output directory"):
        fold_file(path, tmp_path / "taken")


def test_compare_outputs_feeds_every_input_of_a_two_input_model():
    # before: only the first input was fed, and the comparison was "skipped: onnxruntime cannot run the model"
    rng, node = np.random.default_rng(2), helper.make_node
    graph = helper.make_graph(
        [node("Conv", ["a", "w1"], ["t1"]), node("Conv", ["t1", "w2"], ["t2"]), node("Conv", ["b", "w3"], ["t3"]),
         node("Add", ["t2", "t3"], ["output"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2, 12, 12]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 8, 8])],
        [_weight(f"w{i}", rng, 2, 2, 3, 3) for i in (1, 2, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, reports = fold_model(model)
    assert sum(r.folded for r in reports) == 1
    check = compare_outputs(model, folded, strict=True)
    assert check["input"] == "a" and check["rel_diff"] < 1e-5
