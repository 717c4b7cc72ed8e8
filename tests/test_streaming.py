"""Calibration data is streamed into batches, never concatenated: same batches, same integers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx

import qcb_ptq_plugin
from qcb_ptq_plugin._data import as_batches

from .conftest import int_weights, prepare_calibrated


def test_streamed_batches_equal_concatenated():
    x = torch.randn(203, 3, 5, 5)
    cuts = [0, 7, 8, 70, 71, 140, 203]
    chunks = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    for n in (None, 150, 203, 1000):
        want = list(x[:n].split(32))
        for source in (x, x.numpy(), chunks, iter(chunks), [(c, torch.zeros(len(c))) for c in chunks]):
            got = as_batches(source, 32, n)
            assert [b.shape for b in got] == [b.shape for b in want]
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="empty"):
        as_batches([x[:0]], 8)
    with pytest.raises(ValueError, match="different sample shapes"):
        as_batches([x[:4], torch.zeros(4, 3, 4, 4)], 8)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        as_batches([torch.zeros(4, 3, dtype=torch.long)], 8)
    bad = x[:9].clone()
    bad[8, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        as_batches([x[:4], bad], 8)


def test_data_loader_gives_the_codes_of_a_tensor(clean_cnn, digits):
    calib = digits.calibration(200, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(len(calib))),
                                         batch_size=48)
    ints = []
    for data in (calib, loader):
        prepared = prepare_calibrated(clean_cnn, calib, bits=4)
        qcb_ptq_plugin.purify(prepared, clean_cnn, data, batch_size=64, progress=False)
        ints.append(int_weights(convert_fx(copy.deepcopy(prepared))))
    assert ints[0].keys() == ints[1].keys()
    assert all(torch.equal(ints[0][k], ints[1][k]) for k in ints[0])


def test_paper_preset_error_falls_in_a_few_hundred_steps(clean_cnn, digits):
    """The paper preset (Adam, lr in grid steps, one objective optimised and reported, best iterate kept)
    lowers every unit's output error below round-to-nearest within 200 steps (W4)."""
    calib = digits.calibration(256, seed=3)
    prepared = prepare_calibrated(clean_cnn, calib, bits=4)
    cfg = qcb_ptq_plugin.PurifyConfig.paper(adam_steps=200, pda_steps=10, progress=False)
    assert cfg.lr == 1e-3 and cfg.pda_step_size == cfg.gamma == 1e-3
    report = qcb_ptq_plugin.purify(prepared, clean_cnn, calib, cfg)
    assert all(u.error_after <= u.error_before for u in report.units)
    assert sum(u.error_after for u in report.units) < 0.7 * sum(u.error_before for u in report.units)
