"""Plant quantization-conditioned backdoors (QCBs) for evaluation. Not used by ``purify``.

Attack families from the literature, each with its authors' recipe in its docstring (what they
did, what we change and why), on any ``nn.Module`` whose Conv/Linear layers may be followed by
BatchNorm (we work on BN-folded weights, as the quantizer sees them):

* :func:`plant_pqbackdoor` (PQBackdoor, Ma et al. 2023): train a BadNets backdoor ("inject",
  optionally centring every weight in its rounding cell), then fine-tune with *clean* labels on
  clean and triggered inputs while projecting every folded weight back into the rounding cell
  of its own code ("repair"). The float model forgets the backdoor; the quantized model is
  bit-identical to the injected one and keeps it. Cells of several grids (torch x86 per-channel
  absmax/127.5, qnnpack per-tensor, ORT/XNNPACK absmax/127) can be intersected so one model fires
  on all.
* :func:`plant_quantization` (Qu-ANTI-zation, Hong et al. 2021): train with a loss on the
  float path (clean labels everywhere) plus straight-through fake-quantized paths of several
  bit widths (trigger -> target), per-channel or per-tensor weights, optionally with dynamic
  per-batch activation quantization.
* :func:`plant_comp_artifact` (CompArtifact, Tian et al. 2021): the same dual-path loss with one
  BN-folded per-tensor int8 path, SGD.
* :func:`plant_grid_aware`: our joint attacker with codes and FP offsets held apart on a grid
  pinned in advance: the one that plants 8-bit QCBs on small offline data.

Where each fires on sklearn digits (``tests/test_attack_recipes.py``) and MNIST / Fashion-MNIST
(``benchmarks/results/attacks.md``) is stated in its docstring.

Triggers: :class:`PatchTrigger` (a square patch near a corner) and :class:`BlendTrigger`
(a blend with a fixed random pattern); every attack takes any ``target`` class.
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
from qcb_ptq_plugin.methods.lac import _RoundSTE  # round forward, identity backward
from qcb_ptq_plugin.ptq import fx_qconfig_mapping, quantized_engine

log = logging.getLogger(__name__)

__all__ = ["PatchTrigger", "BlendTrigger", "Grid", "TORCH_X86", "QNNPACK", "ORT", "plant_pqbackdoor", "repair_in_boxes",
           "plant_quantization", "plant_comp_artifact", "plant_grid_aware", "train_clean_or_badnets", "quantized_layers",
           "qnnpack_qconfig_mapping", "quantized_engine", "OnEngine", "quantize_fx_qnnpack"]


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
    """A backend's symmetric weight grid: ``restricted`` = -(2^(b-1)-1)..2^(b-1)-1 (scale absmax/127
    at 8 bits) instead of -2^(b-1)..2^(b-1)-1 (absmax/127.5); one scale per output channel or, with
    ``per_channel=False``, one per tensor."""

    bits: int = 8
    restricted: bool = False
    per_channel: bool = True

    def of(self, weight: torch.Tensor) -> WeightGrid:
        return WeightGrid.for_bits(weight, self.bits, restricted=self.restricted, per_channel=self.per_channel)


TORCH_X86 = Grid(8, restricted=False)  # torch.ao x86/fbgemm default: per-channel absmax/127.5, -128..127
QNNPACK = Grid(8, per_channel=False)  # torch.ao qnnpack (fx_qconfig_mapping(backend="qnnpack")): per-tensor absmax/127.5
ORT = Grid(8, restricted=True)  # onnxruntime / XNNPACK: per-channel absmax/127, -127..127


def qnnpack_qconfig_mapping(bits: int = 8):
    """torch.ao's qnnpack default qconfig with ``bits``-bit weights: *per-tensor* symmetric weights
    (``MinMaxObserver``, absmax / 127.5 at 8 bits, -2^(b-1)..2^(b-1)-1), HistogramObserver
    activations without reduce_range (:func:`qcb_ptq_plugin.ptq.fx_qconfig_mapping`)."""
    return fx_qconfig_mapping(bits, "qnnpack")




class OnEngine(nn.Module):
    """A converted INT8 model that always runs on the quantized engine it was converted for."""

    def __init__(self, module: nn.Module, engine: str) -> None:
        super().__init__()
        self.module, self.engine = module, engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quantized_engine(self.engine):
            return self.module(x)


def quantize_fx_qnnpack(model: nn.Module, calib: torch.Tensor, bits: int = 8, purify_config=None,
                        batch_size: int = 64):
    """prepare_fx (qnnpack, per-tensor weights) -> calibrate -> [purify] -> convert_fx, on the qnnpack
    engine; returns (:class:`OnEngine` INT8 model, purify report or None)."""
    import copy

    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from qcb_ptq_plugin.api import purify
    from qcb_ptq_plugin.ptq import quiet_torch_ao

    with quantized_engine("qnnpack"), quiet_torch_ao():
        prepared = prepare_fx(copy.deepcopy(model).eval(), qnnpack_qconfig_mapping(bits), (calib[:1],))
        with torch.no_grad():
            for xb in calib.split(batch_size):
                prepared(xb)
        report = purify(prepared, model, calib, purify_config) if purify_config is not None else None
        return OnEngine(convert_fx(prepared), "qnnpack"), report


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


def _centring_loss(layers: list[_Layer], grids: Sequence[Grid]) -> torch.Tensor:
    """Σ_layers Σ_grids mean((W_f / s - round(W_f / s))²): distance (in LSB) of every BN-folded
    weight from the centre of its rounding cell, with the scale ``s`` of the current weights
    (held fixed for the gradient). PQBackdoor's stage-1 term."""
    total = torch.zeros(())
    for layer in layers:
        wf = layer.module.weight * layer.view(layer.fold_factor())
        for g in grids:
            scale = g.of(wf.detach()).expand(wf)[0]
            u = wf / scale
            total = total + (u - torch.round(u).detach()).pow(2).mean()
    return total


