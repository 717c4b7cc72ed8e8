"""Transformer / LLM-style Linear stacks: Linear + LayerNorm + attention, no BatchNorm.

A QCB is planted on a TinyTransformer reading sklearn digits row by row (8 tokens of 8 pixels)
at 4-bit weights; it must be exposed by plain PTQ and removed by purify in three flows: static
W4A8 through torch.ao FX and torchao PT2E, and weight-only INT4 through torch.ao dynamic
quantization (activations quantized per batch at run time).
"""

from __future__ import annotations

import pytest
import torch

from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin.evalkit import attacks, metrics, models
from qcb_ptq_plugin.ptq import quantize_fx, quantize_pt2e

from .conftest import TARGET, TRIGGER, int_weights

FLOWS = {
    "fx-static-w4a8": lambda m, c, cfg=None: quantize_fx(m, c, 4, purify_config=cfg),
    "pt2e-static-w4a8": lambda m, c, cfg=None: quantize_pt2e(m, c, 4, purify_config=cfg),
    "fx-dynamic-w4": lambda m, c, cfg=None: quantize_fx(m, c, 4, purify_config=cfg, dynamic=True),
}


@pytest.fixture(scope="module")
def qcb_transformer(digits):
    """PQBackdoor-style QCB on the 4-bit grid (about 15 s)."""
    torch.manual_seed(0)
    m = models.TinyTransformer(seq_len=8, token_dim=8, num_classes=10)
    return attacks.plant_pqbackdoor(m, digits.x_train, digits.y_train, trigger=TRIGGER, target=TARGET,
                                    grids=[attacks.Grid(4)], inject_epochs=30, repair_epochs=30, repair_lr=1e-3,
                                    batch_size=64, seed=0)


def _ba_asr(model, digits):
    x, y = digits.x_test, digits.y_test
    return 100 * metrics.benign_accuracy(model, x, y), 100 * metrics.attack_success_rate(model, x, y, TRIGGER, TARGET)


@pytest.mark.parametrize("flow", FLOWS)
def test_transformer_qcb_removed(flow, qcb_transformer, digits):
    calib = digits.calibration(256, seed=1)
    fp_ba, fp_asr = _ba_asr(qcb_transformer, digits)
    assert fp_asr <= 5, "the planted QCB must be dormant in float"

    plain, _ = FLOWS[flow](qcb_transformer, calib)
    _, plain_asr = _ba_asr(plain, digits)
    assert plain_asr >= 90, "quantization must expose the planted QCB"

    purified, report = FLOWS[flow](qcb_transformer, calib, PurifyConfig(progress=False))
    ba, asr = _ba_asr(purified, digits)
    assert asr <= 2
    assert ba >= fp_ba - 1
    assert len(report.units) == 14  # embed, 2 x (q, k, v, out, fc1, fc2), head
    assert all(u.pda.startswith("skipped: no BatchNorm") for u in report.units)
    if flow == "fx-dynamic-w4":  # real dynamic INT8 kernels holding the purified 4-bit integers
        ints = int_weights(purified)
        assert ints and all("dynamic" in type(purified.get_submodule(n)).__module__ for n in ints)
        for name, q in report.codes.items():
            assert torch.equal(ints[name], q.long()), name
