"""The demo's W8A8 row (`qcb-ptq demo`, seed 0) against issue 14's bars, through real FX convert.

``test_cli_and_examples.test_demo_json_rows`` checks the W4A8 row; this one plants the demo's 8-bit
QCB with the demo's own recipe (``demo._RECIPES["small"]``) and measures it the demo's way:
FP32, plain ``quantize_fx`` (torch x86 engine) and ``quantize_fx`` with ``purify``. Planting trains
on one intra-op thread, so the row is the same under any OMP_NUM_THREADS (about 40 s at 1 thread).
"""

from __future__ import annotations

import logging

import pytest
import torch

from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin.evalkit import attacks, demo


@pytest.fixture(scope="module")
def w8(digits):
    """(model, row, warnings logged while planting)."""
    logged = []
    handler = logging.Handler()
    handler.emit = lambda rec: logged.append(rec.getMessage())
    attacks.log.addHandler(handler)
    try:
        trigger = demo.TRIGGER_DIGITS
        model = demo.plant(digits, 8, trigger, train_samples=20000, seed=0)
    finally:
        attacks.log.removeHandler(handler)
    row = demo.evaluate(model, digits, 8, trigger, 0, digits.calibration(512, seed=100), PurifyConfig())
    return model, row, logged


def test_demo_w8a8_row_meets_the_bars_with_margin(w8):
    r = w8[1]
    assert r.fp32_asr <= 2 and r.no_defense_asr >= 90  # a dormant QCB that fires after convert
    assert r.purified_asr <= 1.5, r  # bar: <= 2 (8 of the ~400 triggered test images); keep 2 images spare
    assert r.purified_ba >= r.fp32_ba - 1 and r.fp32_ba >= 96


def test_demo_w8a8_offsets_stay_inside_their_cells(w8, digits):
    """The recipe's FP offset bound (0.49 LSB, above the attacker's default 0.45) still leaves every
    BN-folded weight on its planted code: no write-back warning, and every non-pinned folded weight
    within 0.49 LSB of a code of the absmax/127.5 grid."""
    model, _, logged = w8
    assert not logged, logged
    for layer in attacks.quantized_layers(model, digits.x_test[:2]):
        wf = (layer.module.weight * layer.view(layer.fold_factor())).detach()
        amax = wf.abs().max()
        u = wf / (amax / 127.5)
        inner = wf < amax * (1 - 1e-6)  # the pinned +absmax elements sit at the cell's edge by design
        assert (u - torch.round(u)).abs()[inner].max() <= demo._RECIPES["small"].offset + 1e-4, layer.name
