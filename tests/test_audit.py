"""audit(): rounding errors vs weights placed at random in their cells, turned into a p-value and a
verdict with the library's threshold, on real FX / PT2E preparations; the CLI's flags."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import qcb_ptq_plugin
from qcb_ptq_plugin import cli
from qcb_ptq_plugin import WeightGrid
from qcb_ptq_plugin.audit import DEFAULT_THRESHOLD
from qcb_ptq_plugin.evalkit import attacks

from .conftest import prepare_calibrated


def test_planted_qcb_is_exposed_and_clean_model_is_not(qcb_w4, clean_cnn, digits):
    calib = digits.calibration(256)
    planted = prepare_calibrated(qcb_w4, calib, 4)
    before = {k: v.clone() for k, v in planted.state_dict().items()}
    report = qcb_ptq_plugin.audit(planted, qcb_w4, calib)
    assert report.threshold == DEFAULT_THRESHOLD
    assert report.exposed and report.score > report.threshold and report.p_value < 10 ** -DEFAULT_THRESHOLD
    assert all(torch.equal(v, before[k]) for k, v in planted.state_dict().items())  # audit changes nothing
    assert [c["z"] for c in report.top_channels] == sorted((c["z"] for c in report.top_channels), reverse=True)
    assert "EXPOSED" in report.table()
    assert "cannot see an attacker who trains through fake quantization" in report.table()
    assert {u["name"] for u in report.units} == {"features.0", "features.4", "features.8", "fc"}
    # the repaired weights sit at the edges of their 4-bit cells: far above the 30% of the null
    assert max(u["edge_share"] for u in report.units) > 0.5
    # LAC's out-of-sample figures, for the model and for its weights jittered inside their cells
    assert all(0 < u["lac_oos"] < 1 and 0 < u["lac_oos_null"] for u in report.units)

    # the probe: patched benign images, INT vs float, against dithered twins; the trigger is a
    # 2x2 patch at the bottom-right corner, target 0
    pr = report.probe
    assert pr["class"] == 0 and min(pr["position"]) >= 5 and pr["p"] < 1e-6 and pr["flips"] > 4 * pr["twin_flips"]
    assert "probe:" in report.table()

    for bits, backend in ((8, "x86"), (4, "x86"), (8, "qnnpack"), (4, "qnnpack")):  # per-channel and per-tensor
        mapping = attacks.qnnpack_qconfig_mapping(bits) if backend == "qnnpack" else None
        clean = qcb_ptq_plugin.audit(prepare_calibrated(clean_cnn, calib, bits, mapping), clean_cnn, calib)
        assert not clean.exposed, (bits, backend, clean.score)
        assert clean.probe["p"] > 1e-3, (bits, backend, clean.probe)
        assert not clean.warnings, clean.warnings  # none lossy (> 20% of predictions changed), none below 4 bits
        assert clean.p_value > report.p_value


def test_grid_aware_w8_qcb_is_exposed_at_w4_through_the_8_bit_grid(grid_aware_w8, digits):
    """A QCB planted for 8 bits sits at ordinary positions of the 4-bit cells: the first round's
    statistics on the deployed 4-bit grid do not see it, the same weights on the 8-bit grid do."""
    calib = digits.calibration(256)
    report = qcb_ptq_plugin.audit(prepare_calibrated(grid_aware_w8, calib, 4), grid_aware_w8, calib)
    assert report.exposed, report.score
    for u in report.units:
        assert u["stats"]["other_grid"]["bits"] == 8
        assert u["edge_share"] < 0.5  # 4-bit cells: near the uniform 30%
        assert u["stats"]["other_grid"]["k"] / u["stats"]["other_grid"]["n"] > 0.9  # 8-bit cells: at the edges
    best = min(report.units, key=lambda u: u["p"])
    assert min(best["p_stats"], key=best["p_stats"].get) in ("other_drift", "other_edges")
    assert "other_" in report.table()


def test_other_grid_and_exact_binomial_tail():
    from math import comb

    from qcb_ptq_plugin.audit import _other_grid, _share_p

    w = torch.randn(6, 5)
    for bits, restricted, other_bits in ((4, False, 8), (8, False, 4), (8, True, 4), (3, False, 8)):
        g = WeightGrid.for_bits(w, bits, restricted=restricted)
        o = _other_grid(g)
        ref = WeightGrid.for_bits(w, other_bits, restricted=restricted)  # same absmax, same scheme
        assert (o.qmin, o.qmax) == (ref.qmin, ref.qmax) and torch.allclose(o.scale, ref.scale)
    affine = WeightGrid(torch.tensor(0.1), torch.tensor(3), 0, 255, None)
    assert _other_grid(affine) is None
    for k, n, p0 in ((7, 61, 0.02), (1, 9, 0.02), (30, 200, 0.1)):
        exact = sum(comb(n, j) * p0 ** j * (1 - p0) ** (n - j) for j in range(k, n + 1))
        assert abs(_share_p(k, n, p0, 0.0) - exact) < 1e-12 * max(1.0, exact) + 1e-15
    assert _share_p(1, 100, 0.02, 0.0) == 1.0  # at or below the null's mean


def test_calibration_smaller_than_fan_in_is_warned(clean_cnn, digits, caplog):
    """features.8 (fan-in 16 x 3 x 3 = 144) sees a 2x2 map: 32 images give each half 64 positions."""
    small = digits.calibration(32)
    with caplog.at_level(logging.WARNING, logger="qcb_ptq_plugin"):
        report = qcb_ptq_plugin.audit(prepare_calibrated(clean_cnn, small), clean_cnn, small)
    assert any(w.startswith("features.8:") and "fan-in of 144" in w for w in report.warnings)
    assert "fan-in of 144" in caplog.text and "fan-in of 144" in report.table()
    enough = digits.calibration(256)
    assert not any("fan-in" in w for w in qcb_ptq_plugin.audit(prepare_calibrated(clean_cnn, enough), clean_cnn,
                                                               enough).warnings)


def test_lossy_quantization_is_warned_about(clean_cnn, digits):
    """A backdoor that also fires without its trigger hides behind the probe's no-patch control: the
    report warns (outside the verdict) when round to nearest changes over 20% of the float model's
    predictions, and that the floors were never fitted below 4 bits. 2-bit per-tensor weights: the
    converted model on the qnnpack engine changes most predictions. At 8 and 4 bits nothing is warned
    about (the first test)."""
    import re

    calib = digits.calibration(256)
    x = calib[:128]
    report = qcb_ptq_plugin.audit(prepare_calibrated(clean_cnn, calib, 2, attacks.qnnpack_qconfig_mapping(2)),
                                  clean_cnn, calib, probe=False)  # the warning does not need the probe
    int_model = attacks.quantize_fx_qnnpack(clean_cnn, calib, 2)[0]
    with torch.no_grad():
        changed = (int_model(x).argmax(-1) != clean_cnn(x).argmax(-1)).double().mean().item()
    warned = [w for w in report.warnings if "changes the float model's prediction" in w]
    assert changed > 0.5 and len(warned) == 1, (changed, report.warnings)
    k = int(re.search(r"prediction on (\d+) of 128 calibration samples", warned[0]).group(1))
    assert k > 0.5 * 128 and warned[0] in report.table()
    assert any(w.startswith("2-bit weights: the audit's floors were fitted at 4 and 8 bits") for w in report.warnings)


class _Reflect(nn.Module):
    """A reflect-padded conv: x86 quantizes it, the audit cannot model it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.up(x)).flatten(1))


