"""The other methods behind the same call: "rtn", "efrap", "qvec" through FX, PT2E and onnxruntime.

Each is checked on real kernels: the integers read back from the converted model equal
``report.codes``, the float model (module or .onnx file) is untouched, and on the session's W4
QCB (plain PTQ ASR >= 90%, see test_purify_fx) the backdoor is gone. EFRAP's bar is also checked
at W8A8 on the grid-aware dormant 8-bit QCB of test_attacks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin.grid import WeightGrid
from qcb_ptq_plugin.methods.efrap import EfrapConfig, _Terms
from qcb_ptq_plugin.methods.qvec import QVecConfig, qvec_codes
from qcb_ptq_plugin.ptq import quantize_pt2e
from qcb_ptq_plugin.units import Unit, float_layer

from .conftest import TARGET, TRIGGER, int_weights, prepare_calibrated
from .test_onnx_static import ORT_W4A8, Reader, fp32_onnx  # noqa: F401  (fp32_onnx is a fixture)
from .test_pt2e_eager import _pt2e_int_weights

CONFIGS = {"efrap": EfrapConfig(progress=False), "qvec": QVecConfig(progress=False)}
#: EFRAP's bar (its paper: ~1-2% ASR): ASR <= 5%, BA >= FP32 - 1 (measured with flip weight 1.0:
#: BA 98.66 = FP32, ASR 0 in FX, PT2E and ORT, in the release's weight units; the default, flip
#: weight 3.0 in LSB units, also passes). QVec (lambda = 1) also takes ASR to 0 but costs BA: FX 97.55, ORT 95.32
#: vs FP32 98.66, so it does NOT meet EFRAP's BA bar (misses by 0.1 in FX, 2.3 in ORT); its
#: bound here is FP32 - 4.5.
BA_SLACK = {"efrap": 0.01, "qvec": 0.045}


def _bars(method, model, fp_model, digits):
    x, y = digits.x_test, digits.y_test
    assert metrics.attack_success_rate(model, x, y, TRIGGER, TARGET) <= 0.05, method
    assert metrics.benign_accuracy(model, x, y) >= metrics.benign_accuracy(fp_model, x, y) - BA_SLACK[method], method


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_is_plain_ptq(clean_cnn, digits, bits):
    """RTN stores plain convert_fx's integers except at exact ties of a row's absmax element.

    There W/s = +-(qmax - qmin)/2 (127.5 at W8, 7.5 at W4) and the integer depends on the
    toolchain's arithmetic: the grid rounds W/s half-to-even (-127.5 -> -128, 7.5 -> 8 -> 7
    clamped), torch.ao's kernel gives -127 at W8 and stores 8 at W4 (it clamps to the qint8
    storage range, not to quant_max: a code a 4-bit grid (-8..7) cannot hold). At most one
    such element per channel; every other integer is equal."""
    calib = digits.calibration(128)
    prepared = prepare_calibrated(clean_cnn, calib, bits)
    plain = int_weights(convert_fx(copy.deepcopy(prepared)))
    report = qcb_ptq_plugin.purify(prepared, clean_cnn, calib, method="rtn", progress=False)
    got = int_weights(convert_fx(prepared))
    assert set(got) == set(plain) == set(report.codes)
    half = 2 ** (bits - 1)
    for name, q in report.codes.items():
        assert torch.equal(got[name], q), name
        differ = q != plain[name]
        assert ((q - plain[name]).abs()[differ] == 1).all(), name
        assert (torch.maximum(q.abs(), plain[name].abs())[differ] == half).all(), name  # absmax ties only
        assert (differ.flatten(1).sum(1) <= 1).all(), name
    assert all(u.flips == 0 and u.error_after == pytest.approx(u.error_before) for u in report.units)


@pytest.mark.parametrize("method", ["efrap", "qvec"])
def test_fx_removes_the_w4_qcb_keeps_integers_and_float_model(method, qcb_w4, digits):
    calib = digits.calibration(256, seed=1)
    model = copy.deepcopy(qcb_w4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_calibrated(model, calib, 4)
    report = qcb_ptq_plugin.purify(prepared, model, calib, CONFIGS[method], method=method)
    int8 = convert_fx(prepared)
    got = int_weights(int8)
    assert set(got) == set(report.codes)
    for name, q in report.codes.items():
        assert torch.equal(got[name], q), name
    assert report.method == method and sum(u.flips for u in report.units) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _bars(method, int8, qcb_w4, digits)


@pytest.mark.parametrize("method", ["efrap", "qvec"])
def test_pt2e_removes_the_w4_qcb(method, qcb_w4, digits):
    calib = digits.calibration(256, seed=1)
    before = {k: v.clone() for k, v in qcb_w4.state_dict().items()}
    int8, report = quantize_pt2e(qcb_w4, calib, bits=4, purify_config=CONFIGS[method], method=method)
    assert all(torch.equal(v, before[k]) for k, v in qcb_w4.state_dict().items())
    ints = _pt2e_int_weights(int8)
    assert len(ints) == len(report.codes)
    for got, q in zip(ints, report.codes.values()):
        assert torch.equal(got, q)
    _bars(method, int8, qcb_w4, digits)


@pytest.mark.parametrize("method", ["efrap", "qvec"])
def test_onnxruntime_removes_the_w4_qcb(method, fp32_onnx, qcb_w4, digits, tmp_path):
    calib = digits.calibration(256, seed=1).numpy()
    source = fp32_onnx.read_bytes()
    report = qonnx.quantize_static(fp32_onnx, tmp_path / "m.onnx", Reader(calib), **ORT_W4A8,
                                   purify_config=CONFIGS[method], method=method)
    assert fp32_onnx.read_bytes() == source  # the float model file is untouched
    import onnx

    for (_, q_file), q in zip(qonnx.int_weights(onnx.load(str(tmp_path / "m.onnx"))), report.codes.values()):
        assert np.array_equal(q_file.reshape(q.shape), q.numpy())
    assert report.method == method
    _bars(method, qonnx.OrtModel(tmp_path / "m.onnx"), qcb_w4, digits)


def test_efrap_removes_the_grid_aware_w8_qcb(grid_aware_w8, digits):
    """EFRAP's bar at W8A8 on a dormant 8-bit QCB (FX, x86 INT8: plain PTQ fires), with the
    converted integers equal to the report and the float model untouched."""
    calib = digits.calibration(256, seed=1)
    model = copy.deepcopy(grid_aware_w8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_calibrated(model, calib, 8)
    plain = convert_fx(copy.deepcopy(prepared))
    assert metrics.attack_success_rate(plain, digits.x_test, digits.y_test, TRIGGER, TARGET) >= 0.9
    report = qcb_ptq_plugin.purify(prepared, model, calib, CONFIGS["efrap"], method="efrap")
    int8 = convert_fx(prepared)
    got = int_weights(int8)
    assert set(got) == set(report.codes) and all(torch.equal(got[n], q) for n, q in report.codes.items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _bars("efrap", int8, grid_aware_w8, digits)


def test_efrap_closed_form_gradient_is_autograd():
    g = torch.Generator().manual_seed(0)
    G, O, K = 2, 3, 5
    w = torch.randn(G, O, K, generator=g)
    s = torch.rand(G, O, 1, generator=g) * 0.2 + 0.05
    x = torch.randn(G, K, 40, generator=g)
    H, C = x @ x.transpose(1, 2) / 40, torch.randn(G, O, K, generator=g)
    rest = w / s - torch.floor(w / s)
    t = _Terms(torch.floor(w / s), s, torch.zeros_like(s), -4, 3, H, C, 1 - torch.round(rest),
               (w - s * torch.round(w / s).clamp(-4, 3)).abs(), 1.0, 0.01,
               torch.rand(G, O, 1, generator=g) * 4)  # row weights: the gain^2 of a BN after the layer
    v = torch.randn(G, O, K, generator=g).requires_grad_(True)
    act, flip, reg = t.loss(v)
    (auto,) = torch.autograd.grad(act + flip + 0.01 * reg, v)
    assert torch.allclose(t.grad(v.detach()), auto, atol=1e-5, rtol=1e-4)


def test_qvec_flips_exactly_the_large_errors():
    """Q(W - lam (Q(W) - W)) flips an element iff its error exceeds 1 / (2 (1 + lam)) LSB
    (and the flipped integer is on the grid)."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    unit = Unit("u", None, float_layer(w), w, None, WeightGrid.for_bits(w, 4), write=lambda _: None)
    x = w / unit.grid.scale[:, None]
    e = x - torch.round(x)
    flip_to = torch.round(x) + torch.sign(e)
    on_grid = (flip_to >= -8) & (flip_to <= 7)
    tie = e.abs() > 0.5 - 1e-5  # each row's absmax element sits at W/s = +-7.5
    for lam in (0.0, 0.5, 1.0, 3.0):
        flipped = qvec_codes(unit, lam) != unit.grid.quantize(w)
        assert torch.equal(flipped[~tie], ((e.abs() > 1 / (2 * (1 + lam))) & on_grid)[~tie]), lam
    assert 0 < (qvec_codes(unit, 1.0) != unit.grid.quantize(w)).float().mean() < 1


