"""Adaptive attacker (LAC+PDA paper, Sec. 6): Qu-ANTI-zation training plus an alignment term
λ Σ_l ||W_l I_l - Q(W_l) I_l||² that hides the FP-vs-INT drift LAC corrects.

    python benchmarks/bench_adaptive.py            # digits, W4A8, λ in {0, 1}, 3 seeds (~4 min)

Writes benchmarks/results/adaptive.md. BA / ASR in % on the digits test split, INT models are
real torch.ao FX conversions; the audit score is that of qcb_ptq_plugin.audit (-log10 p; exposed above
audit.DEFAULT_THRESHOLD).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.ptq import prepare_fx_calibrated, quantize_fx

from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown

HERE = Path(__file__).resolve().parent
TRIGGER = attacks.PatchTrigger(size=2, value=1.0, margin=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligns", default="0,1")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "adaptive.md"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    d = datasets.digits()
    calib = d.calibration(256, seed=100)

    def measure(m):
        return (100 * metrics.benign_accuracy(m, d.x_test, d.y_test),
                100 * metrics.attack_success_rate(m, d.x_test, d.y_test, TRIGGER, 0))

    rows = []
    for align in (float(a) for a in args.aligns.split(",")):
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            m = attacks.plant_quantization(models.SmallCNN(1, 10, width=16), d.x_train, d.y_train, trigger=TRIGGER,
                                           bits=(4,), pretrain_epochs=20, epochs=30, lr=5e-4, c=2.0, align=align,
                                           batch_size=64, seed=seed)
            row = {"align": align, "seed": seed, "fp32": measure(m), "plain": measure(quantize_fx(m, calib, 4)[0])}
            for name, over in (("LAC", dict(pda="off")), ("LAC+PDA", dict(pda="on"))):
                row[name] = measure(quantize_fx(m, calib, 4, purify_config=q.PurifyConfig(progress=False, **over))[0])
            row["audit"] = q.audit(prepare_fx_calibrated(m, calib, 4), m, calib).score
            rows.append(row)
            print(row, flush=True)

    cpu = cpu_name()
    lines = ["# Adaptive attacker", "", f"Command: `python benchmarks/bench_adaptive.py --aligns {args.aligns} "
             f"--seeds {args.seeds}`", "", f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}.", "",
             "SmallCNN (width 16) on sklearn digits, Qu-ANTI-zation-style W4 QCB (20 clean + 30 attack epochs, "
             "c = 2); `align` = λ of the adaptive term (0: the ordinary attack). Defender: 256 unlabelled "
             "calibration images, torch.ao FX W4A8. BA / ASR in %.", "",
             "| λ | seed | FP32 BA / ASR | plain PTQ BA / ASR | LAC BA / ASR | LAC+PDA BA / ASR | audit score |",
             "|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        f = lambda t: f"{t[0]:.2f} / {t[1]:.2f}"  # noqa: E731
        lines.append(f"| {r['align']:g} | {r['seed']} | {f(r['fp32'])} | {f(r['plain'])} | {f(r['LAC'])} | "
                     f"{f(r['LAC+PDA'])} | {r['audit']:.1f} |")
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
