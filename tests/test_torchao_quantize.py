"""``qcb_ptq_plugin.quantize_``: torchao's own ``quantize_`` with purified integers, read back from torchao.

Every CPU config torchao 0.18 runs here; the model is a TinyTransformer (Linear + LayerNorm +
attention) whose Linears have 64/128 inputs, so int4 ``PerGroup(32)`` gives 2-4 groups per row.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qcb_ptq_plugin
from qcb_ptq_plugin import WeightGrid
from qcb_ptq_plugin.evalkit import models
from qcb_ptq_plugin.units import Gram

torchao_q = pytest.importorskip("torchao.quantization")
from torchao.quantization.granularity import PerGroup  # noqa: E402

from qcb_ptq_plugin.adapters.torchao_quantize import int_weights, read_grid  # noqa: E402

CONFIGS = {
    "int8-weight-only": lambda: torchao_q.Int8WeightOnlyConfig(),
    "int4-group32-weight-only": lambda: torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                       granularity=PerGroup(32)),
    "int8-dyn-act-int8": lambda: torchao_q.Int8DynamicActivationInt8WeightConfig(),
    "int8-dyn-act-int4-group32": lambda: torchao_q.Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
}


def not_embed(mod, fqn):  # the 8-wide token embedding does not split into groups of 32
    return isinstance(mod, torch.nn.Linear) and fqn != "embed"


@pytest.fixture(scope="module")
def tiny(digits):
    torch.manual_seed(0)
    return models.TinyTransformer(seq_len=8, token_dim=8, num_classes=10, dim=64).eval()


def _out_err(model, ref, x):
    with torch.no_grad():
        return (model(x) - ref(x)).pow(2).mean().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_one_line_purifies_inside_torchao_and_integers_read_back(name, tiny, digits):
    calib, x = digits.calibration(64, seed=1), digits.x_test[:256]
    plain = copy.deepcopy(tiny)
    torchao_q.quantize_(plain, CONFIGS[name](), filter_fn=not_embed)
    model, before = copy.deepcopy(tiny), copy.deepcopy(tiny.state_dict())
    float_copy = copy.deepcopy(tiny)

    report = qcb_ptq_plugin.quantize_(model, CONFIGS[name](), calib, not_embed, progress=False)

    ints = int_weights(model)  # torchao tensors, read back after torchao's own quantize_
    assert set(ints) == set(report.codes) == set(int_weights(plain)) and len(ints) == 13
    for n, q in report.codes.items():
        assert type(model.get_submodule(n).weight) is type(plain.get_submodule(n).weight)
        assert torch.equal(ints[n], q), n
        assert torch.equal(model.get_submodule(n).weight.scale, plain.get_submodule(n).weight.scale), n
    assert sum(u.flips for u in report.units) > 0
    # purified integers track the float model better than torchao's round-to-nearest, by a margin
    assert _out_err(model, float_copy, x) < 0.7 * _out_err(plain, float_copy, x)
    assert all(torch.equal(v, before[k]) for k, v in float_copy.state_dict().items())  # reference untouched
    assert report.method == "lac_pda" and all(u.pda.startswith("skipped: no BatchNorm") for u in report.units)
    if name == "int4-group32-weight-only":  # method= as in purify: LAC alone is the same here (no BN)
        lac = qcb_ptq_plugin.quantize_(copy.deepcopy(tiny), CONFIGS[name](), calib, not_embed, method="lac",
                                       progress=False)
        assert lac.method == "lac" and all(torch.equal(lac.codes[n], q) for n, q in report.codes.items())
        with pytest.raises(ValueError, match="method='nope' is unknown"):
            qcb_ptq_plugin.quantize_(copy.deepcopy(tiny), CONFIGS[name](), calib, not_embed, method="nope")


@pytest.mark.parametrize("name", ["int8-weight-only", "int4-group32-weight-only"])
def test_grid_is_torchaos_grid(name, tiny):
    """Round-to-nearest on the grid read back from torchao gives torchao's integers, bit for bit."""
    plain = copy.deepcopy(tiny)
    torchao_q.quantize_(plain, CONFIGS[name](), filter_fn=not_embed)
    for n, q in int_weights(plain).items():
        grid = read_grid(plain.get_submodule(n).weight, n).grid
        assert grid.per_group == (name.startswith("int4"))
        assert torch.equal(grid.quantize(tiny.get_submodule(n).weight), q), n
        assert torch.allclose(grid.dequantize(q), plain.get_submodule(n).weight.dequantize(), atol=1e-6), n


def test_per_group_grid_solver_beats_rounding():
    """The gram solver on a per-group grid: exact output error no worse than round-to-nearest, and lower."""
    from qcb_ptq_plugin.config import PurifyConfig
    from qcb_ptq_plugin.methods.lac import _solve_gram

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    blocks = w.reshape(16, 2, 32).abs().amax(-1)
    grid = WeightGrid.from_groups(blocks / 7.5, torch.zeros_like(blocks, dtype=torch.int64), -8, 7, 32)
    gram = Gram()
    gram.add(x.T.unsqueeze(0), (x @ w.T).T.unsqueeze(0))
    q = _solve_gram(gram, w.unsqueeze(0), grid, PurifyConfig()).reshape(w.shape)
    err = lambda q: gram.channel_errors(grid.dequantize(q).unsqueeze(0)).sum().item()  # noqa: E731
    assert q.min() >= -8 and q.max() <= 7
    assert err(q) < 0.5 * err(grid.quantize(w))


@pytest.mark.parametrize("config, problem", [
    (lambda: torchao_q.Int4WeightOnlyConfig(group_size=32), "Int4WeightOnlyConfig: its kernels need the 'mslk'"),
    (lambda: torchao_q.Float8WeightOnlyConfig(), "Float8WeightOnlyConfig: it stores floating-point weights"),
])
def test_configs_it_cannot_purify_are_refused_with_the_fix(config, problem, tiny, digits):
    model, before = copy.deepcopy(tiny), copy.deepcopy(tiny.state_dict())
    with pytest.raises(NotImplementedError, match=problem) as err:
        qcb_ptq_plugin.quantize_(model, config(), digits.calibration(8), not_embed)
    assert "IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(" in str(err.value)  # the fix
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any change