def test_method_configs_refuse_bad_values(clean_cnn, digits):
    with pytest.raises(ValueError, match="lam=-0.5 must be >= 0"):
        QVecConfig(lam=-0.5)
    with pytest.raises(ValueError, match="steps=-1 must be >= 0"):
        EfrapConfig(steps=-1)
    calib = digits.calibration(32)
    with pytest.raises(TypeError, match="takes a EfrapConfig"):
        qcb_ptq_plugin.purify(prepare_calibrated(clean_cnn, calib), clean_cnn, calib, QVecConfig(), method="efrap")
    assert EfrapConfig.paper().steps == 10000 and EfrapConfig.paper().lr == 1e-3


def test_upper_inverse_by_halves_matches_a_triangular_solve():
    """The blocked inverse GPTQ's factor comes from: exact (to float32) on odd sizes above and
    below the leaf, batched, and upper triangular."""
    from qcb_ptq_plugin.methods.lac import _upper_inverse

    gen = torch.Generator().manual_seed(0)
    for n in (5, 37, 700):
        R = torch.randn(3, n, n, generator=gen).triu() / n ** 0.5
        R.diagonal(dim1=1, dim2=2).copy_(torch.rand(3, n, generator=gen) + 1.0)
        U = _upper_inverse(R, leaf=16)
        ref = torch.linalg.solve_triangular(R, torch.eye(n).expand_as(R), upper=True)
        assert torch.equal(U, U.triu())
        assert torch.allclose(U, ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(R @ U, torch.eye(n).expand_as(R), atol=1e-4)
