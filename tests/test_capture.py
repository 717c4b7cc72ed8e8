"""The graph stepper (one forward for all units) captures what a fresh forward per unit would."""

from __future__ import annotations

import pytest
import torch

from qcb_ptq_plugin import PurifyConfig, _pass, get_method
from qcb_ptq_plugin.evalkit import models
from qcb_ptq_plugin.api import prepare_plan
from qcb_ptq_plugin.ptq import prepare_fx_calibrated, prepare_pt2e_calibrated


@pytest.fixture(scope="module")
def small_resnet(digits):
    torch.manual_seed(0)
    m = models.ResNet((1, 1, 1, 1), num_classes=10, in_channels=1, width=4).eval()
    with torch.no_grad():  # non-trivial BN statistics so the folded weights differ from the raw ones
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("flow", ["fx", "pt2e"])
def test_stepper_matches_fresh_forwards(flow, small_resnet, digits):
    calib = digits.x_train[:192]
    prepare = prepare_fx_calibrated if flow == "fx" else prepare_pt2e_calibrated
    cfg = PurifyConfig(progress=False, batch_size=64)
    runs = []
    for stepped in (True, False):
        prepared = prepare(small_resnet, calib, bits=4)
        _, plan, batches = prepare_plan(prepared, small_resnet, calib, cfg)
        assert plan.capture._stepper is not None  # FX and PT2E simulators are graphs
        if not stepped:
            plan.capture._stepper = None
        seen = []

        def capture(unit, x, _c=plan.capture, _seen=seen):
            i_q, i_fp = _c(unit, x)
            _seen.append(i_q)
            return i_q, i_fp

        codes, _ = _pass.run(plan.units, capture, batches, get_method("lac_pda"), cfg)
        runs.append((codes, seen))
    (codes_a, seen_a), (codes_b, seen_b) = runs
    assert len(seen_a) == len(seen_b) == len(plan.units) * len(batches)
    for a, b in zip(seen_a, seen_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(codes_a, codes_b))
    # residual blocks: some unit reads an input that an earlier unit's write changed
    assert len(plan.units) >= 5
