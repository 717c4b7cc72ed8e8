"""Round to nearest: method ``"rtn"``, the no-defense baseline for tables.

``purify(..., method="rtn")`` stores exactly the integers plain PTQ would store, through the
same adapters, pinning and report, so a table can put "no defense" in the same row format as
every method. The report's error before and after are equal and ``flips`` is 0.

Also home of :func:`unit_gram`, the one pass over a unit's inputs that every Gram-based method
(``rtn``, ``efrap``, ``qvec``) starts with.
"""

from __future__ import annotations

import time

import torch

from ..config import MethodConfig
from ..units import Gram, Unit, UnitData
from . import UnitResult, register_method

__all__ = ["rtn", "unit_gram"]


def unit_gram(unit: Unit, data: UnitData) -> Gram:
    """H = Σ I Iᵀ, C = Σ T Iᵀ, t over the calibration set: I from the (partly defended)
    quantized model, T = W_o I^fp + b the float layer's output on the same samples."""
    gram = Gram()
    for i_q, i_fp in data:
        with torch.no_grad():
            gram.add_batch(unit, i_q, unit.target(i_fp))
    return gram


@register_method("rtn", MethodConfig, summary="round to nearest: plain PTQ's integers (no defense)")
def rtn(unit: Unit, data: UnitData, cfg: MethodConfig) -> UnitResult:
    gram = unit_gram(unit, data)  # only for the report's per-layer error
    t0 = time.perf_counter()
    q = unit.grid.quantize(unit.weight.detach().float())
    return UnitResult(codes=q, gram=gram, solve_seconds=time.perf_counter() - t0)
