"""Olive workflow with QCBPurify after OnnxStaticQuantization (workflow.json beside this file).

    pip install -c constraints.txt -e ".[olive,data]"
    python examples/olive/run.py [workdir]          # about a minute on 2 CPU cores

Trains a small CNN on sklearn digits, exports it to ONNX, writes 256 calibration images as the
raw files Olive's ``raw_dataset`` reads, and runs the workflow with Olive's default passes plus
``QCBPurify`` (``qcb_olive.package_config()``). The purified INT8 model and its report land in
``workdir/output``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from olive.workflows import run as olive_run

from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.integrations import olive as qcb_olive

HERE = Path(__file__).parent
work = Path(sys.argv[1] if len(sys.argv) > 1 else "olive_work").resolve()
(work / "calib" / "input").mkdir(parents=True, exist_ok=True)

data = datasets.digits()
torch.manual_seed(0)
model = attacks.train_clean_or_badnets(models.SmallCNN(1, 10, width=8), data.x_train, data.y_train, epochs=6,
                                       batch_size=64)
torch.onnx.export(model, (data.x_test[:1],), str(work / "model.fp32.onnx"), dynamo=False, input_names=["input"],
                  output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
for i, x in enumerate(data.calibration(256).numpy()):
    x.astype(np.float32).tofile(work / "calib" / "input" / f"{i:04d}.bin")  # one sample per file

workflow = json.loads((HERE / "workflow.json").read_text())
workflow["input_model"]["model_path"] = workflow["passes"]["purify"]["float_model"] = str(work / "model.fp32.onnx")
workflow["data_configs"][0]["load_dataset_config"]["params"]["data_dir"] = str(work / "calib")
workflow["cache_dir"], workflow["output_dir"] = str(work / "cache"), str(work / "output")
olive_run(workflow, package_config=qcb_olive.package_config())

out = next((work / "output").rglob(qcb_olive.REPORT_FILE)).parent
report = json.loads((out / qcb_olive.REPORT_FILE).read_text())
int8 = qonnx.OrtModel(str(next(out.glob("*.onnx"))))
print(f"purified {len(report['units'])} layers in {report['seconds']:.1f}s; INT8 BA "
      f"{100 * metrics.benign_accuracy(int8, data.x_test, data.y_test):.1f}%, FP32 BA "
      f"{100 * metrics.benign_accuracy(model, data.x_test, data.y_test):.1f}%")
