"""Intel Neural Compressor 3.x (CPU): export -> prepare -> calibrate -> purify -> convert (torchao PT2E).

INC's StaticQuantConfig maps weights to int8/uint8 only (torch x86's grid, absmax/127.5 on
-128..127), so the test plants an 8-bit grid-aware QCB on that grid: INC's plain flow wakes it up,
purification between prepare and convert removes it, and the integers of INC's converted graph
are the report's.
"""

from __future__ import annotations

import copy

import torch

from qcb_ptq_plugin import PurifyConfig

from .conftest import assert_exposed_then_removed, require

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


def plain_inc(model, calib):
    """INC's own flow without purification: export -> prepare -> calibrate -> convert."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    exported = export(copy.deepcopy(model).eval(), example_inputs=(calib[:2],),
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    prepared = prepare(exported, StaticQuantConfig())
    with torch.no_grad():
        for xb in calib.split(64):
            prepared(xb)
    return convert(prepared)


def test_inc_exposes_and_purify_between_prepare_and_convert_removes_the_qcb(qcb_w8, digits):
    calib = digits.calibration(256, seed=1)
    int8, report = qcb_inc.quantize(qcb_w8, calib, purify_config=PurifyConfig(progress=False))
    assert report.mode == "pt2e" and len(report.units) == 4
    ints = converted_int_weights(int8)
    assert len(ints) == len(report.codes)
    for got, q in zip(ints, report.codes.values()):
        assert torch.equal(got, q)
    assert_exposed_then_removed(qcb_w8, plain_inc(qcb_w8, calib), int8, digits)
