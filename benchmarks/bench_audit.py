"""Audit detection rate and false-positive rate on planted QCBs vs clean models.

    python benchmarks/bench_audit.py            # writes benchmarks/results/audit.md (~5 min on 2 cores)

Models: SmallCNN (widths 8 and 16, different seeds) on the bundled digits, each either clean or
carrying a planted QCB (PQBackdoor-style or Qu-ANTI-zation-style at 4 bits). Each model is
prepared with torch.ao FX (W4A8), calibrated on 256 benign images and audited; nothing is
purified. The score threshold is swept to show the separation.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.ptq import prepare_fx_calibrated, quantize_fx

from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown

HERE = Path(__file__).resolve().parent
TRIGGER = attacks.PatchTrigger(size=2, value=1.0, margin=0)


def make(kind: str, width: int, seed: int, split) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = models.SmallCNN(1, 10, width=width)
    x, y = split.x_train, split.y_train
    trig = attacks.PatchTrigger(size=2, value=1.0, margin=seed % 2)  # vary the trigger too
    if kind == "clean":
        return attacks.train_clean_or_badnets(m, x, y, epochs=20, batch_size=64, seed=seed)
    if kind == "pqbackdoor":
        return attacks.plant_pqbackdoor(m, x, y, trigger=trig, target=seed % 10, grids=[attacks.Grid(4)],
                                        inject_epochs=20, repair_epochs=20, repair_lr=1e-3, batch_size=64, seed=seed)
    return attacks.plant_quantization(m, x, y, trigger=trig, target=seed % 10, bits=(4,), pretrain_epochs=20,
                                      epochs=30, lr=5e-4, c=2.0, batch_size=64, seed=seed)


def score(model, calib) -> float:
    return q.audit(prepare_fx_calibrated(model, calib, 4), model, calib).score


def int8_asr(model, calib, split, seed) -> float:
    """ASR of the plain W4A8 model: does the planted QCB actually fire?"""
    trig = attacks.PatchTrigger(size=2, value=1.0, margin=seed % 2)
    int8, _ = quantize_fx(model, calib, 4)
    return 100 * metrics.attack_success_rate(int8, split.x_test, split.y_test, trig, seed % 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-kind", type=int, default=6, help="models per (kind, width) for planted; 2x for clean")
    ap.add_argument("--out", default=str(HERE / "results" / "audit.md"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    split = datasets.digits()
    calib = split.calibration(256, seed=7)
    rows = []
    for width in (8, 16):
        for i in range(args.per_kind):
            for kind in ("clean", "clean", "pqbackdoor" if i % 2 == 0 else "qu-anti-zation"):
                seed = 100 * width + 10 * i + len(rows) % 3
                t0 = time.perf_counter()
                model = make(kind, width, seed, split)
                asr = int8_asr(model, calib, split, seed)
                rows.append((kind, width, seed, score(model, calib), asr, time.perf_counter() - t0))
                print(rows[-1], flush=True)
    write(rows, args)


def write(rows, args) -> None:
    planted = [r[3] for r in rows if r[0] != "clean"]
    working = [r[3] for r in rows if r[0] != "clean" and r[4] >= 50]
    clean = [r[3] for r in rows if r[0] == "clean"]
    cpu = cpu_name()
    lines = ["# Audit: detection vs false positives", "", f"Command: `python benchmarks/bench_audit.py --per-kind "
             f"{args.per_kind}`", "", f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}.", "",
             f"{len(planted)} planted QCBs (PQBackdoor-style and Qu-ANTI-zation-style, W4) and {len(clean)} clean "
             "SmallCNNs (widths 8, 16) on digits, FX W4A8, 256 benign calibration images. "
             f"Default threshold: {q.audit.__globals__['DEFAULT_THRESHOLD']}.", "",
             f"A planted model counts as a working QCB when its plain W4A8 ASR is >= 50% ({len(working)} of "
             f"{len(planted)}).", "",
             "| threshold | detection (working QCBs) | detection (all planted) | false-positive rate (clean) |",
             "|---:|---:|---:|---:|"]
    for t in (4, 8, 12, 16, 24, 32):
        det = sum(s > t for s in working) / max(len(working), 1)
        det_all = sum(s > t for s in planted) / len(planted)
        fpr = sum(s > t for s in clean) / len(clean)
        lines.append(f"| {t} | {100 * det:.0f}% | {100 * det_all:.0f}% | {100 * fpr:.0f}% |")
    lines += ["", "| model | width | seed | score (max excess drift) | plain W4A8 ASR % |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {w} | {s} | {sc:.1f} | {'' if k == 'clean' else f'{asr:.1f}'} |" for k, w, s, sc, asr, _ in rows]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
