"""Planted QCB models shared by bench_paper.py and bench_approx.py (sklearn digits, 8x8 images).

One clean model per (architecture, seed), then a grid-aware QCB planted on it for the target bit
width (``evalkit.attacks.plant_grid_aware``, the recipes of tests/test_attacks.py that fire
after a real FX convert): W8 on the x86 8-bit grid, W4 on the 4-bit grid. Planted weights are
cached (state dicts, loaded with ``weights_only=True``) under the system temp folder, so the
two benchmarks plant each model once.

The W8 recipe does not plant dormant on the digits MLP (FP32 ASR 36-87% over the settings tried
for seed 0: lr 1e-2/5e-2, int_margin 0.5/2, polish_epochs 10/30, offset 0.49, hidden
(128, 64)/(256, 256)): its 64 inputs leave the FP offsets too little room. MLP rows are W4 only.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from qcb_ptq_plugin.evalkit import attacks, datasets, models

TRIGGER = attacks.PatchTrigger(size=2, value=1.0, margin=0)
TARGET = 0
ARCHS = {
    "cnn": ("SmallCNN(width 16)", lambda: models.SmallCNN(1, 10, width=16)),
    "mlp": ("MLP(64-128-64-10, Linear-BatchNorm1d-ReLU)", lambda: models.MLP(64, 10, (128, 64))),
}
#: plant_grid_aware settings per bit width (tests/test_attacks.py)
RECIPES = {
    8: dict(bits=8, epochs=30, lr=5e-2, int_margin=2.0, batch_size=64),
    4: dict(bits=4, epochs=15, lr=5e-2, int_margin=2.0, equal_absmax=False, batch_size=64),
}
CACHE = Path(tempfile.gettempdir()) / "qcb_plants"


def planted(arch: str, bits: int, seed: int, d: datasets.Split) -> torch.nn.Module:
    """The seed's clean ``arch`` model with a grid-aware QCB for ``bits`` planted on it (eval mode)."""
    path = CACHE / f"{arch}_w{bits}_s{seed}.pt"
    m = ARCHS[arch][1]()
    if path.exists():
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval()
    clean_path = CACHE / f"{arch}_clean_s{seed}.pt"
    if clean_path.exists():
        m.load_state_dict(torch.load(clean_path, weights_only=True))
    else:
        torch.manual_seed(seed)
        m = ARCHS[arch][1]()
        attacks.train_clean_or_badnets(m, d.x_train, d.y_train, epochs=20, batch_size=64, seed=seed)
        _save(m, clean_path)
    m = attacks.plant_grid_aware(copy.deepcopy(m), d.x_train, d.y_train, trigger=TRIGGER, target=TARGET, seed=seed,
                                 **RECIPES[bits])
    _save(m, path)
    return m.eval()


def _save(m: torch.nn.Module, path: Path) -> None:
    """Atomically: two benchmarks may plant the same model at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(m.state_dict(), tmp)
    os.replace(tmp, path)
