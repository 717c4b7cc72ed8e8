"""NVIDIA ModelOpt: ``mtq.quantize(..., {"algorithm": "qcb_purify"}, forward_loop)`` and its ONNX export.

W4A8: INT8_DEFAULT_CFG with 4-bit per-channel weights (ModelOpt rounds to amax/7). ModelOpt
exports 4-bit weights for TensorRT as ``trt::DequantizeLinear(W_float, amax/7)``; TensorRT
rounds W/s when it builds the engine. The test reads those integers back and, to run the export
in onnxruntime, swaps each such node for a standard DequantizeLinear of round(W/s).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from qcb_ptq_plugin.evalkit import metrics

from ..conftest import TARGET, TRIGGER
from .conftest import require

mtq = require("modelopt.torch.quantization", "modelopt")
qcb_modelopt = require("qcb_ptq_plugin.integrations.modelopt", "modelopt")
onnx = require("onnx", "test")
from onnx import helper, numpy_helper  # noqa: E402

from qcb_ptq_plugin import onnx as qonnx  # noqa: E402


def w4a8_config(algorithm) -> dict:
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg["quant_cfg"] = [*cfg["quant_cfg"], {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}}]
    return {**cfg, "algorithm": algorithm}


PURIFY = {"method": "qcb_purify", "options": {"progress": False}}


@pytest.fixture(scope="module")
def calib(digits):
    return digits.calibration(256, seed=1)


def quantize(model, calib, algorithm):
    def forward_loop(m):
        with torch.no_grad():
            for xb in calib.split(64):
                m(xb)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtq.quantize(copy.deepcopy(model), w4a8_config(algorithm), forward_loop)


def export(model, example, path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=21, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load(str(path))


def exported_codes(proto: onnx.ModelProto, exact: bool) -> dict[str, np.ndarray]:
    """{weight name: round(W/s)} of each ``trt::DequantizeLinear(W, s)`` (what TensorRT stores); with
    ``exact``, W/s must already be whole numbers (a purified export carries W = s*q)."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    codes = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.domain == "trt":
            w, s = inits[n.input[0]], consts[n.input[1]]
            q = w / s
            if exact:
                assert np.abs(q - np.round(q)).max() < 1e-3, f"{n.input[0]} is not a multiple of its scale"
            codes[n.input[0].removesuffix(".weight")] = np.round(q).astype(np.int64)
    return codes


def onnxruntime_model(proto: onnx.ModelProto, codes: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The export with each trt::DequantizeLinear replaced by a standard one of the int8 codes."""
    proto = copy.deepcopy(proto)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    for i, n in enumerate(proto.graph.node):
        if n.op_type == "DequantizeLinear" and n.domain == "trt":
            name = n.input[0].removesuffix(".weight")
            axis = next(a.i for a in n.attribute if a.name == "axis")
            proto.graph.initializer.extend([numpy_helper.from_array(codes[name].astype(np.int8), name + ".q"),
                                            numpy_helper.from_array(consts[n.input[1]].reshape(-1), name + ".s")])
            proto.graph.node[i].CopyFrom(helper.make_node("DequantizeLinear", [name + ".q", name + ".s"],
                                                          list(n.output), axis=axis))
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", 21)])
    return proto


def test_qcb_purify_is_a_modelopt_calibration_algorithm(qcb_w4_narrow, calib, digits, tmp_path):
    x, y = digits.x_test, digits.y_test
    fp_ba = metrics.benign_accuracy(qcb_w4_narrow, x, y)
    assert metrics.attack_success_rate(qcb_w4_narrow, x, y, TRIGGER, TARGET) <= 0.05

    plain = quantize(qcb_w4_narrow, calib, "max")
    assert metrics.attack_success_rate(plain, x, y, TRIGGER, TARGET) >= 0.90
    plain_proto = export(plain, x[:1], tmp_path / "plain.onnx")
    plain_codes = exported_codes(plain_proto, exact=False)
    plain_ort = qonnx.OrtModel(onnxruntime_model(plain_proto, plain_codes))
    assert metrics.attack_success_rate(plain_ort, x, y, TRIGGER, TARGET) >= 0.90  # the export wakes it up too

    purified = quantize(qcb_w4_narrow, calib, PURIFY)
    report = qcb_modelopt.report(purified)
    assert report.mode == "modelopt" and [u.name for u in report.units] == ["features.0", "features.4",
                                                                              "features.8", "fc"]
    assert [u.pda for u in report.units[:3]] == ["applied"] * 3  # ModelOpt keeps BN unfolded: PDA reads it
    assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01

    proto = export(purified, x[:1], tmp_path / "purified.onnx")
    codes = exported_codes(proto, exact=True)
    assert codes.keys() == report.codes.keys()
    for name, q in report.codes.items():
        assert np.array_equal(codes[name], q.numpy()), name
    assert any(not np.array_equal(codes[k], plain_codes[k]) for k in codes)
    exported = qonnx.OrtModel(onnxruntime_model(proto, codes))
    assert metrics.attack_success_rate(exported, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.benign_accuracy(exported, x, y) >= fp_ba - 0.01


def test_amax_stays_frozen_and_fake_quant_reproduces_the_codes(qcb_w4_narrow, calib):
    plain, purified = quantize(qcb_w4_narrow, calib, "max"), quantize(qcb_w4_narrow, calib, PURIFY)
    report = qcb_modelopt.report(purified)
    for name, q in report.codes.items():
        a, b = plain.get_submodule(name), purified.get_submodule(name)
        assert torch.equal(a.weight_quantizer.amax, b.weight_quantizer.amax)  # the grid max calibration chose
        s = b.weight_quantizer.amax.reshape(-1, *[1] * (q.dim() - 1)) / 7
        assert torch.equal(torch.round(b.weight_quantizer(b.weight) / s).long(), q)


def test_errors_name_the_fix(qcb_w4_narrow):
    with pytest.raises(ValueError, match="needs calibration data: pass forward_loop"):
        mtq.quantize(copy.deepcopy(qcb_w4_narrow), w4a8_config(PURIFY), None)
    with pytest.raises(ValueError, match="not calibrated with the qcb_purify algorithm"):
        qcb_modelopt.report(qcb_w4_narrow)
