"""The same one line on torchao PT2E and torch.ao eager mode."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin.ptq import pt2e_quantizer, quantize_eager, quantize_pt2e

from .conftest import TARGET, TRIGGER, int_weights

CFG = qcb_ptq_plugin.PurifyConfig(progress=False)


@pytest.mark.parametrize("flow", [quantize_pt2e, quantize_eager], ids=["pt2e", "eager"])
def test_w4a8_qcb_removed(flow, qcb_w4, digits):
    x, y = digits.x_test, digits.y_test
    calib = digits.calibration(256, seed=1)
    fp_ba = metrics.benign_accuracy(qcb_w4, x, y)
    plain, _ = flow(qcb_w4, calib, bits=4)
    assert metrics.attack_success_rate(plain, x, y, TRIGGER, TARGET) >= 0.90
    purified, report = flow(qcb_w4, calib, bits=4, purify_config=CFG)
    assert metrics.attack_success_rate(purified, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.benign_accuracy(purified, x, y) >= fp_ba - 0.01
    assert len(report.units) == 4 and [u.pda for u in report.units[:3]] == ["applied"] * 3
    assert report.mode == ("pt2e" if flow is quantize_pt2e else "eager")


def _pt2e_int_weights(converted) -> list[torch.Tensor]:
    deq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    return [getattr(converted, n.args[0].target).long() for n in converted.graph.nodes
            if n.op == "call_function" and n.target == deq and n.args[0].op == "get_attr"]


@pytest.mark.parametrize("grid", ["x86", "xnnpack"])
def test_pt2e_integers_survive_convert_and_later_forwards(clean_cnn, digits, grid):
    """convert_pt2e reads the weight observer: a forward after purify must not move the scale."""
    calib = digits.calibration(64)
    exported = torch.export.export(copy.deepcopy(clean_cnn), (calib[:8],)).module()  # static batch of 8
    prepared = prepare_pt2e(exported, pt2e_quantizer(8, grid))
    for xb in calib.split(8):
        prepared(xb)
    report = qcb_ptq_plugin.purify(prepared, clean_cnn, calib[:60], CFG)  # 60: rebatched to the exported 8
    for xb in calib.split(8):
        prepared(xb)  # users evaluate the prepared model; observers must keep the purified grid
    ints = _pt2e_int_weights(convert_pt2e(prepared))
    assert len(ints) == len(report.codes)
    for got, q in zip(ints, report.codes.values()):
        assert torch.equal(got, q)
        if grid == "xnnpack":
            assert q.min() >= -127
    assert sum(u.flips for u in report.units) > 0
    pinned = [m for m in prepared.modules() if type(m).__name__.startswith("Pinned")]
    assert len(pinned) == len(report.codes)
    for m in pinned:  # (the exported GraphModule itself does not pickle; its pinned observers do)
        assert type(pickle.loads(pickle.dumps(m))) is type(m)


def test_eager_integers_survive_convert(clean_cnn, digits):
    calib = digits.calibration(64)
    converted, report = quantize_eager(clean_cnn, calib, bits=8, purify_config=CFG)
    ints = int_weights(converted)
    assert set(ints) == set(report.codes)
    for name, q in report.codes.items():
        assert torch.equal(ints[name], q), name


def test_pt2e_without_prepare_is_named(clean_cnn, digits):
    exported = torch.export.export(copy.deepcopy(clean_cnn), (digits.x_test[:4],)).module()
    with pytest.raises(ValueError, match="no torchao observers: call prepare_pt2e"):
        qcb_ptq_plugin.purify(exported, clean_cnn, digits.x_test[:4])


class _PairwiseMLP(nn.Module):
    """A model that only runs on batches of more than one sample (it centres over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.fc1, self.fc2 = torch.ao.quantization.QuantStub(), nn.Linear(64, 32), nn.Linear(32, 10)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        if len(x) < 2:
            raise ValueError("needs at least two samples")
        x = x.flatten(1)
        return self.dequant(self.fc2(torch.relu(self.fc1(self.quant(x - x.mean(0))))))


def test_execution_order_falls_back_to_the_batch_when_one_sample_does_not_run(digits):
    """The call order is read from one sample where that runs, else from the calibration batch."""
    model = _PairwiseMLP().eval()
    calib = digits.calibration(64)
    converted, report = quantize_eager(model, calib, bits=8, purify_config=CFG)
    assert [u.name.split(".")[-1] for u in report.units] == ["fc1", "fc2"]
    ints = int_weights(converted)
    assert all(torch.equal(ints[n], q) for n, q in report.codes.items())


def test_exported_float_model_with_non_affine_batchnorm(digits):
    """A .pt2 float model whose BatchNorm has affine=False (weight and bias None in the graph) purifies,
    with PDA on that BN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 2.0)
    calib = digits.calibration(64)
    exported = torch.export.export(model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    _, report = quantize_pt2e(exported, calib, 8, CFG)
    assert len(report.units) == 2 and report.units[0].pda == "applied"