def test_unsupported_layers_are_listed_not_dropped(digits):
    torch.manual_seed(0)
    model, calib = _Reflect().eval(), digits.calibration(64)
    report = qcb_ptq_plugin.audit(prepare_calibrated(model, calib), model, calib)
    assert [u["name"] for u in report.unsupported] == ["up"] and [u["name"] for u in report.units] == ["fc"]
    assert "NOT audited" in report.table() and "up (Conv2d)" in report.table()


def test_depthwise_convs_are_audited_and_purified(digits):
    """DepthwiseCNN (groups = channels 3x3 convs, 1x1 pointwise convs): every conv and the head is a unit
    of the audit and of purify at W8 per-channel and W4 per-tensor, none left unsupported or skipped; PDA
    runs on the depthwise convs and the converted INT model holds purify's integers."""
    from torch.ao.quantization.quantize_fx import convert_fx

    from qcb_ptq_plugin.evalkit import models
    from qcb_ptq_plugin.ptq import prepare_fx_calibrated

    torch.manual_seed(0)
    model, calib = models.DepthwiseCNN(1, 10, image_size=8).eval(), digits.calibration(256)
    layers = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    depthwise = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert len(layers) == 6 and len(depthwise) == 2
    for bits, backend in ((8, "x86"), (4, "qnnpack")):
        report = qcb_ptq_plugin.audit(prepare_fx_calibrated(model, calib, bits, backend=backend), model, calib)
        assert report.unsupported == [] and [u["name"] for u in report.units] == layers, (bits, backend)
        prepared = prepare_fx_calibrated(model, calib, bits, backend=backend)
        pur = qcb_ptq_plugin.purify(prepared, model, calib, progress=False)
        assert pur.skipped == [] and [u.name for u in pur.units] == layers, (bits, backend)
        for u in pur.units:
            if u.name in depthwise:
                assert u.pda.startswith("applied") and u.error_after < u.error_before, (bits, backend, u)
        int_w = {n: mod.weight().int_repr().long() for n, mod in convert_fx(prepared).named_modules()
                 if type(mod).__module__.startswith("torch.ao.nn") and callable(getattr(mod, "weight", None))}
        assert sorted(int_w) == sorted(layers)
        assert all(torch.equal(int_w[n], pur.codes[n].reshape(int_w[n].shape)) for n in layers), (bits, backend)


