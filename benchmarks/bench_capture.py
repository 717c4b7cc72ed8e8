"""Quantized-side capture cost on ResNet-18: graph stepping vs one fresh forward per unit.

    python benchmarks/bench_capture.py

Reads every unit's input I for 256 CIFAR-size images (random; the cost does not depend on the
values) from the FX simulator, once with the stepper (one paused forward per batch) and once
re-running the simulator up to each unit. Prints both wall times.
"""

import time
import warnings

import torch

from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin.evalkit import models
from qcb_ptq_plugin.api import prepare_plan
from qcb_ptq_plugin.ptq import prepare_fx_calibrated

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = models.resnet18_cifar().eval()
x = torch.rand(256, 3, 32, 32)
prepared = prepare_fx_calibrated(model, x, 8)
for stepped in (True, False):
    _, plan, batches = prepare_plan(prepared, model, x, PurifyConfig(progress=False))
    if not stepped:
        plan.capture._stepper = None
    t0 = time.perf_counter()
    for unit in plan.units:
        for b in batches:
            plan.capture(unit, b)
    print(f"{'stepped' if stepped else 'fresh forwards'}: {time.perf_counter() - t0:.1f}s for {len(plan.units)} units")
