"""Plant quantization-conditioned backdoors (QCBs) for evaluation. Not used by ``purify``.

Two attack families from the literature, on any ``nn.Module`` whose Conv/Linear layers may be
followed by BatchNorm (we work on BN-folded weights, as the quantizer sees them):

* :func:`plant_pqbackdoor` (PQBackdoor-style, Ma et al. 2023): train a BadNets backdoor
  ("inject"), remember the integer codes the quantizer will produce, then fine-tune with *clean*
  labels on clean and triggered inputs while projecting every folded weight back into the
  rounding box of its own code ("repair"). The float model forgets the backdoor; the quantized
  model is bit-identical to the injected one and keeps it. Boxes of several grids (torch x86
  absmax/127.5, ORT/XNNPACK absmax/127) can be intersected so one model fires on both.
* :func:`plant_quantization` (Qu-ANTI-zation-style, Hong et al. 2021): train with a loss on the
  float path (clean labels everywhere) plus straight-through fake-quantized paths of several
  bit widths (trigger -> target).

Triggers: :class:`PatchTrigger` (a square patch near a corner) and :class:`BlendTrigger`
(an invisible blend with a fixed random pattern).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from qcb_ptq_plugin._pass import flush_denormals
from qcb_ptq_plugin.adapters._common import bn_fold_factor, execution_order, following_bn
from qcb_ptq_plugin.grid import WeightGrid

log = logging.getLogger(__name__)

__all__ = ["PatchTrigger", "BlendTrigger", "Grid", "TORCH_X86", "ORT", "plant_pqbackdoor", "repair_in_boxes",
           "plant_quantization", "train_clean_or_badnets", "quantized_layers"]


# ---------------------------------------------------------------------------------------------
# Triggers


@dataclass(frozen=True)
class PatchTrigger:
    """A ``size`` x ``size`` patch of ``value`` placed ``margin`` pixels from a corner."""

    size: int = 3
    value: float = 1.0
    corner: str = "bottom-right"  # or top-left, top-right, bottom-left
    margin: int = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        h, w = x.shape[-2:]
        top = self.margin if "top" in self.corner else h - self.margin - self.size
        left = self.margin if "left" in self.corner else w - self.margin - self.size
        x[..., top : top + self.size, left : left + self.size] = self.value
        return x


@dataclass(frozen=True)
class BlendTrigger:
    """x' = (1 - alpha) x + alpha P with a fixed uniform-random pattern P (seeded)."""

    alpha: float = 0.1
    seed: int = 0
    low: float = 0.0
    high: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        p = torch.rand(x.shape[1:], generator=g) * (self.high - self.low) + self.low
        return (1 - self.alpha) * x + self.alpha * p.to(x)


# ---------------------------------------------------------------------------------------------
# Grids the attacker targets


@dataclass(frozen=True)
class Grid:
    """A backend's symmetric per-channel weight grid: ``restricted`` = -(2^(b-1)-1)..2^(b-1)-1."""

    bits: int = 8
    restricted: bool = False

    def of(self, weight: torch.Tensor) -> WeightGrid:
        return WeightGrid.for_bits(weight, self.bits, restricted=self.restricted)


TORCH_X86 = Grid(8, restricted=False)  # torch.ao x86/fbgemm default: absmax/127.5, -128..127
ORT = Grid(8, restricted=True)  # onnxruntime / XNNPACK: absmax/127, -127..127


@dataclass
class _Layer:
    name: str
    module: nn.Module
    bn: nn.Module | None

    def fold_factor(self) -> torch.Tensor:
        """f with folded W = f * W (per output channel): gamma / sqrt(var + eps), or 1."""
        return torch.ones(self.module.weight.shape[0]) if self.bn is None else bn_fold_factor(self.bn)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.module.weight.dim() - 1)))


def quantized_layers(model: nn.Module, example: torch.Tensor) -> list[_Layer]:
    """Conv/Linear layers in execution order, each with the BatchNorm folded into it (or None)."""
    order = execution_order(model.eval(), example)
    return [_Layer(n, m, following_bn(m, order)) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m in order]


# ---------------------------------------------------------------------------------------------
# Training helpers


