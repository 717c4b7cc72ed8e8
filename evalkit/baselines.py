"""Label-using baselines of the LAC+PDA paper's Table 1, and QVec's whole-model lambda search.

FT and FP change the *float* model before PTQ, with a small labelled clean set (the paper: 5%
of the training data), so they are not plugin methods: quantize what they return with plain
PTQ and measure.

* :func:`fine_tune` (FT): a few epochs of ordinary training (train mode) on the labelled set.
* :func:`fine_prune` (FP, Liu et al., RAID 2018): rank the last conv layer's channels by their
  mean activation on clean data, prune the least active ones (as many as keep clean accuracy on
  the labelled set within ``max_drop``), then fine-tune with the pruned channels held at zero.
* :func:`qvec_search`: QVec's global lambda, scored on unlabeled calibration data by top-1
  agreement with the float model (see :mod:`qcb_ptq_plugin.methods.qvec`).

Every function works on a deep copy; the model passed in is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import metrics

__all__ = ["labelled_subset", "fine_tune", "pruning_depth", "fine_prune", "qvec_search"]


def labelled_subset(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.05, seed: int = 0):
    """The defender's labelled clean data: ``fraction`` of the training set, drawn at random."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: max(1, int(fraction * len(x)))]
    return x[idx], y[idx]


def _train(model: nn.Module, x, y, epochs: int, lr: float, batch_size: int, seed: int,
           after_step: Callable[[], None] | None = None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()  # measured: freezing BN statistics left the W4 QCB intact (ASR 98-100% vs 7-24%)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
    return model.eval()


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 1e-3,
              batch_size: int = 64, seed: int = 0) -> nn.Module:
    """FT: a copy of ``model`` trained ``epochs`` more epochs on the labelled clean set (x, y)."""
    return _train(copy.deepcopy(model), x, y, epochs, lr, batch_size, seed)


def _last_conv_bn(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    mods = list(model.modules())
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("fine-pruning needs a Conv2d layer")
    i = convs[-1]
    bn = next((m for m in mods[i + 1:] if isinstance(m, nn.BatchNorm2d)), None)
    return mods[i], bn


@torch.no_grad()
def _channel_activity(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    acts = []
    h = layer.register_forward_hook(lambda _m, _i, o: acts.append(F.relu(o).mean((0, 2, 3))))
    try:
        for xb in x.split(256):
            model(xb)
    finally:
        h.remove()
    return torch.stack(acts).mean(0)


def pruning_depth(order: torch.Tensor, accuracy_without: Callable[[torch.Tensor], float], floor: float,
                  step: float = 0.05) -> int:
    """Fine-Pruning's stopping rule: how many of ``order``'s first channels (least active first)
    can be pruned, growing the ratio by ``step``, while ``accuracy_without(channels)`` >= ``floor``."""
    keep, ratio = 0, step
    while ratio < 1.0:
        k = int(round(ratio * len(order)))
        if accuracy_without(order[:k]) < floor:
            break
        keep, ratio = k, ratio + step
    return keep


def fine_prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_drop: float = 0.05, step: float = 0.05,
               epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> tuple[nn.Module, float]:
    """FP: prune the last conv layer's least active channels, then fine-tune; returns (model, ratio pruned).

    A channel is pruned by zeroing its conv filter and its BatchNorm affine (its output after
    BN-ReLU is 0); the pruning ratio grows by ``step`` while accuracy on (x, y) stays within
    ``max_drop`` of the unpruned model's. Pruned channels are held at zero while fine-tuning.
    """
    model = copy.deepcopy(model).eval()
    conv, bn = _last_conv_bn(model)
    watch = bn if bn is not None else conv
    order = torch.argsort(_channel_activity(model, watch, x))  # least active first
    base = metrics.benign_accuracy(model, x, y)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def prune(channels: torch.Tensor) -> None:
        with torch.no_grad():
            conv.weight[channels] = 0
            if conv.bias is not None:
                conv.bias[channels] = 0
            if bn is not None:
                bn.weight[channels] = 0
                bn.bias[channels] = 0

    def accuracy_without(channels: torch.Tensor) -> float:
        model.load_state_dict(saved)
        prune(channels)
        return metrics.benign_accuracy(model, x, y)

    n = conv.out_channels
    keep = pruning_depth(order, accuracy_without, base - max_drop, step)
    model.load_state_dict(saved)
    pruned = order[:keep]
    prune(pruned)
    model = _train(model, x, y, epochs, lr, batch_size, seed, after_step=lambda: prune(pruned))
    return model, keep / n


def qvec_search(quantize: Callable[[float], Callable], float_model: nn.Module, calib: torch.Tensor,
                lambdas: Sequence[float] = (0.5, 1.0, 2.0), budget: float = 0.01) -> tuple[float, dict[float, float]]:
    """QVec's global lambda: the largest candidate whose top-1 agreement with ``float_model`` on
    the unlabeled ``calib`` stays within ``budget`` of round-to-nearest's (lambda = 0).

    ``quantize(lam)`` returns a quantized model (any callable returning logits) purified with
    ``method="qvec", lam=lam``; lambda = 0 is plain round-to-nearest. Returns (lambda, agreement
    per candidate). No labels, no trigger: a QCB is dormant on clean data, so this bounds the
    clean cost of the correction rather than measuring the backdoor.
    """
    ref = metrics.predict(float_model, calib)
    agree = {lam: (metrics.predict(quantize(lam), calib) == ref).float().mean().item()
             for lam in sorted({0.0, *lambdas})}
    return max(lam for lam, a in agree.items() if a >= agree[0.0] - budget), agree
