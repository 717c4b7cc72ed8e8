"""One W4 QCB through every flow: torch.ao FX, torchao PT2E, torch.ao eager, ONNX export of the
purified FX model, and onnxruntime's quantize_static (QInt4 QDQ).

    python benchmarks/bench_flows.py        # digits, ~1 min; writes benchmarks/results/flows.md

The model is the test suite's QCB (tests/conftest.py: SmallCNN width 16, PQBackdoor-style on the
torch x86 4-bit grid, which equals ORT's). BA / ASR in % on the digits test split; every INT
model is a real torch quantized model or a real onnxruntime session.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.onnx._feeds import Replay
from qcb_ptq_plugin.ptq import quantize_eager, quantize_fx, quantize_pt2e

from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown

HERE = Path(__file__).resolve().parent
TRIGGER = attacks.PatchTrigger(size=2, value=1.0, margin=0)


def main() -> None:
    warnings.filterwarnings("ignore")
    d = datasets.digits()
    torch.manual_seed(0)
    model = attacks.plant_pqbackdoor(models.SmallCNN(1, 10, width=16), d.x_train, d.y_train, trigger=TRIGGER,
                                     target=0, grids=[attacks.Grid(4)], inject_epochs=20, repair_epochs=20,
                                     repair_lr=1e-3, batch_size=64, seed=0)
    calib = d.calibration(256, seed=1)
    cfg = q.PurifyConfig(progress=False)

    def measure(m):
        return (100 * metrics.benign_accuracy(m, d.x_test, d.y_test),
                100 * metrics.attack_success_rate(m, d.x_test, d.y_test, TRIGGER, 0))

    rows = [("FP32 model", *measure(model), "")]
    for name, fn in (("torch.ao FX", quantize_fx), ("torchao PT2E", quantize_pt2e), ("torch.ao eager", quantize_eager)):
        rows.append((f"{name}, plain", *measure(fn(model, calib, 4)[0]), ""))
        int_model, _ = fn(model, calib, 4, purify_config=cfg)
        rows.append((f"{name}, purified", *measure(int_model), ""))
        if name == "torch.ao FX":
            purified_fx = int_model

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt4,
              activation_type=QuantType.QUInt8)
    with tempfile.TemporaryDirectory() as tmp:
        path = qonnx.export(purified_fx, d.x_test[:64], Path(tmp) / "fx_purified.onnx")
        ort = qonnx.OrtModel(path)
        agree = 100 * (metrics.predict(ort, d.x_test) == metrics.predict(purified_fx, d.x_test)).float().mean().item()
        rows.append(("FX purified -> qonnx.export -> onnxruntime", *measure(ort), f"top-1 agreement with torch {agree:.2f}%"))
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(model, (d.x_test[:1],), str(fp32), dynamo=False, opset_version=21, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "b"}, "output": {0: "b"}})
        feeds = lambda: Replay([{"input": c} for c in calib.numpy().reshape(8, 32, 1, 8, 8)])  # noqa: E731
        quantize_static(str(fp32), str(Path(tmp) / "plain.onnx"), feeds(), **kw)
        rows.append(("onnxruntime quantize_static, plain", *measure(qonnx.OrtModel(Path(tmp) / "plain.onnx")), ""))
        qonnx.quantize_static(fp32, Path(tmp) / "purified.onnx", feeds(), **kw, purify_config=cfg)
        rows.append(("qcb_ptq_plugin.onnx.quantize_static", *measure(qonnx.OrtModel(Path(tmp) / "purified.onnx")), ""))

    lines = ["# One W4A8 QCB through every flow", "", "Command: `python benchmarks/bench_flows.py`", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}.", "",
             "| flow | BA % | ASR % | note |", "|---|---:|---:|---|"]
    lines += [f"| {n} | {ba:.2f} | {asr:.2f} | {note} |" for n, ba, asr, note in rows]
    write_markdown(lines, str(HERE / "results" / "flows.md"))


if __name__ == "__main__":
    main()
