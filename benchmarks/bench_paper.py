"""The paper preset (``PurifyConfig.paper()``, 10000 Adam steps per unit) vs the fast default on planted QCBs.

    OMP_NUM_THREADS=1 python benchmarks/bench_paper.py --archs cnn,mlp --seeds 0,1,2 --bits 4,8 \\
        --steps 10000 --jsonl /tmp/paper_runs.jsonl --out benchmarks/results/paper_vs_fast.md

Models: benchmarks/_plants.py (digits; grid-aware QCBs planted for W4 and W8, one per
architecture, bit width and seed). Per model: plain FX x86 PTQ, the fast default and the paper
preset purify the same calibrated model (256 calibration images), then real ``convert_fx``;
BA / ASR on the digits test split (449 images: one image is 0.22 points). For the paper preset
the run also records the one objective it optimises and reports (the unit's output after its
activation and output quantizer, see ``methods/lac.py``): at round to nearest, at each of its
20 checkpoints and the kept iterate, per unit.

Each finished model is appended to ``--jsonl`` at once and the markdown is rewritten from every
JSONL given (``--render a.jsonl,b.jsonl`` only renders), so a run cut short still reports
exactly what finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent


class _Trajectories(logging.Handler):
    """Collects the adam solver's per-unit objective log lines (see ``lac._solve_adam``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.units: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "adam objective" in record.msg:
            name, rtn, every, curve, kept, best = record.args
            self.units.append(dict(unit=name, rtn=rtn, every=every, curve=curve, kept_step=kept, best=best))


def run_model(arch: str, bits: int, seed: int, steps: int, d, calib) -> dict:
    from torch.ao.quantization.quantize_fx import convert_fx

    import qcb_ptq_plugin as q
    from qcb_ptq_plugin.evalkit import metrics
    from qcb_ptq_plugin.ptq import prepare_fx_calibrated

    from _plants import TARGET, TRIGGER, planted

    t0 = time.perf_counter()
    m = planted(arch, bits, seed, d)
    row = dict(arch=arch, bits=bits, seed=seed, steps=steps, plant_s=time.perf_counter() - t0,
               fp=(metrics.benign_accuracy(m, d.x_test, d.y_test),
                   metrics.attack_success_rate(m, d.x_test, d.y_test, TRIGGER, TARGET)))
    base = prepare_fx_calibrated(m, calib, bits)

    def score(prepared):
        int8 = convert_fx(prepared)
        return (metrics.benign_accuracy(int8, d.x_test, d.y_test),
                metrics.attack_success_rate(int8, d.x_test, d.y_test, TRIGGER, TARGET))

    row["plain"] = score(copy.deepcopy(base))
    for name, cfg in (("fast", q.PurifyConfig(progress=False, seed=seed)),
                      ("paper", q.PurifyConfig.paper(adam_steps=steps, progress=False, seed=seed))):
        prepared = copy.deepcopy(base)
        traj, logger = _Trajectories(), logging.getLogger("qcb_ptq_plugin.methods.lac")
        level = logger.level
        logger.setLevel(logging.INFO)  # the solver logs its checkpoints at INFO
        logger.addHandler(traj)
        try:
            t = time.perf_counter()
            rep = q.purify(prepared, m, calib, cfg)
            row[f"{name}_s"] = time.perf_counter() - t
        finally:
            logger.removeHandler(traj)
            logger.setLevel(level)
        row[name] = score(prepared)
        row[f"{name}_error"] = (sum(u.error_before for u in rep.units), sum(u.error_after for u in rep.units))
        if name == "paper":
            row["trajectories"] = traj.units
            row["act_pinned"] = sum(type(mod).__name__ == "FixedQParamsObserver" for mod in prepared.modules())
    return row


def _pct(vals) -> str:
    vals = [100 * v for v in vals]
    return f"{statistics.mean(vals):.2f} +- {statistics.pstdev(vals):.2f}"


