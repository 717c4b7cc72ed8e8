"""purify on torch.ao FX: exact integers through convert_fx, fidelity, QCB removal, inputs left alone."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig
from torch.ao.quantization.observer import MinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin.ptq import quantize_fx

from .conftest import TARGET, TRIGGER, int_weights, prepare_calibrated


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_fx_keeps_the_purified_integers(qcb_w4, digits, bits):
    calib = digits.calibration(128)
    prepared = prepare_calibrated(qcb_w4, calib, bits)
    plain = int_weights(convert_fx(copy.deepcopy(prepared)))
    report = qcb_ptq_plugin.purify(prepared, qcb_w4, calib, progress=False)
    purified = int_weights(convert_fx(prepared))

    assert set(purified) == set(report.codes) == {u.name for u in report.units}
    for name, q in report.codes.items():
        assert torch.equal(purified[name], q), name  # convert re-observed, yet kept our integers
    assert sum(u.flips for u in report.units) > 0
    assert any(not torch.equal(plain[n], purified[n]) for n in plain)  # and they are not plain RTN
    for name, q in report.codes.items():
        lim = 2 ** (bits - 1)
        assert q.min() >= -lim and q.max() <= lim - 1


def test_per_tensor_affine_weights(clean_cnn, digits):
    calib = digits.calibration(64)
    w = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    mapping = QConfigMapping().set_global(QConfig(activation=get_default_qconfig("x86").activation, weight=w))
    prepared = prepare_calibrated(clean_cnn, calib, qconfig_mapping=mapping)
    report = qcb_ptq_plugin.purify(prepared, clean_cnn, calib, progress=False)
    converted = int_weights(convert_fx(prepared))
    for name, q in report.codes.items():
        assert torch.equal(converted[name], q)
    assert all(u.error_after <= u.error_before for u in report.units)


def _unit_outputs(model, x, names):
    """Dequantized outputs of the named modules on x (works on float and INT8 modules)."""
    out, handles = {}, []
    for n in names:
        m = model.get_submodule(n)
        handles.append(m.register_forward_hook(
            lambda _m, _i, o, n=n: out.__setitem__(n, o.dequantize() if o.is_quantized else o)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_heldout_unit_outputs_closer_to_float(qcb_w4, digits):
    """On test images (not calibration), each purified INT8 unit output is closer to float."""
    calib = digits.calibration(256)
    plain, _ = quantize_fx(qcb_w4, calib, bits=4)
    purified, _ = quantize_fx(qcb_w4, calib, bits=4, purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    # INT8 fused ConvReLU units vs the float ReLU after each conv-BN; the head vs the float head
    pairs = {"features.0": "features.2", "features.4": "features.6", "features.8": "features.10", "fc": "fc"}
    x = digits.x_test
    ref = _unit_outputs(qcb_w4, x, pairs.values())
    got_plain = _unit_outputs(plain, x, pairs)
    got_pur = _unit_outputs(purified, x, pairs)
    for q_name, f_name in pairs.items():
        e_plain = (got_plain[q_name] - ref[f_name]).pow(2).mean()
        e_pur = (got_pur[q_name] - ref[f_name]).pow(2).mean()
        assert e_pur < e_plain, (q_name, e_pur.item(), e_plain.item())


def test_removes_a_w4a8_qcb_it_has_not_seen(qcb_w4, digits):
    """The issue's bar: plain FX PTQ ASR >= 90% -> purified <= 2%, BA within 1 point of FP32."""
    x, y = digits.x_test, digits.y_test
    calib = digits.calibration(256, seed=1)
    fp_ba = metrics.benign_accuracy(qcb_w4, x, y)
    assert metrics.attack_success_rate(qcb_w4, x, y, TRIGGER, TARGET) <= 0.05  # dormant in FP32
    plain, _ = quantize_fx(qcb_w4, calib, bits=4)
    assert metrics.attack_success_rate(plain, x, y, TRIGGER, TARGET) >= 0.90  # quantization exposes it
    purified, _ = quantize_fx(qcb_w4, calib, bits=4, purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01


def test_pipeline_helpers_purify_when_a_method_is_named(qcb_w4, digits):
    """quantize_fx: no method and no config = plain PTQ; a method alone runs it with its default config."""
    calib = digits.calibration(64)
    assert quantize_fx(qcb_w4, calib, bits=4)[1] is None
    _, report = quantize_fx(qcb_w4, calib, bits=4, method="rtn")
    assert report.method == "rtn" and len(report.units) == 4 and sum(u.flips for u in report.units) == 0
    _, report = quantize_fx(qcb_w4, calib, bits=4, purify_config=qcb_ptq_plugin.PurifyConfig(progress=False))
    assert report.method == "lac_pda"


def test_float_model_and_observers_untouched(qcb_w4, digits):
    calib = digits.calibration(64)
    model = copy.deepcopy(qcb_w4).train()  # even in train mode its BN stats must not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_calibrated(model.eval(), calib, 4)
    model.train()
    observers = {k: v.clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}
    qcb_ptq_plugin.purify(prepared, model, calib, progress=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in prepared.state_dict().items():
        if k in observers:
            assert torch.equal(v, observers[k]), k


class _NoBN(nn.Module):
    """x -> conv -> relu -> flatten -> fc"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def test_bn_free_model_skips_pda_with_a_logged_reason(digits, caplog):
    model = _NoBN().eval()
    calib = digits.calibration(64)
    prepared = prepare_calibrated(model, calib)
    with caplog.at_level(logging.INFO, logger="qcb_ptq_plugin"):
        report = qcb_ptq_plugin.purify(prepared, model, calib, progress=False)
    assert [u.pda for u in report.units] == ["skipped: no BatchNorm after this layer in the float model"] * 2
    assert "no BatchNorm" in caplog.text
    with pytest.raises(ValueError, match="no quantized layer .* feeds a BatchNorm"):
        qcb_ptq_plugin.purify(prepare_calibrated(model, calib), model, calib, pda="on", progress=False)


def test_pda_applied_where_bn_exists(qcb_w4, digits):
    calib = digits.calibration(64)
    report = qcb_ptq_plugin.purify(prepare_calibrated(qcb_w4, calib, 4), qcb_w4, calib, progress=False)
    assert [u.pda for u in report.units[:-1]] == ["applied"] * 3
    assert report.units[-1].pda.startswith("skipped")  # the Linear head has no BN
    assert "features.0" in report.table()
    d = report.to_dict()
    assert d["units"][0]["name"] == "features.0" and "codes" not in d


def test_calibration_data_forms(clean_cnn, digits):
    """A Tensor, a list of batches and a DataLoader of (x, y) give the same result."""
    calib = digits.calibration(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(64)), batch_size=16)
    results = []
    for data in (calib, list(calib.split(10)), loader):
        prepared = prepare_calibrated(clean_cnn, calib)
        results.append(qcb_ptq_plugin.purify(prepared, clean_cnn, data, progress=False).codes)
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
