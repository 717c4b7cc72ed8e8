"""Defense quality of speed approximations vs the exact fast default, on planted models.

    python benchmarks/bench_approx.py [--seeds 0,1,2] [--out benchmarks/results/approx.md]

Models: SmallCNN(width 16) on the bundled sklearn digits with a PQBackdoor-style QCB planted on
the torch x86 4-bit grid (as tests/conftest.py), one model per seed. Rows: W4A8 (the planted
bit width) and W8A8 of the same models (no 8-bit QCB planted: W8 rows measure BA and that
ASR stays low; planted W8 rows wait for the 8-bit attacker). Each variant purifies the same
calibrated model; BA/ASR in % on the digits test split; time is the purify call.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

VARIANTS = {
    "exact (default)": {},
    "PDA 1 step of gamma": dict(pda_steps=1, pda_step_size=1e-3),
    "Gram on 1/4 of positions": "quarter",
    "1 coordinate-descent pass": dict(cd_passes=1),
    "all three": "all",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(HERE / "results" / "approx.md"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--paper-steps", type=int, default=0, help="also run the paper preset with this many Adam steps")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from torch.ao.quantization.quantize_fx import convert_fx

    import qcb_ptq_plugin as q
    from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
    from qcb_ptq_plugin.ptq import prepare_fx_calibrated

    trigger, target = attacks.PatchTrigger(size=2, value=1.0, margin=0), 0
    d = datasets.digits()
    calib = d.calibration(256, seed=1)
    positions = 128 * calib[0].numel() // 4  # a quarter of a full batch's input-resolution positions
    rows: dict = {}
    load = [os.popen("uptime").read().strip()]
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        m = models.SmallCNN(1, 10, width=16)
        attacks.plant_pqbackdoor(m, d.x_train, d.y_train, trigger=trigger, target=target, grids=[attacks.Grid(4)],
                                 inject_epochs=20, repair_epochs=20, repair_lr=1e-3, batch_size=64, seed=seed)
        m.eval()
        for bits in (4, 8):
            base = prepare_fx_calibrated(m, calib, bits)
            int8 = convert_fx(copy.deepcopy(base))
            rows.setdefault((bits, "plain PTQ"), []).append(
                (metrics.benign_accuracy(int8, d.x_test, d.y_test), metrics.attack_success_rate(
                    int8, d.x_test, d.y_test, trigger, target), 0.0))
            chosen = {k: VARIANTS[k] for k in args.variants.split(",") if k}
            if args.paper_steps:
                chosen[f"paper preset, {args.paper_steps} Adam steps"] = "paper"
            for name, v in chosen.items():
                over = {"quarter": dict(gram_positions=positions),
                        "all": dict(gram_positions=positions, cd_passes=1, pda_steps=1, pda_step_size=1e-3)
                        }.get(v, v) if isinstance(v, str) else v
                prepared = copy.deepcopy(base)
                t0 = time.perf_counter()
                if v == "paper":
                    cfg = q.PurifyConfig.paper(adam_steps=args.paper_steps, pda_steps=min(500, args.paper_steps),
                                               progress=False, seed=seed)
                    rep = q.purify(prepared, m, calib, cfg)
                    errs = (sum(u.error_before for u in rep.units), sum(u.error_after for u in rep.units))
                    print(f"seed {seed} W{bits} paper preset: error {errs[0]:.4g} -> {errs[1]:.4g}", flush=True)
                else:
                    q.purify(prepared, m, calib, progress=False, seed=seed, **over)
                sec = time.perf_counter() - t0
                int8 = convert_fx(prepared)
                rows.setdefault((bits, name), []).append(
                    (metrics.benign_accuracy(int8, d.x_test, d.y_test),
                     metrics.attack_success_rate(int8, d.x_test, d.y_test, trigger, target), sec))
            print(seed, bits, {k[1]: v[-1] for k, v in rows.items() if k[0] == bits}, flush=True)
    load.append(os.popen("uptime").read().strip())

    def ms(vals):
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):.2f} +- {statistics.pstdev(vals):.2f}"

    lines = ["# Speed approximations vs the exact fast default (defense quality)", "",
             f"Command: `python benchmarks/bench_approx.py --seeds {args.seeds} --variants '{args.variants}' "
             f"--paper-steps {args.paper_steps}`", "",
             f"Load: before `{load[0]}`, after `{load[1]}`", "",
             "SmallCNN(16) on sklearn digits, PQBackdoor-style QCB planted on the x86 4-bit grid, one model per "
             "seed; 256 calibration images; mean +- std over seeds; per-seed values in brackets.", "",
             "| bits | variant | BA % | ASR % | per-seed BA / ASR | purify s |", "|---|---|---:|---:|---|---:|"]
    for (bits, name), vals in rows.items():
        per = ", ".join(f"{100 * b:.1f}/{100 * a:.1f}" for b, a, _ in vals)
        lines.append(f"| W{bits}A8 | {name} | {ms([v[0] for v in vals])} | {ms([v[1] for v in vals])} | {per} | "
                     f"{statistics.mean(v[2] for v in vals):.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
