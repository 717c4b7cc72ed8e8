"""MLPs with BatchNorm1d purify with PDA applied in every flow (FX x86, FX qnnpack, PT2E, ORT).

PDA on a BatchNorm1d matches batch statistics per feature (over N, or N and L) to the running
statistics: our extension, not the paper's, and the report says so. The model is a planted W4
QCB (``models.MLP`` on digits): at W4A8 plain PTQ wakes it up, at W8A8 it stays dormant, so
W8A8 checks that purification keeps the float model's behaviour (an 8-bit QCB on this MLP is
not plantable in seconds).
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import attacks, metrics, models
from qcb_ptq_plugin.methods import lac
from qcb_ptq_plugin.ptq import quantize_eager, quantize_fx, quantize_pt2e, quantized_engine

from .conftest import TARGET, TRIGGER, prepare_calibrated

BN1D = lac.BN1D_APPLIED


@pytest.fixture(scope="module")
def mlp_w4(digits):
    """Flatten -> Linear-BN1d-ReLU (128) -> Linear-BN1d-ReLU (64) -> Linear, W4 QCB (about 4 s)."""
    torch.manual_seed(0)
    m = models.MLP(64, 10, (128, 64))
    attacks.plant_pqbackdoor(m, digits.x_train, digits.y_train, trigger=TRIGGER, target=TARGET,
                             grids=[attacks.Grid(4)], inject_epochs=20, repair_epochs=20, repair_lr=1e-3,
                             batch_size=64, seed=0)
    return m.eval()


def _ort(model, calib, bits, purify, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from qcb_ptq_plugin import onnx as qonnx

    fp32 = tmp_path / "mlp.onnx"
    if not fp32.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (calib[:1],), str(fp32), dynamo=False, opset_version=21, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
              weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8)
    feeds = [{"input": b} for b in np.split(calib.numpy(), 8)]
    it = iter(feeds)
    reader = SimpleNamespace(get_next=lambda: next(it, None))
    out = tmp_path / f"int{bits}_{purify}.onnx"
    if purify:
        report = qonnx.quantize_static(fp32, out, reader, **kw,
                                       purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    else:
        ort_quantize_static(str(fp32), str(out), reader, **kw)
        report = None
    return qonnx.OrtModel(out), report


def _quantize(flow, model, calib, bits, purify, tmp_path):
    cfg = qcb_ptq_plugin.PurifyConfig(progress=False) if purify else None
    if flow == "fx-x86":
        return quantize_fx(model, calib, bits, cfg)
    if flow == "fx-qnnpack":
        return quantize_fx(model, calib, bits, cfg, backend="qnnpack")
    if flow == "pt2e":
        return quantize_pt2e(model, calib, bits, cfg)
    if flow == "eager":  # fuse_modules folds Linear+BatchNorm1d
        return quantize_eager(model, calib, bits, cfg)
    return _ort(model, calib, bits, purify, tmp_path)


def test_mlp_w4_qcb_removed_with_bn1d_pda(mlp_w4, digits, tmp_path):
    """The planted W4 QCB wakes up under plain FX PTQ and is removed with PDA applied."""
    x, y = digits.x_test, digits.y_test
    calib = digits.calibration(256, seed=1)
    fp_ba = metrics.benign_accuracy(mlp_w4, x, y)
    fp_asr = metrics.attack_success_rate(mlp_w4, x, y, TRIGGER, TARGET)
    assert fp_asr <= 0.05
    plain, _ = quantize_fx(mlp_w4, calib, 4)
    assert metrics.attack_success_rate(plain, x, y, TRIGGER, TARGET) >= 0.90
    purified, report = quantize_fx(mlp_w4, calib, 4, qcb_ptq_plugin.PurifyConfig(progress=False))
    assert [u.pda for u in report.units][:2] == [BN1D, BN1D]
    assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= max(0.02, fp_asr + 0.005)
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01


@pytest.mark.parametrize("flow", ["fx-x86", "fx-qnnpack", "pt2e", "eager", "ort"])
def test_mlp_bn1d_w8a8_every_flow(mlp_w4, digits, flow, tmp_path):
    """Default settings, W8A8: PDA applied on both BN1d units, ASR and BA at the float model's."""
    x, y = digits.x_test, digits.y_test
    calib = digits.calibration(256, seed=1)
    fp_ba = metrics.benign_accuracy(mlp_w4, x, y)
    fp_asr = metrics.attack_success_rate(mlp_w4, x, y, TRIGGER, TARGET)
    with quantized_engine("qnnpack" if flow == "fx-qnnpack" else torch.backends.quantized.engine):
        purified, report = _quantize(flow, mlp_w4, calib, 8, True, tmp_path)
        assert [u.pda for u in report.units] == [BN1D, BN1D, "skipped: no BatchNorm after this layer in the "
                                                 "float model"]
        assert all(u.error_after <= u.error_before for u in report.units)
        assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= max(0.02, fp_asr + 0.005)
        assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01
    assert "our extension, not the paper's" in report.table()


class _Conv1dBN(nn.Module):
    """(N, 1, 64) -> conv1d(k=3)-BN1d-ReLU -> flatten -> fc: BatchNorm1d on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def test_pda_matches_batch_statistics_of_bn1d_over_n_and_l(digits):
    torch.manual_seed(0)
    model = _Conv1dBN().eval()
    x = digits.x_train[:512].flatten(1).unsqueeze(1)  # (N, 1, 64)
    with torch.no_grad():
        z = model.conv(x[:128])
        # the "poisoned" statistics: the batch mean an input shifted by +0.02 would give
        model.bn.running_mean.copy_(z.mean((0, 2)) + 0.02 * model.conv.weight.sum((1, 2)))
        model.bn.running_var.copy_(z.var((0, 2), unbiased=False))
    model.eval()
    unit = SimpleNamespace(bn=model.bn, fp_layer=model.conv)
    cfg = qcb_ptq_plugin.PurifyConfig(pda_steps=20, gamma=0.05, pda_step_size=0.01)  # room for +0.02
    nudged, first, last = lac._pda(x[:128], unit, cfg)
    assert last < 0.5 * first  # the gap of batch statistics over N and L shrinks
    assert (nudged - x[:128]).abs().max() <= cfg.gamma + 1e-7
    z = model.conv(nudged)
    mean_gap = (z.mean((0, 2)) - model.bn.running_mean).abs().mean()
    assert mean_gap < (model.conv(x[:128]).mean((0, 2)) - model.bn.running_mean).abs().mean()

    calib = x[:128]
    report = qcb_ptq_plugin.purify(prepare_calibrated(copy.deepcopy(model), calib), model, calib, progress=False)
    assert report.units[0].pda == BN1D and report.units[0].error_after <= report.units[0].error_before
