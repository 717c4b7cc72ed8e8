"""EFRAP per-layer diagnostics and schedule variants on the bench's planted models (side script).

    OMP_NUM_THREADS=1 python benchmarks/efrap_diag.py --seeds 3 --kinds grid-aware --bits 8 --variants default,noflip

For each variant (a dict of EfrapConfig overrides plus this script's own schedule knobs) it runs
FX (and optionally ORT) PTQ with an instrumented copy of ``methods.efrap`` swapped into the
registry and prints, per unit: weights flipped vs nearest, h still undecided at the end
(0.1 < h < 0.9), the unit's relative output error D/t of nearest, of the soft W(V) at the end and
of the hard rounding, and the share of flipped weights with a small truncation error; then BA / ASR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_defenses as bd  # noqa: E402
from qcb_ptq_plugin import methods as M  # noqa: E402
from qcb_ptq_plugin.methods import efrap as E  # noqa: E402
from qcb_ptq_plugin.methods.rtn import unit_gram  # noqa: E402

RECORDS: list[dict] = []
KNOBS: dict = {}


def _rel(w, H, C, t):
    """relative output error D(W)/t per unit, D = tr(W H Wᵀ) - 2 tr(W Cᵀ) + t (all / n)."""
    w = w.double()
    d = (torch.bmm(w, H.double()) * w).sum() - 2 * (w * C.double()).sum() + t
    return (d / t).item()


def efrap_diag(unit, data, cfg):
    """methods.efrap with schedule knobs (KNOBS) and per-unit records (RECORDS)."""
    gram = unit_gram(unit, data)
    t0 = time.perf_counter()
    op, grid = unit.op, unit.grid
    w_full = unit.weight.detach().float()
    w = op.grouped(w_full)
    s, z = (op.grouped(t)[..., :1].float() for t in grid.expand(w_full))
    x = w / s
    floor = torch.floor(x)
    rest = x - floor
    flip_to = 1.0 - torch.round(rest)
    nearest = s * ((torch.round(x) + z).clamp(grid.qmin, grid.qmax) - z)
    v = torch.logit(rest.clamp(E._LOGIT_CLIP, 1 - E._LOGIT_CLIP)).requires_grad_(True)
    H = (gram.H / gram.n).float()
    C = (gram.C / gram.n).float()
    kappa = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30).view(-1, 1, 1)
    alpha = (w - nearest).abs() / s
    row_weight = 1.0 / (s * s * kappa)
    terms = E._Terms(floor, s, z, grid.qmin, grid.qmax, H, C, flip_to, alpha, cfg.flip_weight, cfg.reg_weight,
                     row_weight)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    sched = KNOBS.get("sched", "const")
    warm = KNOBS.get("warmup", 0.2)
    b_hi, b_lo = KNOBS.get("beta", (20.0, 2.0))
    reg_w = KNOBS.get("reg_weight", cfg.reg_weight)
    for step in range(cfg.steps):
        if sched == "const":
            v.grad = terms.grad(v.detach())
        else:  # AdaRound: no reg for `warm` of the steps, then |2h-1|^beta with beta annealed b_hi -> b_lo
            vv = v.detach()
            h, w_v, inside = terms._soft(vv)
            d_act = 2 * s * row_weight * (torch.bmm(w_v, H) - C) * inside
            d_bce = -flip_to / (h + 1e-8) + (1 - flip_to) / (1 - h + 1e-8)
            g = d_act + cfg.flip_weight * alpha * d_bce
            frac = step / max(cfg.steps, 1)
            if frac >= warm:
                r = (frac - warm) / (1 - warm)
                lam = reg_w
                if sched == "geo":  # beta 2, weight geometric reg_w[0] -> reg_w[1]
                    beta, lam = 2.0, reg_w[0] * (reg_w[1] / reg_w[0]) ** r
                elif sched == "cos":
                    beta = b_lo + 0.5 * (b_hi - b_lo) * (1 + torch.cos(torch.tensor(r * torch.pi))).item()
                else:
                    beta = b_hi + (b_lo - b_hi) * r
                u = (2 * h - 1)
                g = g + lam * (-2 * beta * u.abs().clamp_min(1e-12).pow(beta - 1) * torch.sign(u))
            v.grad = h * (1 - h) * g
        opt.step()
    with torch.no_grad():
        h = torch.sigmoid(v)
        soft = terms._soft(v)[1]
        qh = (floor + (v >= 0).float() + z).clamp(grid.qmin, grid.qmax)
        hard = s * (qh - z)
        t = (gram.t / gram.n)
        qn = (torch.round(x) + z).clamp(grid.qmin, grid.qmax)
        flipped = qh != qn
        rec = dict(name=unit.name, n=w.numel(), flips=int(flipped.sum()),
                   flips_small=int((flipped & (alpha < 0.15)).sum()),
                   undecided=int(((h > 0.1) & (h < 0.9)).sum()),
                   rel_nearest=_rel(nearest, H, C, t), rel_soft=_rel(soft, H, C, t), rel_hard=_rel(hard, H, C, t),
                   rel_float=_rel(w, H, C, t))
        RECORDS.append(rec)
    return M.UnitResult(codes=op.ungrouped(qh.to(torch.int64), w_full.shape), gram=gram,
                        solve_seconds=time.perf_counter() - t0)


def load(kind, bits, seed, cache_dir):
    d = Path(cache_dir)
    for name in (f"digits-{kind}-w{bits}-n20000-g32-seed{seed}.pt", f"digits-{kind}-w{bits}-n20000-g32-seed{seed}-779274b47ad7.pt"):
        if (d / name).exists():
            return torch.load(d / name, weights_only=False)
    raise FileNotFoundError(f"{kind} w{bits} seed {seed}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="3")
    p.add_argument("--kinds", default="grid-aware")
    p.add_argument("--bits", default="8")
    p.add_argument("--toolchains", default="fx")
    p.add_argument("--variants", default='{"default": {}}', help="JSON {label: {cfg overrides + knobs}}")
    p.add_argument("--plain", action="store_true", help="also plain PTQ rows")
    p.add_argument("--layers", action="store_true", help="print per-unit records")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "qcb-ptq" / "bench"))
    a = p.parse_args()
    variants = json.loads(a.variants)
    m = M._METHODS["efrap"]
    M._METHODS["efrap"] = M.Method(m.name, m.config_type, efrap_diag, m.summary, m.defaults, m.check)
    tcs = {"fx": "torch.ao FX", "ort": "onnxruntime"}
    for seed in map(int, a.seeds.split(",")):
        args = argparse.Namespace(dataset="digits", calib=256, seed=seed)
        split, trigger, calib = bd.setup(args)
        for kind in a.kinds.split(","):
            for bits in map(int, a.bits.split(",")):
                try:
                    model = load(kind, bits, seed, a.cache_dir)
                except FileNotFoundError:
                    continue
                fp_ba, fp_asr = bd.measure(model, split, trigger)
                if a.plain:
                    for tc in a.toolchains.split(","):
                        ba, asr, sec = bd.run_one(tcs[tc], model, split, calib, bits, trigger)
                        print(json.dumps(dict(seed=seed, kind=kind, bits=bits, tc=tc, variant="plain", fp32=round(fp_ba, 2),
                                              bar=round(fp_ba - 1, 2), ba=round(ba, 2), asr=round(asr, 2))), flush=True)
                for label, over in variants.items():
                    KNOBS.clear()
                    KNOBS.update({k: v for k, v in over.items() if k in ("sched", "warmup", "beta", "reg_weight")})
                    cfgo = {k: v for k, v in over.items() if k not in KNOBS}
                    if "reg_weight" in over and over.get("sched", "const") == "const":
                        cfgo["reg_weight"] = over["reg_weight"]
                    cfg = E.EfrapConfig(progress=False, **cfgo)
                    for tc in a.toolchains.split(","):
                        RECORDS.clear()
                        ba, asr, sec = bd.run_one(tcs[tc], model, split, calib, bits, trigger, "efrap", cfg)
                        tot = {k: sum(r[k] for r in RECORDS) for k in ("n", "flips", "flips_small", "undecided")}
                        print(json.dumps(dict(seed=seed, kind=kind, bits=bits, tc=tc, variant=label, bar=round(fp_ba - 1, 2),
                                              ba=round(ba, 2), asr=round(asr, 2), margin=round(ba - fp_ba + 1, 2),
                                              s=round(sec, 1), **tot,
                                              hard=[round(1e3 * r["rel_hard"], 2) for r in RECORDS],
                                              soft=[round(1e3 * r["rel_soft"], 2) for r in RECORDS])), flush=True)
                        if a.layers:
                            for r in RECORDS:
                                print("   ", json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}),
                                      flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
