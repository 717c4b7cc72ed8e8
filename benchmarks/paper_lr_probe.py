"""Does the paper preset's Adam iterate settle? The objective at each of its 20 checkpoints, per unit.

    OMP_NUM_THREADS=1 python benchmarks/paper_lr_probe.py STEPS BITS '{"name": {config overrides}}'

e.g. ``300 4 '{"lr 1e-2": {"lr": 0.01, "act_lr": 0}, "lr 1e-3": {"lr": 0.001, "act_lr": 0}}'``.
Model: a clean SmallCNN(8) on sklearn digits (6 epochs, seed 1), FX x86, 128 calibration images,
PDA off (``pda_steps=0``). Prints each unit's objective at round to nearest and every checkpoint
as a fraction of it (the kept best is the minimum; the last entry is the iterate the optimiser
ends on).
"""

import json
import logging
import sys
import time
import warnings

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin.evalkit import attacks, datasets, models
from qcb_ptq_plugin.ptq import prepare_fx_calibrated


class _Print(logging.Handler):
    def emit(self, r):
        if "adam objective" in r.msg:
            name, rtn, _every, curve, *_ = r.args
            print(f"  {name}: RTN {rtn:.4g}, checkpoints / RTN {[round(c / rtn, 2) for c in curve]}", flush=True)


def main() -> None:
    warnings.filterwarnings("ignore")
    steps, bits, configs = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    d = datasets.digits()
    torch.manual_seed(1)
    m = attacks.train_clean_or_badnets(models.SmallCNN(1, 10, width=8), d.x_train, d.y_train, epochs=6,
                                       batch_size=64, seed=1).eval()
    calib = d.calibration(128, seed=3)
    logger = logging.getLogger("qcb_ptq_plugin.methods.lac")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Print())
    for name, over in configs.items():
        print(name, over, flush=True)
        p = prepare_fx_calibrated(m, calib, bits)
        t = time.perf_counter()
        q.purify(p, m, calib, q.PurifyConfig.paper(**{"adam_steps": steps, "pda_steps": 0, "progress": False, **over}))
        print(f"  {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
