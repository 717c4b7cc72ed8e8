"""Every quantized layer is purified or named: unsupported layers are an error naming them and the
way out, or with skip_unsupported=True a warning each and a row in the report; shared modules are
one unit fed from every call site; PT2E conv overloads (padding="same") are purified; ConvTranspose
and Conv3d are units through the same column machinery."""

from __future__ import annotations

import copy
import logging
import warnings

import onnx
import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qcb_ptq_plugin
from qcb_ptq_plugin import _pass
from qcb_ptq_plugin.ptq import quantize_pt2e

from .conftest import int_weights


class _Mixed(nn.Module):
    """x -> conv -> reflect-padded conv (x86 quantizes it, LAC cannot) -> flatten -> shared fc (called twice) -> head"""

    def __init__(self, padding_mode="reflect"):
        super().__init__()
        self.conv, self.up = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode=padding_mode)
        self.shared, self.head = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        y = self.up(torch.relu(self.conv(x))).flatten(1)[:, :64]
        return self.head(torch.relu(self.shared(torch.relu(self.shared(y)))))


@pytest.fixture(scope="module")
def mixed(digits):
    torch.manual_seed(0)
    model, calib = _Mixed().eval(), digits.calibration(128)
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[:1],))
    with torch.no_grad():
        prepared(calib)
    return model, prepared, calib


def test_unsupported_layer_is_an_error_naming_it_and_the_way_out(mixed):
    model, prepared, calib = mixed
    with pytest.raises(NotImplementedError, match=r"'up' \(Conv2d\).*Exclude .* skip_unsupported=True"):
        qcb_ptq_plugin.purify(copy.deepcopy(prepared), model, calib, progress=False)


def test_skip_unsupported_warns_and_reports_every_quantized_layer(mixed, caplog):
    model, prepared, calib = mixed
    prepared = copy.deepcopy(prepared)
    with caplog.at_level(logging.WARNING, logger="qcb_ptq_plugin"):
        report = qcb_ptq_plugin.purify(prepared, model, calib, progress=False, skip_unsupported=True)
    assert "'up' (Conv2d) is quantized but NOT purified" in caplog.text
    assert [s["name"] for s in report.skipped] == ["up"] and report.to_dict()["skipped"][0]["kind"] == "Conv2d"
    assert "NOT PURIFIED" in report.table()
    converted = int_weights(convert_fx(prepared))
    # every quantized layer of the INT8 model is purified (its integers are ours) or named
    assert set(converted) == set(report.codes) | {s["name"] for s in report.skipped}
    for name, q in report.codes.items():
        assert torch.equal(converted[name], q), name


def test_shared_module_is_one_unit_fed_from_every_call_site(mixed):
    model, prepared, calib = mixed
    report = qcb_ptq_plugin.purify(copy.deepcopy(prepared), model, calib, progress=False, skip_unsupported=True)
    shared = next(u for u in report.units if u.name == "shared")
    assert [u.name for u in report.units].count("shared") == 1
    assert shared.error_after < shared.error_before
    # its statistics hold the rows of both call sites: the float target energy matches both, not the first
    rows = []
    h = model.shared.register_forward_hook(lambda _m, _i, out: rows.append(out - model.shared.bias))
    with torch.no_grad():
        model(calib)
    h.remove()
    assert len(rows) == 2
    both, first = torch.cat(rows).pow(2).sum(1).mean().item(), rows[0].pow(2).sum(1).mean().item()
    assert abs(first - both) > 0.1 * both  # the two sites differ enough to tell apart
    assert shared.target_energy == pytest.approx(both, rel=1e-2)


def test_same_padding_is_numeric_zero_padding():
    """aten.conv2d.padding (nn.Conv2d(padding="same")) becomes a unit where "same" is symmetric."""
    from qcb_ptq_plugin.units import LayerOp

    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 9)
    for kernel, dilation in ((3, 1), (5, 2), ((3, 5), 1)):
        conv = nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation)
        assert torch.allclose(LayerOp.from_module(conv).apply(x, conv.weight, conv.bias), conv(x), atol=1e-6)
    with pytest.raises(NotImplementedError, match="padding='same'"):
        LayerOp.from_module(nn.Conv2d(3, 4, 2, padding="same"))  # torch pads one more on the right


def test_pt2e_shared_linear_is_one_unit(digits):
    calib = digits.calibration(128)
    torch.manual_seed(0)
    model = _Mixed("zeros").eval()
    _, report = quantize_pt2e(model, calib, 8, qcb_ptq_plugin.PurifyConfig(progress=False))
    names = [u.name for u in report.units]
    assert names.count("shared") == 1 and not report.skipped
    shared = next(u for u in report.units if u.name == "shared")
    assert shared.error_after < shared.error_before