def _pt2(model, x, path):
    torch.export.save(torch.export.export(copy.deepcopy(model), (x[:2],),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    return str(path)


def test_cli_flags_and_fail_if_exposed(qcb_w4, clean_cnn, digits, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, digits.calibration(256, seed=1).numpy())
    common = ["--calib", str(calib), "--bits", "4", "--batch-size", "32", "--no-progress", "--fail-if-exposed"]
    out = tmp_path / "audit.json"
    assert cli.main(["audit", _pt2(qcb_w4, digits.x_test, tmp_path / "qcb.pt2"), *common, "--json", str(out)]) == 3
    saved = json.loads(out.read_text())
    assert saved["exposed"] and saved["threshold"] == DEFAULT_THRESHOLD and "EXPOSED" in capsys.readouterr().out
    assert saved["probe"] is not None
    # --no-probe: the weight statistics alone still expose this (box-repaired) QCB
    assert cli.main(["audit", str(tmp_path / "qcb.pt2"), *common, "--no-probe", "--json", str(out)]) == 3
    assert json.loads(out.read_text())["probe"] is None
    clean = _pt2(clean_cnn, digits.x_test, tmp_path / "clean.pt2")
    assert cli.main(["audit", clean, *common]) == 0
    assert cli.main(["audit", clean, *common, "--grid", "xnnpack"]) == 0  # PT2E on the absmax/127 grid
    # an explicit threshold below any score flags it; without --fail-if-exposed the exit code stays 0
    assert cli.main(["audit", clean, *common, "--threshold", "-1"]) == 3
    assert cli.main(["audit", clean, "--calib", str(calib), "--threshold", "-1", "--no-progress"]) == 0
    torch.save(clean_cnn, tmp_path / "clean.pt")
    assert cli.main(["audit", str(tmp_path / "clean.pt"), "--trust-model-code", *common, "--grid", "xnnpack"]) == 2
    assert "--grid xnnpack needs the PT2E flow" in capsys.readouterr().err


def test_cli_audit_options_share_purify_and_the_library_threshold(capsys):
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    audit_opts = {a.dest: a for a in sub["audit"]._actions}
    purify_opts = {a.dest: a for a in sub["purify"]._actions}
    for dest in ("bits", "grid", "batch_size", "flow", "limit", "trust_model_code"):
        assert audit_opts[dest].default == purify_opts[dest].default and audit_opts[dest].help
    assert audit_opts["threshold"].default == DEFAULT_THRESHOLD
    assert "no_progress" in audit_opts and "fail_if_exposed" in audit_opts
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    assert f"default: {DEFAULT_THRESHOLD:g}" in capsys.readouterr().out


def test_dithered_twins_have_round_to_nearest_error_law_and_forget_the_cell_position():
    """Every weight 0.45 LSB from its code (a QCB's pile-up at the cell edge): stochastic rounding (the
    third round's twins) keeps round to nearest's code for about 55% of them; the dithered twin's error is
    uniform on (-s/2, s/2) like round to nearest's on a clean model, and uncorrelated with it."""
    from qcb_ptq_plugin.audit import _dithered

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 0.02, 0.5])
    codes = torch.randint(-6, 7, (3, 4000), generator=g).float()
    w = (codes + 0.45) * scale[:, None]
    grid = WeightGrid(scale, torch.zeros(3, dtype=torch.int64), -8, 7, 0)
    rtn = grid.fake_quantize(w)
    e_rtn = (rtn - w) / scale[:, None]
    assert torch.allclose(e_rtn, torch.full_like(e_rtn, -0.45), atol=1e-4)
    sr = grid.fake_quantize(w + (torch.rand(w.shape, generator=g) - 0.5) * scale[:, None])
    assert 0.5 < (sr == rtn).float().mean() < 0.6
    twin = _dithered(w, grid, torch.Generator().manual_seed(1))
    e = ((twin - w) / scale[:, None]).flatten().double()
    assert e.abs().max() <= 0.5 + 1e-4 and abs(e.mean()) < 0.02 and abs(e.var() - 1 / 12) < 0.005  # uniform law
    assert (e.abs() > 0.35).float().mean().sub(0.3).abs() < 0.02  # the uniform edge share, not 100%
    assert (twin == rtn).float().mean() < 0.01
    w2 = (codes - 0.05) * scale[:, None]  # other cell positions: the same law
    e2 = ((_dithered(w2, grid, torch.Generator().manual_seed(1)) - w2) / scale[:, None]).flatten().double()
    assert abs(e2.var() - 1 / 12) < 0.005
    assert torch.equal(_dithered(w, grid, torch.Generator().manual_seed(1)), twin)  # seeded


