"""EFRAP per-layer diagnostics and schedule variants on the bench's planted models (side script).

    OMP_NUM_THREADS=1 python benchmarks/efrap_diag.py --seeds 3,0 --layers
    OMP_NUM_THREADS=1 python benchmarks/efrap_diag.py --seeds 0,1,2,3,4,5 --bits 8,4 --toolchains fx,ort --plain \
        --kinds grid-aware,grid-aware-ort,pqbackdoor,clean \
        --variants '{"w10": {}, "w30": {"reg_weight": 30}, "geo": {"geo": [0.01, 100]}}'

For each variant (EfrapConfig overrides, LSB balance) it runs FX (and ORT) PTQ with an
instrumented copy of ``methods.efrap`` swapped into the registry (same terms, same optimiser
loop) and prints BA / ASR with, per unit: weights flipped vs nearest, h still undecided at the end
(0.1 < h < 0.9), the unit's relative output error D/t of nearest, of the soft W(V) at the end and
of the hard rounding, and flipped weights with a truncation error under 0.15 LSB. Used for the
choice of the annealed regulariser (``methods/efrap.py``, ``benchmarks/results/defenses.md``).
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
KNOBS: dict = {}  # "geo": [lo, hi], the one schedule the method itself does not have


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
    if "geo" in KNOBS:  # beta 2 throughout, weight geometric from geo[0] to geo[1] after AdaRound's 20% warm-up
        lo, hi = KNOBS["geo"]
        opt = torch.optim.Adam([v], lr=cfg.lr)
        for step in range(cfg.steps):
            r = (step / cfg.steps - E._WARMUP) / (1 - E._WARMUP)
            terms.reg_weight, terms.beta = (lo * (hi / lo) ** r if r >= 0 else 0.0), 2.0
            v.grad = terms.grad(v.detach())
            opt.step()
    else:  # the method's own loop: cfg.reg_schedule "anneal" (default) or "const" (the release's)
        E._optimise(terms, v, cfg)
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
    """A planted model from the bench's cache: the current key, or the names the seed 0-5 runs of
    2026-11-24 stored them under (the key has hashed the attack kit's source since seed 5; planting
    is deterministic at one thread, so any stored copy is the model the tables report)."""
    stem = f"digits-{kind}-w{bits}-n20000-g32-seed{seed}"
    for path in [Path(cache_dir) / f"{stem}.pt", *sorted(Path(cache_dir).glob(f"{stem}-*.pt"))]:
        if path.exists():
            return torch.load(path, weights_only=False)
    raise FileNotFoundError(f"{kind} w{bits} seed {seed}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="3")
    p.add_argument("--kinds", default="grid-aware")
    p.add_argument("--bits", default="8")
    p.add_argument("--toolchains", default="fx")
    p.add_argument("--variants", default='{"default": {}, "const": {"reg_schedule": "const", "reg_weight": 0.01}}',
                   help='JSON {label: {EfrapConfig overrides}}; "geo": [lo, hi] ramps a beta-2 regulariser instead')
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
                        print(json.dumps(dict(seed=seed, kind=kind, bits=bits, tc=tc, variant="plain",
                                              fp32=round(fp_ba, 2), bar=round(fp_ba - 1, 2), ba=round(ba, 2),
                                              asr=round(asr, 2))), flush=True)
                for label, over in variants.items():
                    KNOBS.clear()
                    KNOBS.update({k: v for k, v in over.items() if k == "geo"})
                    cfg = E.EfrapConfig(progress=False, **{k: v for k, v in over.items() if k != "geo"})
                    for tc in a.toolchains.split(","):
                        RECORDS.clear()
                        ba, asr, sec = bd.run_one(tcs[tc], model, split, calib, bits, trigger, "efrap", cfg)
                        tot = {k: sum(r[k] for r in RECORDS) for k in ("n", "flips", "flips_small", "undecided")}
                        print(json.dumps(dict(seed=seed, kind=kind, bits=bits, tc=tc, variant=label,
                                              bar=round(fp_ba - 1, 2), ba=round(ba, 2), asr=round(asr, 2),
                                              margin=round(ba - fp_ba + 1, 2), s=round(sec, 1), **tot,
                                              hard=[round(1e3 * r["rel_hard"], 2) for r in RECORDS],
                                              soft=[round(1e3 * r["rel_soft"], 2) for r in RECORDS])), flush=True)
                        if a.layers:
                            for r in RECORDS:
                                print("   ", json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                                                         for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