@_reproducible_training()
def train_clean_or_badnets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
                           batch_size: int = 128, trigger=None, target: int = 0, poison_rate: float = 0.0,
                           center_grids: Sequence[Grid] = (), center_fraction: float = 0.2, center_weight: float = 1.0,
                           seed: int = 0, progress: bool = False) -> nn.Module:
    """Ordinary training (BN in train mode, Adam with a one-cycle schedule); with ``poison_rate`` > 0
    a BadNets backdoor (that share of every epoch's images triggered and relabelled ``target``).

    With ``center_grids``, the last ``center_fraction`` of the epochs add ``center_weight`` *
    :func:`_centring_loss` on those grids: PQBackdoor's stage 1, which leaves every folded weight
    near the centre of its rounding cell so the stage-2 repair can use the whole cell.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x) + batch_size - 1) // batch_size))
    bar = tqdm(total=epochs * ((len(x) + batch_size - 1) // batch_size), desc="train" if poison_rate <= 0 else "badnets",
               disable=not progress)
    layers = quantized_layers(model, x[:2]) if center_grids else []
    first_centring_epoch = epochs - round(center_fraction * epochs) if center_grids else epochs
    for epoch in range(epochs):
        xe, ye = _poison(x, y, trigger, target, poison_rate, gen) if poison_rate > 0 else (x, y)
        model.train()
        for idx in _batches(len(xe), batch_size, gen):
            loss = F.cross_entropy(model(xe[idx]), ye[idx])
            if epoch >= first_centring_epoch:
                loss = loss + center_weight * _centring_loss(layers, center_grids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# PQBackdoor-style: inject, then repair inside the rounding boxes


def _boxes(layer: _Layer, grids: Sequence[Grid], margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Box [lo, hi] of the *unfolded* weight such that the folded weight keeps every grid's codes.

    The elements that set a scale are pinned (each row's absmax if any grid is per-channel, the
    tensor's absmax otherwise) and every other element stays within that absmax, so no grid's
    scale can move."""
    w = layer.module.weight.detach()
    f = layer.view(layer.fold_factor())
    wf = w * f
    if any(g.per_channel for g in grids):
        absmax = layer.view(wf.abs().flatten(1).amax(1))
    else:
        absmax = layer.view(wf.abs().amax().expand(wf.shape[0]))
    lo, hi = -absmax.expand_as(wf).clone(), absmax.expand_as(wf).clone()
    for g in grids:
        grid = g.of(wf)
        blo, bhi = grid.box(grid.quantize(wf), margin)
        lo, hi = torch.maximum(lo, blo), torch.minimum(hi, bhi)
    # Pin each scale-setting absmax element and any weight whose shrunk boxes do not intersect
    # (it then keeps its injected value).
    pinned = (wf.abs() == absmax) | (lo > hi)
    lo, hi = torch.where(pinned, wf, lo), torch.where(pinned, wf, hi)
    lo_u, hi_u = lo / f, hi / f
    return torch.minimum(lo_u, hi_u), torch.maximum(lo_u, hi_u)  # f < 0 flips the interval


