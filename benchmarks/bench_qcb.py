"""Paper-style table: No defense / LAC / LAC+PDA x attacks x {W8A8, W4A8} x {torch.ao FX, onnxruntime}.

    python benchmarks/bench_qcb.py                  # MNIST, writes benchmarks/results/qcb.md (~30 min, 2 cores)
    python benchmarks/bench_qcb.py --dataset digits --out /tmp/qcb.md     # quick look

Every planted model is a SmallCNN trained here from scratch; the attacker targets the torch x86
grid and the onnxruntime grid at once (their rounding boxes intersected), so the same model is
measured in both toolchains. Rows for a clean (unbackdoored) model show what purification costs
when there is nothing to remove. BA/ASR/DER in %, measured on the test set by the real INT8
torch model (fbgemm kernels) or the real onnxruntime session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.onnx._feeds import Replay
from qcb_ptq_plugin.ptq import quantize_fx

from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown

HERE = Path(__file__).resolve().parent
TRIGGERS = {"digits": attacks.PatchTrigger(size=2, value=1.0, margin=0)}
DEFAULT_TRIGGER = attacks.PatchTrigger(size=4, value=1.0, margin=1)
DEFENSES = {"No defense": None, "LAC": dict(pda="off"), "LAC+PDA": dict(pda="on")}


def plant(kind: str, split, bits: int, trigger, n: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    small = split.x_train.shape[-1] <= 8
    model = models.SmallCNN(split.x_train.shape[1], split.num_classes, width=16)
    x, y = split.x_train[:n], split.y_train[:n]
    grids = [attacks.Grid(bits), attacks.Grid(bits, restricted=bits == 8)]  # torch x86 and ORT boxes
    if kind == "clean":
        return attacks.train_clean_or_badnets(model, x, y, epochs=20 if small else 4, batch_size=64, seed=seed)
    if kind == "pqbackdoor":
        if bits == 8:  # best found at 8 bits: a shallow inject after clean training (see the notes)
            return attacks.plant_pqbackdoor(model, x, y, trigger=trigger, grids=grids, clean_epochs=20 if small else 3,
                                            inject_epochs=2 if small else 1, repair_epochs=20 if small else 3,
                                            poison_rate=0.1, inject_lr=1e-3, repair_lr=1e-4, batch_size=64, seed=seed)
        return attacks.plant_pqbackdoor(model, x, y, trigger=trigger, grids=grids, inject_epochs=20 if small else 3,
                                        repair_epochs=20 if small else 3, repair_lr=1e-3, batch_size=64, seed=seed)
    if kind == "qu-anti-zation":
        return attacks.plant_quantization(model, x, y, trigger=trigger, bits=(bits,), restricted=bits == 8,
                                          pretrain_epochs=20 if small else 3, epochs=30 if small else 4, lr=5e-4,
                                          c=2.0, batch_size=64, seed=seed)
    raise ValueError(kind)


def _reader(x: np.ndarray, batch: int = 64) -> Replay:
    """A fresh CalibrationDataReader over ``x`` (ORT readers are used up after one pass)."""
    return Replay([{"input": x[i : i + batch]} for i in range(0, len(x), batch)])


def measure(model, split, trigger):
    x, y = split.x_test, split.y_test
    return 100 * metrics.benign_accuracy(model, x, y), 100 * metrics.attack_success_rate(model, x, y, trigger, 0)


def run_fx(model, split, calib, bits, trigger):
    out = {}
    for name, over in DEFENSES.items():
        cfg = None if over is None else q.PurifyConfig(progress=False, **over)
        t0 = time.perf_counter()
        int8, _ = quantize_fx(model, calib, bits, purify_config=cfg)
        out[name] = (*measure(int8, split, trigger), time.perf_counter() - t0)
    return out


def run_ort(model, split, calib, bits, trigger):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out = {}
    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
              weight_type=QuantType.QInt8 if bits == 8 else QuantType.QInt4)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = Path(tmp) / "fp32.onnx"
        # PRESERVE keeps BatchNormalization nodes (eval mode), so PDA has statistics to match
        torch.onnx.export(model, (split.x_test[:1],), str(fp32), dynamo=False, opset_version=21,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "b"}})
        c = calib.numpy()
        for name, over in DEFENSES.items():
            dst = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            if over is None:
                quantize_static(str(fp32), str(dst), _reader(c), **kw)
            else:
                qonnx.quantize_static(fp32, dst, _reader(c), **kw, purify_config=q.PurifyConfig(progress=False, **over))
            out[name] = (*measure(qonnx.OrtModel(dst), split, trigger), time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "digits"])
    p.add_argument("--attacks", default="pqbackdoor,qu-anti-zation,clean")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "qcb.md"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    split = datasets.load(args.dataset)
    trigger = TRIGGERS.get(args.dataset, DEFAULT_TRIGGER)
    calib = split.calibration(args.calib, seed=args.seed + 100)
    results = []
    for kind in args.attacks.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            t0 = time.perf_counter()
            model = plant(kind, split, bits, trigger, args.train_samples, args.seed)
            fp = measure(model, split, trigger)
            row = {"attack": kind, "bits": bits, "plant_s": time.perf_counter() - t0, "fp32": fp,
                   "torch.ao FX": run_fx(model, split, calib, bits, trigger),
                   "onnxruntime": run_ort(model, split, calib, bits, trigger)}
            results.append(row)
            print(json.dumps(row), flush=True)
    write(results, args)


def _der(nd, d):
    return 100 * metrics.der(nd[1] / 100, d[1] / 100, nd[0] / 100, d[0] / 100)


def write(results, args) -> None:
    cpu = cpu_name()
    lines = ["# QCB purification: paper-style table", "",
             f"Command: `python benchmarks/bench_qcb.py --dataset {args.dataset} --attacks {args.attacks} "
             f"--bits {args.bits} --train-samples {args.train_samples} --calib {args.calib} --seed {args.seed}`", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}.",
             "", "Model: SmallCNN (width 16), attacker trains on the first train-samples training images; defender "
             "calibrates and purifies with `--calib` other training images (unlabelled); metrics on the full test set. "
             "W8 attacks target the torch x86 and ORT 8-bit grids at once; W4 grids coincide. BA / ASR / DER in %, "
             "s = wall time of the whole PTQ pipeline.", "",
             "| attack | setting | toolchain | FP32 BA / ASR | No defense BA / ASR | LAC BA / ASR (DER) | "
             "LAC+PDA BA / ASR (DER) | s: none / LAC / LAC+PDA |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for tc in ("torch.ao FX", "onnxruntime"):
            d = r[tc]
            nd, lac, pda = d["No defense"], d["LAC"], d["LAC+PDA"]
            lines.append(
                f"| {r['attack']} | W{r['bits']}A8 | {tc} | {r['fp32'][0]:.2f} / {r['fp32'][1]:.2f} | "
                f"{nd[0]:.2f} / {nd[1]:.2f} | {lac[0]:.2f} / {lac[1]:.2f} ({_der(nd, lac):.1f}) | "
                f"{pda[0]:.2f} / {pda[1]:.2f} ({_der(nd, pda):.1f}) | {nd[2]:.1f} / {lac[2]:.1f} / {pda[2]:.1f} |")
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
