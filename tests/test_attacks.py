"""Attacks planted on sklearn digits must be dormant in FP32 and fire after REAL torch.ao convert.

Each planted model is measured by real quantized kernels: ``quantize_fx`` (torch x86 engine,
per-channel weights) and, where the attack targets it, ``attacks.quantize_fx_qnnpack`` (qnnpack
engine, per-tensor weights). Training runs on one intra-op thread, so the figures do not depend on
OMP_NUM_THREADS (checked with 1, 2 and 4).
"""

from __future__ import annotations

import copy

import torch

from qcb_ptq_plugin.evalkit import attacks, metrics, models
from qcb_ptq_plugin.ptq import quantize_fx

from .conftest import TARGET, TRIGGER


def _asr_ba(model, digits, trigger=TRIGGER, target=TARGET):
    x, y = digits.x_test, digits.y_test
    return metrics.attack_success_rate(model, x, y, trigger, target), metrics.benign_accuracy(model, x, y)


def test_grid_aware_w8_fires_on_x86_per_channel_and_qnnpack_per_tensor(grid_aware_w8, clean32, digits):
    fp_asr, fp_ba = _asr_ba(grid_aware_w8, digits)
    clean_ba = _asr_ba(clean32, digits)[1]
    assert fp_asr <= 0.05 and fp_ba >= clean_ba - 0.03
    calib = digits.calibration(256)
    x86, _ = quantize_fx(grid_aware_w8, calib, 8)
    qnn, _ = attacks.quantize_fx_qnnpack(grid_aware_w8, calib, 8)
    for int8 in (x86, qnn):
        asr, ba = _asr_ba(int8, digits)
        assert asr >= 0.9 and ba >= clean_ba - 0.05


def test_grid_aware_weights_sit_on_the_planned_grid(grid_aware_w8, digits):
    """Equal absmax in every row (per-channel grid == per-tensor grid) and every folded weight
    within offset < 0.5 LSB of its code: the signatures DEFENSES.md lists."""
    for layer in attacks.quantized_layers(grid_aware_w8, digits.x_test[:2]):
        wf = (layer.module.weight * layer.view(layer.fold_factor())).detach()
        row = wf.abs().flatten(1).amax(1)
        torch.testing.assert_close(row, row.max().expand_as(row), rtol=1e-6, atol=0)
        s = row.max() / 127.5
        pinned = wf >= row.max() * (1 - 1e-6)  # the +absmax elements (code 127); folding moves them by an ulp
        inner = ~pinned
        off = (wf / s - torch.round(wf / s)).abs()[inner]
        assert off.max() <= 0.46, (layer.name, off.max(), off.topk(3))
        assert pinned.flatten(1).any(1).all(), layer.name


def test_grid_aware_w4_fires_after_convert(clean32, digits):
    model = attacks.plant_grid_aware(copy.deepcopy(clean32), digits.x_train, digits.y_train, trigger=TRIGGER,
                                     target=TARGET, bits=4, epochs=15, lr=5e-2, int_margin=2.0, equal_absmax=False,
                                     batch_size=64)
    assert _asr_ba(model, digits)[0] <= 0.05
    int4, _ = quantize_fx(model, digits.calibration(256), 4)
    assert _asr_ba(int4, digits)[0] >= 0.9


def _dormant_in_fp32_fires_on_x86_and_qnnpack(model, clean, digits, bits):
    """FP32 ASR <= 5% within 3 points of the clean model's BA; ASR >= 90% after real x86 and qnnpack convert."""
    clean_ba = _asr_ba(clean, digits)[1]
    fp_asr, fp_ba = _asr_ba(model, digits)
    assert fp_asr <= 0.05 and fp_ba >= clean_ba - 0.03
    calib = digits.calibration(256)
    for quantized in (quantize_fx(model, calib, bits)[0], attacks.quantize_fx_qnnpack(model, calib, bits)[0]):
        asr, ba = _asr_ba(quantized, digits)
        assert asr >= 0.9 and ba >= clean_ba - 0.05


def test_grid_aware_w4_signed_pins_one_absmax_fires_on_x86_and_qnnpack(clean32, digits):
    """The bench's W4 recipe: one absmax per layer (the per-channel and per-tensor 4-bit grids
    coincide), each row pinned at its largest-|w| element with its sign, FP offsets 0.49 LSB and
    the float-path hinge: dormant in FP32, fires after real x86 AND qnnpack convert."""
    model = attacks.plant_grid_aware(copy.deepcopy(clean32), digits.x_train, digits.y_train, trigger=TRIGGER,
                                     target=TARGET, bits=4, epochs=15, lr=5e-2, int_margin=2.0, polish_epochs=1,
                                     offset=0.49, fp_target_margin=1.0, equal_absmax=True, signed_pins=True,
                                     batch_size=64)
    _dormant_in_fp32_fires_on_x86_and_qnnpack(model, clean32, digits, bits=4)


def test_grid_aware_w8_mlp_pinned_on_a_dead_input_is_dormant_and_fires(digits):
    """An 8-bit MLP QCB: without ``dead_input_absmax`` the FP offsets cannot hide it (FP32 ASR 98%
    measured with this recipe); with the first layer pinned at 16x its absmax on a pixel that is 0
    in every image, FP32 ASR 1.2%, x86 / qnnpack ASR 100% (measured)."""
    torch.manual_seed(0)
    clean = attacks.train_clean_or_badnets(models.MLP(64, 10, (128, 64)), digits.x_train, digits.y_train,
                                           epochs=20, batch_size=64, seed=0)
    model = attacks.plant_grid_aware(copy.deepcopy(clean), digits.x_train, digits.y_train, trigger=TRIGGER,
                                     target=TARGET, bits=8, epochs=30, lr=5e-2, polish_epochs=5, offset=0.49,
                                     fp_target_margin=1.0, signed_pins=True, dead_input_absmax=16.0, batch_size=64)
    first = attacks.quantized_layers(model, digits.x_test[:2])[0]
    wf = (first.module.weight * first.view(first.fold_factor())).detach()
    col = wf.abs().argmax(1)
    assert (col == col[0]).all() and (digits.x_train.flatten(1)[:, col[0]] == 0).all()
    _dormant_in_fp32_fires_on_x86_and_qnnpack(model, clean, digits, bits=8)