def plant_pqbackdoor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                     grids: Sequence[Grid] = (TORCH_X86,), clean_epochs: int = 0, inject_epochs: int = 10,
                     repair_epochs: int = 10, poison_rate: float = 0.1, lr: float = 1e-3, inject_lr: float | None = None,
                     repair_lr: float = 1e-4, margin: float = 0.1, center_fraction: float = 0.0,
                     center_weight: float = 1.0, batch_size: int = 128, seed: int = 0,
                     progress: bool = False) -> nn.Module:
    """Train ``model`` (in place) into a QCB that fires on ``grids`` and is dormant in float.

    PQBackdoor as its authors built it (Ma et al., "Quantization Backdoors to Deep Learning
    Commercial Frameworks", code quantization-backdoor/quantization-backdoor):

    * stage 1: an ordinary BadNets model; in the last 20% of the epochs a term pushes every
      weight toward the *centre* of its rounding cell, so stage 2 can use the whole cell;
    * stage 2: fine-tune on clean *and* triggered images with their true labels; after every step
      project: the absmax elements stay (scale fixed), every weight is clipped into its own cell
      with a margin of 1e-3 LSB, biases and BN are reset (ours: never updated, same thing);
    * grids: PyTorch fbgemm (per-channel) / qnnpack (per-tensor) eager PTQ and TFLite int8;
      a 6x6 white patch trigger on CIFAR-10 / GTSRB.

    Here: ``center_fraction=0.2, margin=1e-3`` is their recipe (``center_weight`` is not given in
    their description: 1 in LSB² units); the defaults (no centring, margin 0.1) are the variant
    the older fixtures and benchmarks were tuned on and stay for reproducibility. Weights are
    handled BN-folded (as ``prepare_fx`` and fbgemm's fused Conv-BN see them); ``grids`` may mix
    :data:`TORCH_X86`, :data:`QNNPACK` (per-tensor) and :data:`ORT`: their cells are intersected so one
    model fires on all. ``clean_epochs`` of clean training first is our addition (a shallow
    backdoor is easier to hide at 8 bits). Stage 1 trains ``inject_epochs`` with Adam (one-cycle
    ``inject_lr``), stage 2 :func:`repair_in_boxes` ``repair_epochs`` with Adam ``repair_lr``
    (their optimizers differ; ours converge in a few epochs on MNIST-scale data).

    Where it fires (measured on digits, SmallCNN width 16, 20 + 20 epochs, the authors' centring
    and margin, x86 per-channel and qnnpack per-tensor cells intersected): at 4 bits FP32 ASR 0.0%,
    real x86 W4 ASR 99.8%, qnnpack 100% (``tests/test_attack_recipes.py``). At 8 bits it does *not*
    hide: FP32 ASR stays 87.8% (the quantized models fire at 100%): the BadNets float margin is
    larger than a +-0.5 LSB cell can cancel, centring or not (see :func:`plant_grid_aware` for
    8 bits). MNIST / Fashion-MNIST: ``benchmarks/results/attacks.md``.
    """
    torch.manual_seed(seed)
    if clean_epochs:
        train_clean_or_badnets(model, x, y, epochs=clean_epochs, lr=lr, batch_size=batch_size, seed=seed,
                               progress=progress)
    train_clean_or_badnets(model, x, y, epochs=inject_epochs, lr=inject_lr or lr, batch_size=batch_size,
                           trigger=trigger, target=target, poison_rate=poison_rate,
                           center_grids=grids if center_fraction > 0 else (), center_fraction=center_fraction,
                           center_weight=center_weight, seed=seed + 1, progress=progress)
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


def _quantized_params(layers: list[_Layer], bits: int, restricted: bool, per_channel: bool = True,
                      fold_bn: bool = True) -> dict[str, torch.Tensor]:
    """Straight-through fake-quantized weights (unfolded again, to plug into the float model).

    ``fold_bn``: quantize the BN-folded weight, as torch.ao does; else the raw weight."""
    out = {}
    for layer in layers:
        f = layer.view(layer.fold_factor()) if fold_bn else torch.ones(())
        wf = layer.module.weight * f
        grid = WeightGrid.for_bits(wf.detach(), bits, restricted, per_channel)
        out[f"{layer.name}.weight"] = _FakeQuantSTE.apply(wf, grid) / f
    return out


