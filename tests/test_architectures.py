"""The evalkit's round-6 architectures (AllConvNet: stride-2 convs, no pooling; InvertedResidualCNN:
MobileNetV2 blocks with a residual add) go through the FX path: purify covers every Conv2d and Linear,
none unsupported or skipped, and the converted INT model holds purify's integers and classifies."""

from __future__ import annotations

import pytest
import torch
from qcb_ptq_plugin.evalkit import attacks, metrics, models
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin
from qcb_ptq_plugin.ptq import prepare_fx_calibrated

from .conftest import int_weights


@pytest.mark.parametrize("arch", ["AllConvNet", "InvertedResidualCNN"])
def test_new_architecture_is_purified_and_converts(arch, digits):
    torch.manual_seed(0)
    model = getattr(models, arch)(1, 10, image_size=8, width=8)
    attacks.train_clean_or_badnets(model, digits.x_train, digits.y_train, epochs=10, batch_size=64, seed=0)
    layers = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    strided = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d) and mod.stride != (1, 1)]
    depthwise = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    if arch == "AllConvNet":  # 8x8 digits: one stride-2 conv (8 -> 4), no pooling layer but the global one
        assert len(layers) == 5 and strided == ["features.3"] and depthwise == []
        assert [type(mod) for mod in model.modules() if "Pool" in type(mod).__name__] == [nn.AdaptiveAvgPool2d]
    else:  # stem, 2 x (expand, depthwise, project), head; the first block adds its input
        assert len(layers) == 8 and depthwise == ["block1.dw.0", "block2.dw.0"]
        assert model.block1.residual and not model.block2.residual
    calib, xt, yt = digits.calibration(256), digits.x_test, digits.y_test
    fp_ba = metrics.benign_accuracy(model, xt, yt)
    assert fp_ba > 0.5, fp_ba
    for bits, backend in ((8, "x86"), (4, "qnnpack")):  # per-channel and per-tensor weight grids
        prepared = prepare_fx_calibrated(model, calib, bits, backend=backend)
        pur = qcb_ptq_plugin.purify(prepared, model, calib, progress=False)
        assert pur.skipped == [] and [u.name for u in pur.units] == layers, (bits, backend)
        converted = convert_fx(prepared)
        int_w = int_weights(converted)
        assert sorted(int_w) == sorted(layers), (bits, backend)
        assert all(torch.equal(int_w[n], pur.codes[n].reshape(int_w[n].shape)) for n in layers), (bits, backend)
        int_model = attacks.OnEngine(converted, backend)
        int_ba = metrics.benign_accuracy(int_model, xt, yt)
        assert int_ba > fp_ba - (0.05 if bits == 8 else 0.25), (bits, backend, fp_ba, int_ba)
