"""PurifyConfig.paper(): its one objective falls, and the activation scales it learns reach convert."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.ao.quantization.observer import FixedQParamsObserver
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin as q
from .conftest import prepare_calibrated


def test_paper_preset_is_the_release_schedule():
    cfg = q.PurifyConfig.paper()
    assert (cfg.solver, cfg.adam_steps, cfg.adam_batch_size, cfg.act_lr) == (q.Solver.ADAM, 10000, 32, 4e-5)
    assert (cfg.gamma, cfg.pda_steps, cfg.pda_step_size) == (1e-3, 500, 1e-3)  # step = gamma, halved at 250
    with pytest.raises(ValueError, match="act_lr"):
        q.PurifyConfig(act_lr=-1.0)


@pytest.fixture(scope="module")
def paper_run(clean_cnn, digits, caplog_module):
    calib = digits.calibration(128, seed=3)
    prepared = prepare_calibrated(clean_cnn, calib, bits=4)
    calibrated = copy.deepcopy(prepared)
    cfg = q.PurifyConfig.paper(adam_steps=300, pda_steps=10, progress=False)
    report = q.purify(prepared, clean_cnn, calib, cfg)
    return calibrated, prepared, report, caplog_module


@pytest.fixture(scope="module")
def caplog_module():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger, handler = logging.getLogger("qcb_ptq_plugin.methods.lac"), Keep(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_paper_objective_falls_at_the_last_iterate(paper_run):
    """Not only the kept best: the last scored iterate of every unit is below round to nearest,
    and the report shows that same objective (after the activation and output quantizer)."""
    _, _, report, records = paper_run
    runs = [r.args for r in records if "adam objective" in r.msg]
    assert [a[0] for a in runs] == [u.name for u in report.units]
    for (name, rtn, _every, curve, _kept, best), u in zip(runs, report.units):
        assert len(curve) == 20 and curve[-1] < rtn, (name, rtn, curve)
        assert u.error_before == pytest.approx(rtn, rel=1e-4) and u.error_after == pytest.approx(best, rel=1e-4)
        assert u.error_after < 0.9 * u.error_before, name


def _output_scales(converted: torch.nn.Module) -> dict[str, float]:
    return {n: float(m.scale) for n, m in converted.named_modules()
            if type(m).__module__.startswith("torch.ao.nn") and isinstance(getattr(m, "scale", None), float)}


def test_learned_activation_scales_reach_the_converted_model(paper_run, digits):
    calibrated, prepared, _, _ = paper_run
    pinned = {n: m for n, m in prepared.named_modules() if isinstance(m, FixedQParamsObserver)}
    assert len(pinned) >= 3  # the unit outputs of conv1..3 and fc (one may keep its scale)
    before = _output_scales(convert_fx(calibrated))
    after = _output_scales(converted := convert_fx(prepared))
    learned = sorted(float(m.scale) for m in pinned.values())
    moved = sorted(after[n] for n in after if after[n] != before[n])
    assert moved == learned  # every learned scale is an output scale of the INT8 model, bit for bit
    assert all(after[n] == before[n] for n in after if after[n] not in learned)
    # and the INT8 model runs with them: still a working classifier
    acc = (converted(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc >= 0.8


def test_activation_scales_stay_without_act_lr(clean_cnn, digits):
    calib = digits.calibration(64, seed=4)
    prepared = prepare_calibrated(clean_cnn, calib, bits=8)
    q.purify(prepared, clean_cnn, calib, q.PurifyConfig.paper(adam_steps=20, pda_steps=2, act_lr=0.0, progress=False))
    assert not any(isinstance(m, FixedQParamsObserver) for m in prepared.modules())


def test_learned_activation_scales_reach_convert_pt2e(clean_cnn, digits):
    """PT2E: the learned scale replaces the torchao observer, and convert_pt2e quantizes with it."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.observer import FixedQParamsObserver as TorchaoFixed
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from qcb_ptq_plugin.ptq import prepare_pt2e_calibrated

    calib = digits.calibration(64, seed=5)
    prepared = prepare_pt2e_calibrated(clean_cnn, calib, bits=4)
    q.purify(prepared, clean_cnn, calib, q.PurifyConfig.paper(adam_steps=100, pda_steps=2, progress=False))
    learned = {float(m.scale) for m in prepared.modules() if isinstance(m, TorchaoFixed)}
    assert learned
    converted = convert_pt2e(prepared)
    scales = {float(n.args[1]) for n in converted.graph.nodes
              if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and isinstance(n.args[1], float)}
    assert learned <= scales


def test_adam_starts_from_the_fast_solvers_integers(clean_cnn, digits):
    """With no Adam step, adam_start="gram" keeps the fast solver's integers and "rtn" (the
    release's start) keeps round to nearest: the start is wired, and scored like any iterate."""
    from .conftest import int_weights

    calib = digits.calibration(64, seed=6)
    base = dict(pda_steps=3, progress=False)
    configs = {"gram": q.PurifyConfig(**base), "rtn": "rtn",
               "adam from gram": q.PurifyConfig(solver="adam", adam_steps=0, **base),
               "adam from rtn": q.PurifyConfig(solver="adam", adam_steps=0, adam_start="rtn", **base)}
    ints = {}
    for name, cfg in configs.items():
        prepared = prepare_calibrated(clean_cnn, calib, bits=4)
        if cfg == "rtn":
            q.purify(prepared, clean_cnn, calib, method="rtn", progress=False)
        else:
            q.purify(prepared, clean_cnn, calib, cfg)
        ints[name] = int_weights(convert_fx(prepared))
    same = lambda a, b: all(torch.equal(ints[a][k], ints[b][k]) for k in ints[a])  # noqa: E731
    assert not same("gram", "rtn")
    assert same("adam from gram", "gram") and same("adam from rtn", "rtn")
    with pytest.raises(ValueError, match="adam_start"):
        q.PurifyConfig(adam_start="zero")
