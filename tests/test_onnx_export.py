"""Path A: purified FX INT8 model -> ONNX file that onnxruntime runs like torch does."""

from __future__ import annotations

import numpy as np
import pytest

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.ptq import quantize_fx

from .conftest import TARGET, TRIGGER, prepare_calibrated


@pytest.fixture(scope="module")
def purified_fx(qcb_w4, digits):
    calib = digits.calibration(256, seed=1)
    return quantize_fx(qcb_w4, calib, bits=4, purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))


def test_exported_model_keeps_integers_and_predictions(purified_fx, digits, tmp_path):
    int8, report = purified_fx
    path = qonnx.export(int8, digits.x_test[:64], tmp_path / "purified.onnx")  # validates by default
    ort_model = qonnx.OrtModel(path)
    x, y = digits.x_test, digits.y_test
    agree = (metrics.predict(ort_model, x) == metrics.predict(int8, x)).float().mean().item()
    assert agree >= 0.99
    assert metrics.attack_success_rate(ort_model, x, y, TRIGGER, TARGET) <= 0.02
    onnx_ints = qonnx.int_weights(path)
    assert len(onnx_ints) == len(report.codes)
    for (_, q_onnx), q in zip(onnx_ints, report.codes.values()):
        assert np.array_equal(q_onnx.reshape(q.shape), q.numpy())


def test_dynamic_batch(purified_fx, digits, tmp_path):
    int8, _ = purified_fx
    path = qonnx.export(int8, digits.x_test[:4], tmp_path / "m.onnx")
    out = qonnx.OrtModel(path)(digits.x_test[:37])
    assert out.shape == (37, 10)


def test_validation_catches_a_mismatch(purified_fx, digits, tmp_path, monkeypatch):
    int8, _ = purified_fx
    real = qonnx._export.session

    class Skewed:  # an onnxruntime session whose outputs are off: export must refuse the file
        def __init__(self, path):
            self.s = real(path)

        def get_inputs(self):
            return self.s.get_inputs()

        def run(self, *a):
            return [o + 10.0 for o in self.s.run(*a)]

    monkeypatch.setattr(qonnx._export, "session", Skewed)
    with pytest.raises(qonnx.ExportMismatchError, match="disagrees with the torch INT8 model"):
        qonnx.export(int8, digits.x_test[:8], tmp_path / "bad.onnx")


def test_prepared_model_is_refused(clean_cnn, digits, tmp_path):
    prepared = prepare_calibrated(clean_cnn, digits.calibration(16))
    with pytest.raises(ValueError, match="prepared, not converted"):
        qonnx.export(prepared, digits.x_test[:2], tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="must be a Tensor"):
        qonnx.export(prepared, [1, 2], tmp_path / "x.onnx")
