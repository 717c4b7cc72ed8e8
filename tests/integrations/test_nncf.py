"""OpenVINO NNCF: ``nncf.quantize`` then one purify call, for the ONNX and the torch FX backends.

NNCF's quantize allows 8-bit weights only (its CPU/GPU/NPU hardware configs refuse num_bits=4), on
the narrow grid absmax/127 (-127..127), so the tests plant an 8-bit grid-aware QCB on that grid:
NNCF's plain flow must wake it up, the purified flow must not, and the integers read back from
NNCF's export (the saved ``.onnx``; ``torch.export`` of the FX result saved as ``.pt2``) must be the
report's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ..conftest import TARGET, TRIGGER
from .conftest import assert_exposed_then_removed, export_onnx, require

nncf = require("nncf", "nncf")
onnx = require("onnx", "test")
from onnx import numpy_helper  # noqa: E402

from qcb_ptq_plugin import PurifyConfig  # noqa: E402
from qcb_ptq_plugin import onnx as qonnx  # noqa: E402
from qcb_ptq_plugin.evalkit import metrics  # noqa: E402
from qcb_ptq_plugin.integrations import nncf as qcb_nncf  # noqa: E402

QUIET = PurifyConfig(progress=False)


@pytest.fixture(scope="module")
def calib(digits):
    return digits.calibration(256, seed=1).split(64)


# ---------------------------------------------------------------------------------------------
# ONNX backend


@pytest.fixture(scope="module")
def fp32(qcb_w8_narrow, digits, tmp_path_factory):
    return export_onnx(qcb_w8_narrow, digits.x_test[:1], tmp_path_factory.mktemp("nncf") / "fp32.onnx")


@pytest.fixture(scope="module")
def dataset(calib):
    return nncf.Dataset([b.numpy() for b in calib], lambda b: {"input": b})


def quantize(fp32, dataset):
    return nncf.quantize(fp32, dataset, subset_size=4)  # 4 batches of 64


def test_nncf_onnx_exposes_and_purify_onnx_removes_the_qcb(fp32, dataset, digits, tmp_path):
    plain = quantize(fp32, dataset)
    purified = quantize(fp32, dataset)
    report = qcb_nncf.purify_onnx(fp32, purified, dataset, QUIET)
    assert report.mode == "nncf-onnx" and len(report.units) == 4

    onnx.save(purified, str(tmp_path / "purified.onnx"))  # NNCF's ONNX export is the ModelProto itself
    saved = onnx.load(str(tmp_path / "purified.onnx"))
    ints = qonnx.int_weights(saved)
    assert len(ints) == len(report.codes)
    for (_, q_file), q in zip(ints, report.codes.values()):
        assert np.array_equal(q_file.reshape(q.shape), q.numpy())
        assert q.abs().max() <= 127  # NNCF's narrow range

    a = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in saved.graph.initializer}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert len(changed) == 4 and all(a[k].dtype == np.int8 for k in changed)  # weight integers only: scales and
    # NNCF's corrected biases stay as NNCF set them
    assert_exposed_then_removed(qonnx.OrtModel(fp32), qonnx.OrtModel(plain), qonnx.OrtModel(saved), digits)


def test_wrong_inputs_name_the_fix(fp32, dataset):
    with pytest.raises(TypeError, match="FP32 and the quantized onnx.ModelProto"):
        qcb_nncf.purify_onnx(fp32, "int8.onnx", dataset)
    with pytest.raises(ValueError, match="no Conv/Gemm/MatMul with integer weights"):
        qcb_nncf.purify_onnx(fp32, fp32, dataset)


# ---------------------------------------------------------------------------------------------
# torch FX backend


def export(model, example):
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def pt2_int_weights(program) -> list[torch.Tensor]:
    """The int8 weights an exported program carries (NNCF's compressed weights: int8 * scale), in graph order."""
    tensors = {**program.state_dict, **program.constants}
    sig = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers,
           **program.graph_signature.inputs_to_lifted_tensor_constants}
    return [tensors[sig[n.name]] for n in program.graph.nodes
            if n.op == "placeholder" and n.name in sig and tensors[sig[n.name]].dtype == torch.int8
            and any(u.target == torch.ops.aten.mul.Tensor for u in n.users)]


def test_nncf_fx_exposes_and_purify_fx_removes_the_qcb(qcb_w8_narrow, calib, digits, tmp_path):
    model, x = qcb_w8_narrow.eval(), digits.x_test
    dataset = nncf.Dataset(list(calib))
    plain = nncf.quantize(export(model, x[:2]).module(), dataset, subset_size=4)
    purified = nncf.quantize(export(model, x[:2]).module(), dataset, subset_size=4)
    report = qcb_nncf.purify_fx(model, purified, dataset, QUIET)
    assert report.mode == "nncf-fx" and [u.name for u in report.units] == ["features.0", "features.4",
                                                                            "features.8", "fc"]

    torch.export.save(export(purified, x[:2]), str(tmp_path / "purified.pt2"))
    loaded = torch.export.load(str(tmp_path / "purified.pt2"))
    ints = pt2_int_weights(loaded)
    assert len(ints) == len(report.codes)
    for got, q in zip(ints, report.codes.values()):
        assert torch.equal(got.long(), q)
    assert_exposed_then_removed(model, plain, loaded.module(), digits)
    assert metrics.attack_success_rate(purified, x, digits.y_test, TRIGGER, TARGET) <= 0.02


def test_purify_fx_names_the_fix(qcb_w8_narrow, calib, digits):
    with pytest.raises(TypeError, match="torch.fx.GraphModule nncf.quantize returned"):
        qcb_nncf.purify_fx(qcb_w8_narrow, qcb_w8_narrow, list(calib))
    exported = export(qcb_w8_narrow.eval(), digits.x_test[:2]).module()
    with pytest.raises(TypeError, match="not the exported graph"):
        qcb_nncf.purify_fx(exported, exported, list(calib))
    with pytest.raises(ValueError, match="no conv/linear with an int8 weight constant"):
        qcb_nncf.purify_fx(qcb_w8_narrow, exported, list(calib))
