"""Shared fixtures: the bundled sklearn digits and a small W4 QCB planted once per session."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from qcb_ptq_plugin.evalkit import attacks, datasets, models
from qcb_ptq_plugin.ptq import fx_qconfig_mapping

warnings.filterwarnings("ignore", category=DeprecationWarning)

TRIGGER = attacks.PatchTrigger(size=2, value=1.0, margin=0)
TARGET = 0


@pytest.fixture(scope="session")
def digits():
    return datasets.digits()


@pytest.fixture(scope="session")
def qcb_w4(digits):
    """A SmallCNN with a PQBackdoor-style QCB on the torch x86 4-bit grid (about 10 s)."""
    torch.manual_seed(0)
    m = models.SmallCNN(1, 10, width=16)
    attacks.plant_pqbackdoor(m, digits.x_train, digits.y_train, trigger=TRIGGER, target=TARGET,
                             grids=[attacks.Grid(4)], inject_epochs=20, repair_epochs=20, repair_lr=1e-3,
                             batch_size=64, seed=0)
    return m


@pytest.fixture(scope="session")
def clean32(digits):
    """A clean SmallCNN (width 32) on digits: the grid-aware attacker starts from a clean model."""
    torch.manual_seed(0)
    m = models.SmallCNN(1, 10, width=32)
    return attacks.train_clean_or_badnets(m, digits.x_train, digits.y_train, epochs=20, batch_size=64, seed=0)


@pytest.fixture(scope="session")
def grid_aware_w8(clean32, digits):
    """The grid-aware dormant 8-bit QCB (test_attacks checks it; test_methods defends it)."""
    return attacks.plant_grid_aware(copy.deepcopy(clean32), digits.x_train, digits.y_train, trigger=TRIGGER,
                                    target=TARGET, bits=8, epochs=30, lr=5e-2, int_margin=2.0, batch_size=64)


@pytest.fixture(scope="session")
def clean_cnn(digits):
    torch.manual_seed(1)
    m = models.SmallCNN(1, 10, width=8)
    return attacks.train_clean_or_badnets(m, digits.x_train, digits.y_train, epochs=6, batch_size=64, seed=1)


def int_weights(converted: torch.nn.Module) -> dict[str, torch.Tensor]:
    """INT8 weights of a converted model's quantized Conv/Linear modules (eager/FX), read back as integers."""
    return {name: m.weight().int_repr().long() for name, m in converted.named_modules()
            if type(m).__module__.startswith("torch.ao.nn") and callable(getattr(m, "weight", None))}


def prepare_calibrated(model, calib, bits=8, qconfig_mapping=None):
    """prepare_fx + calibration, as a user script does it."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    p = prepare_fx(copy.deepcopy(model).eval(), qconfig_mapping or fx_qconfig_mapping(bits), (calib[:1],))
    with torch.no_grad():
        for xb in calib.split(64):
            p(xb)
    return p
