"""``"quantguard"``: learned rounding with error-guided reversal (QuantGuard-style, arXiv 2606.29239).

QuantGuard (abstract only) learns differentiable rounding control variables under three terms:
error-guided rounding-reversal constraints, output-distribution consistency and weight-distance
regularisation, on a small calibration set, without changing the quantizer. Our per-unit
reading (EFRAP's structure, the LLM terms added), with the choices the abstract leaves open:

* rounding variables V (one per weight), h = sigmoid(V), soft weight
  W(V) = s (clamp(floor(W/s) + z + h, qmin, qmax) - z); V starts at logit(frac(W/s)), i.e. at
  the float weight; the final integers round up where V >= 0;
* **rounding reversal**, error-guided: binary cross-entropy of h toward the bit opposite to
  round-to-nearest, each weight weighted by its normalised truncation error 2|W/s - round(W/s)|
  (weights far from their integer, where an attacker hides the most, are pushed hardest);
* **output-distribution consistency**: on the unit that produces the logits (``logits_units``,
  by name suffix, default ``lm_head``/``head``) KL(softmax(T) || softmax(W(V) I + b)) per token,
  the float model's next-token distribution as target. Other units cannot see the logits in a
  per-unit pass; there the term is the unit's output error ||W(V) I - T||² / ||T||² (a
  Gauss-Newton stand-in for the KL that the sequential pass propagates forward);
* **weight distance**: mean ((W(V) - W)/s)², in LSB², keeps the solution near the float weight;
* EFRAP's binarisation term sum(1 - |2h - 1|²) pushes h to {0, 1}.

Adam on V, ``steps`` per unit, one random minibatch of ``batch_tokens`` cached inputs per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MethodConfig
from ..units import Gram, Unit, UnitData
from . import UnitResult, register_method

__all__ = ["QuantGuardConfig", "quantguard"]


@dataclass
class QuantGuardConfig(MethodConfig):
    """Settings of ``"quantguard"`` (weights of the loss terms; the output term has weight 1).

    Attributes:
        steps: Adam steps per unit.
        lr: learning rate of the rounding variables V.
        batch_tokens: cached input rows (tokens) per step.
        reversal: weight of the error-guided rounding-reversal term.
        distance: weight of the weight-distance term (LSB²).
        binarize: weight of the h -> {0, 1} term.
        logits_units: name suffixes of units whose output is the logits (KL there).
    """

    steps: int = 300
    lr: float = 5e-2
    batch_tokens: int = 1024
    reversal: float = 0.02
    distance: float = 0.01
    binarize: float = 0.01
    logits_units: tuple[str, ...] = ("lm_head", "head")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "lr", "batch_tokens", "reversal", "distance", "binarize"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        self.logits_units = tuple(self.logits_units)


@register_method("quantguard", QuantGuardConfig,
                 summary="learned rounding: error-guided reversal + output KL/consistency + weight distance")
def quantguard(unit: Unit, data: UnitData, cfg: QuantGuardConfig) -> UnitResult:
    if unit.op.kind != "linear":
        raise NotImplementedError(f"{unit.name}: quantguard handles Linear layers (LLMs); use 'lac' for convolutions")
    gram, xs, ts = Gram(), [], []
    for i_q, i_fp in data:
        with torch.no_grad():
            t = unit.target(i_fp)
            gram.add_batch(unit, i_q, t)
        xs.append(i_q.reshape(-1, i_q.shape[-1]))
        ts.append(t.reshape(-1, t.shape[-1]))
    x, tgt = torch.cat(xs), torch.cat(ts)  # (N, K), (N, O)
    t0 = time.perf_counter()
    grid, w = unit.grid, unit.weight.detach().float()
    s, z = (t.float() for t in grid.expand(w))
    base = torch.floor(w / s)
    frac = (w / s - base).clamp(1e-4, 1 - 1e-4)
    err = 2 * (w / s - torch.round(w / s)).abs()  # normalised truncation error in [0, 1]
    flip_to = 1.0 - torch.round(frac)  # the bit opposite to round-to-nearest
    v = torch.logit(frac).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    logits = unit.name.endswith(cfg.logits_units)
    gen = torch.Generator().manual_seed(cfg.seed)
    energy = tgt.pow(2).sum(1).mean().clamp_min(1e-12)
    bias = unit.bias
    for _ in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (min(cfg.batch_tokens, x.shape[0]),), generator=gen)
        h = torch.sigmoid(v)
        wq = s * ((base + z + h).clamp(grid.qmin, grid.qmax) - z)
        out, t = F.linear(x[idx], wq, bias), tgt[idx]
        if logits:
            consistency = F.kl_div(F.log_softmax(out, -1), F.log_softmax(t, -1), log_target=True,
                                   reduction="batchmean")
        else:
            consistency = (out - t).pow(2).sum(1).mean() / energy
        reversal = (err * F.binary_cross_entropy(h, flip_to, reduction="none")).mean()
        distance = ((wq - w) / s).pow(2).mean()
        binarize = (1 - (2 * h - 1).abs().pow(2)).mean()
        loss = consistency + cfg.reversal * reversal + cfg.distance * distance + cfg.binarize * binarize
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = (base + z + (v >= 0).float()).clamp(grid.qmin, grid.qmax).long()
    return UnitResult(codes=q, gram=gram, pda="skipped: not part of this method",
                      solve_seconds=time.perf_counter() - t0)
