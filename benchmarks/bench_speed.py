"""Speed and memory: plain PTQ vs purify (fast default) vs purify (paper preset), one run.

    python benchmarks/bench_speed.py                      # both models, writes benchmarks/results/speed.md
    python benchmarks/bench_speed.py --models resnet18 --paper-steps 100

Each measurement runs in a fresh subprocess so its peak RSS is its own. Models:

* ``smallcnn``: SmallCNN(width 16) on MNIST with a planted W4A8 QCB (PQBackdoor-style),
  512 calibration images; reports BA/ASR of each INT8 model on the MNIST test set.
* ``resnet18``: CIFAR-style ResNet-18 (11.2M parameters), 256 random 3x32x32 calibration
  images (speed only: no CIFAR ships offline), W8A8.

The paper preset (10000 Adam steps per unit, PDA 500 steps) is run with ``--paper-steps``
steps per unit and its time extrapolated linearly to 10000 steps when fewer are run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown

HERE = Path(__file__).resolve().parent


def _measure(model_name: str, mode: str, paper_steps: int, seed: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import qcb_ptq_plugin as q
    from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
    from qcb_ptq_plugin.ptq import quantize_fx

    torch.manual_seed(seed)
    out: dict = {"model": model_name, "mode": mode}
    if model_name == "smallcnn":
        split = datasets.mnist()
        trigger = attacks.PatchTrigger(size=4, value=1.0, margin=1)
        model = attacks.plant_pqbackdoor(models.SmallCNN(1, 10, 16), split.x_train[:20000], split.y_train[:20000],
                                         trigger=trigger, grids=[attacks.Grid(4)], inject_epochs=3, repair_epochs=3,
                                         repair_lr=1e-3, seed=seed)
        calib, bits = split.calibration(512, seed=seed + 100), 4
    else:
        model = models.resnet18_cifar()
        for m in model.modules():  # non-trivial BN statistics, as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        calib, bits, split = torch.randn(256, 3, 32, 32), 8, None
    if mode == "plain":
        config = None
    elif mode == "fast":
        config = q.PurifyConfig(progress=False)
    elif mode == "exact":  # the defaults before the approximations of benchmarks/results/approx.md
        config = q.PurifyConfig(progress=False, pda_steps=5, pda_step_size=2.5e-4, cd_passes=4, gram_positions=None)
    else:
        config = q.PurifyConfig.paper(adam_steps=paper_steps, pda_steps=min(500, paper_steps), progress=False)
    t0 = time.perf_counter()
    int8, report = quantize_fx(model, calib, bits, purify_config=config)
    out["seconds"] = time.perf_counter() - t0
    if report is not None:
        out["purify_seconds"] = report.seconds
        out["units"] = len(report.units)
        out["rel_error_before"], out["rel_error_after"] = report.rel_error_before, report.rel_error_after
    if mode == "paper" and paper_steps < 10000:
        # Adam scales with its steps (to 10000), PDA with its steps (to 500); capture and PTQ are fixed
        pda = sum(u.pda_seconds for u in report.units)
        solve = sum(u.solve_seconds for u in report.units)
        out["seconds_extrapolated_to_10000_steps"] = (out["seconds"] + pda * (500 / config.pda_steps - 1)
                                                      + solve * (10000 / paper_steps - 1))
    if split is not None and mode == "plain":
        out["fp32_ba"] = 100 * metrics.benign_accuracy(model, split.x_test, split.y_test)
        out["fp32_asr"] = 100 * metrics.attack_success_rate(model, split.x_test, split.y_test, trigger, 0)
    if split is not None:
        out["ba"] = 100 * metrics.benign_accuracy(int8, split.x_test, split.y_test)
        out["asr"] = 100 * metrics.attack_success_rate(int8, split.x_test, split.y_test, trigger, 0)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smallcnn,resnet18")
    p.add_argument("--paper-steps", type=int, default=10000, help="Adam steps per unit of the paper preset")
    p.add_argument("--resnet-paper-steps", type=int, default=50, help="paper-preset steps on ResNet-18 (extrapolated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "speed.md"))
    p.add_argument("--modes", default="plain,fast,paper", help="of plain, fast, exact, paper")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every mode, interleaved; ratios are to the same round's plain PTQ, median reported")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        model, mode = args.one
        steps = args.paper_steps if model == "smallcnn" else args.resnet_paper_steps
        print(json.dumps(_measure(model, mode, steps, args.seed)))
        return
    rows = []
    for rnd in range(args.repeat):
        for model in args.models.split(","):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", model, mode, "--paper-steps", str(args.paper_steps),
                       "--resnet-paper-steps", str(args.resnet_paper_steps), "--seed", str(args.seed)]
                load = os.getloadavg()[0]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append({**json.loads(res.stdout.strip().splitlines()[-1]), "round": rnd,
                             "load": (load, os.getloadavg()[0])})
                print(rows[-1], flush=True)
    _write(rows, args)


def _write(rows: list[dict], args) -> None:
    cpu = cpu_name()
    lines = ["# Speed and memory of purify", "",
             f"Command: `python benchmarks/bench_speed.py --models {args.models} --paper-steps {args.paper_steps} "
             f"--resnet-paper-steps {args.resnet_paper_steps} --modes {args.modes} --repeat {args.repeat}`", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, torch {__import__('torch').__version__}, "
             f"Python {platform.python_version()}; no GPU.", "",
             "Wall time is the whole PTQ pipeline (prepare_fx + calibrate + [purify] + convert_fx); the ratio is to "
             "plain PTQ on the same model and data in the same run. Peak RSS is the measuring process's maximum. "
             "Paper-preset rows that ran fewer steps are extrapolated from the measured per-unit PDA and solver "
             "time (Adam to 10000 steps, PDA to 500); their BA/ASR/error are those of the truncated run.", "",
             "| model | round | pipeline | wall s | x plain PTQ | purify s | peak RSS MB | BA % | ASR % | "
             "rel. error before -> after | load avg before, after |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    base = {(r["model"], r["round"]): r["seconds"] for r in rows if r["mode"] == "plain"}
    ratios: dict = {}
    for r in rows:
        if "fp32_ba" in r:
            lines.append(f"| {r['model']} | {r['round']} | FP32 model (no quantization) | | | | | {r['fp32_ba']:.2f} | "
                         f"{r['fp32_asr']:.2f} | | |")
        secs = r.get("seconds_extrapolated_to_10000_steps", r["seconds"])
        note = " (extrapolated)" if "seconds_extrapolated_to_10000_steps" in r else ""
        err = (f"{r['rel_error_before']:.2e} -> {r['rel_error_after']:.2e}" if "rel_error_after" in r else "")
        name = {"plain": "plain PTQ", "fast": "purify, fast default", "paper": "purify, paper preset",
                "exact": "purify, exact (5-step PDA, 4 CD passes, every Gram position)"}[r["mode"]]
        ratio = secs / base[r["model"], r["round"]]
        ratios.setdefault((r["model"], name), []).append(ratio)
        lines.append(f"| {r['model']} | {r['round']} | {name} | {secs:.1f}{note} | {ratio:.1f} | "
                     f"{r.get('purify_seconds', 0):.1f} | {r['peak_rss_mb']:.0f} | {r.get('ba', float('nan')):.2f} | "
                     f"{r.get('asr', float('nan')):.2f} | {err} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |")
    lines += ["", "Median ratio to plain PTQ over rounds:", ""]
    lines += [f"- {model}, {name}: {statistics.median(v):.1f}x (rounds: {', '.join(f'{x:.1f}' for x in v)})"
              for (model, name), v in ratios.items() if name != "plain PTQ"]
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