def test_ort_quantized_node_without_float_twin_is_named(digits, tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from qcb_ptq_plugin.adapters import ort

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    fp32 = tmp_path / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (digits.x_test[:1],), str(fp32), dynamo=False, opset_version=21,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}})
    feeds = iter([{"input": digits.calibration(64).numpy()}])
    quantize_static(str(fp32), str(tmp_path / "q.onnx"), type("R", (), {"get_next": lambda self: next(feeds, None)})(),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    fp, q = onnx.load(str(fp32)), onnx.load(str(tmp_path / "q.onnx"))
    gemms = [n for n in fp.graph.node if n.op_type == "Gemm"]
    orphan, gemms[0].name = gemms[0].name, "renamed"  # the quantized node has no float twin now
    plan = ort.plan(fp, q, -128, 127)
    assert [u.name for u in plan.units] == [gemms[1].name]
    assert [(u.kind, "float twin" in u.reason) for u in plan.unsupported] == [("Gemm", True)]
    with pytest.raises(NotImplementedError, match=f"'{orphan}' \\(Gemm\\).*float twin"):
        _pass.check_coverage(plan.unsupported, qcb_ptq_plugin.PurifyConfig())


@pytest.mark.parametrize("make", [
    lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
    lambda: nn.ConvTranspose2d(3, 5, (3, 2), stride=(2, 1), padding=(0, 1)),
    lambda: nn.ConvTranspose1d(4, 4, 4, stride=2, padding=3, groups=4, output_padding=1, bias=False),
    lambda: nn.ConvTranspose3d(2, 4, 3, stride=2, padding=1, output_padding=(1, 0, 1)),
    lambda: nn.Conv3d(4, 6, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1), groups=2),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv1d(3, 4, 3, dilation=2),
    lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
    lambda: nn.Linear(7, 5),
])
def test_columns_match_the_layer(make):
    """W x = y through columns: ConvTranspose as the conv of its zero-inserted, padded input with
    the flipped, channel-swapped kernel; Conv3d unfolded over three spatial dims. A subset of
    positions (``gram_positions``) is gathered directly and equals those columns of the whole."""
    from qcb_ptq_plugin.units import LayerOp

    torch.manual_seed(0)
    m = make()
    linear = isinstance(m, nn.Linear)
    x = torch.randn(2, 3, 7) if linear else torch.randn(2, m.in_channels, *([5] * len(m.kernel_size)))  # (B, T, F)
    groups, out = (1, m.out_features) if linear else (m.groups, m.out_channels)
    op, y = LayerOp.from_module(m), m(x)
    n = op.outputs(y).shape[-1]
    keep = torch.randperm(n)[: n // 2 + 1]
    assert torch.equal(op.columns(x, keep), op.columns(x)[..., keep])
    assert torch.equal(op.outputs(y, keep), op.outputs(y)[..., keep])
    assert torch.allclose(op.apply(x, m.weight, m.bias), y, atol=1e-5)
    bias = 0 if m.bias is None else op.bias_view(m.bias, y.dim())
    wg = op.grouped(m.weight)  # (G, O/G, K): rows are output channels for every kind
    assert wg.shape[:2] == (groups, out // groups)
    assert torch.allclose(torch.bmm(wg, op.columns(x)), op.outputs(y - bias), atol=1e-5)
    assert torch.equal(op.ungrouped(wg, m.weight.shape), m.weight)


class _UpNet(nn.Module):
    """conv (stride 2) -> convT (stride 2) + BN2d -> relu -> grouped, dilated convT -> head"""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up, self.bn = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(4)
        self.mix = nn.ConvTranspose2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.up(torch.relu(self.down(x)))))
        return self.head(self.mix(y).flatten(1))


class _Net3d(nn.Module):
    """an 8x8 digit as a 4x4x4 volume -> Conv3d + BN3d + relu -> head"""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("net,pda_units", [(_UpNet, {"up"}), (_Net3d, {"conv"})])
def test_convtranspose_and_conv3d_are_purified_units(digits, net, pda_units):
    torch.manual_seed(0)
    model, calib = net().eval(), digits.calibration(64)
    calib = calib.reshape(-1, 1, 4, 4, 4) if net is _Net3d else calib
    with torch.no_grad():  # BN statistics that differ from identity, so PDA has a gap to close
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[:1],))
    with torch.no_grad():
        prepared(calib)
    cfg = qcb_ptq_plugin.PurifyConfig(progress=False, pda_steps=4)
    report = qcb_ptq_plugin.purify(prepared, model, calib, config=cfg)
    assert not report.skipped
    converted = int_weights(convert_fx(prepared))
    assert set(converted) == set(report.codes)
    for name, q in report.codes.items():
        assert torch.equal(converted[name], q), name
    for u in report.units:
        assert u.error_after <= u.error_before + 1e-12, u.name
    assert {u.name for u in report.units if u.pda == "applied"} == pda_units, [(u.name, u.pda) for u in report.units]


def test_blocked_gram_equals_one_bmm():
    """Wide layers' H = cols colsᵀ is built from the blocks on and above the diagonal, mirrored."""
    from qcb_ptq_plugin.units import _gram

    torch.manual_seed(0)
    cols = torch.randn(2, 1100, 300, dtype=torch.float64)  # K = 1100: blocks of 512, 512, 76
    h = _gram(cols)
    torch.testing.assert_close(h, torch.bmm(cols, cols.transpose(1, 2)), rtol=1e-12, atol=1e-9)
    assert torch.equal(h, h.transpose(1, 2))
