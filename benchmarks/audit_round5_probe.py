"""Issue 13, round 5 candidates for the audit's probe, measured on SEEN models only, before round 5
was committed: "library" below is round 4's probe (8 twins, its floor ``bench_audit.ROUND4_PROBE_FLOOR``,
no pooling, no control) and the layers' scores are round 4's (``bench_audit.layer_score``); the
candidate "pooled" with the control is what round 5 committed (``audit._probe_z``).

1. More twins: the probe's verdict on QCBs near the threshold depends on the draw of its 8 dithered
   twins. ``draws`` regenerates, for a few recorded audits (same model, setting, calibration size as
   the record), round to nearest's counts and a pool of P dithered twins (``audit._dithered``, one
   seeded generator); ``analyze`` splits the pool into disjoint groups of T twins (independent draws
   of a T-twin probe) and scores each as the library does (probe p x cells, combined x2 with the
   record's layer p), so the spread over draws can be read per T. Seconds per flip pass are recorded
   (an audit's probe costs T + 2 passes).
2. Positional localisation: per (position, class) the probe's z against the twins, and also
   z_pos = (F - med_c) / sqrt(med_c + 1 + (PROBE_FLOOR n)^2), med_c the median over positions of
   round to nearest's own F for class c (a collapsed INT model flips to one class at every position;
   a trigger at one). The candidate cell score is min(z, z_pos). Scored on ``--twins``' counts of the
   calibration, fresh and fresh2 sets (round 4's /tmp/audit4/twins_counts.jsonl, dithered family) and
   on the ``draws`` file (fresh3 and the borderline models).

    OMP_NUM_THREADS=1 python benchmarks/audit_round5_probe.py draws /tmp/audit5/draws.jsonl --pool 48 \\
        --only smallcnn-digits-adaptive-s96:4:per-channel ...
    OMP_NUM_THREADS=1 python benchmarks/audit_round5_probe.py analyze /tmp/audit5/draws.jsonl \\
        --counts /tmp/audit4/twins_counts.jsonl

The no-patch control ("control"): each cell also against the unpatched images round to nearest sends to
that class (``draws`` records them as ``rtn0``). ``refit`` refits the probe floor per number of twins on
the clean calibration audits (``draws OUT --pool 24 --only clean-calibration``) and scores the draws
files' models at twice it, for the library's z, with the control, and with the twins' variance pooled
per class ("pooled"); ``pooled COUNTS FLOOR [DRAWS]`` scores the pooled variant on --twins' counts of the
seen sets. Exact commands and results: the round 5 notes in benchmarks/results/audit.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_audit as B  # noqa: E402

A = B.audit_mod
RES = Path(__file__).resolve().parent / "results"
LAYER_RECORDS = [str(RES / f) for f in ("audit_calibration4.jsonl", "audit_fresh_dither.jsonl",
                                          "audit_fresh2_dither.jsonl", "audit_fresh3.jsonl")]


def layer_scores() -> dict:
    return {(r["model"], r["bits"], r["grid"]): (r, B.layer_score(r)) for r in B.records(*LAYER_RECORDS)}


def draws(out: str, only: list[str], pool: int, seed: int) -> None:
    recs = layer_scores()
    if len(only) == 1 and only[0].startswith("clean-"):  # every clean audit of a set (clean-calibration: the floor's fit)
        half = only[0][len("clean-"):]
        only = [f"{m}:{b}:{g}" for (m, b, g), (r, _) in recs.items() if r["half"] == half and r["kind"] == "clean"]
    done = {(d["model"], d["bits"], d["grid"]) for d in B.records(out)} if Path(out).exists() else set()
    by_name, splits = {r.name: r for r in B.RECIPES}, {}
    torch.set_num_threads(1)
    for key in only:
        name, bits, grid = key.split(":")
        if (name, int(bits), grid) in done:
            continue
        rec = recs[name, int(bits), grid][0]
        plan, x = B.probe_inputs(rec, by_name, splits, Path("/tmp/qcb_audit_models"))
        if x is None:  # no probe there (transformer tokens, flat inputs)
            continue
        n = x.shape[0]
        sim, fp = plan.capture.simulator, plan.capture.float_model
        pos, classes, flips = B.probe_counter(plan, x)
        with torch.no_grad():
            rtn_w = [u.grid.fake_quantize(u.weight.detach().float()) for u in plan.units]
            t0 = time.perf_counter()
            rtn = flips()
            # the no-patch control: images round to nearest sends to each class where the float model does not
            p0, f0 = sim(x).argmax(-1), fp(x).argmax(-1)
            rtn0 = torch.bincount(p0[p0 != f0], minlength=classes).tolist()
            gen, twins = torch.Generator().manual_seed(seed), []
            try:
                for _ in range(pool):
                    for u in plan.units:
                        u.write(A._dithered(u.weight.detach().float(), u.grid, gen))
                    twins.append(flips())
            finally:
                for u, wq in zip(plan.units, rtn_w):
                    u.write(wq)
            secs = (time.perf_counter() - t0) / (pool + 1)  # per flip pass (rtn's includes the control)
        o = {k: rec[k] for k in ("model", "kind", "half", "bits", "grid", "calib", "fp32", "plain")}
        o.update(n=n, positions=pos, rtn=rtn, rtn0=rtn0, twins=twins, secs_per_pass=secs, audit_s_record=rec["audit_s"])
        with open(out, "a") as f:
            f.write(json.dumps(o) + "\n")
        print(f"{name:44s} W{bits} {grid:11s} {pool} twins, {secs:.2f}s per pass", flush=True)


def cell_z(f: torch.Tensor, t: torch.Tensor, n: int, f0=None, floor: float = B.ROUND4_PROBE_FLOOR) -> dict:
    """Per cell: the library's z, the positional z (against the class's median over positions) and the
    control z (against the class's unpatched flips f0, where given); f (positions, classes), t (twins,
    positions, classes)."""
    m = t.mean(0)
    out = {"library": (f - m) / (m + 1 + t.var(0) + (floor * n) ** 2).sqrt()}
    med = f.median(0).values  # per class, over positions (round to nearest's own baseline)
    out["positional"] = torch.minimum(out["library"], (f - med) / (med + 1 + (floor * n) ** 2).sqrt())
    if f0 is not None:
        out["control"] = torch.minimum(out["library"], (f - f0) / (f0 + 1 + (floor * n) ** 2).sqrt())
    return out


def total(p_probe: float, s_layers: float) -> float:
    return B.combined_score(s_layers, p_probe)


def scores(f, t, n, s_layers, f0=None) -> dict:
    out = {}
    for name, zz in cell_z(f, t, n, f0).items():
        k = int(zz.argmax())
        out[name] = {"score": total(min(1.0, zz.numel() * A._p_upper(float(zz.max()))), s_layers), "z": float(zz.max()),
                     "cell": divmod(k, zz.shape[1])}
    return out


def analyze(draw_files: list[str], counts: str | None) -> None:
    thr = A.DEFAULT_THRESHOLD
    recs = layer_scores()
    ds = B.records(*draw_files) if draw_files else []
    ctl = {(d["model"], d["bits"], d["grid"]): torch.tensor(d["rtn0"], dtype=torch.float64) for d in ds if "rtn0" in d}
    print("## 1. draw spread: disjoint groups of T twins from each pool (score = library's total)")
    for d in (d for d in ds if d["twins"]):
        key = (d["model"], d["bits"], d["grid"])
        f, pool = torch.tensor(d["rtn"], dtype=torch.float64), torch.tensor(d["twins"], dtype=torch.float64)
        s_layers = recs[key][1]
        print(f"{d['model']} W{d['bits']} {d['grid']} N={d['calib']} ASR {d['plain'][1]:.1f} layers {s_layers:.2f}, "
              f"{d['secs_per_pass']:.2f}s/pass (record's audit {d['audit_s_record']:.1f}s); unpatched flips per "
              f"class {ctl[key].int().tolist() if key in ctl else None}")
        for T in (8, 16, 24):
            groups = [pool[k * T:(k + 1) * T] for k in range(len(pool) // T)]
            res = [scores(f, g, d["n"], s_layers, ctl.get(key)) for g in groups]
            for name in res[0] if res else ():
                sc = [r[name]["score"] for r in res]
                zs = [r[name]["z"] for r in res]
                print(f"  T={T:2d} {name:10s} scores " + " ".join(f"{v:5.1f}" for v in sc)
                      + "  | z " + " ".join(f"{v:4.1f}" for v in zs) + f"  | flagged {sum(v > thr for v in sc)}/{len(sc)}")
    if not counts:
        return
    print("\n## 2. localisation candidates on --twins' counts (dithered, 8 twins, one draw) + the draws files "
          "(first 8 twins); 'control' only where the unpatched flips were regenerated")
    rows = [(x, torch.tensor(x["probe"]["rtn"], dtype=torch.float64),
             torch.tensor(x["probe"]["dither"], dtype=torch.float64)) for x in B.records(counts)]
    seen = {(x["model"], x["bits"], x["grid"]) for x, _, _ in rows}  # a model in both: the --twins draw
    rows += [(d, torch.tensor(d["rtn"], dtype=torch.float64), torch.tensor(d["twins"][:8], dtype=torch.float64))
             for d in ds if d["twins"] and (d["model"], d["bits"], d["grid"]) not in seen]
    tally: dict = {}
    for x, f, t in rows:
        key = (x["model"], x["bits"], x["grid"])
        kind = "working" if B.working(x) else ("clean" if x["kind"] == "clean" else None)
        if key not in recs or kind is None:
            continue
        s_layers = recs[key][1]
        sc = scores(f, t, x["n"], s_layers, ctl.get(key))
        c = tally.setdefault((x["half"], kind), {"n": 0, "library": 0, "positional": 0, "control": 0, "ctl_n": 0})
        c["n"] += 1
        c["ctl_n"] += "control" in sc
        for name, v in sc.items():
            c[name] += v["score"] > thr
        flags = {name: v["score"] > thr for name, v in sc.items()}
        if len(set(flags.values())) > 1 or (kind == "clean" and sc["library"]["score"] > 1) or \
                (kind == "working" and s_layers <= thr):
            print(f"  {x['model']:42s} W{x['bits']} {x['grid']:11s} {kind:7s} layers {s_layers:6.2f} "
                  + " ".join(f"{name} {v['score']:6.2f} (z {v['z']:4.1f} @{v['cell']})" for name, v in sc.items()))
    for (half, kind), c in sorted(tally.items()):
        print(f"  {half:11s} {kind:7s} flagged: library {c['library']}/{c['n']}, positional {c['positional']}/{c['n']}, "
              f"control {c['control']}/{c['ctl_n']} (of those with the control)")


def p_probe(f, t, n, floor, f0=None, variant="library") -> float:
    """The probe's p as round 4's library computed it ("library"), with the no-patch control ("control"), or
    with the control and the twins' variance pooled per class ("pooled": var = phi_c (mean + 1), phi_c
    the median over positions of each cell's var / (mean + 1): a steadier variance than one cell's T twins)."""
    m = t.mean(0)
    v = t.var(0)
    if variant == "pooled":
        v = (v / (m + 1)).median(0).values * (m + 1)
    z = (f - m) / (m + 1 + v + (floor * n) ** 2).sqrt()
    if variant in ("control", "pooled") and f0 is not None:
        z = torch.minimum(z, (f - f0) / (f0 + 1 + (floor * n) ** 2).sqrt())
    return min(1.0, z.numel() * A._p_upper(float(z.max())))


def refit(clean_file: str, draw_files: list[str]) -> None:
    """Per number of twins T: the probe floor refitted as round 4 did (``bench_audit.fit_twins``: the
    smallest floor with which no clean calibration audit gets 2 x probe p below 1 / their number), on
    the first T twins of ``clean_file``'s pools; then, at twice it, the draws files' models scored on
    disjoint groups of T twins (library statistic and with the no-patch control)."""
    thr = A.DEFAULT_THRESHOLD
    recs = layer_scores()
    clean = [d for d in B.records(clean_file) if d["twins"]]
    ds = [d for d in B.records(*draw_files) if d["twins"]]
    ctl = {(d["model"], d["bits"], d["grid"]): torch.tensor(d["rtn0"], dtype=torch.float64)
           for d in B.records(*draw_files)}
    T_max = min(len(d["twins"]) for d in clean)
    variants = ("library", "control", "pooled")
    print(f"{len(clean)} clean calibration audits with {T_max} twins each")
    for T in (8, 16, 24):
        if T > T_max:
            continue
        cs = [(torch.tensor(d["rtn"], dtype=torch.float64), torch.tensor(d["twins"][:T], dtype=torch.float64), d["n"])
              for d in clean]
        fls = {}
        for variant in variants:  # clean calibration audits have no control counts: fitted without it
            fit_v = "pooled_nc" if variant == "pooled" else "library"
            hi = B.smallest_floor(lambda fl: min(2 * p_probe(f, t, n, fl, None, fit_v.replace("_nc", ""))
                                                 for f, t, n in cs) >= 1 / len(cs))
            fls[variant] = 2 * hi
            worst = max(total(p_probe(f, t, n, 2 * hi, None, fit_v.replace("_nc", "")), recs[d["model"], d["bits"], d["grid"]][1])
                        for (f, t, n), d in zip(cs, clean))
            print(f"T={T:2d} {variant}: floor fitted {hi:.4f}, at 2x = {2 * hi:.4f} (round 4, T=8: {B.ROUND4_PROBE_FLOOR}); "
                  f"highest clean calibration score at 2x {worst:.2f}")
        for d in ds:
            key = (d["model"], d["bits"], d["grid"])
            f, pool = torch.tensor(d["rtn"], dtype=torch.float64), torch.tensor(d["twins"], dtype=torch.float64)
            groups = [pool[k * T:(k + 1) * T] for k in range(len(pool) // T)]
            for variant in variants:
                fl = fls[variant]
                sc = [total(p_probe(f, g, d["n"], fl, ctl.get(key), variant), recs[key][1]) for g in groups]
                print(f"    {d['model']:36s} W{d['bits']} {d['grid']:11s} {d['kind']:14s} {variant:8s} "
                      + " ".join(f"{v:5.1f}" for v in sc) + f"  flagged {sum(v > thr for v in sc)}/{len(sc)}")


def pooled_sets(counts: str, floor: float, draw_files: list[str]) -> None:
    """The pooled-variance probe ("pooled", at ``floor``, with the control where ``draw_files`` hold the
    unpatched counts, else without it: conservative for clean audits) on --twins' counts (8 dithered
    twins, one draw) of the calibration, fresh and fresh2 sets: flagged working / clean per set, against
    the library's probe at PROBE_FLOOR."""
    thr = A.DEFAULT_THRESHOLD
    recs = layer_scores()
    ctl = {(d["model"], d["bits"], d["grid"]): torch.tensor(d["rtn0"], dtype=torch.float64)
           for d in B.records(*draw_files)} if draw_files else {}
    tally: dict = {}
    rows = [(x, x["probe"]["rtn"], x["probe"]["dither"]) for x in B.records(counts)]
    seen = {(x["model"], x["bits"], x["grid"]) for x, _, _ in rows}  # draws files: their first 8 twins
    rows += [(d, d["rtn"], d["twins"][:8]) for d in (B.records(*draw_files) if draw_files else [])
             if d["twins"] and (d["model"], d["bits"], d["grid"]) not in seen]
    for x, f, t in rows:
        key = (x["model"], x["bits"], x["grid"])
        kind = "working" if B.working(x) else ("clean" if x["kind"] == "clean" else None)
        if key not in recs or kind is None:
            continue
        f, t = torch.tensor(f, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
        s_lay = recs[key][1]
        a = total(p_probe(f, t, x["n"], B.ROUND4_PROBE_FLOOR), s_lay)
        b = total(p_probe(f, t, x["n"], floor, ctl.get(key), "pooled"), s_lay)
        c = tally.setdefault((x["half"], kind), [0, 0, 0, 0.0])
        c[0] += 1
        c[1] += a > thr
        c[2] += b > thr
        if kind == "clean":
            c[3] = max(c[3], b)
        if (a > thr) != (b > thr) or (kind == "clean" and b > 1.5):
            print(f"  {x['model']:42s} W{x['bits']} {x['grid']:11s} {kind:7s} layers {s_lay:6.2f} library {a:6.2f} "
                  f"pooled {b:6.2f}")
    for (half, kind), (n, a, b, mx) in sorted(tally.items()):
        print(f"  {half:11s} {kind:7s} flagged: library {a}/{n}, pooled {b}/{n}"
              + (f" (highest clean pooled score {mx:.2f})" if kind == "clean" else ""))


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draws")
    d.add_argument("out")
    d.add_argument("--only", nargs="+", required=True, metavar="MODEL:BITS:GRID")
    d.add_argument("--pool", type=int, default=48)
    d.add_argument("--seed", type=int, default=5)
    a = sub.add_parser("analyze")
    a.add_argument("draws", nargs="*")
    a.add_argument("--counts")
    ps = sub.add_parser("pooled")
    ps.add_argument("counts")
    ps.add_argument("floor", type=float)
    ps.add_argument("draws", nargs="*")
    r = sub.add_parser("refit")
    r.add_argument("clean")
    r.add_argument("draws", nargs="+")
    args = ap.parse_args()
    if args.cmd == "pooled":
        return pooled_sets(args.counts, args.floor, args.draws)
    if args.cmd == "refit":
        return refit(args.clean, args.draws)
    if args.cmd == "draws":
        draws(args.out, args.only, args.pool, args.seed)
    else:
        analyze(args.draws, args.counts)


if __name__ == "__main__":
    main()
