"""Calibration sanity check and numerical/device hygiene: ranges unlike the observers' are flagged,
damp must be > 0, the user's denormal setting survives purify, CUDA models purify where CUDA exists."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin
from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin._pass import _flushing

from .conftest import int_weights, prepare_calibrated


def test_calibration_unlike_the_observers_data_is_flagged(clean_cnn, digits, caplog):
    calib = digits.calibration(64)
    prepared = prepare_calibrated(clean_cnn, calib)
    with caplog.at_level(logging.WARNING, logger="qcb_ptq_plugin"):
        report = qcb_ptq_plugin.purify(prepared, clean_cnn, calib * 1000, progress=False)
    assert len(report.warnings) == 1 and "1000x" in report.warnings[0] and "observers recorded" in caplog.text
    assert "WARNING: calibration data spans" in report.table() and report.to_dict()["warnings"] == report.warnings
    same = qcb_ptq_plugin.purify(prepare_calibrated(clean_cnn, calib), clean_cnn, digits.calibration(64, seed=3),
                                 progress=False)
    assert same.warnings == []  # other samples of the same data are fine


def test_damp_must_be_positive():
    with pytest.raises(ValueError, match=r"damp=0 must be > 0.*H_kk = 0"):
        PurifyConfig(damp=0)


@pytest.mark.parametrize("user_setting", [True, False])
def test_users_denormal_setting_restored(clean_cnn, digits, user_setting):
    if not torch.set_flush_denormal(user_setting):
        pytest.skip("this CPU cannot flush denormals")
    try:
        calib = digits.calibration(32)
        qcb_ptq_plugin.purify(prepare_calibrated(clean_cnn, calib), clean_cnn, calib, progress=False)
        assert _flushing() is user_setting
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_purify_a_cuda_model(clean_cnn, digits):
    import copy

    model = copy.deepcopy(clean_cnn).cuda()
    calib = digits.calibration(64)
    prepared = prepare_calibrated(model, calib.cuda())
    report = qcb_ptq_plugin.purify(prepared, model, calib, progress=False)  # calibration data on the CPU
    assert all(u.error_after <= u.error_before for u in report.units)
    converted = int_weights(convert_fx(prepared.cpu()))
    for name, q in report.codes.items():
        assert torch.equal(converted[name], q.cpu()), name
