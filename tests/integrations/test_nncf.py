"""OpenVINO NNCF, ONNX backend: ``nncf.quantize`` then ``purify_onnx``, read back from the saved file.

NNCF's quantize allows 8-bit weights only (its CPU/GPU/NPU hardware configs refuse num_bits=4),
and an 8-bit QCB cannot be hidden in FP32 on what installs here (README, "What the demo shows"),
so this pipeline is tested at W8A8 on the suite's clean model with the trigger: purification must
keep accuracy and the trigger harmless, lower every layer's error, and its integers must be the
ones in the saved model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from qcb_ptq_plugin.evalkit import metrics

from ..conftest import TARGET, TRIGGER
from .conftest import require

nncf = require("nncf", "nncf")
onnx = require("onnx", "test")
from onnx import numpy_helper  # noqa: E402

from qcb_ptq_plugin import PurifyConfig  # noqa: E402
from qcb_ptq_plugin import onnx as qonnx  # noqa: E402
from qcb_ptq_plugin.integrations import nncf as qcb_nncf  # noqa: E402


@pytest.fixture(scope="module")
def fp32(clean_cnn, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("nncf") / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(clean_cnn.eval(), (digits.x_test[:1],), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def dataset(digits):
    calib = digits.calibration(256, seed=1).numpy()
    return nncf.Dataset([calib[i : i + 64] for i in range(0, len(calib), 64)], lambda b: {"input": b})


def quantize(fp32, dataset):
    return nncf.quantize(fp32, dataset, subset_size=4)  # 4 batches of 64


def test_purified_nncf_onnx_model(fp32, dataset, digits, tmp_path):
    x, y = digits.x_test, digits.y_test
    fp = qonnx.OrtModel(fp32)
    fp_ba, fp_asr = metrics.benign_accuracy(fp, x, y), metrics.attack_success_rate(fp, x, y, TRIGGER, TARGET)

    plain = quantize(fp32, dataset)
    purified = quantize(fp32, dataset)
    report = qcb_nncf.purify_onnx(fp32, purified, dataset, PurifyConfig(progress=False))
    assert report.mode == "nncf-onnx" and len(report.units) == 4
    assert all(u.error_after < u.error_before for u in report.units)

    onnx.save(purified, str(tmp_path / "purified.onnx"))  # NNCF's ONNX export is the ModelProto itself
    saved = onnx.load(str(tmp_path / "purified.onnx"))
    ints = qonnx.int_weights(saved)
    assert len(ints) == len(report.codes)
    for (_, q_file), q in zip(ints, report.codes.values()):
        assert np.array_equal(q_file.reshape(q.shape), q.numpy())
        assert q.abs().max() <= 127  # NNCF's narrow range

    a = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in saved.graph.initializer}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert len(changed) == 4 and all(a[k].dtype == np.int8 for k in changed)  # weight integers only: scales and
    # NNCF's corrected biases stay as NNCF set them

    model = qonnx.OrtModel(saved)
    assert metrics.benign_accuracy(model, x, y) >= fp_ba - 0.01
    assert metrics.attack_success_rate(model, x, y, TRIGGER, TARGET) <= fp_asr + 0.02


def test_wrong_inputs_name_the_fix(fp32, dataset):
    with pytest.raises(TypeError, match="FP32 and the quantized onnx.ModelProto"):
        qcb_nncf.purify_onnx(fp32, "int8.onnx", dataset)
    with pytest.raises(ValueError, match="no Conv/Gemm/MatMul with integer weights"):
        qcb_nncf.purify_onnx(fp32, fp32, dataset)
