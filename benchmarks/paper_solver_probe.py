"""Which half of the paper preset raises its W4 ASR over the fast default: PDA or the Adam solver?

    OMP_NUM_THREADS=1 python benchmarks/paper_solver_probe.py ARCH BITS SEED VARIANT

VARIANT is one of ``fast`` (the default: Gram solver, 1 PDA step of gamma), ``fast+paperPDA``
(Gram solver, the release's PDA: 500 steps of 1e-3 halved at 250), ``paper``
(``PurifyConfig.paper()``: Adam/STE, 10000 steps, release PDA) and ``paper+fastPDA`` (Adam/STE with
1 PDA step). The model is benchmarks/_plants.py's (cached) grid-aware QCB, calibrated and scored as
in bench_paper.py; prints one JSON line with BA / ASR (%) after real ``convert_fx``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    warnings.filterwarnings("ignore")
    from torch.ao.quantization.quantize_fx import convert_fx

    import qcb_ptq_plugin as q
    from _plants import TARGET, TRIGGER, planted
    from qcb_ptq_plugin.evalkit import datasets, metrics
    from qcb_ptq_plugin.ptq import prepare_fx_calibrated

    arch, bits, seed, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    d = datasets.digits()
    m = planted(arch, bits, seed, d)
    calib = d.calibration(256, seed=1)
    configs = {
        "fast": q.PurifyConfig(progress=False, seed=seed),
        "fast+paperPDA": q.PurifyConfig(progress=False, seed=seed, gamma=1e-3, pda_steps=500, pda_step_size=1e-3),
        "paper": q.PurifyConfig.paper(progress=False, seed=seed),
        "paper+fastPDA": q.PurifyConfig.paper(progress=False, seed=seed, pda_steps=1),
    }
    prepared = copy.deepcopy(prepare_fx_calibrated(m, calib, bits))
    t0 = time.perf_counter()
    q.purify(prepared, m, calib, configs[variant])
    int8 = convert_fx(prepared)
    print(json.dumps(dict(arch=arch, bits=bits, seed=seed, variant=variant, seconds=round(time.perf_counter() - t0, 1),
                          ba=round(100 * metrics.benign_accuracy(int8, d.x_test, d.y_test), 2),
                          asr=round(100 * metrics.attack_success_rate(int8, d.x_test, d.y_test, TRIGGER, TARGET), 2))))


if __name__ == "__main__":
    main()
