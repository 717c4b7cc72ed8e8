"""audit(): the paper's activation drift turned into a verdict, without changing the model."""

from __future__ import annotations

import torch

import qcb_ptq_plugin

from .conftest import prepare_calibrated


def test_planted_qcb_is_exposed_and_clean_model_is_not(qcb_w4, clean_cnn, digits):
    calib = digits.calibration(128)
    planted = prepare_calibrated(qcb_w4, calib, 4)
    before = {k: v.clone() for k, v in planted.state_dict().items()}
    report = qcb_ptq_plugin.audit(planted, qcb_w4, calib)
    assert report.exposed and report.score > report.threshold
    assert all(torch.equal(v, before[k]) for k, v in planted.state_dict().items())  # audit changes nothing
    assert report.top_channels and report.top_channels[0]["excess"] >= report.top_channels[-1]["excess"]
    assert "EXPOSED" in report.table()

    for bits in (8, 4):
        clean = qcb_ptq_plugin.audit(prepare_calibrated(clean_cnn, calib, bits), clean_cnn, calib)
        assert not clean.exposed, (bits, clean.score)
        assert clean.score < report.score