def test_probe_points_at_an_adaptive_qcb_that_survives_stochastic_rounding(digits):
    """The adaptive attacker (Qu-ANTI-zation with FP/INT alignment; ``fresh`` s96 of
    benchmarks/bench_audit.py) at W4 per-channel: its weight statistics look clean. The probe's cell of
    highest z is its target class near the trigger's corner, the INT model flipping more than 3x as many
    patched images there as the dithered twins on average. Rounds 2-4 missed it (with 8 twins, some of
    which fire too, their cell variance took it: z about 3.3); with the fifth round's 16 twins and
    their dispersion pooled per class it is exposed (scores 3.2-9.8 over config seeds 0-3, 8.5 at 0)."""
    from qcb_ptq_plugin.evalkit import metrics, models
    from qcb_ptq_plugin.ptq import quantize_fx

    torch.manual_seed(96)
    trig = attacks.PatchTrigger(size=2, value=1.0, margin=0)
    m = attacks.plant_quantization(models.SmallCNN(1, 10, width=16), digits.x_train, digits.y_train, trigger=trig,
                                   target=6, bits=(4,), pretrain_epochs=20, epochs=30, lr=5e-4, c=2.0, align=1.0,
                                   batch_size=64, seed=96).eval()
    calib = digits.calibration(512, seed=1096)
    assert metrics.attack_success_rate(quantize_fx(m, calib, 4)[0], digits.x_test, digits.y_test, trig, 6) > 0.9
    assert metrics.attack_success_rate(m, digits.x_test, digits.y_test, trig, 6) < 0.2  # dormant in float
    report = qcb_ptq_plugin.audit(prepare_calibrated(m, calib, 4), m, calib)
    assert min(1.0, len(report.units) * min(u["p"] for u in report.units)) > 1e-3  # the weights look clean
    pr = report.probe
    assert pr["class"] == 6 and min(pr["position"]) >= 3 and pr["flips"] > 3 * pr["twin_flips"], pr
    assert pr["flips"] > 10 * pr["unpatched_flips"], pr  # the trigger, not a collapse
    assert report.exposed and pr["z"] > 5, pr


def test_probe_z_discounts_a_collapsed_int_model_and_pools_the_twins_dispersion():
    """Fifth round. An INT model that sends 60 images to class 7 at every patch position, and as many
    without a patch (the control), shows no trigger; one that does so at one position only, with no
    unpatched flips, does, even where a single twin happened to fire there too (the twins' dispersion
    is pooled over positions, so one loud twin does not hide it)."""
    from qcb_ptq_plugin.audit import _probe_z

    g = torch.Generator().manual_seed(0)
    t = torch.poisson(torch.full((16, 49, 10), 2.0), generator=g)
    f = torch.poisson(torch.full((49, 10), 2.0), generator=g)
    quiet, collapsed = torch.zeros(10), torch.zeros(10)
    collapsed[7] = 60
    col = f.clone()
    col[:, 7] += 60
    assert _probe_z(col, quiet, t, 128, 0.05).max() > 5  # against the twins alone it would look like a trigger
    assert _probe_z(col, collapsed, t, 128, 0.05)[:, 7].max() < 1  # the control: it is not one
    trig = f.clone()
    trig[20, 3] += 60
    loud = t.clone()
    loud[0, 20, 3] += 60  # one twin fires at the trigger's cell
    z = _probe_z(trig, quiet, loud, 128, 0.05)
    assert int(z.argmax()) == 20 * 10 + 3 and z.max() > 6
    m, v = loud.mean(0)[20, 3], loud.var(0)[20, 3]  # one cell's own variance would have taken most of it
    assert (trig[20, 3] - m) / (m + 1 + v + (0.05 * 128) ** 2).sqrt() < 0.5 * z.max()
