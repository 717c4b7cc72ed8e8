"""``"flipguard"``: data-free selective rounding reversal (FlipGuard-style, arXiv 2606.28962).

FlipGuard perturbs weights before quantization to break the alignment an attacker builds
between the float weights and the rounding boundaries; it uses no data and no triggers. The
abstract does not publish the selection rule. Ours, per unit:

* e = W/s - round(W/s) (signed, in LSB): how far the float weight sits from its integer.
  A QCB attacker who hides the backdoor inside the rounding box (Egashira et al.'s PGD repair,
  PQBackdoor, our grid-aware planting) leaves the float weights close to the box edges, |e| -> 0.5;
  clean weights spread |e| uniformly over [0, 0.5].
* Every weight with |e| > ``threshold`` is perturbed across its rounding boundary by
  (0.5 - |e| + tiny) LSB in the direction of e, so it rounds to the *other* neighbour; at most
  ``max_flip_rate`` of each row (the largest |e| first). The row's or group's extreme elements
  are never selected, so the grid's scale does not move.
* The perturbation is at most 0.5 - ``threshold`` LSB, i.e. the deployed integers move by one
  step where the float weight was nearly tied anyway.

Data-free: the integers are chosen from the weights alone. The pass still reads the unit's
inputs once, only to report the output error before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import MethodConfig
from ..units import Gram, Unit, UnitData
from . import UnitResult, register_method

__all__ = ["FlipGuardConfig", "flipguard", "flip_codes"]


@dataclass
class FlipGuardConfig(MethodConfig):
    """Settings of ``"flipguard"``.

    Attributes:
        threshold: reverse the rounding of weights whose |W/s - round(W/s)| exceeds this (LSB).
        max_flip_rate: at most this fraction of each output row is reversed (largest |e| first).
    """

    threshold: float = 0.3
    max_flip_rate: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.threshold < 0.5:
            raise ValueError(f"threshold={self.threshold} must be in [0, 0.5)")
        if not 0 <= self.max_flip_rate <= 1:
            raise ValueError(f"max_flip_rate={self.max_flip_rate} must be in [0, 1]")


def flip_codes(unit: Unit, cfg: FlipGuardConfig) -> torch.Tensor:
    """Round-to-nearest integers with the selected near-tie weights rounded the other way."""
    grid, w = unit.grid, unit.weight.detach().float()
    s, z = grid.expand(w)
    q = grid.quantize(w)
    e = w / s - (q - z).float()  # signed distance to the integer, LSB
    extreme = (q == q.flatten(1).amax(1).view(-1, *[1] * (q.dim() - 1))) | \
              (q == q.flatten(1).amin(1).view(-1, *[1] * (q.dim() - 1)))
    cand = (e.abs() > cfg.threshold) & ~extreme & (e.abs() <= 0.5)
    score = torch.where(cand, e.abs(), torch.zeros_like(e)).flatten(1)  # (O, K')
    k = int(cfg.max_flip_rate * score.shape[1])
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        top = score.topk(k, dim=1)
        keep.scatter_(1, top.indices, top.values > 0)
    flip = keep.view_as(q)
    return torch.where(flip, q + torch.sign(e).long(), q).clamp(grid.qmin, grid.qmax)


@register_method("flipguard", FlipGuardConfig, summary="data-free rounding reversal of near-tie weights (FlipGuard-style)")
def flipguard(unit: Unit, data: UnitData, cfg: FlipGuardConfig) -> UnitResult:
    t0 = time.perf_counter()
    q = flip_codes(unit, cfg)
    solve = time.perf_counter() - t0
    gram = Gram()  # for the report only: the integers above never saw data
    for i_q, i_fp in data:
        with torch.no_grad():
            gram.add_batch(unit, i_q, unit.target(i_fp))
    return UnitResult(codes=q, gram=gram, pda="skipped: not part of this method", solve_seconds=solve)
