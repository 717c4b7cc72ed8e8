"""Microsoft Olive: the example workflow (``examples/olive/workflow.json``) run by Olive's engine.

``OnnxStaticQuantization`` with Olive's defaults (QDQ, int8 weights per tensor on ORT's narrow grid
absmax/127, int8 activations per tensor) wakes up an 8-bit grid-aware QCB planted on that grid;
the same workflow with ``QCBPurify`` after it removes it, and the integers of the output model
are the ones the pass reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_exposed_then_removed, export_onnx, require

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # no usage events from test runs (CI disables them too)
require("olive.workflows", "olive")
from olive.workflows import run as olive_run  # noqa: E402

from qcb_ptq_plugin import onnx as qonnx  # noqa: E402
from qcb_ptq_plugin.integrations import olive as qcb_olive  # noqa: E402

WORKFLOW = Path(__file__).parents[2] / "examples" / "olive" / "workflow.json"


@pytest.fixture(scope="module")
def work(qcb_w8_narrow, digits, tmp_path_factory):
    """The FP32 model and the calibration images as raw files, where the workflow reads them."""
    work = tmp_path_factory.mktemp("olive")
    export_onnx(qcb_w8_narrow, digits.x_test[:1], work / "model.fp32.onnx")
    (work / "calib" / "input").mkdir(parents=True)
    for i, x in enumerate(digits.calibration(256, seed=1).numpy()):
        x.astype(np.float32).tofile(work / "calib" / "input" / f"{i:04d}.bin")
    return work


def run_workflow(work: Path, name: str, passes: list[str], **purify_options) -> Path:
    """Run the example workflow on ``work`` with the given passes; returns the output model's folder."""
    wf = json.loads(WORKFLOW.read_text())
    wf["passes"] = {k: v for k, v in wf["passes"].items() if k in passes}
    wf["input_model"]["model_path"] = str(work / "model.fp32.onnx")
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_dir"] = str(work / "calib")
    if "purify" in passes:
        wf["passes"]["purify"].update(float_model=str(work / "model.fp32.onnx"), **purify_options)
    wf["cache_dir"], wf["output_dir"] = str(work / name / "cache"), str(work / name / "output")
    olive_run(wf, package_config=qcb_olive.package_config())
    return next((work / name / "output").rglob("*.onnx")).parent


def test_package_config_adds_to_olive_defaults(tmp_path):
    from olive.package_config import OlivePackageConfig

    ours, default = qcb_olive.package_config(), OlivePackageConfig.load_default_config()
    assert {k.lower() for k in ours["passes"]} == set(default.passes) | {"qcbpurify"} and len(default.passes) > 50
    cfg = OlivePackageConfig.parse_file_or_obj(str(qcb_olive.write_package_config(tmp_path / "pkg.json")))
    assert cfg.import_pass_module("QCBPurify") is qcb_olive.QCBPurify
    assert cfg.get_pass_module_config("OnnxStaticQuantization")


def test_olive_static_quantization_exposes_and_qcb_purify_removes_the_qcb(work, qcb_w8_narrow, digits):
    plain_dir = run_workflow(work, "plain", ["quantize"])
    purified_dir = run_workflow(work, "purified", ["quantize", "purify"], save_codes=True)
    report = json.loads((purified_dir / qcb_olive.REPORT_FILE).read_text())
    assert report["mode"] == "olive" and len(report["units"]) == 4

    model_file = next(purified_dir.glob("*.onnx"))
    codes = np.load(purified_dir / qcb_olive.CODES_FILE)
    ints = dict(qonnx.int_weights(str(model_file)))
    assert sorted(ints) == sorted(codes.files) == sorted(u["name"] for u in report["units"])
    for name in codes.files:
        assert np.array_equal(ints[name].reshape(codes[name].shape), codes[name]), name
        assert np.abs(codes[name]).max() <= 127
    plain_ints = dict(qonnx.int_weights(str(next(plain_dir.glob("*.onnx")))))
    assert any(not np.array_equal(plain_ints[k], ints[k]) for k in ints)
    assert_exposed_then_removed(qcb_w8_narrow, qonnx.OrtModel(str(next(plain_dir.glob("*.onnx")))),
                                qonnx.OrtModel(str(model_file)), digits)


@pytest.mark.parametrize("symmetric, expected", [(True, (-127, 127)), (False, (-128, 127))])
def test_weight_range_follows_weight_symmetric(work, digits, tmp_path, symmetric, expected):
    """QCBPurify reads ORT's weight range off the model: narrow when symmetric, full when
    ``WeightSymmetric=False`` (ORT honours it for per-tensor weights; per-channel ones stay
    symmetric), and the adapter reproduces ORT's integers with that range."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from qcb_ptq_plugin.adapters import ort
    from qcb_ptq_plugin.onnx._feeds import Replay

    fp, out = work / "model.fp32.onnx", tmp_path / "q.onnx"
    feeds = [{"input": digits.calibration(64, seed=1).numpy()}]
    quantize_static(str(fp), str(out), Replay(feeds), quant_format=QuantFormat.QDQ, per_channel=False,
                    weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": symmetric})
    q = onnx.load(str(out))
    assert qcb_olive._weight_range(q) == expected
    assert len(ort.plan(onnx.load(str(fp)), q, *expected).units) == 4
