"""Fixtures for the pipeline tests: QCBs on each pipeline's weight grid, and how a missing pipeline is handled.

* ModelOpt rounds 4-bit weights to absmax/7 on -7..7 (ORT and torch x86 use absmax/7.5 on -8..7,
  the grid of the suite's ``qcb_w4``), so its test plants a W4 QCB on that grid.
* NNCF, INC and ORT static quantization (Olive) allow 8-bit weights only: their tests plant an
  8-bit QCB with the grid-aware attacker, on torch x86's grid (absmax/127.5, -128..127: INC) or
  on the narrow one (absmax/127, -127..127: NNCF, ORT). One absmax per layer makes the
  per-channel and per-tensor grids coincide (Olive's ORT default is per tensor).
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings

import pytest
import torch

from qcb_ptq_plugin.evalkit import attacks, metrics, models

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


@pytest.fixture(scope="session")
def clean32(digits):
    torch.manual_seed(2)
    m = models.SmallCNN(1, 10, width=32)
    return attacks.train_clean_or_badnets(m, digits.x_train, digits.y_train, epochs=20, batch_size=64, seed=2)


def _grid_aware_w8(clean, digits, restricted: bool):
    """Seed 2: FP32 ASR 0.2% on the narrow grid; purification brings a model
    back to its FP32 behaviour, so the <= 2% bar needs an FP32 ASR below it (seed 0 left 2.2%)."""
    return attacks.plant_grid_aware(copy.deepcopy(clean), digits.x_train, digits.y_train, trigger=TRIGGER,
                                    target=TARGET, bits=8, epochs=20, lr=5e-2, int_margin=1.0, polish_epochs=5,
                                    batch_size=64, seed=2, restricted=restricted)


@pytest.fixture(scope="session")
def qcb_w8(clean32, digits):
    """An 8-bit QCB on torch x86's grid (absmax/127.5, -128..127): INC."""
    return _grid_aware_w8(clean32, digits, restricted=False)


@pytest.fixture(scope="session")
def qcb_w8_narrow(clean32, digits):
    """An 8-bit QCB on the narrow grid (absmax/127, -127..127): NNCF, onnxruntime (Olive)."""
    return _grid_aware_w8(clean32, digits, restricted=True)


def export_onnx(model, example, path, opset: int = 17):
    """FP32 ONNX with a dynamic batch (BatchNorm folded by the exporter), loaded back."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load(str(path))


def assert_exposed_then_removed(float_model, plain, purified, digits) -> None:
    """The issue's bar: dormant in FP32, plain flow ASR >= 90%, purified ASR <= 2% with BA within 1 point."""
    x, y = digits.x_test, digits.y_test

    def asr(m):
        return metrics.attack_success_rate(m, x, y, TRIGGER, TARGET)

    fp_ba = metrics.benign_accuracy(float_model, x, y)
    assert asr(float_model) <= 0.05
    assert asr(plain) >= 0.90
    assert asr(purified) <= 0.02
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01