def render(rows: list[dict], cmd: str, load: list[str]) -> list[str]:
    from _plants import ARCHS

    lines = ["# Paper preset (10000 Adam steps) vs the fast default, on planted QCBs", "",
             f"Command: `{cmd}`", "", f"Load (uptime): {' / '.join(load)}", "",
             "Digits (sklearn), grid-aware QCBs (benchmarks/_plants.py) planted per architecture, bit width and "
             "seed; FX x86 PTQ, real `convert_fx`; 256 calibration images; BA / ASR in % on the 449-image test "
             "split (one image = 0.22 points). Mean +- std over the seeds that finished; per-seed values in "
             "the second table. Only models whose run finished are listed.", "",
             "## BA / ASR", "",
             "| arch | bits | seeds | FP32 BA / ASR | plain PTQ BA / ASR | fast BA / ASR | paper BA / ASR | "
             "paper - fast: BA / ASR points | fast s | paper s |", "|---|---|---|---|---|---|---|---|---:|---:|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r["bits"], r["steps"]), []).append(r)
    for (arch, bits, steps), rs in sorted(groups.items()):
        def both(key):
            return f"{_pct([r[key][0] for r in rs])} / {_pct([r[key][1] for r in rs])}"

        dba = 100 * statistics.mean(r["paper"][0] - r["fast"][0] for r in rs)
        dasr = 100 * statistics.mean(r["paper"][1] - r["fast"][1] for r in rs)
        lines.append(f"| {ARCHS[arch][0]} | W{bits}A8 | {','.join(str(r['seed']) for r in rs)} | {both('fp')} | "
                     f"{both('plain')} | {both('fast')} | {both('paper')} | {dba:+.2f} / {dasr:+.2f} | "
                     f"{statistics.mean(r['fast_s'] for r in rs):.1f} | "
                     f"{statistics.mean(r['paper_s'] for r in rs):.0f} |")
    lines += ["", "## Per seed: BA / ASR and the paper preset's objective", "",
              "Objective = the one the paper preset optimises and reports (sum over units of the unit's output "
              "error after its activation and output quantizer, mean over samples and positions): at round to "
              "nearest, at the LAST of its 20 checkpoints (no selection), and the kept (best scored) iterate; "
              "'units falling' counts units whose last checkpoint is below round to nearest.", "",
              "| arch | bits | seed | steps | plain | fast | paper | objective RTN -> last -> kept | units falling | "
              "act. scales pinned |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["bits"], r["seed"])):
        tr = r["trajectories"]
        rtn, last, kept = (sum(u[k] if k != "curve" else u["curve"][-1] for u in tr) for k in ("rtn", "curve", "best"))
        falling = sum(u["curve"][-1] < u["rtn"] for u in tr)
        objective = f"{rtn:.4g} -> {last:.4g} -> {kept:.4g} | {falling}/{len(tr)}" if tr else "not recorded | -"
        ba_asr = {k: f"{100 * r[k][0]:.1f} / {100 * r[k][1]:.1f}" for k in ("plain", "fast", "paper")}
        lines.append(f"| {r['arch']} | W{r['bits']} | {r['seed']} | {r['steps']} | {ba_asr['plain']} | "
                     f"{ba_asr['fast']} | {ba_asr['paper']} | {objective} | {r['act_pinned']} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="cnn,mlp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bits", default="4,8")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--jsonl", default=str(HERE / "results" / "paper_runs.jsonl"))
    p.add_argument("--render", default="", help="comma-separated JSONL files: only write the markdown from them")
    p.add_argument("--cmd", default="", help="the command line to print in the markdown (with --render)")
    p.add_argument("--out", default=str(HERE / "results" / "paper_vs_fast.md"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import sys

    sys.path.insert(0, str(HERE))
    from qcb_ptq_plugin.evalkit import datasets
    from qcb_ptq_plugin.evalkit.harness import write_markdown

    load = [os.popen("uptime").read().strip()]
    if args.render:
        rows = [json.loads(ln) for f in args.render.split(",") for ln in Path(f).read_text().splitlines() if ln]
        write_markdown(render(rows, args.cmd, load), args.out)
        return
    d = datasets.digits()
    calib = d.calibration(256, seed=1)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/bench_paper.py " + " ".join(
        f"--{k} {getattr(args, k)}" for k in ("archs", "seeds", "bits", "steps"))
    done = set()
    if Path(args.jsonl).exists():  # a restarted run skips the models already written
        rows = [json.loads(ln) for ln in Path(args.jsonl).read_text().splitlines() if ln]
        done = {(r["arch"], r["bits"], r["seed"], r["steps"]) for r in rows}
    for arch in args.archs.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for bits in [int(b) for b in args.bits.split(",")]:
                if (arch, bits, seed, args.steps) in done:
                    continue
                row = run_model(arch, bits, seed, args.steps, d, calib)
                row["load_after"] = os.popen("uptime").read().strip()
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "trajectories"}), flush=True)
    rows = [json.loads(ln) for ln in Path(args.jsonl).read_text().splitlines() if ln]
    write_markdown(render(rows, cmd, load + [os.popen("uptime").read().strip()]), args.out)


if __name__ == "__main__":
    main()
