"""Fixtures for the pipeline tests: a W4 QCB on the narrow 4-bit grid, and how a missing pipeline is handled.

ModelOpt and NNCF round 4-bit weights to absmax/7 on -7..7 (ORT and torch x86 use absmax/7.5 on
-8..7, the grid of the suite's ``qcb_w4``), so their tests plant a QCB on that grid.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from qcb_ptq_plugin.evalkit import attacks, models

from ..conftest import TARGET, TRIGGER

NARROW_W4 = attacks.Grid(4, restricted=True)  # absmax/7, -7..7: ModelOpt (amax/7) and NNCF (narrow range)


def require(module: str, extra: str):
    """Import a pipeline; a missing one skips locally but fails under CI, which must run every pipeline."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is not installed ({e}); pip install -c constraints.txt -e '.[{extra}]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg, allow_module_level=True)


@pytest.fixture(scope="session")
def qcb_w4_narrow(digits):
    """A SmallCNN with a PQBackdoor-style QCB on the narrow 4-bit grid (about 20 s)."""
    torch.manual_seed(0)
    m = models.SmallCNN(1, 10, width=16)
    attacks.plant_pqbackdoor(m, digits.x_train, digits.y_train, trigger=TRIGGER, target=TARGET, grids=[NARROW_W4],
                             inject_epochs=20, repair_epochs=20, repair_lr=1e-3, batch_size=64, seed=0)
    return m.eval()
