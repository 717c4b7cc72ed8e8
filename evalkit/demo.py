"""The main example: plant a QCB, watch plain PTQ expose it, watch the one line purify it.

A clean SmallCNN is trained once; for each setting (W8A8, W4A8) a copy is turned into a QCB by the
grid-aware joint attacker (:func:`attacks.plant_grid_aware`) on that setting's weight grid, then
measured three ways on the held-out test set: FP32, plain FX PTQ (prepare_fx -> calibrate ->
convert_fx) and the same PTQ with ``qcb_ptq_plugin.purify`` between calibration and convert.
Calibration images come from the training split (``Split.calibration``), metrics from the test
split.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qcb_ptq_plugin import PurifyConfig
from qcb_ptq_plugin._io import write_text
from qcb_ptq_plugin.ptq import quantize_fx

from . import attacks, datasets, metrics, models

log = logging.getLogger(__name__)

__all__ = ["Row", "run_demo", "format_table"]

TRIGGER_MNIST = attacks.PatchTrigger(size=4, value=1.0, margin=1)
TRIGGER_DIGITS = attacks.PatchTrigger(size=2, value=1.0, margin=0)


@dataclass
class Row:
    setting: str
    fp32_ba: float
    fp32_asr: float
    no_defense_ba: float
    no_defense_asr: float
    purified_ba: float
    purified_asr: float
    der: float
    seconds: float  # purify wall time


@dataclass(frozen=True)
class _Recipe:
    """How the demo plants a QCB (grid-aware joint attacker, :func:`attacks.plant_grid_aware`)."""

    width: int  # SmallCNN width
    clean_epochs: int  # clean training, shared by every bit width
    epochs: int  # joint FP/INT training per bit width
    polish_epochs: int = 1  # FP-offset-only passes after it
    lr: float = 5e-2
    int_margin: float = 2.0
    batch_size: int = 64
    offset: float = 0.45  # bound of the FP offset, in LSB
    fp_target_margin: float | None = None  # FP triggered target logit kept this far below the best other


_RECIPES = {  # dataset kind -> recipe; "small" = digits (tests), "mnist" = 28x28 sets
    "small": _Recipe(32, 20, 20, polish_epochs=5, int_margin=1.0, offset=0.49, fp_target_margin=1.0),
    "mnist": _Recipe(16, 2, 3, lr=1e-1),
}


def _recipe(split: datasets.Split) -> _Recipe:
    return _RECIPES["small" if split.x_train.shape[-1] <= 8 else "mnist"]


def train_clean(split: datasets.Split, train_samples: int | None = None, seed: int = 0,
                progress: bool = False) -> torch.nn.Module:
    """The clean SmallCNN every planted model starts from (the grid-aware attack needs one)."""
    r = _recipe(split)
    torch.manual_seed(seed)
    model = models.SmallCNN(split.x_train.shape[1], split.num_classes, width=r.width)
    return attacks.train_clean_or_badnets(model, split.x_train[:train_samples], split.y_train[:train_samples],
                                          epochs=r.clean_epochs, batch_size=r.batch_size, seed=seed,
                                          progress=progress)


def plant(split: datasets.Split, bits: int, trigger, target: int = 0, train_samples: int | None = None,
          seed: int = 0, progress: bool = False, clean: torch.nn.Module | None = None) -> torch.nn.Module:
    """A SmallCNN with a QCB on a ``bits``-bit grid fixed in advance; see ``_RECIPES``. At 8 bits one
    absmax per layer (the torch x86 per-channel and qnnpack per-tensor grids coincide); at 4 bits
    each row keeps its own absmax (a shared one would coarsen small rows to a few levels)."""
    r = _recipe(split)
    model = copy.deepcopy(clean) if clean is not None else train_clean(split, train_samples, seed, progress)
    return attacks.plant_grid_aware(model, split.x_train[:train_samples], split.y_train[:train_samples],
                                    trigger=trigger, target=target, bits=bits, epochs=r.epochs, lr=r.lr,
                                    int_margin=r.int_margin, polish_epochs=r.polish_epochs, offset=r.offset,
                                    fp_target_margin=r.fp_target_margin,
                                    equal_absmax=bits == 8, batch_size=r.batch_size, seed=seed + 1,
                                    progress=progress)


def evaluate(model, split: datasets.Split, bits: int, trigger, target: int, calib: torch.Tensor,
             config: PurifyConfig | None = None) -> Row:
    x, y = split.x_test, split.y_test

    def measure(m):
        return 100 * metrics.benign_accuracy(m, x, y), 100 * metrics.attack_success_rate(m, x, y, trigger, target)

    fp_ba, fp_asr = measure(model)
    plain, _ = quantize_fx(model, calib, bits)
    nd_ba, nd_asr = measure(plain)
    t0 = time.perf_counter()
    purified, report = quantize_fx(model, calib, bits, purify_config=config or PurifyConfig())
    seconds = time.perf_counter() - t0
    log.info("W%dA8 purify report:\n%s", bits, report.table())
    pu_ba, pu_asr = measure(purified)
    return Row(f"W{bits}A8", fp_ba, fp_asr, nd_ba, nd_asr, pu_ba, pu_asr,
               100 * metrics.der(nd_asr / 100, pu_asr / 100, nd_ba / 100, pu_ba / 100), seconds)


def run_demo(dataset: str = "digits", bits: tuple[int, ...] = (8, 4), calib_size: int = 512,
             train_samples: int | None = 20000, seed: int = 0, progress: bool = True,
             json_path: str | Path | None = None) -> list[Row]:
    split = datasets.load(dataset)
    trigger = TRIGGER_DIGITS if split.x_train.shape[-1] <= 8 else TRIGGER_MNIST
    calib = split.calibration(calib_size, seed=seed + 100)
    rows = []
    t0 = time.perf_counter()
    clean = train_clean(split, train_samples, seed, progress)
    log.info("trained the clean model in %.0fs", time.perf_counter() - t0)
    for b in bits:
        t0 = time.perf_counter()
        model = plant(split, b, trigger, train_samples=train_samples, seed=seed, progress=progress, clean=clean)
        log.info("planted the W%d QCB in %.0fs", b, time.perf_counter() - t0)
        rows.append(evaluate(model, split, b, trigger, 0, calib, PurifyConfig(progress=progress)))
    if json_path is not None:
        meta = {"dataset": dataset, "model": "SmallCNN", "attack": "grid-aware joint (attacks.plant_grid_aware)",
                "trigger": repr(trigger), "target": 0, "calibration_samples": calib_size, "seed": seed}
        write_text(json_path, json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2), "demo rows")
    return rows


def format_table(rows: list[Row]) -> str:
    head = (f"{'setting':<8} | {'FP32 BA':>7} {'ASR':>6} | {'plain PTQ BA':>12} {'ASR':>6} | "
            f"{'purified BA':>11} {'ASR':>6} | {'DER':>6} | {'purify s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.setting:<8} | {r.fp32_ba:>7.2f} {r.fp32_asr:>6.2f} | {r.no_defense_ba:>12.2f} "
                     f"{r.no_defense_asr:>6.2f} | {r.purified_ba:>11.2f} {r.purified_asr:>6.2f} | {r.der:>6.2f} | "
                     f"{r.seconds:>8.1f}")
    return "\n".join(lines)
