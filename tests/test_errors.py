"""Bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import (QConfig, QConfigMapping, default_dynamic_qconfig, float16_static_qconfig,
                                   get_default_qat_qconfig_mapping)
from torch.ao.quantization.observer import PlaceholderObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import qcb_ptq_plugin
from qcb_ptq_plugin import PurifyConfig

from .conftest import prepare_calibrated


@pytest.fixture()
def setup(clean_cnn, digits):
    calib = digits.calibration(32)
    return clean_cnn, prepare_calibrated(clean_cnn, calib), calib


def test_unprepared_model(setup):
    model, _, calib = setup
    with pytest.raises(ValueError, match="not a prepared model.*prepare_fx"):
        qcb_ptq_plugin.purify(copy.deepcopy(model), model, calib)


def test_same_object(setup):
    model, _, calib = setup
    with pytest.raises(ValueError, match="same object"):
        qcb_ptq_plugin.purify(model, model, calib)


def test_uncalibrated_model(setup):
    model, _, calib = setup
    prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(torch.ao.quantization.get_default_qconfig("x86")),
                          (calib[:1],))
    with pytest.raises(RuntimeError, match="has not seen any data: run calibration"):
        qcb_ptq_plugin.purify(prepared, model, calib)


def test_converted_model(setup):
    model, prepared, calib = setup
    with pytest.raises(ValueError, match="already converted|not a prepared model"):
        qcb_ptq_plugin.purify(convert_fx(prepared), model, calib)


def test_float_model_with_other_weights(setup):
    model, prepared, calib = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.features[4].weight.mul_(1.5)
    with pytest.raises(ValueError, match="does not match the prepared model at 'features.4'"):
        qcb_ptq_plugin.purify(prepared, other, calib)


def test_float_model_of_another_architecture(setup):
    _, prepared, calib = setup
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    with pytest.raises(ValueError, match="float model does not match"):
        qcb_ptq_plugin.purify(prepared, other, calib)


def test_empty_calibration(setup):
    model, prepared, _ = setup
    with pytest.raises(ValueError, match="calibration data is empty"):
        qcb_ptq_plugin.purify(prepared, model, [])


def test_wrong_input_shape(setup):
    model, prepared, _ = setup
    with pytest.raises(ValueError, match=r"shape \(4, 3, 8, 8\) does not fit the float model"):
        qcb_ptq_plugin.purify(prepared, model, torch.rand(4, 3, 8, 8))


def test_inconsistent_batch_shapes(setup):
    model, prepared, calib = setup
    with pytest.raises(ValueError, match="different sample shapes"):
        qcb_ptq_plugin.purify(prepared, model, [calib[:4], torch.rand(4, 1, 9, 9)])


def test_scalar_calibration_data(setup):
    model, prepared, _ = setup
    with pytest.raises(ValueError, match=r"contains a scalar; pass samples shaped \(N, \*input_shape\)"):
        qcb_ptq_plugin.purify(prepared, model, [torch.tensor(3.0)])


def test_nan_and_inf(setup):
    model, prepared, calib = setup
    bad = calib.clone()
    bad[0, 0, 0, 0], bad[1, 0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        qcb_ptq_plugin.purify(prepared, model, bad)


def test_integer_images(setup):
    model, prepared, calib = setup
    with pytest.raises(TypeError, match="dtype torch.uint8.*float"):
        qcb_ptq_plugin.purify(prepared, model, (calib * 255).to(torch.uint8))


def test_float_activation_weight_only_qconfig(setup):
    model, _, calib = setup
    weight_only = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float),
                          weight=default_dynamic_qconfig.weight)
    prepared = prepare_calibrated(model, calib, qconfig_mapping=QConfigMapping().set_object_type(nn.Linear, weight_only))
    with pytest.raises(ValueError, match="keeps float activations.*dynamic"):
        qcb_ptq_plugin.purify(prepared, model, calib)


def test_float16_weights(setup):
    model, _, calib = setup
    mapping = QConfigMapping().set_global(float16_static_qconfig)
    prepared = prepare_calibrated(model, calib, qconfig_mapping=mapping)
    with pytest.raises(ValueError, match="quantizes weights to torch.float16|no quantized Conv/Linear layer.*qconfig"):
        qcb_ptq_plugin.purify(prepared, model, calib)


def test_qat_prepared(setup):
    model, _, calib = setup
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (calib[:1],))
    with pytest.raises(ValueError, match="QAT"):
        qcb_ptq_plugin.purify(prepared, model, calib)


def test_unsupported_layer(digits):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(4 * 64, 10)).eval()
    calib = digits.calibration(16)
    with pytest.raises(NotImplementedError, match="'0' \\(Conv2d\\).*padding_mode='reflect'.*zero padding.*Exclude"):
        qcb_ptq_plugin.purify(prepare_calibrated(model, calib), model, calib)


@pytest.mark.parametrize("field,value,msg", [("solver", "sgd", "solver='sgd' is unknown"),
                                             ("pda", "maybe", "pda='maybe' is unknown"),
                                             ("batch_size", 0, "batch_size=0 must be positive"),
                                             ("gamma", -1.0, "gamma=-1.0 must be >= 0")])
def test_config_validation(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        PurifyConfig(**{field: value})


def test_unknown_override(setup):
    model, prepared, calib = setup
    with pytest.raises(TypeError, match="stepz"):
        qcb_ptq_plugin.purify(prepared, model, calib, stepz=3)
