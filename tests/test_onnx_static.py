"""Path B: FP32 .onnx -> purified INT8 .onnx inside onnxruntime's quantize_static flow."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin import onnx as qonnx

from .conftest import TARGET, TRIGGER

# ORT's 4-bit weight grid (absmax/7.5, -8..7) equals torch x86's, so the session's W4 QCB fires here.
ORT_W4A8 = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt4,
                activation_type=QuantType.QUInt8)


class Reader:
    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 32):
        self.feeds = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.feeds, None)


@pytest.fixture(scope="module")
def fp32_onnx(qcb_w4, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(qcb_w4, (digits.x_test[:1],), str(path), dynamo=False, opset_version=21,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def calib(digits):
    return digits.calibration(256, seed=1).numpy()


def test_purified_ort_model_removes_the_qcb(fp32_onnx, calib, digits, tmp_path):
    x, y = digits.x_test, digits.y_test
    fp = qonnx.OrtModel(fp32_onnx)
    fp_ba = metrics.benign_accuracy(fp, x, y)
    assert metrics.attack_success_rate(fp, x, y, TRIGGER, TARGET) <= 0.05

    ort_quantize_static(str(fp32_onnx), str(tmp_path / "plain.onnx"), Reader(calib), **ORT_W4A8)
    plain = qonnx.OrtModel(tmp_path / "plain.onnx")
    assert metrics.attack_success_rate(plain, x, y, TRIGGER, TARGET) >= 0.90

    report = qonnx.quantize_static(fp32_onnx, tmp_path / "purified.onnx", Reader(calib), **ORT_W4A8,
                                   purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    purified = qonnx.OrtModel(tmp_path / "purified.onnx")
    assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01
    assert report.mode == "onnxruntime" and len(report.units) == 4
    assert not any("observers recorded" in w for w in report.warnings)  # the data ORT calibrated with


def test_only_the_weight_integers_change(fp32_onnx, calib, tmp_path):
    ort_quantize_static(str(fp32_onnx), str(tmp_path / "plain.onnx"), Reader(calib), **ORT_W4A8)
    report = qonnx.quantize_static(fp32_onnx, tmp_path / "pur.onnx", Reader(calib), **ORT_W4A8,
                                   purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    plain, pur = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "pur.onnx"))
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in pur.graph.node]
    a = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in pur.graph.initializer}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(k.endswith("_quantized") and "bias" not in k for k in changed)  # scales, biases equal
    for (_, q_file), q in zip(qonnx.int_weights(pur), report.codes.values()):
        assert np.array_equal(q_file.reshape(q.shape), q.numpy())
    assert report.samples == len(calib)


def test_num_samples_limits_what_the_method_fits_on(fp32_onnx, calib, tmp_path):
    """ORT calibrates its scales on every feed; the method fits on the config's first num_samples."""
    report = qonnx.quantize_static(fp32_onnx, tmp_path / "m.onnx", Reader(calib, batch=32), **ORT_W4A8, method="rtn",
                                   purify_config=qcb_ptq_plugin.MethodConfig(num_samples=50, progress=False))
    assert report.samples == 50 and "50 calibration samples" in report.table()


def test_not_an_onnx_file(tmp_path, calib):
    bad = tmp_path / "model.onnx"
    bad.write_text("definitely not protobuf")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        qonnx.quantize_static(bad, tmp_path / "out.onnx", Reader(calib))
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        qonnx.quantize_static(tmp_path / "missing.onnx", tmp_path / "out.onnx", Reader(calib))


