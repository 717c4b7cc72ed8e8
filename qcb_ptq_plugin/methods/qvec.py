"""QVec, data-free task-vector correction: method ``"qvec"`` (our reading of an abstract).

Paper: "Quantization as a Malicious Task" (arXiv 2606.20254). Only the abstract is public: the
difference between a float model and its quantized counterpart is a structured, malicious task
vector; QVec counteracts it by a controlled parameter correction before deployment, with no
retraining, no trigger samples, one quantization pass and a lightweight hyperparameter search.

Our reading, per unit with weight W (BN folded) on the frozen grid Q:

    tau = Q(W) - W                     # the quantization task vector, one RTN pass
    W_lambda = W - lambda * tau        # move against it
    deploy Q(W_lambda)                 # same quantizer, same (pinned) scales

With e = W/s - round(W/s) (in LSB), W_lambda/s = round(W/s) + (1 + lambda) e, so an element
flips its rounding exactly when |e| > 1 / (2 (1 + lambda)): a data-free, error-ordered flipped
rounding (lambda = 0 is plain round-to-nearest, lambda = 1 flips every |e| > 1/4).

Open choices, and what we chose:

* **Sign: lambda >= 0 only.** With lambda < 0, W_lambda/s = round(W/s) + (1 + lambda) e changes
  no integer for -2 <= lambda <= 0, and below -2 moves integers to the side of round(W/s)
  away from W, more than one LSB from the float weight.
* **Scales frozen.** The grid is pinned by the pass (the scale the toolchain computed at
  calibration); recalibrating on W_lambda would move absmax elements and the whole grid.
* **One lambda for every layer (global), default 1.0; the search is over the whole model.**
  The per-unit interface makes a per-layer lambda scored on the unit's output error
  D(W) = ||W_o I^fp - Q(W) I||² (closed form from the Gram) look natural, and we measured it
  on the tests' W4 QCB (SmallCNN, digits, FP32 BA 98.66): it is erratic. Taking each layer's
  error-minimising lambda kept BA 88.4 with ASR 55.6; "largest lambda within 1.5 / 2 / 3 / 5x
  the round-to-nearest error" gave BA 44.1 / 88.4 / 86.4 / 96.0 (ASR 0-1%). Layers that flip
  by different rules break each other, and on clean data round-to-nearest is often the
  error-minimising choice, since a QCB is dormant there. One lambda everywhere is stable:
  lambda = 0.5 / 1 / 2 gives BA 97.3 / 97.6 / 96.0 with ASR 0 (lambda = 4: BA 33.9, ASR 72.6;
  lambda = 0.25: BA 32.1). Scoring a global lambda needs whole-model forwards, which sit
  outside the per-unit pass. :func:`qcb_ptq_plugin.evalkit.baselines.qvec_search` does that
  search: the largest candidate whose top-1 agreement with the float model on the unlabeled
  calibration data stays within a budget of round-to-nearest's agreement. No trigger, no labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import MethodConfig
from ..units import Unit, UnitData
from . import UnitResult, register_method
from .rtn import unit_gram

__all__ = ["QVecConfig", "qvec", "qvec_codes"]


@dataclass
class QVecConfig(MethodConfig):
    """Settings of QVec.

    Attributes:
        lam: the correction strength lambda >= 0, the same for every layer (0 = round to
            nearest; an element flips when its rounding error exceeds 1 / (2 (1 + lam)) LSB).

    Shared settings (``batch_size``, ``num_samples``, ``seed``, ``progress``): :class:`MethodConfig`.
    """

    lam: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lam >= 0:
            raise ValueError(f"lam={self.lam} must be >= 0 (lambda < 0 keeps round-to-nearest or moves integers "
                             "away from W; see qcb_ptq_plugin.methods.qvec)")


def qvec_codes(unit: Unit, lam: float) -> torch.Tensor:
    """Q(W - lam * (Q(W) - W)) on the unit's frozen grid."""
    w = unit.weight.detach().float()
    tau = unit.grid.fake_quantize(w) - w
    return unit.grid.quantize(w - lam * tau)


@register_method("qvec", QVecConfig, summary="data-free task-vector correction Q(W - lambda (Q(W) - W))")
def qvec(unit: Unit, data: UnitData, cfg: QVecConfig) -> UnitResult:
    gram = unit_gram(unit, data)  # only for the report's per-layer error: the correction is data-free
    t0 = time.perf_counter()
    q = qvec_codes(unit, cfg.lam)
    return UnitResult(codes=q, gram=gram, solve_seconds=time.perf_counter() - t0)
