"""ORT flow speed: plain ``quantize_static`` vs the purifying ``qcb_ptq_plugin.onnx.quantize_static``.

    python benchmarks/bench_ort.py [--model resnet18|smallcnn] [--n 256] [--repeat 2] [--previous]

CIFAR-size ResNet-18 (random weights and 256 random images: the cost does not depend on the
values), exported with torch.onnx (dynamo=False), W8A8 QDQ per-channel. Plain and purified run
back to back in this process, ``--repeat`` times; the ratio is taken within each repeat.
``--previous`` also times the previous capture (the whole quantized graph re-run per unit and
batch, the FP32 graph per unit and batch) for comparison.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


class Reader:
    def __init__(self, x: np.ndarray, batch: int):
        self.feeds = iter([{"input": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.feeds, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--previous", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    import qcb_ptq_plugin as q
    from qcb_ptq_plugin import onnx as qonnx
    from qcb_ptq_plugin.adapters import ort as ort_adapter
    from qcb_ptq_plugin.evalkit import models

    torch.manual_seed(0)
    model = (models.resnet18_cifar() if args.model == "resnet18" else models.SmallCNN(3, 10, 16)).eval()
    x = torch.rand(args.n, 3, 32, 32)
    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
              activation_type=QuantType.QUInt8)
    cfg = q.PurifyConfig(progress=False, batch_size=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "fp32.onnx"
        torch.onnx.export(model, (x[:1],), str(fp), dynamo=False, opset_version=21, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        xn = x.numpy()
        print(f"uptime: {os.popen('uptime').read().strip()}")
        for r in range(args.repeat):
            t0 = time.perf_counter()
            ort_quantize_static(str(fp), str(Path(tmp) / "plain.onnx"), Reader(xn, args.batch), **kw)
            plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            rep = qonnx.quantize_static(fp, Path(tmp) / "pur.onnx", Reader(xn, args.batch), **kw, purify_config=cfg)
            pur = time.perf_counter() - t0
            line = (f"repeat {r}: plain quantize_static {plain:.1f}s, purified {pur:.1f}s ({pur / plain:.1f}x; "
                    f"pass {rep.seconds:.1f}s, PDA {sum(u.pda_seconds for u in rep.units):.1f}s, "
                    f"solves {sum(u.solve_seconds for u in rep.units):.1f}s, {len(rep.units)} units)")
            print(line, flush=True)
            if args.previous:
                build, cache = ort_adapter._StagedRun.build, ort_adapter._OnnxCapture.__init__.__defaults__
                ort_adapter._StagedRun.build = classmethod(lambda cls, *a: None)
                ort_adapter._OnnxCapture.__init__.__defaults__ = (0,)
                try:
                    t0 = time.perf_counter()
                    qonnx.quantize_static(fp, Path(tmp) / "prev.onnx", Reader(xn, args.batch), **kw, purify_config=cfg)
                    print(f"repeat {r}: previous capture, purified {time.perf_counter() - t0:.1f}s", flush=True)
                finally:
                    ort_adapter._StagedRun.build, ort_adapter._OnnxCapture.__init__.__defaults__ = build, cache
        print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
