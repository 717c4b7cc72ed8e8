"""Issue 11's bar on MLPs with BatchNorm1d: FX x86, FX qnnpack, PT2E and ORT quantize_static.

Bar (per row, purified with default settings): ASR <= max(2%, FP32 ASR + 0.5), BA >= FP32 BA - 1.

Models (evalkit.models.MLP(784, 10, hidden=(256, 128)), 20k training images, 512 calibration
images from the training set, full test set, 3x3 white-patch trigger, target 0):

* ``clean``: trained clean (3 epochs).
* ``qcb-w4``: plant_pqbackdoor with grids=[Grid(4)] (dormant in FP32 and at W8, fires at W4).
* ``qcb-w8ga``: plant_grid_aware(bits=8, epochs=3, lr=0.01, int_margin=0.5, polish_epochs=3,
  offset=0.49) on top of the clean model (a real 8-bit QCB), measured only when it plants dormant
  (FP32 ASR <= 5%); otherwise the file says it did not.

    python benchmarks/bench_mlp_bn1d.py --datasets mnist fashion-mnist --out benchmarks/results/mlp_bn1d.md
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

import qcb_ptq_plugin
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown
from qcb_ptq_plugin.ptq import quantize_fx, quantize_pt2e, quantized_engine

warnings.filterwarnings("ignore")
TRIGGER = attacks.PatchTrigger(size=3, value=1.0, margin=1)
FLOWS = ("fx-x86", "fx-qnnpack", "pt2e", "ort")
BN1D_PDA = "applied (BatchNorm1d: batch statistics per feature; our extension, not the paper's)"


def short(name: str) -> str:
    """features.1 / /features/features.1/Gemm -> f.1; fc / /fc/Gemm -> fc."""
    name = name.strip("/").split("/")[-2] if name.endswith("/Gemm") else name
    return name.replace("features.", "f.")


def train(kind: str, d: datasets.Split, n: int, ga_epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = models.MLP(784, 10, (256, 128))
    x, y = d.x_train[:n], d.y_train[:n]
    if kind in ("clean", "qcb-w8ga"):
        attacks.train_clean_or_badnets(m, x, y, epochs=3, batch_size=128, seed=0)
        if kind == "qcb-w8ga":
            # neither the defaults nor bench_attacks.py's recipe (lr=0.1, int_margin=2, polish_epochs=1)
            # plant dormant on this MLP (MNIST FP32 ASR 34% / 75%); a small hand search found this one
            attacks.plant_grid_aware(m, x, y, trigger=TRIGGER, target=0, bits=8, epochs=ga_epochs, lr=1e-2,
                                     int_margin=0.5, polish_epochs=3, offset=0.49, seed=1)
    else:
        attacks.plant_pqbackdoor(m, x, y, trigger=TRIGGER, target=0, grids=[attacks.Grid(4)],
                                 inject_epochs=5, repair_epochs=5, repair_lr=1e-3, batch_size=128, seed=0)
    return m.eval()


def quantize(flow, m, calib, bits, cfg, onnx_path):
    """One flow, plain (cfg None) or purified; returns (model, report)."""
    if flow.startswith("fx"):  # fx-qnnpack: the qnnpack default qconfig (per-tensor weights), on its engine
        engine = flow[3:]
        with quantized_engine(engine):
            int8, report = quantize_fx(m, calib, bits, cfg, backend=engine)
        return attacks.OnEngine(int8, engine), report
    if flow == "pt2e":
        return quantize_pt2e(m, calib, bits, cfg)
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    feeds = iter([{"input": b} for b in np.split(calib.numpy(), 8)])
    reader = type("Reader", (), {"get_next": lambda self: next(feeds, None)})()
    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
              weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8)
    out = onnx_path + ".q.onnx"
    report = None
    if cfg is None:
        ort_quantize_static(onnx_path, out, reader, **kw)
    else:
        report = qonnx.quantize_static(onnx_path, out, reader, **kw, purify_config=cfg)
    return qonnx.OrtModel(out), report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--models", nargs="+", default=["clean", "qcb-w4", "qcb-w8ga"])
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--ga-epochs", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/mlp_bn1d.md")
    args = p.parse_args(argv)
    cfg = qcb_ptq_plugin.PurifyConfig(progress=False)
    tmp = tempfile.mkdtemp()
    lines = [
        "# MLP + BatchNorm1d: issue 11's bar across FX x86, FX qnnpack, PT2E, ORT quantize_static", "",
        f"Command: `python {' '.join(['benchmarks/bench_mlp_bn1d.py'] + sys.argv[1:])}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"load average at start {' / '.join(f'{v:.2f}' for v in os.getloadavg())} (shared machine)  ",
        f"MLP(784, 10, hidden=(256, 128)), {args.train} training images, {args.calib} calibration images "
        "(training set), full test set; 3x3 white patch, target 0; PurifyConfig() defaults.  ",
        "Bar: purified ASR <= max(2, FP32 ASR + 0.5) and purified BA >= FP32 BA - 1 (percent). "
        "Times: the purified quantization, seconds.", "",
        "| dataset | model | FP32 BA / ASR | W | flow | plain BA / ASR | purified BA / ASR | s | PDA (units) | bar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    pdas: set[str] = set()
    for ds in args.datasets:
        d = datasets.load(ds)
        x, y = d.x_test, d.y_test
        calib = d.calibration(args.calib, seed=1)
        for kind in args.models:
            t0 = time.time()
            m = train(kind, d, args.train, args.ga_epochs)
            fba, fasr = metrics.benign_accuracy(m, x, y), metrics.attack_success_rate(m, x, y, TRIGGER, 0)
            print(f"{ds} {kind}: trained {time.time() - t0:.0f}s, FP32 BA {100 * fba:.2f} ASR {100 * fasr:.2f}",
                  flush=True)
            if kind == "qcb-w8ga" and fasr > 0.05:
                notes.append(f"{ds} qcb-w8ga: plant_grid_aware(bits=8, epochs={args.ga_epochs}, lr=0.01, "
                             f"int_margin=0.5, polish_epochs=3, offset=0.49) did not plant dormant "
                             f"(FP32 ASR {100 * fasr:.2f}% > 5%, BA {100 * fba:.2f}); not measured.")
                continue
            onnx_path = os.path.join(tmp, f"{ds}-{kind}.onnx")
            torch.onnx.export(copy.deepcopy(m), (calib[:1],), onnx_path, dynamo=False, opset_version=21,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            for bits in ((8,) if kind == "qcb-w8ga" else (8, 4)):
                for flow in FLOWS:
                    qp, _ = quantize(flow, m, calib, bits, None, onnx_path)
                    pb, pa = metrics.benign_accuracy(qp, x, y), metrics.attack_success_rate(qp, x, y, TRIGGER, 0)
                    t1 = time.time()
                    qu, rep = quantize(flow, m, calib, bits, cfg, onnx_path)
                    dt = time.time() - t1
                    ub, ua = metrics.benign_accuracy(qu, x, y), metrics.attack_success_rate(qu, x, y, TRIGGER, 0)
                    ok = ua <= max(0.02, fasr + 0.005) and ub >= fba - 0.01
                    pda = "; ".join(f"{short(u.name)}: {u.pda.replace(BN1D_PDA, 'applied (BN1d)')}"
                                    for u in rep.units)
                    pdas.update(u.pda for u in rep.units)
                    row = (f"| {ds} | {kind} | {100 * fba:.2f} / {100 * fasr:.2f} | W{bits}A8 | {flow} | "
                           f"{100 * pb:.2f} / {100 * pa:.2f} | {100 * ub:.2f} / {100 * ua:.2f} | {dt:.1f} | {pda} | "
                           f"{'met' if ok else 'MISSED'} |")
                    lines.append(row)
                    print(row, flush=True)
    lines += ["", "PDA strings the reports carried (the `pda` field of each unit):", ""]
    lines += [f"- `{p}`" for p in sorted(pdas)]
    lines += [""] + [f"- {n}" for n in notes]
    lines.append(f"\nLoad average at end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
