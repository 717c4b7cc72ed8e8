"""A weight grid set by weights on inputs that are always 0 is reported (a planted-range trick)."""

from __future__ import annotations

import copy

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks
from qcb_ptq_plugin.evalkit.models import MLP

from .conftest import prepare_calibrated


def test_a_grid_set_by_weights_on_dead_inputs_is_reported(digits):
    calib = digits.calibration(128, seed=7)
    dead = (calib.flatten(1) == 0).all(0).nonzero().flatten()
    assert len(dead) > 0  # sklearn digits: some border pixels are 0 in every image
    torch.manual_seed(0)
    clean = attacks.train_clean_or_badnets(MLP(in_features=calib[0].numel(), hidden=(32,)), digits.x_train,
                                           digits.y_train, epochs=5).eval()  # dead-pixel weights stay at init
    inflated = copy.deepcopy(clean)
    with torch.no_grad():  # as plant_grid_aware(dead_input_absmax=16): no output changes, a 16x coarser grid
        w = inflated.features[1].weight
        w[:, dead[0]] = 16 * w.abs().amax()
    assert torch.equal(clean(calib), inflated(calib))

    warned = {}
    for name, model in (("clean", clean), ("inflated", inflated)):
        prepared = prepare_calibrated(model, calib, bits=8)
        warned[name] = [w for w in q.purify(prepared, model, calib, progress=False).warnings if "set by weights" in w]
    assert warned["clean"] == []
    assert len(warned["inflated"]) == 1
    assert warned["inflated"][0].startswith("features.1: the weight grid of 32 of 32 scale group(s)")
