"""The Blindspots study's detectors, each on a tiny BadNets model (digits) where it should detect.

The BadNets backdoor lives in the float weights, so it survives static INT8 PTQ and each detector
must find it at FP32 and, run on the real integer model (NC: through the weight-exact surrogate),
at INT8. A clean model is the negative control where one is cheap (STRIP).
"""

from __future__ import annotations

import pytest
import torch

from qcb_ptq_plugin.evalkit import attacks, baselines, blindspots as bs, metrics, models

from .conftest import TARGET, TRIGGER


@pytest.fixture(scope="module")
def badnets(digits):
    torch.manual_seed(0)
    m = models.SmallCNN(1, 10, width=8)
    return attacks.train_clean_or_badnets(m, digits.x_train, digits.y_train, epochs=10, batch_size=64,
                                          trigger=TRIGGER, target=TARGET, poison_rate=0.1, seed=0)


@pytest.fixture(scope="module")
def views(badnets, digits):
    """FP32 and static INT8 (every layer, torch.ao FX convert)."""
    return {p.name: p for p in bs.precisions(badnets, digits.calibration(256), bits=(8,))}


def test_badnets_fires_at_every_precision(views, digits):
    for p in views.values():
        assert metrics.attack_success_rate(p.model, digits.x_test, digits.y_test, TRIGGER, TARGET) >= 0.9, p.name


def test_surrogate_carries_the_converted_integers(views, digits):
    """Folded surrogate weights = the converted model's integers x scales, exactly; outputs agree."""
    int8 = views["INT8"]
    quantized = {n: m for n, m in int8.model.named_modules() if callable(getattr(m, "weight", None))}
    layers = attacks.quantized_layers(int8.surrogate, digits.x_test[:2])
    assert {layer.name for layer in layers} <= set(quantized)
    for layer in layers:
        wq = quantized[layer.name].weight()
        folded = layer.module.weight.detach() * layer.view(layer.fold_factor())
        scale = wq.q_per_channel_scales().float().view(-1, *([1] * (folded.dim() - 1)))
        torch.testing.assert_close(folded / scale, wq.int_repr().float(), atol=1e-4, rtol=0)
    agree = (metrics.predict(int8.surrogate, digits.x_test) == metrics.predict(int8.model, digits.x_test)).float()
    assert agree.mean() >= 0.97


@pytest.mark.parametrize("precision", ["FP32", "INT8"])
def test_neural_cleanse_flags_the_target(views, digits, precision):
    nc = bs.neural_cleanse(views[precision], digits.calibration(128, seed=3), 10, steps=150, lr=0.2, init_cost=1e-2)
    assert nc.detected() and nc.flagged == TARGET, nc
    assert nc.reversed_asr >= 0.9  # the reversed trigger also fires on the real (integer) model


def test_anomaly_index_is_the_mad_outlier_score():
    index, flagged = bs.anomaly_index(torch.tensor([10.0, 11.0, 9.0, 10.0, 2.0]))
    assert flagged == 4 and index == pytest.approx(8 / (1.4826 * 1.0))


@pytest.mark.parametrize("precision", ["FP32", "INT8"])
def test_strip_catches_triggered_inputs(views, digits, precision, clean_cnn):
    keep = digits.y_test != TARGET
    clean, triggered = digits.x_test[:100], TRIGGER(digits.x_test[keep][:100])
    overlays = digits.calibration(128, seed=3)
    st = bs.strip(views[precision].model, clean, triggered, overlays)
    assert st.detected() and st.auroc >= 0.9, st
    control = bs.strip(clean_cnn, clean, triggered, overlays)  # no backdoor: triggered inputs look clean
    assert not control.detected() and control.auroc < 0.8, control


@pytest.mark.parametrize("precision", ["FP32", "INT8"])
def test_activation_clustering_and_spectral_signatures_find_the_poison(views, digits, precision):
    xs, ys, is_poison = bs.poisoned_set(digits.x_train, digits.y_train, TRIGGER, TARGET, 0.03, seed=3)
    assert is_poison.sum() == int(0.03 * len(xs)) and (ys[is_poison] == TARGET).all()
    feats = bs.penultimate(views[precision].model, xs, layer="features.11")
    ac = bs.activation_clustering(feats, ys, is_poison, TARGET)
    assert ac.detected(TARGET) and ac.target_stat <= 0.35, ac
    ss = bs.spectral_signatures(feats, ys, is_poison, TARGET)
    assert ss.detected(TARGET) and ss.recall > ss.target_stat, ss


def test_pruning_masks_channels_of_the_integer_model(views, digits):
    int8 = views["INT8"]
    xl, yl = baselines.labelled_subset(digits.x_train, digits.y_train, 0.1)
    pruned, ratio = bs.prune(int8.model, xl, yl, layer="features.11", max_drop=0.05)
    assert 0 < ratio < 1 and len(pruned.channels) == round(ratio * 32)
    seen = []
    h = int8.model.get_submodule("fc").register_forward_pre_hook(lambda _m, a: seen.append(a[0].dequantize()))
    try:
        pruned(digits.x_test[:16])
    finally:
        h.remove()
    assert (seen[0][:, pruned.channels] == 0).all() and (seen[0].abs().sum(0) > 0).any()
    assert metrics.benign_accuracy(pruned, xl, yl) >= metrics.benign_accuracy(int8.model, xl, yl) - 0.05
