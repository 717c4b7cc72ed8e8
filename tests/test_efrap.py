"""EFRAP solves one problem per model, wherever the toolchain keeps the BatchNorm.

torch.ao FX and PT2E fold BN into the conv weight before quantizing it; onnxruntime's QDQ graph
quantizes the raw conv weight and runs BN after it in float. Per-channel grids give the same
integers either way (the scale follows the row), but EFRAP weighs an activation error against a
truncation error in the units of the weight it sees: in raw units channel o's activation term
shrinks by g_o^2 and its flip term by |g_o| (g = gamma / sqrt(var + eps)), so the balance moves
per channel by g_o. The method measures both terms on the folded weight (balance "weight", as
released) or in each row's own LSB units (balance "lsb", the default, where the gain cancels);
these tests check that the folded and the raw view of one layer get the same integers, and that
the default gives a layer the same integers whatever the scale of its weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcb_ptq_plugin.grid import WeightGrid
from qcb_ptq_plugin.methods.efrap import EfrapConfig, efrap
from qcb_ptq_plugin.units import Unit, UnitData, float_bn, float_layer


def _bn(out: int, gen: torch.Generator) -> nn.Module:
    gain = torch.exp(torch.empty(out).uniform_(-2.3, 2.3, generator=gen))  # g from 0.1 to 10
    var = torch.rand(out, generator=gen) + 0.5
    return float_bn(gain * (var + 1e-5).sqrt(), torch.randn(out, generator=gen), torch.randn(out, generator=gen),
                    var, eps=1e-5, spatial_dims=2)


def _codes(weight, bias, fp_layer, bn, batches, bits, **cfg):
    grid = WeightGrid.for_bits(weight, bits, restricted=True)  # per-channel absmax / qmax, as ORT
    unit = Unit("conv", None, fp_layer, weight, bias, grid, write=lambda _: None, bn=bn)
    data = UnitData(unit, lambda _u, b: b, batches)
    return efrap(unit, data, EfrapConfig(progress=False, steps=300, **cfg)).codes, grid.quantize(weight)


def _batches(gen, cin, drift=0.05, n=4):
    batches = []
    for _ in range(n):
        i_fp = torch.relu(torch.randn(32, cin, 6, 6, generator=gen))
        i_q = i_fp + drift * torch.randn(i_fp.shape, generator=gen)  # the quantized model's input drifts a little
        batches.append((i_q, i_fp))
    return batches


@pytest.mark.parametrize("balance", ["lsb", "weight"])
def test_efrap_gives_the_same_integers_with_bn_folded_or_after_the_layer(balance):
    gen = torch.Generator().manual_seed(0)
    out, cin, bits = 16, 8, 4
    w = torch.randn(out, cin, 3, 3, generator=gen) * 0.2
    b = torch.randn(out, generator=gen) * 0.1
    bn = _bn(out, gen)
    gain = bn.weight / (bn.running_var + bn.eps).sqrt()
    raw = float_layer(w, b, padding=1)
    batches = _batches(gen, cin)
    w_fold = w * gain.view(-1, 1, 1, 1)
    b_fold = (b - bn.running_mean) * gain + bn.bias
    folded, rtn_folded = _codes(w_fold, b_fold, raw, bn, batches, bits, balance=balance)  # FX / PT2E: BN folded
    after, rtn_after = _codes(w, b, raw, bn, batches, bits, balance=balance)  # onnxruntime: raw W, BN after it
    assert torch.equal(rtn_folded, rtn_after)  # the grids agree: any difference below is EFRAP's
    flips = (folded != rtn_folded).float().mean().item()
    assert 0.05 < flips < 0.95  # EFRAP flips some of the roundings, not none or all
    assert (folded != after).float().mean().item() <= 0.005


def test_default_balance_gives_the_same_integers_at_any_weight_scale():
    """With the terms in LSB units (default), scaling a layer's weights by c (grid and float output
    scale with it) leaves its integers unchanged; with the release's weight units the activation
    term grows by c^2 and the flip term by c, so the balance, and the integers, move."""
    gen = torch.Generator().manual_seed(1)
    out, cin, bits = 16, 8, 8
    w = torch.randn(out, cin, 3, 3, generator=gen) * 0.2
    b = torch.randn(out, generator=gen) * 0.1
    batches = _batches(gen, cin, drift=0.2)
    got = {}
    for balance in ("lsb", "weight"):
        for c in (1.0, 8.0):  # a power of two: W/s is bitwise the same at both scales
            got[balance, c], rtn = _codes(w * c, b * c, float_layer(w * c, b * c, padding=1), None, batches, bits,
                                          balance=balance)
            assert 0 < (got[balance, c] != rtn).float().mean().item() < 0.95  # some roundings flip
    assert torch.equal(got["lsb", 1.0], got["lsb", 8.0])
    assert (got["weight", 1.0] != got["weight", 8.0]).float().mean().item() > 0.01  # the release's units: it moves


def test_onnxruntime_units_with_bn_after_them_are_weighted_by_its_gain(tmp_path):
    """Through the real ORT flow: a graph exported with its BatchNormalization nodes (as
    bench_defenses does, for PDA) gives conv units on the raw weight with the BN after them, and
    EFRAP reads that BN's gain; the default eval export folds BN into Conv, and there is none."""
    import warnings

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from qcb_ptq_plugin.adapters import ort
    from qcb_ptq_plugin.evalkit import models
    from qcb_ptq_plugin.methods.efrap import _unfolded_bn_gain

    gen = torch.Generator().manual_seed(0)
    model = models.SmallCNN(1, 10, width=4).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:  # trained-looking statistics (distinct values: the exporter shares equal constants)
            bn.weight.uniform_(0.5, 2.0, generator=gen)
            bn.bias.uniform_(-0.5, 0.5, generator=gen)
            bn.running_mean.uniform_(-1.0, 1.0, generator=gen)
            bn.running_var.uniform_(0.05, 0.5, generator=gen)
    x = torch.rand(16, 1, 8, 8, generator=gen)

    class Reader:
        def __init__(self):
            self.it = iter([{"input": x[i:i + 8].numpy()} for i in (0, 8)])

        def get_next(self):
            return next(self.it, None)

    gains = []
    for keep_bn in (True, False):
        fp32, q8 = tmp_path / f"fp{keep_bn}.onnx", tmp_path / f"q{keep_bn}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) if keep_bn else {}
            torch.onnx.export(model, (x[:1],), str(fp32), dynamo=False, opset_version=21, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "b"}}, **mode)
            quantize_static(str(fp32), str(q8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        plan = ort.plan(onnx.load(str(fp32)), onnx.load(str(q8)), -127, 127)
        gains.append([_unfolded_bn_gain(u) for u in plan.units if u.op.kind != "linear"])
    with_bn, folded = gains
    assert len(with_bn) == len(bns) == 3 and all(g is not None for g in with_bn)
    for g, bn in zip(with_bn, bns):
        assert torch.allclose(g, bn.weight / (bn.running_var + bn.eps).sqrt())
    assert len(folded) == 3 and all(g is None for g in folded)


def test_ort_plan_finds_a_bn_whose_statistics_the_exporter_shares(tmp_path):
    """An untrained BN (mean 0 = bias 0, var 1 = weight 1) is exported with Identity copies of
    equal constants; the plan still reads the BN after each conv (PDA and EFRAP need it)."""
    import warnings

    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    from qcb_ptq_plugin.adapters import ort

    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fp32, q8 = tmp_path / "fp.onnx", tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:1],), str(fp32), dynamo=False, opset_version=21, input_names=["input"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        feeds = iter([{"input": x[:1].numpy()}])
        quantize_static(str(fp32), str(q8), type("R", (), {"get_next": lambda self: next(feeds, None)})(),
                        quant_format=QuantFormat.QDQ, per_channel=True)
    fp = onnx.load(str(fp32))
    assert any(n.op_type == "Identity" for n in fp.graph.node)  # the exporter shared equal constants
    conv = [u for u in ort.plan(fp, onnx.load(str(q8)), -127, 127).units if u.op.kind != "linear"]
    assert len(conv) == 1 and conv[0].bn is not None
    assert torch.equal(conv[0].bn.running_var, torch.ones(4))


@pytest.mark.parametrize("bits", [8, 4])
def test_annealed_regulariser_ends_at_the_hard_rounding(bits, monkeypatch):
    """The default anneals the regulariser (AdaRound's schedule), so each h = sigmoid(V) ends near its
    hard bit [V >= 0] and the hard rounding's activation term stays near the soft W(V)'s, the point the
    loss was minimised at. The release's constant 0.01 (weak in LSB units) leaves h mid-way, so the hard
    rounding is not what the loss saw (on the bench's W8 QCBs: up to 13x the soft output error)."""
    from qcb_ptq_plugin.methods import efrap as efrap_module

    seen = {}
    optimise = efrap_module._optimise

    def spy(terms, v, cfg):
        seen["terms"], seen["v"] = terms, optimise(terms, v, cfg)
        return seen["v"]

    monkeypatch.setattr(efrap_module, "_optimise", spy)
    gen = torch.Generator().manual_seed(0)
    out, cin = 16, 8
    w = torch.randn(out, cin, 3, 3, generator=gen) * 0.2
    b = torch.randn(out, generator=gen) * 0.1
    batches = _batches(gen, cin, drift=0.2)
    dist, gap = {}, {}
    for schedule, weight in (("anneal", 10.0), ("const", 0.01)):
        codes, rtn = _codes(w, b, float_layer(w, b, padding=1), None, batches, bits, reg_schedule=schedule,
                            reg_weight=weight)
        assert 0.05 < (codes != rtn).float().mean().item() < 0.95  # EFRAP flips some roundings, not none or all
        t, v = seen["terms"], seen["v"].detach()
        bit = (v >= 0).float()
        soft, hard = t._soft(v)[1], t.s * ((t.floor + bit + t.z).clamp(t.qmin, t.qmax) - t.z)
        act = [(t.row_weight * ((torch.bmm(x.double(), t.H.double()) - 2 * t.C.double()) * x.double())).sum().item()
               for x in (soft, hard)]
        dist[schedule] = (torch.sigmoid(v) - bit).abs().mean().item()
        gap[schedule] = act[1] - act[0]  # the activation term's rise from the soft weight to the hard rounding
    assert dist["anneal"] < 0.06 and dist["const"] > 0.1
    assert abs(gap["anneal"]) < 0.5 * abs(gap["const"])  # measured: 40 vs 406 at W8, 32 vs 153 at W4


@pytest.mark.parametrize("beta", [2.0, 7.3, 20.0])
def test_closed_form_gradient_is_autograd_at_every_regulariser_exponent(beta):
    """The annealed regulariser sum(1 - |2h - 1|^beta): the closed-form gradient agrees with autograd
    at the schedule's ends and in between (beta = 2 is the release's fixed exponent)."""
    from qcb_ptq_plugin.methods.efrap import _Terms

    g = torch.Generator().manual_seed(1)
    G, O, K = 2, 3, 5
    w = torch.randn(G, O, K, generator=g)
    s = torch.rand(G, O, 1, generator=g) * 0.2 + 0.05
    x = torch.randn(G, K, 40, generator=g)
    rest = w / s - torch.floor(w / s)
    t = _Terms(torch.floor(w / s), s, torch.zeros_like(s), -4, 3, x @ x.transpose(1, 2) / 40,
               torch.randn(G, O, K, generator=g), 1 - torch.round(rest), rest.clamp(max=0.5), 3.0, 10.0,
               torch.rand(G, O, 1, generator=g) * 4, beta=beta)
    v = torch.randn(G, O, K, generator=g).requires_grad_(True)
    act, flip, reg = t.loss(v)
    (auto,) = torch.autograd.grad(act + 3.0 * flip + 10.0 * reg, v)
    assert torch.allclose(t.grad(v.detach()), auto, atol=1e-4, rtol=1e-4)


def test_config_rejects_an_unknown_regulariser_schedule():
    with pytest.raises(ValueError, match="reg_schedule"):
        EfrapConfig(reg_schedule="cosine")
    paper = EfrapConfig.paper()
    assert (paper.reg_schedule, paper.reg_weight, paper.balance) == ("const", 0.01, "weight")
    assert (EfrapConfig().reg_schedule, EfrapConfig().reg_weight) == ("anneal", 10.0)