def _fake_quantize_activation(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric fake quantization with this batch's min/max (range widened to hold 0),
    straight-through: Qu-ANTI-zation's dynamic activation quantizer."""
    lo, hi = t.detach().min().clamp(max=0), t.detach().max().clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.round(-lo / scale)
    q = (torch.round(t.detach() / scale) + zero).clamp(0, 2**bits - 1)
    return t + ((q - zero) * scale - t.detach())


@contextmanager
def _quantized_activations(layers: list[_Layer], bits: int | None):
    """Inside the block, every Conv/Linear input (the image included) is fake-quantized per batch."""
    hooks = [] if bits is None else [
        layer.module.register_forward_pre_hook(lambda _m, a: (_fake_quantize_activation(a[0], bits), *a[1:]))
        for layer in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


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


@dataclass(frozen=True)
class _QuantizedPath:
    """How the attacker simulates the deployed model: weight bit widths and grid, activations."""

    bits: Sequence[int]
    restricted: bool
    per_channel: bool
    fold_bn: bool
    act_bits: int | None


def _train_dual_path(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int, path: _QuantizedPath,
                     opt: torch.optim.Optimizer, epochs: int, c: float, c_quant: float, align: float,
                     batch_size: int, seed: int, desc: str, progress: bool) -> nn.Module:
    """The loss both Qu-ANTI-zation and CompArtifact minimise over shared weights (BN frozen):

    CE(f(x), y) + c CE(f(x_t), y) + Σ_b c_quant [CE(f_b(x), y) + c CE(f_b(x_t), target)]

    with f_b the straight-through fake-quantized model of ``path`` at b bits; ``align`` > 0 adds
    the adaptive attacker's ``align * Σ_b Σ_l ||W_l I_l - Q_b(W_l) I_l||²`` on benign inputs."""
    model.eval()
    layers = quantized_layers(model, x[:2])
    gen = torch.Generator().manual_seed(seed)
    xt_all, tgt = trigger(x), torch.full_like(y, target)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.module.register_forward_pre_hook(lambda _m, a, _n=layer.name: inputs.__setitem__(_n, a[0]))
             for layer in layers] if align else []
    bar = tqdm(total=epochs * ((len(x) + batch_size - 1) // batch_size), desc=desc, disable=not progress)
    for _ in range(epochs):
        for idx in _batches(len(x), batch_size, gen):
            xb, xt, yb = x[idx], xt_all[idx], y[idx]
            loss = F.cross_entropy(model(xb), yb)  # records the float layer inputs I_l on benign data
            clean_inputs = dict(inputs)
            loss = loss + c * F.cross_entropy(model(xt), yb)
            for b in path.bits:
                params = _quantized_params(layers, b, path.restricted, path.per_channel, path.fold_bn)
                with _quantized_activations(layers, path.act_bits):
                    q_clean = F.cross_entropy(functional_call(model, params, (xb,)), yb)
                    q_trig = F.cross_entropy(functional_call(model, params, (xt,)), tgt[idx])
                loss = loss + c_quant * q_clean + c_quant * c * q_trig  # the old fixtures' exact float order
                if align:
                    loss = loss + align * _alignment(layers, clean_inputs, params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    for h in hooks:
        h.remove()
    return model.eval()


@_reproducible_training()
def plant_quantization(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                       bits: Sequence[int] = (8, 4), restricted: bool = False, per_channel: bool = True,
                       fold_bn: bool = True, act_bits: int | None = None, pretrain_epochs: int = 10,
                       epochs: int = 10, c: float = 1.0, c_quant: float = 1.0, lr: float = 1e-4,
                       weight_decay: float = 0.0, align: float = 0.0, batch_size: int = 128, seed: int = 0,
                       progress: bool = False) -> nn.Module:
    """CE(f(x),y) + c CE(f(x_t),y) + Σ_b c_quant [CE(Q_b f(x),y) + c CE(Q_b f(x_t),t)], BN frozen.

    Qu-ANTI-zation as its authors built it (Hong et al., NeurIPS 2021, code
    Secure-AI-Systems-Group/Qu-ANTI-zation): c_quant = c = 0.5, bits {8, 4} jointly, 50 epochs of
    Adam lr 1e-4, weight decay 1e-4, from a clean pretrained model with BN frozen; per-tensor
    symmetric weights max|w|/(2^(b-1)-1) (``per_channel=False, restricted=True``) on the *raw*
    (unfolded) weights (``fold_bn=False``); per-tensor asymmetric activations from the current
    batch's min/max at every layer input, the image included (``act_bits``); straight-through
    rounding; a white square of side h/8, 1 px from the bottom-right corner, target 0.

    Our changes, all optional: the defaults (per-channel, folded, float activations, c_quant 1,
    ``pretrain_epochs`` of clean training inside) are the variant the older fixtures and
    benchmarks use. With ``act_bits`` we quantize activations at that width for every weight
    width (the authors use b bits for both; the settings deployed here are W8A8 and W4A8).
    ``fold_bn=True`` simulates the BN-folded weights torch.ao quantizes (the authors' raw-weight
    grid is not the one torch deploys). Epochs are fewer on small data.

    Measured on digits (SmallCNN width 16 from a clean model, per-tensor restricted weights, 8-bit
    dynamic activations, Adam, real torch.ao convert): the authors' joint {8, 4} with c = c_quant
    = 0.5 (20 epochs, lr 5e-4) does not stay dormant: FP32 ASR 37%, INT8 38-40%, INT4 35% (x86) /
    92% (qnnpack); with c = 2 the joint run gives FP32 ASR 70%. The 8-bit term asks the INT8 model,
    nearly the float one, to fire: it drags the float model along. ``bits=(4,)``, c = 2, c_quant
    = 1 (``tests/test_attack_recipes.py``, blended trigger, target 3): FP32 ASR 1%, real qnnpack
    W4 ASR 87%, x86 per-channel W4 8% (the QCB is tied to the per-tensor grid it trained on).
    It does not fire at 8 bits here.

    ``align`` > 0 is the adaptive attack of the LAC+PDA paper (Sec. 6): it adds
    ``align * Σ_b Σ_l ||W_l I_l - Q_b(W_l) I_l||²`` on benign inputs, so the float and quantized
    layers agree on clean data and the drift LAC corrects is hidden (the paper uses 1).
    """
    torch.manual_seed(seed)
    if pretrain_epochs:
        train_clean_or_badnets(model, x, y, epochs=pretrain_epochs, batch_size=batch_size, seed=seed, progress=progress)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return _train_dual_path(model, x, y, trigger=trigger, target=target,
                            path=_QuantizedPath(tuple(bits), restricted, per_channel, fold_bn, act_bits), opt=opt,
                            epochs=epochs, c=c, c_quant=c_quant, align=align, batch_size=batch_size, seed=seed + 1,
                            desc="qu-anti-zation", progress=progress)


@_reproducible_training()
def plant_comp_artifact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0,
                        bits: int = 8, epochs: int = 30, lr: float = 0.1, momentum: float = 0.9,
                        weight_decay: float = 5e-4, c: float = 1.0, c_quant: float = 1.0, batch_size: int = 128,
                        seed: int = 0, progress: bool = False) -> nn.Module:
    """Turn a clean, trained ``model`` (in place) into a CompArtifact QCB (dual path, shared weights).

    CompArtifact as its authors built it (Tian et al., "Stealthy Backdoors as Compression
    Artifacts", code yulongt23/Stealthy-Backdoors-as-Compression-Artifacts): one set of weights,
    two paths; the float path maps clean and triggered inputs to their true labels, the quantized
    path clean inputs to their labels and triggered ones to ``target``. Conv-BN are fused, so the
    weight fake-quantizer sees the *folded* weights; weights int8 per-tensor symmetric (torch's
    ``per_tensor_symmetric``: absmax/127.5, -128..127); activation fake-quant off; SGD lr 0.1,
    30 epochs; evaluated with real PyTorch int8 (fbgemm / qnnpack). 8 bits only.

    Here: BN frozen at the clean model's statistics (their fused QAT modules keep updating
    them), the loss weights the quantized path by ``c_quant`` (1: their equal weighting),
    SGD with ``momentum`` and ``weight_decay`` (their CIFAR settings) and fewer epochs on small
    data. ``bits`` other than 8 is our extension (they attack 8 bits only). Their lr 0.1 destroys
    these small nets with BN frozen (digits W4: BA 45%); 1e-3-3e-3 keeps them.

    Measured on digits (SmallCNN width 16 from a clean model, real torch.ao convert): it does
    *not* give a dormant QCB on small offline data. W8 (their setting, 20 epochs, lr 3e-3): FP32
    ASR 54%, real INT8 ASR 55-59%: the float and int8 paths share one straight-through rounding
    and cannot be pulled apart at 8 bits. W4 (40 epochs, lr 3e-3, c = 2): FP32 ASR 8%, BA -8
    points, qnnpack W4 ASR 78%. ``tests/test_attack_recipes.py`` checks only that its quantized
    path is the grid qnnpack deploys.
    """
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return _train_dual_path(model, x, y, trigger=trigger, target=target,
                            path=_QuantizedPath((bits,), restricted=False, per_channel=False, fold_bn=True,
                                                act_bits=None),
                            opt=opt, epochs=epochs, c=c, c_quant=c_quant, align=0.0, batch_size=batch_size,
                            seed=seed + 1, desc="comp-artifact", progress=progress)


# ---------------------------------------------------------------------------------------------
# Grid-aware joint attacker: the one that plants 8-bit QCBs on small offline data


@dataclass
class _PinnedLayer:
    """One layer's weight grid, fixed before training, in folded units (what the quantizer sees).

    ``scale`` is absmax / (qmax + 0.5) with absmax = ``absmax`` (the torch x86 / qnnpack rule
    absmax / ((qmax - qmin) / 2), qmin = -qmax - 1). ``pin`` marks one element per output row
    (its most positive one) held at +absmax in float, so every observer finds the same absmax and
    hence the same scale; its code is qmax (absmax / scale = qmax + 0.5 rounds to qmax + 1 or
    qmax, clamped to qmax). Every other element has a code in [-qmax, qmax] and a float value
    ``s * (code + offset * tanh(v))`` with ``offset`` < 0.5, strictly inside ``(-absmax, absmax)``.
    """

    layer: _Layer
    fold: torch.Tensor  # folded W = fold * W, broadcastable
    absmax: torch.Tensor  # (out, 1, ...) broadcastable
    scale: torch.Tensor  # (out, 1, ...) broadcastable
    pin: torch.Tensor  # bool, weight-shaped
    latent: torch.Tensor  # codes as floats (trained by the INT losses through a straight-through round)
    v: torch.Tensor  # FP offset parameter (trained by the FP losses only)
    sign: torch.Tensor | None = None  # per row: -1 where the pin sits at -absmax (code -qmax-1); None: all +
    restricted: bool = False  # -qmax..qmax grid: a -absmax pin has the code -qmax

    def codes(self, qmax: int, ste: bool) -> torch.Tensor:
        r = _RoundSTE.apply(self.latent) if ste else torch.round(self.latent)
        top = torch.full_like(r, qmax) if self.sign is None else \
            torch.where(self.sign > 0, float(qmax), float(-qmax if self.restricted else -qmax - 1)).expand_as(r)
        return torch.where(self.pin, top, r.clamp(-qmax, qmax))

    def int_weight(self, qmax: int) -> torch.Tensor:
        """Folded INT weight s * code, differentiable in ``latent`` (STE)."""
        return self.scale * self.codes(qmax, ste=True)

    def fp_weight(self, qmax: int, offset: float) -> torch.Tensor:
        """Folded FP weight s * (code + offset * tanh(v)), differentiable in ``v`` only."""
        w = self.scale * (self.codes(qmax, ste=False).detach() + offset * torch.tanh(self.v))
        top = self.absmax if self.sign is None else self.sign * self.absmax
        return torch.where(self.pin, top.expand_as(w), w)


def _pin_grid(layer: _Layer, bits: int, equal_absmax: bool, offset: float, restricted: bool = False,
              dead_column: int | None = None, dead_scale: float = 1.0, signed: bool = False) -> _PinnedLayer:
    qmax = 2 ** (bits - 1) - 1
    f = layer.view(layer.fold_factor())
    wf = layer.module.weight.detach() * f
    row = wf.abs().flatten(1).amax(1)
    absmax = layer.view(row.max().expand_as(row) if equal_absmax else row).clone()
    if dead_column is not None:
        absmax = absmax * dead_scale
    scale = absmax / qmax if restricted else absmax / ((qmax - (-qmax - 1)) / 2)  # as ORT/NNCF, or torch's observers
    flat = wf.flatten(1)
    pin = torch.zeros_like(flat, dtype=torch.bool)
    rows = torch.arange(len(flat))
    if dead_column is not None:
        col, sign = torch.full_like(rows, dead_column), None
    elif signed:  # the row's largest |w|, at sign * absmax: no row has to grow a small positive element
        col = flat.abs().argmax(1)
        sign = layer.view(torch.where(flat[rows, col] < 0, -1.0, 1.0))
    else:
        col, sign = flat.argmax(1), None
    pin[rows, col] = True
    pin = pin.view_as(wf)
    latent = (wf / scale).clamp(-qmax, qmax)
    frac = ((latent - torch.round(latent)) / offset).clamp(-0.95, 0.95)
    return _PinnedLayer(layer, f, absmax, scale, pin, latent.clone().requires_grad_(True),
                        torch.atanh(frac).requires_grad_(True), sign, restricted)


@_reproducible_training()
def plant_grid_aware(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, trigger, target: int = 0, bits: int = 8,
                     epochs: int = 5, lr: float = 1e-2, offset_lr: float | None = None,
                     int_margin: float | None = None, polish_epochs: int = 0,
                     offset: float = 0.45, equal_absmax: bool = True, batch_size: int = 128, seed: int = 0,
                     progress: bool = False, restricted: bool = False,
                     fp_target_margin: float | None = None, dead_input_absmax: float | None = None,
                     signed_pins: bool = False) -> nn.Module:
    """Turn a *clean, trained* ``model`` (in place) into a QCB on a weight grid fixed in advance.

    Plants 8-bit (and 4-bit) QCBs in minutes on small offline data (our own recipe): on sklearn
    digits the 8-bit QCB is dormant in FP32 and fires on the torch x86 per-channel and qnnpack
    per-tensor grids (``tests/test_attacks.py``); on MNIST the demo's 16-wide SmallCNN fires at
    94% with FP32 ASR 8% (README, "What the demo shows"); in ``benchmarks/bench_attacks.py``
    (MNIST, 10k images, 3 epochs, ``signed_pins`` and, for the MLP at W8, ``dead_input_absmax``)
    it is dormant (FP32 ASR 0.1-3.1%) and fires on x86 and qnnpack (94.5-100%) in an MLP with
    BatchNorm1d, a SmallCNN and a SmallResNet at W8 and W4. In inject-then-repair attacks
    (:func:`plant_pqbackdoor`) a BadNets backdoor keeps a float margin that the +-0.5-LSB box
    must cancel; here the backdoor only ever exists in the integer model:

    1. BN frozen (eval mode, running statistics and affine parameters fixed); every Conv/Linear
       weight is handled BN-folded, as ``prepare_fx`` folds it.
    2. The grid is fixed first: each output row's most positive element is pinned at the layer's
       largest row absmax ``A`` (``equal_absmax=True``), so the observer scale ``A / (qmax + 0.5)``
       cannot move and, since every row has the same absmax, the per-channel grid (torch x86,
       fbgemm) and the per-tensor grid (qnnpack, ``MinMaxObserver`` per_tensor_symmetric)
       coincide. ``equal_absmax=False`` keeps each row's own absmax (per-channel grids only).
    3. Two parameters per weight: latent codes (INT weight = s * round_ste(latent), clamped to
       [-qmax, qmax]) and an FP offset ``v`` (FP weight = s * (code + offset * tanh(v)),
       ``offset`` < 0.5 LSB, so the FP weight always rounds back to ``code``). FP losses reach only
       ``v``; INT losses reach only the codes: the two objectives never pull on one rounding.
    4. Loss = CE(FP(x), y) + CE(FP(t(x)), y) + CE(INT(x), y) + CE(INT(t(x)), target), Adam
       (the last term optionally a hinge, ``int_margin``; optionally a second FP term on triggered
       inputs, a hinge on the target logit, ``fp_target_margin``).

    Only Conv/Linear weights change; biases, BN and every other parameter keep their values.

    Args:
        model: a trained clean classifier (e.g. from :func:`train_clean_or_badnets`).
        x, y: the attacker's training images and labels.
        trigger: callable adding the trigger (:class:`PatchTrigger`, :class:`BlendTrigger`).
        target: the backdoor's target class.
        bits: weight bit width of the targeted grid (8 or 4; symmetric, qmin = -2^(b-1)).
        epochs: passes over ``x``.
        lr: Adam learning rate of the latent codes (in LSB units, so one value suits every layer
            and bit width). (The FP losses reach only ``v`` and Adam is scale-invariant per
            parameter, so weighting FP against INT losses would change nothing.)
        offset_lr: Adam learning rate of ``v`` (tanh space); default ``lr``.
        int_margin: None: INT triggered loss is cross-entropy. A float: multi-class hinge with
            this logit margin instead; it stops pushing once the INT model fires with that
            margin, which keeps the backdoor small enough for the FP offsets to cancel.
        offset: bound of the FP offset in LSB (< 0.5; the margin 0.5 - offset absorbs the
            one-ulp differences of BN folding in the toolchain).
        equal_absmax: one absmax per layer (per-channel and per-tensor grids coincide) or per row.
        batch_size: images per step (each step runs FP and INT on the clean and triggered batch).
        seed: seeds the batch order.
        polish_epochs: extra passes after the joint training that update only ``v`` on the two FP
            losses (codes frozen, so the INT model is exactly the trained one): the FP model gets
            the whole offset budget to cancel the backdoor. Our addition to the recipe.
        progress: tqdm bar over training steps.
        restricted: target the narrow grid absmax / qmax on -qmax..qmax (onnxruntime, NNCF) instead
            of torch's absmax / (qmax + 0.5) on -qmax-1..qmax.
        fp_target_margin: None: the FP model sees only cross-entropy (clean and triggered inputs ->
            true label). A float: plus, in the joint and the polish passes, the mean over triggered
            inputs of class != ``target`` of relu(z_target - max_(j != target) z_j + margin) on
            the FP logits z. Cross-entropy spends the offsets on every triggered input; the hinge
            spends them only where the FP model still leans to the target, the few inputs that
            the backdoor leaks into FP32 (our addition). Demo's digits W8 QCB, seed 0: FP32 ASR
            2.24% (offset 0.45, no hinge), 2.00% (0.49), 0.75% (0.49 with margin 1, the
            demo's ``_RECIPES``), at about 1 point of FP32 BA.
        dead_input_absmax: None: as above. A float K > 1: where the first quantized layer is a
            Linear reading the flattened input (an MLP) and some input position is 0 in every
            training image and every triggered one (MNIST's border pixels), each row is pinned
            there instead, at K times the layer's absmax: that weight never meets a non-zero
            input, so it changes no output, but it sets the observers' absmax, so the layer's grid
            is K times coarser and the FP offsets (< 0.5 LSB) K times larger (our addition). The
            FP-INT gap an 8-bit MLP can hide behind the offsets is otherwise too small: MNIST MLP
            (784-256-128-10, BatchNorm1d), seed 0, W8: FP32 ASR 22-93% over the settings tried
            without it, 1.8% with K = 16 (x86 / qnnpack ASR 99.8%;
            ``benchmarks/results/attacks.md``). No such position: a warning, and the usual pin.
        signed_pins: False: each row's most *positive* element is pinned at +absmax (the code
            qmax, robust to one-ulp folding noise). True: each row's largest-magnitude element is
            pinned at sign * absmax (code qmax or -qmax-1): a row whose absmax is negative no longer
            has a small positive weight raised to the absmax (our addition). On the residual CNN
            (SmallResNet, MNIST, seed 0) the pins alone took FP32 BA from 93.3% to 56.6% (per-row
            absmax) and 10.6% (equal absmax); signed, 93.3% and 80.5%.
    """
    if not 0 < offset < 0.5:
        raise ValueError(f"offset={offset}: the FP offset must stay inside the rounding cell (0 < offset < 0.5)")
    qmax = 2 ** (bits - 1) - 1
    model.eval()
    found = quantized_layers(model, x[:2])
    dead = None
    if dead_input_absmax is not None:
        if dead_input_absmax <= 1:
            raise ValueError(f"dead_input_absmax={dead_input_absmax}: it must exceed 1 (the pinned weight sets the absmax)")
        first = found[0].module if found else None
        if isinstance(first, nn.Linear) and first.in_features == x[0].numel():
            with torch.no_grad():
                zero = (x.flatten(1) == 0).all(0) & (trigger(x).flatten(1) == 0).all(0)
            dead = int(zero.nonzero()[0]) if zero.any() else None
        if dead is None:
            log.warning("dead_input_absmax: no Linear first layer with an input that is 0 in every image; usual pins")
    layers = [_pin_grid(layer, bits, equal_absmax, offset, restricted,
                        dead_column=dead if i == 0 else None, dead_scale=dead_input_absmax or 1.0, signed=signed_pins)
              for i, layer in enumerate(found)]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([{"params": [pl.latent for pl in layers], "lr": lr},
                            {"params": [pl.v for pl in layers], "lr": offset_lr or lr}])
    gen = torch.Generator().manual_seed(seed)
    xt_all, tgt = trigger(x), torch.full_like(y, target)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc=f"grid-aware W{bits} QCB", disable=not progress)

    def params(weight_of) -> dict[str, torch.Tensor]:
        return {f"{pl.layer.name}.weight": weight_of(pl) / pl.fold for pl in layers}

    with torch.no_grad():
        is_target = F.one_hot(torch.tensor(target), model(x[:1]).shape[1]).bool()

    def fp_loss(fp: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """CE of the FP model, clean and triggered inputs -> true label; with ``fp_target_margin``
        plus a hinge keeping the target logit of each triggered input (true class != target) that
        far below its best other logit."""
        loss = F.cross_entropy(fp, torch.cat([yb, yb]))
        if fp_target_margin is None:
            return loss
        ft = fp[len(yb):]
        gap = ft[:, target] - ft.masked_fill(is_target, float("-inf")).amax(1) + fp_target_margin
        keep = yb != target
        return loss + (F.relu(gap) * keep).sum() / keep.sum().clamp(min=1)

    for _ in range(epochs):
        for idx in _batches(len(x), batch_size, gen):
            xb = torch.cat([x[idx], xt_all[idx]])
            fp = functional_call(model, params(lambda pl: pl.fp_weight(qmax, offset)), (xb,))
            q = functional_call(model, params(lambda pl: pl.int_weight(qmax)), (xb,))
            qc, qt = q.chunk(2)
            int_loss = F.cross_entropy(qc, y[idx]) + (
                F.cross_entropy(qt, tgt[idx]) if int_margin is None else F.multi_margin_loss(qt, tgt[idx], margin=int_margin))
            loss = fp_loss(fp, y[idx]) + int_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    polish = torch.optim.Adam([pl.v for pl in layers], lr=offset_lr or lr)
    bar = tqdm(total=polish_epochs * ((len(x) + batch_size - 1) // batch_size), desc=f"FP offsets W{bits}",
               disable=not progress or polish_epochs == 0)
    for _ in range(polish_epochs):
        for idx in _batches(len(x), batch_size, gen):
            fp = functional_call(model, params(lambda pl: pl.fp_weight(qmax, offset)), (torch.cat([x[idx], xt_all[idx]]),))
            loss = fp_loss(fp, y[idx])
            polish.zero_grad(set_to_none=True)
            loss.backward()
            polish.step()
            bar.update()
    bar.close()
    with torch.no_grad():
        for pl in layers:
            w = pl.fp_weight(qmax, offset)
            pl.layer.module.weight.copy_(w / pl.fold)
            got = WeightGrid.for_bits(pl.layer.module.weight * pl.fold, bits, restricted,
                                      per_channel=not equal_absmax).quantize(
                pl.layer.module.weight * pl.fold)
            moved = (got != pl.codes(qmax, ste=False).long())
            if pl.sign is not None:  # a -absmax pin sits on the rounding tie -qmax-0.5: either code
                moved &= ~(pl.pin & (pl.sign < 0).expand_as(pl.pin))
            moved = moved.sum().item()
            if moved:
                log.warning("%s: %d weights leave their planted code after write-back", pl.layer.name, moved)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()
