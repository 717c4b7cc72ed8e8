"""A standard torch.ao FX PTQ script with the one added line (runs in ~30 s on 2 CPU cores).

The model is backdoored for 4-bit quantization on purpose (PQBackdoor-style), so you can see
what the line does: plain PTQ wakes the backdoor up, purified PTQ does not.
"""

import copy

import torch
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.ptq import fx_qconfig_mapping, quiet_torch_ao

data = datasets.digits()
trigger = attacks.PatchTrigger(size=2, value=1.0, margin=0)
torch.manual_seed(0)
model = attacks.plant_pqbackdoor(models.SmallCNN(1, 10, width=16), data.x_train, data.y_train, trigger=trigger,
                                 target=0, grids=[attacks.Grid(4)], inject_epochs=20, repair_epochs=20,
                                 repair_lr=1e-3, batch_size=64)
calib = data.calibration(256)


def ptq(purify: bool):
    with quiet_torch_ao():
        prepared = prepare_fx(copy.deepcopy(model), fx_qconfig_mapping(bits=4), (calib[:1],))
        for x in calib.split(32):
            prepared(x)
        if purify:
            report = qcb_ptq_plugin.purify(prepared, model, calib)  # <- the one line
            print(report.table())
        return convert_fx(prepared)


for name, m in [("FP32", model), ("plain W4A8", ptq(False)), ("purified W4A8", ptq(True))]:
    ba = metrics.benign_accuracy(m, data.x_test, data.y_test)
    asr = metrics.attack_success_rate(m, data.x_test, data.y_test, trigger, target=0)
    print(f"{name:>14}: BA {100 * ba:5.1f}%  ASR {100 * asr:5.1f}%")
