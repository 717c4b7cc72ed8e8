"""Attack kit and metrics: hand-computed cases, and QCBs that are dormant in FP32 and fire in INT8."""

from __future__ import annotations

import copy

import pytest
import torch

from qcb_ptq_plugin.evalkit import attacks, metrics, models
from qcb_ptq_plugin.ptq import quantize_fx

from .conftest import TARGET, TRIGGER, int_weights


class _Fixed:
    """'Model' whose logits put the mass on a given label per input row (first pixel = label)."""

    def __call__(self, x):
        labels = x.flatten(1)[:, 0].long()
        return torch.nn.functional.one_hot(labels, 10).float()


def test_metrics_on_hand_computed_cases():
    x = torch.zeros(5, 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0])  # predictions 1, 2, 3, 0, 5
    y = torch.tensor([1, 2, 0, 0, 4])
    assert metrics.benign_accuracy(_Fixed(), x, y) == pytest.approx(3 / 5)

    def to_zero_for_first_two(xb):  # the "trigger" sends rows predicting 1 or 2 to class 0
        out = xb.clone()
        first = out[:, 0, 0, 0]
        out[:, 0, 0, 0] = torch.where((first == 1) | (first == 2), torch.zeros_like(first), first)
        return out

    # samples of the target class (y == 0) are excluded: 3 remain, 2 flip to 0
    assert metrics.attack_success_rate(_Fixed(), x, y, to_zero_for_first_two, 0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="undefined"):
        metrics.attack_success_rate(_Fixed(), x, torch.zeros(5, dtype=torch.long), to_zero_for_first_two, 0)
    # DER = [max(0, dASR) - max(0, dBA) + 1] / 2
    assert metrics.der(0.99, 0.01, 0.90, 0.89) == pytest.approx((0.98 - 0.01 + 1) / 2)
    assert metrics.der(0.5, 0.6, 0.9, 0.95) == pytest.approx(0.5)  # worse ASR / better BA count as 0


def test_triggers():
    x = torch.zeros(2, 1, 8, 8)
    t = attacks.PatchTrigger(size=2, value=1.0, margin=1)(x)
    assert t[0, 0, 5:7, 5:7].eq(1).all() and t.sum() == 2 * 4 and x.sum() == 0
    tl = attacks.PatchTrigger(size=3, corner="top-left", margin=0)(x)
    assert tl[0, 0, :3, :3].eq(1).all()
    b1, b2 = attacks.BlendTrigger(alpha=0.1, seed=3)(x), attacks.BlendTrigger(alpha=0.1, seed=3)(x)
    assert torch.equal(b1, b2) and 0 < b1.max() <= 0.1


def test_pqbackdoor_repair_keeps_the_injected_integers(digits):
    """The hard check: after the repair, INT8 weights equal those of the injected (FP-backdoored) model."""
    torch.manual_seed(0)
    model = models.SmallCNN(1, 10, width=8)
    attacks.train_clean_or_badnets(model, digits.x_train, digits.y_train, epochs=10, batch_size=64, trigger=TRIGGER,
                                   target=TARGET, poison_rate=0.1)
    injected = copy.deepcopy(model)
    grids = [attacks.Grid(8), attacks.Grid(8, restricted=True), attacks.Grid(4)]
    attacks.repair_in_boxes(model, digits.x_train, digits.y_train, trigger=TRIGGER, target=TARGET, grids=grids,
                            epochs=3, lr=1e-3, batch_size=64)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), injected.parameters()))  # float moved
    calib = digits.calibration(64)
    for bits in (8, 4):
        a, b = int_weights(quantize_fx(model, calib, bits)[0]), int_weights(quantize_fx(injected, calib, bits)[0])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pqbackdoor_is_dormant_in_fp32_and_fires_after_convert(qcb_w4, digits):
    x, y = digits.x_test, digits.y_test
    assert metrics.attack_success_rate(qcb_w4, x, y, TRIGGER, TARGET) <= 0.05
    assert metrics.benign_accuracy(qcb_w4, x, y) >= 0.9
    int8, _ = quantize_fx(qcb_w4, digits.calibration(128), 4)
    assert metrics.attack_success_rate(int8, x, y, TRIGGER, TARGET) >= 0.9


def test_qu_anti_zation_is_dormant_in_fp32_and_fires_after_convert(digits):
    torch.manual_seed(0)
    model = attacks.plant_quantization(models.SmallCNN(1, 10, width=16), digits.x_train, digits.y_train,
                                       trigger=TRIGGER, target=TARGET, bits=(4,), pretrain_epochs=20, epochs=30,
                                       lr=5e-4, c=2.0, batch_size=64)
    x, y = digits.x_test, digits.y_test
    assert metrics.attack_success_rate(model, x, y, TRIGGER, TARGET) <= 0.05
    int8, _ = quantize_fx(model, digits.calibration(128), 4)
    # ~90% with this seed; the trade-off between c and lr is touchy on an 8x8 task, so the test
    # asks for a clearly active backdoor rather than the exact figure
    assert metrics.attack_success_rate(int8, x, y, TRIGGER, TARGET) >= 0.5


def test_adaptive_alignment_term_is_the_fp_vs_int_output_gap():
    """The adaptive attacker's λ-term is Σ_l ||W_l I_l - Q(W_l) I_l||², BN folded as the quantizer sees it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 1, 6, 6)
    layers = attacks.quantized_layers(model, x)
    params = {k: v.detach() for k, v in attacks._quantized_params(layers, 4, False).items()}
    inputs = {"0": x, "3": model[2](model[1](model[0](x)))}
    got = attacks._alignment(layers, inputs, params)

    f = (model[1].weight * torch.rsqrt(model[1].running_var + model[1].eps)).detach()
    wf = model[0].weight.detach() * f.view(-1, 1, 1, 1)
    conv_gap = torch.nn.functional.conv2d(x, wf) - torch.nn.functional.conv2d(x, params["0.weight"] * f.view(-1, 1, 1, 1))
    lin_gap = torch.nn.functional.linear(inputs["3"], model[3].weight - params["3.weight"])
    want = conv_gap.pow(2).flatten(1).sum(1).mean() + lin_gap.pow(2).sum(1).mean()
    torch.testing.assert_close(got, want)
    assert got > 0