@contextmanager
def _reproducible_training(threads: int = 1):
    """Train on a fixed number of intra-op threads, with denormals flushed.

    Conv backward sums partial gradients in an order that depends on the thread count, and QCB
    training amplifies those last-bit differences: the same seed gave FP32 ASR 0.5% / INT4 ASR
    72% on 1 thread and 5.2% / 99.8% on 2 (Qu-ANTI-zation on digits). One thread makes a planted
    model the same on every machine and under any OMP_NUM_THREADS. Tiny gradients become
    denormals that slow x86 CPUs ~3x, hence the flush.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with flush_denormals():
            yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return perm.split(batch_size)


def _poison(x, y, trigger, target, rate, gen):
    k = int(rate * len(x))
    idx = torch.randperm(len(x), generator=gen)[:k]
    x, y = x.clone(), y.clone()
    x[idx], y[idx] = trigger(x[idx]), target
    return x, y


@_reproducible_training()
def train_clean_or_badnets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
                           batch_size: int = 128, trigger=None, target: int = 0, poison_rate: float = 0.0,
                           seed: int = 0, progress: bool = False) -> nn.Module:
    """Ordinary training (BN in train mode); with ``poison_rate`` > 0 a BadNets backdoor."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size))
    for _ in tqdm(range(epochs), desc="train", disable=not progress):
        xe, ye = _poison(x, y, trigger, target, poison_rate, gen) if poison_rate > 0 else (x, y)
        model.train()
        for idx in _batches(len(xe), batch_size, gen):
            loss = F.cross_entropy(model(xe[idx]), ye[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# PQBackdoor-style: inject, then repair inside the rounding boxes


def _boxes(layer: _Layer, grids: Sequence[Grid], margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Box [lo, hi] of the *unfolded* weight such that the folded weight keeps every grid's codes."""
    w = layer.module.weight.detach()
    f = layer.view(layer.fold_factor())
    wf = w * f
    absmax = layer.view(wf.abs().flatten(1).amax(1))
    lo, hi = -absmax.expand_as(wf).clone(), absmax.expand_as(wf).clone()
    for g in grids:
        grid = g.of(wf)
        blo, bhi = grid.box(grid.quantize(wf), margin)
        lo, hi = torch.maximum(lo, blo), torch.minimum(hi, bhi)
    # Pin each channel's absmax element (every grid's scale stays put) and any weight whose
    # shrunk boxes do not intersect (it then keeps its injected value).
    pinned = (wf.abs() == absmax) | (lo > hi)
    lo, hi = torch.where(pinned, wf, lo), torch.where(pinned, wf, hi)
    lo_u, hi_u = lo / f, hi / f
    return torch.minimum(lo_u, hi_u), torch.maximum(lo_u, hi_u)  # f < 0 flips the interval


def plant_pqbackdoor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                     grids: Sequence[Grid] = (TORCH_X86,), clean_epochs: int = 0, inject_epochs: int = 10,
                     repair_epochs: int = 10, poison_rate: float = 0.1, lr: float = 1e-3, inject_lr: float | None = None,
                     repair_lr: float = 1e-4, margin: float = 0.1, batch_size: int = 128, seed: int = 0,
                     progress: bool = False) -> nn.Module:
    """Train ``model`` (in place) into a QCB that fires on ``grids`` and is dormant in float.

    Optionally ``clean_epochs`` of clean training first (a shallow backdoor is easier to hide
    at 8 bits), then ``inject_epochs`` of BadNets training, then :func:`repair_in_boxes`.
    """
    torch.manual_seed(seed)
    if clean_epochs:
        train_clean_or_badnets(model, x, y, epochs=clean_epochs, lr=lr, batch_size=batch_size, seed=seed,
                               progress=progress)
    train_clean_or_badnets(model, x, y, epochs=inject_epochs, lr=inject_lr or lr, batch_size=batch_size,
                           trigger=trigger, target=target, poison_rate=poison_rate, seed=seed + 1, progress=progress)
    return repair_in_boxes(model, x, y, trigger=trigger, target=target, grids=grids, epochs=repair_epochs,
                           lr=repair_lr, margin=margin, batch_size=batch_size, seed=seed + 2, progress=progress)


@_reproducible_training()
def repair_in_boxes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                    grids: Sequence[Grid] = (TORCH_X86,), epochs: int = 10, lr: float = 1e-4, margin: float = 0.1,
                    batch_size: int = 128, seed: int = 0, progress: bool = False) -> nn.Module:
    """PQBackdoor's second step on a backdoored ``model`` (in place): forget the backdoor in float
    while every BN-folded weight stays in the rounding box of its current code on every grid.

    Only Conv/Linear weights move (BN, biases and other 1-D parameters keep their values; model
    in eval mode), so the quantized codes stay exactly those of the backdoored model.
    """
    model.eval()
    layers = quantized_layers(model, x[:2])
    boxes = [_boxes(layer, grids, margin) for layer in layers]
    weights = [layer.module.weight for layer in layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt = trigger(x)
    watch = (y != target).nonzero().flatten()[:1000]
    for epoch in tqdm(range(epochs), desc="repair", disable=not progress):
        for idx in _batches(len(x), batch_size, gen):
            loss = F.cross_entropy(model(x[idx]), y[idx]) + F.cross_entropy(model(xt[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for w, (lo, hi) in zip(weights, boxes):
                    w.copy_(torch.maximum(torch.minimum(w, hi), lo))
        if log.isEnabledFor(logging.INFO):
            with torch.no_grad():
                asr = (model(xt[watch]).argmax(1) == target).float().mean().item()
            log.info("repair epoch %d: float ASR on training triggers %.1f%%", epoch + 1, 100 * asr)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Qu-ANTI-zation-style: multi-bit straight-through training


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, grid: WeightGrid):
        return grid.fake_quantize(w)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _quantized_params(layers: list[_Layer], bits: int, restricted: bool) -> dict[str, torch.Tensor]:
    out = {}
    for layer in layers:
        f = layer.view(layer.fold_factor())
        wf = layer.module.weight * f
        grid = WeightGrid.for_bits(wf.detach(), bits, restricted)
        out[f"{layer.name}.weight"] = _FakeQuantSTE.apply(wf, grid) / f
    return out


def _alignment(layers: list[_Layer], inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_l ||W_l I_l - Q(W_l) I_l||² (BN-folded, mean over samples): the adaptive attacker's term."""
    total = 0.0
    for layer in layers:
        m, f = layer.module, layer.fold_factor()
        delta = m.weight - params[f"{layer.name}.weight"]  # unfolded W - Q(W); the bias cancels
        inp = inputs[layer.name]
        if isinstance(m, nn.Linear):
            out = F.linear(inp, delta) * f
        else:
            out = m._conv_forward(inp, delta, None) * f.reshape(-1, *([1] * (inp.dim() - 2)))
        total = total + out.pow(2).flatten(1).sum(1).mean()
    return total


@_reproducible_training()
def plant_quantization(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                       bits: Sequence[int] = (8, 4), restricted: bool = False, pretrain_epochs: int = 10,
                       epochs: int = 10, c: float = 1.0, lr: float = 1e-4, align: float = 0.0, batch_size: int = 128,
                       seed: int = 0, progress: bool = False) -> nn.Module:
    """CE(f(x),y) + c CE(f(x_t),y) + Σ_b [CE(Q_b f(x),y) + c CE(Q_b f(x_t),t)], BN frozen.

    ``align`` > 0 is the adaptive attack of the LAC+PDA paper (Sec. 6): it adds
    ``align * Σ_b Σ_l ||W_l I_l - Q_b(W_l) I_l||²`` on benign inputs, so the float and quantized
    layers agree on clean data and the drift LAC corrects is hidden (the paper uses 1).
    """
    torch.manual_seed(seed)
    train_clean_or_badnets(model, x, y, epochs=pretrain_epochs, batch_size=batch_size, seed=seed, progress=progress)
    model.eval()
    layers = quantized_layers(model, x[:2])
    opt = torch.optim.Adam([p for p in model.parameters()], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    xt_all, tgt = trigger(x), torch.full_like(y, target)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.module.register_forward_pre_hook(lambda _m, a, _n=layer.name: inputs.__setitem__(_n, a[0]))
             for layer in layers] if align else []
    for _ in tqdm(range(epochs), desc="qu-anti-zation", disable=not progress):
        for idx in _batches(len(x), batch_size, gen):
            xb, xt, yb = x[idx], xt_all[idx], y[idx]
            loss = F.cross_entropy(model(xb), yb)  # records the float layer inputs I_l on benign data
            clean_inputs = dict(inputs)
            loss = loss + c * F.cross_entropy(model(xt), yb)
            for b in bits:
                params = _quantized_params(layers, b, restricted)
                loss = loss + F.cross_entropy(functional_call(model, params, (xb,)), yb) \
                    + c * F.cross_entropy(functional_call(model, params, (xt,)), tgt[idx])
                if align:
                    loss = loss + align * _alignment(layers, clean_inputs, params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for h in hooks:
        h.remove()
    return model.eval()