def test_reader_with_wrong_names_or_shapes(fp32_onnx, calib, tmp_path):
    with pytest.raises(ValueError, match=r"yields inputs \['x'\] but the model takes \['input'\]"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", Reader(calib, name="x"))
    with pytest.raises(ValueError, match=r"input 'input' has shape \(32, 1, 9, 9\)"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", Reader(np.zeros((64, 1, 9, 9), np.float32)))
    with pytest.raises(ValueError, match="yielded no data"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", Reader(calib[:0]))
    with pytest.raises(TypeError, match="CalibrationDataReader"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", [calib])
    nan = calib.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", Reader(nan))


def test_model_without_quantizable_layers(tmp_path):
    node = helper.make_node("Relu", ["input"], ["output"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="no Conv/Gemm/MatMul with a constant weight"):
        qonnx.quantize_static(path, tmp_path / "o.onnx", Reader(np.random.rand(8, 4).astype(np.float32)))


def test_qoperator_format_is_refused(fp32_onnx, calib, tmp_path):
    with pytest.raises(NotImplementedError, match="QDQ"):
        qonnx.quantize_static(fp32_onnx, tmp_path / "o.onnx", Reader(calib), quant_format=QuantFormat.QOperator)


def test_staged_capture_equals_whole_graph_runs(fp32_onnx, calib, tmp_path):
    """One staged forward per batch reads the same I and I^fp as re-running both whole graphs per
    unit (the previous capture), with each unit's new integers written before the next unit."""
    from qcb_ptq_plugin import _pass, get_method
    from qcb_ptq_plugin.adapters import ort as ort_adapter

    ort_quantize_static(str(fp32_onnx), str(tmp_path / "plain.onnx"), Reader(calib), **ORT_W4A8)
    fp = onnx.load(str(fp32_onnx))
    feeds = [{"input": calib[i : i + 64]} for i in range(0, len(calib), 64)]
    runs = {}
    for staged in (True, False):
        plan = ort_adapter.plan(fp, onnx.load(str(tmp_path / "plain.onnx")), -8, 7)
        assert plan.capture.staged is not None
        if not staged:
            plan.capture.staged = None  # the whole quantized graph per unit and batch
            plan.capture.cache_bytes = 0  # the whole FP32 graph per unit and batch
        seen = []
        capture = plan.capture

        def recording(unit, feed, capture=capture, seen=seen):
            i_q, i_fp = capture(unit, feed)
            seen.append((i_q, i_fp))
            return i_q, i_fp

        codes, _ = _pass.run(plan.units, recording, feeds, get_method("lac_pda"),
                             qcb_ptq_plugin.PurifyConfig(progress=False))
        runs[staged] = (codes, seen)
    (codes_s, seen_s), (codes_w, seen_w) = runs[True], runs[False]
    assert len(seen_s) == len(seen_w) == 4 * len(feeds)
    for (a_q, a_fp), (b_q, b_fp) in zip(seen_s, seen_w):
        torch.testing.assert_close(a_q, b_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(a_fp, b_fp, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(codes_s, codes_w))


class _TwoHeads(torch.nn.Module):
    """Two Linears read the same tensor: one FP32 input shared by two units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = torch.nn.Linear(64, 16), torch.nn.Linear(16, 10), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return self.a(h) + self.b(h)


def test_shared_fp32_input_is_served_to_each_unit_then_freed(calib, tmp_path):
    from qcb_ptq_plugin import _pass, get_method
    from qcb_ptq_plugin.adapters import ort as ort_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoHeads().eval(), (torch.from_numpy(calib[:1]),), str(tmp_path / "fp.onnx"), dynamo=False,
                          opset_version=21, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    ort_quantize_static(str(tmp_path / "fp.onnx"), str(tmp_path / "q.onnx"), Reader(calib), **ORT_W4A8)
    plan = ort_adapter.plan(onnx.load(str(tmp_path / "fp.onnx")), onnx.load(str(tmp_path / "q.onnx")), -8, 7)
    capture, seen = plan.capture, {}
    shared = [u.name for u in plan.units if capture.inputs[u.name][1] == capture.inputs[plan.units[-1].name][1]]
    assert len(plan.units) == 3 and len(shared) == 2

    def recording(unit, feed):
        i_q, i_fp = capture(unit, feed)
        seen.setdefault(unit.name, []).append(i_fp)
        return i_q, i_fp

    feeds = [{"input": calib[i : i + 64]} for i in range(0, 128, 64)]
    _pass.run(plan.units, recording, feeds, get_method("rtn"), qcb_ptq_plugin.MethodConfig(progress=False))
    for a, b in zip(*(seen[n] for n in shared)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # the same values, each unit its own array
    assert capture._cache == {} and capture._bytes == 0  # nothing left behind for later units


def test_input_range_read_from_the_quantized_graph(fp32_onnx, calib, tmp_path, caplog):
    """The ORT adapter reads the range calibration recorded at the input (its QuantizeLinear), so
    purifying with data of another scale (images x255 after calibrating on 0..1) is named."""
    from qcb_ptq_plugin import _pass, get_method
    from qcb_ptq_plugin.adapters import ort as ort_adapter

    ort_quantize_static(str(fp32_onnx), str(tmp_path / "plain.onnx"), Reader(calib), **ORT_W4A8)
    plan = ort_adapter.plan(onnx.load(str(fp32_onnx)), onnx.load(str(tmp_path / "plain.onnx")), -8, 7)
    lo, hi = plan.input_range
    assert lo <= calib.min() + 1e-2 and hi >= calib.max() - 1e-2 and hi - lo < 1.1 * (calib.max() - calib.min())
    feeds = [{"input": 255 * calib[i : i + 64]} for i in range(0, len(calib), 64)]
    report = _pass.run_plan(plan, feeds, get_method("lac_pda"), qcb_ptq_plugin.PurifyConfig(progress=False),
                            "onnxruntime")
    assert any("observers recorded" in w for w in report.warnings)
