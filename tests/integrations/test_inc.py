"""Intel Neural Compressor 3.x (CPU): export -> prepare -> calibrate -> purify -> convert (torchao PT2E).

INC's StaticQuantConfig maps weights to int8/uint8 only, so a W4 QCB cannot be quantized through
INC's own config; an 8-bit QCB cannot be hidden in FP32 here. The test runs INC's default W8A8
on the suite's clean model with the trigger, checks purification keeps accuracy and the trigger
harmless, and reads the integers back from INC's converted model.
"""

from __future__ import annotations

import torch

from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin.evalkit import metrics

from ..conftest import TARGET, TRIGGER
from .conftest import require

require("neural_compressor.torch.quantization", "inc")
from qcb_ptq_plugin.integrations import inc as qcb_inc  # noqa: E402


def converted_int_weights(converted) -> list[torch.Tensor]:
    """The integers of INC's converted graph: it keeps float weights and quantizes them in the graph
    (``convert_pt2e(fold_quantize=False)``), so evaluate each weight's quantize_per_channel node."""
    qpc = torch.ops.quantized_decomposed.quantize_per_channel.default
    attrs, out = torch.fx.Interpreter(converted), []
    for n in converted.graph.nodes:
        if n.op == "call_function" and n.target == qpc and n.args[0].op == "get_attr":
            args = [attrs.fetch_attr(a.target) if isinstance(a, torch.fx.Node) else a for a in n.args]
            out.append(qpc(*args).long())
    return out


def test_inc_prepare_purify_convert(clean_cnn, digits):
    x, y = digits.x_test, digits.y_test
    calib = digits.calibration(256, seed=1)
    fp_ba, fp_asr = metrics.benign_accuracy(clean_cnn, x, y), metrics.attack_success_rate(clean_cnn, x, y, TRIGGER,
                                                                                            TARGET)
    int8, report = qcb_inc.quantize(clean_cnn, calib, purify_config=PurifyConfig(progress=False))
    assert report.mode == "pt2e" and len(report.units) == 4
    assert all(u.error_after < u.error_before for u in report.units) and sum(u.flips for u in report.units) > 0
    ints = converted_int_weights(int8)
    assert len(ints) == len(report.codes)
    for got, q in zip(ints, report.codes.values()):
        assert torch.equal(got, q)
    assert metrics.benign_accuracy(int8, x, y) >= fp_ba - 0.01
    assert metrics.attack_success_rate(int8, x, y, TRIGGER, TARGET) <= fp_asr + 0.02

