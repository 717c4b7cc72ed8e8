"""The "Quantization Blindspots" study, redone: five backdoor defenses run on FP32, static INT8
and INT4 versions of one model (Ye & Pandey, arXiv 2512.06243; our own code).

The study asks whether ordinary backdoor defenses still work on the model that is deployed, a
quantized one. The original used torch *dynamic* INT8 (only Linear layers quantized, Conv2d left
in float) and counted any exception as "not detected". Here every precision is a real model:

* ``FP32``: the float model;
* ``INT8`` / ``INT4``: static PTQ of *every* Conv/Linear layer with torch.ao FX
  (:func:`qcb_ptq_plugin.ptq.quantize_fx`, x86 per-channel symmetric weights of 8 / 4 bits,
  8-bit activations), run by torch's quantized kernels.

Defenses (each reads only what its paper reads, from the model at that precision):

* :func:`neural_cleanse` (Wang et al., S&P 2019): reverse-engineer, per class, the smallest mask
  and pattern that send clean inputs to that class; a class whose mask L1 norm is an outlier
  (anomaly index > 2, median absolute deviation with the 1.4826 consistency constant) is flagged.
  It needs gradients, which integer kernels do not give: for INT8/INT4 the gradients come from a
  *weight-exact surrogate* (:func:`dequantized_surrogate`: the float graph whose BN-folded weights
  are exactly the converted model's integers times their scales; activations left in float),
  and the reversed trigger of the flagged class is checked on the real integer model.
* :func:`strip` (Gao et al., ACSAC 2019): superimpose (add, saturate) each input with clean images; a triggered
  input keeps its prediction, so the entropy of the output stays low. Threshold from clean inputs
  at a fixed false-rejection rate; reported: the fraction of triggered inputs caught (black box,
  the real model's outputs only).
* :func:`activation_clustering` (Chen et al., 2018): per training label, the last hidden
  activations (:func:`penultimate`) reduced to 10 dimensions (PCA here, ICA in the paper) and split by 2-means; a label
  whose smaller cluster holds <= 35% of its samples is flagged, and that cluster is the suspected
  poison.
* :func:`spectral_signatures` (Tran et al., NeurIPS 2018): per label, the centred last hidden
  activations' projection on their top singular vector; the 1.5 x (poison count) largest scores
  are removed as suspected poison.
* :func:`prune` (the pruning stage of Fine-Pruning, Liu et al., RAID 2018, on the model at that
  precision: channels of the last conv ranked by mean activation on clean data, the least active
  masked while labelled accuracy stays within ``max_drop``) and, for the whole defense,
  :func:`qcb_ptq_plugin.evalkit.baselines.fine_prune` on the float model followed by PTQ.

AC and SS inspect a dataset: :func:`poisoned_set` builds the suspect set, clean training images
plus triggered non-target images labelled with the target (BadNets poisoning), so poison recall
can be measured on the same set for every model and precision.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .attacks import _reproducible_training, quantized_layers
from .baselines import pruning_depth

__all__ = ["Precision", "precisions", "dequantized_surrogate", "penultimate", "poisoned_set", "NeuralCleanse",
           "neural_cleanse", "anomaly_index", "Strip", "strip", "Clusters", "activation_clustering",
           "spectral_signatures", "Pruned", "prune"]


# ---------------------------------------------------------------------------------------------
# The model at each precision


@dataclass
class Precision:
    """One precision of a model: the real model (float or converted) and a differentiable
    surrogate with the same weights (the float model itself for FP32)."""

    name: str
    model: nn.Module
    surrogate: nn.Module


def dequantized_surrogate(float_model: nn.Module, converted: nn.Module, example: torch.Tensor) -> nn.Module:
    """A float copy of ``float_model`` whose every Conv/Linear weight, BN-folded, equals the
    converted model's integer weight times its scale (what the integer kernels multiply by).

    The BatchNorm stays in the copy, so the unfolded weight is set to dequant / f (f = gamma /
    sqrt(var + eps)): BN(conv(x, W / f)) = conv(x, W) + folded bias. Activations stay in float.
    """
    quantized = {n: m for n, m in converted.named_modules() if callable(getattr(m, "weight", None))}
    surrogate = copy.deepcopy(float_model).eval()
    layers = quantized_layers(surrogate, example)
    missing = [layer.name for layer in layers if layer.name not in quantized]
    if missing:
        raise ValueError(f"layers {missing} have no quantized module in the converted model; quantize every "
                         "Conv/Linear layer (static PTQ) to build the surrogate")
    with torch.no_grad():
        for layer in layers:
            w = quantized[layer.name].weight().dequantize()
            layer.module.weight.copy_(w / layer.view(layer.fold_factor()))
    return surrogate


def precisions(model: nn.Module, calib: torch.Tensor, bits: tuple[int, ...] = (8, 4)) -> list[Precision]:
    """FP32 plus static torch.ao FX PTQ of every layer at each of ``bits`` (weights; activations 8-bit)."""
    from qcb_ptq_plugin.ptq import quantize_fx

    out = [Precision("FP32", model.eval(), model.eval())]
    for b in bits:
        converted, _ = quantize_fx(model, calib, b)
        out.append(Precision(f"INT{b}", converted, dequantized_surrogate(model, converted, calib[:2])))
    return out


@contextmanager
def _pre_hook(model: nn.Module, layer: str, fn):
    handle = model.get_submodule(layer).register_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _layer_inputs(model: nn.Module, x: torch.Tensor, layer: str, batch_size: int = 512) -> torch.Tensor:
    """The input of module ``layer`` on ``x`` (float, dequantized if the model is quantized)."""
    seen: list[torch.Tensor] = []

    def grab(_m, args):
        a = args[0]
        seen.append((a.dequantize() if a.is_quantized else a).float())

    with _pre_hook(model, layer, grab):
        for xb in x.split(batch_size):
            model(xb)
    return torch.cat(seen)


def penultimate(model: nn.Module, x: torch.Tensor, layer: str = "fc") -> torch.Tensor:
    """The input of module ``layer``, flattened: AC's and SS's features. For a CNN, pass the
    global pooling layer (SmallCNN: ``"features.11"``): the last conv block's map keeps where
    things are, and a patch trigger sits in one place (measured on a digits BadNets SmallCNN:
    AC's poison recall 72% on that map, 0% on the pooled 64 features entering ``fc``)."""
    return _layer_inputs(model, x, layer).flatten(1)


def poisoned_set(x: torch.Tensor, y: torch.Tensor, trigger, target: int, rate: float, seed: int = 0):
    """BadNets poisoning of (x, y): ``rate`` of the samples, drawn among non-target ones, get the
    trigger and the target label. Returns (x, y, is_poison)."""
    g = torch.Generator().manual_seed(seed)
    candidates = (y != target).nonzero().flatten()
    idx = candidates[torch.randperm(len(candidates), generator=g)[: int(rate * len(x))]]
    x, y = x.clone(), y.clone()
    x[idx], y[idx] = trigger(x[idx]), target
    is_poison = torch.zeros(len(x), dtype=torch.bool)
    is_poison[idx] = True
    return x, y, is_poison


# ---------------------------------------------------------------------------------------------
# Neural Cleanse


@dataclass
class NeuralCleanse:
    """Mask L1 norm per class, the anomaly index of the smallest, the class it flags."""

    norms: list[float]
    anomaly_index: float
    flagged: int
    reversed_asr: float  # the flagged class's reversed trigger, on the real model

    def detected(self, threshold: float = 2.0) -> bool:
        return self.anomaly_index > threshold


def anomaly_index(norms: torch.Tensor) -> tuple[float, int]:
    """(median - min) / (1.4826 MAD) of the norms, and the argmin class."""
    med = norms.median()
    mad = 1.4826 * (norms - med).abs().median()
    return ((med - norms.min()) / mad.clamp_min(1e-12)).item(), int(norms.argmin())


def _reverse(surrogate: nn.Module, x: torch.Tensor, label: int, steps: int, lr: float, batch_size: int,
             init_cost: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest mask m (H, W) and pattern p (C, H, W) with f((1-m) x + m p) = label (NC's loop,
    with its cost schedule: the L1 weight grows 1.5x while the reversed trigger succeeds on >= 99%
    of a batch, shrinks 1.5^1.5 x while it does not, checked every 10 steps)."""
    c, h, w = x.shape[1:]
    m_raw = torch.zeros(1, 1, h, w).uniform_(-0.1, 0.1, generator=gen).requires_grad_(True)
    p_raw = torch.zeros(1, c, h, w).uniform_(-0.1, 0.1, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr, betas=(0.5, 0.9))
    cost, hits, best = init_cost, [], (None, None, float("inf"))
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch_size,), generator=gen)]
        m, p = torch.tanh(m_raw) / 2 + 0.5, torch.tanh(p_raw) / 2 + 0.5
        out = surrogate((1 - m) * xb + m * p)
        tgt = torch.full((len(xb),), label)
        loss = F.cross_entropy(out, tgt) + cost * m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (out.argmax(1) == tgt).float().mean().item()
        hits.append(acc >= 0.99)
        if acc >= 0.99 and m.sum().item() < best[2]:
            best = (m.detach().clone(), p.detach().clone(), m.sum().item())
        if (step + 1) % 10 == 0:
            cost = cost * 1.5 if all(hits[-10:]) else cost / 1.5**1.5
    if best[0] is None:  # never reached 99%: the last mask (NC keeps it and its norm)
        m, p = torch.tanh(m_raw) / 2 + 0.5, torch.tanh(p_raw) / 2 + 0.5
        best = (m.detach(), p.detach(), m.sum().item())
    return best[0], best[1]


def neural_cleanse(prec: Precision, x: torch.Tensor, num_classes: int, *, steps: int = 300, lr: float = 0.1,
                   batch_size: int = 64, init_cost: float = 1e-3, seed: int = 0) -> NeuralCleanse:
    """Neural Cleanse on ``prec`` with clean images ``x`` (the defender's); gradients from the
    surrogate, the flagged class's reversed trigger measured on the real model."""
    gen = torch.Generator().manual_seed(seed)
    surrogate = prec.surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    with _reproducible_training():  # one thread: the same masks under any OMP_NUM_THREADS, and fast on tiny batches
        masks = [_reverse(surrogate, x, k, steps, lr, batch_size, init_cost, gen) for k in range(num_classes)]
    for p in surrogate.parameters():
        p.requires_grad_(True)
    norms = torch.tensor([m.sum().item() for m, _ in masks])
    index, flagged = anomaly_index(norms)
    m, p = masks[flagged]
    keep = metrics.predict(prec.model, x) != flagged
    rev = (metrics.predict(prec.model, (1 - m) * x[keep] + m * p) == flagged).float().mean().item()
    return NeuralCleanse(norms.tolist(), index, flagged, rev)


# ---------------------------------------------------------------------------------------------
# STRIP


@dataclass
class Strip:
    """Entropy threshold at ``frr`` of clean inputs; share of triggered inputs below it; AUROC."""

    frr: float
    threshold: float
    caught: float
    auroc: float

    def detected(self, min_caught: float = 0.5) -> bool:
        return self.caught >= min_caught


@torch.no_grad()
def strip_entropy(model, x: torch.Tensor, overlays: torch.Tensor, n: int = 20, seed: int = 0,
                  high: float = 1.0) -> torch.Tensor:
    """Mean entropy (nats) of the model's softmax over ``n`` superimpositions x + overlay, clipped
    to [0, ``high``] (STRIP adds the two images with saturation, so a bright trigger survives;
    a 0.5/0.5 blend halves it, and on digits the 2x2 trigger then stops firing: AUROC 0.6)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.stack([torch.randperm(len(overlays), generator=g)[:n] for _ in range(len(x))])  # (N, n)
    blends = (x[:, None] + overlays[pick]).clamp(0, high).flatten(0, 1)  # every superimposition, one batch
    logits = torch.cat([torch.as_tensor(model(b)).float() for b in blends.split(512)])
    prob = torch.softmax(logits, 1).view(len(x), n, -1)
    return -(prob * prob.clamp_min(1e-12).log()).sum(2).mean(1)


def _auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """P(score(pos) > score(neg)), ties counted half (the Mann-Whitney statistic)."""
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def strip(model, clean: torch.Tensor, triggered: torch.Tensor, overlays: torch.Tensor, *, frr: float = 0.05,
          n: int = 20, seed: int = 0) -> Strip:
    """STRIP on the real model: low entropy under superimposition flags an input as triggered."""
    h_clean = strip_entropy(model, clean, overlays, n, seed)
    h_trig = strip_entropy(model, triggered, overlays, n, seed + 1)
    threshold = torch.quantile(h_clean, frr).item()
    return Strip(frr, threshold, (h_trig < threshold).float().mean().item(), _auroc(-h_clean, -h_trig))


# ---------------------------------------------------------------------------------------------
# Activation Clustering and Spectral Signatures


@dataclass
class Clusters:
    """Which labels a dataset defense flags and how much of the poison its suspects hold."""

    flagged: list[int]
    recall: float  # poison inside the suspects / all poison
    precision: float  # poison inside the suspects / suspects
    target_stat: float  # AC: relative size of the target label's smaller cluster; SS: random recall

    def detected(self, target: int, min_recall: float = 0.5) -> bool:
        return target in self.flagged and self.recall >= min_recall


def _two_means(z: torch.Tensor, gen: torch.Generator, restarts: int = 5, iters: int = 50) -> torch.Tensor:
    """Labels (0/1) of the best of ``restarts`` k-means runs with k = 2 (k-means++ seeding)."""
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        c0 = z[torch.randint(len(z), (1,), generator=gen)]
        d = (z - c0).pow(2).sum(1)
        c1 = z[torch.multinomial(d / d.sum(), 1, generator=gen)] if d.sum() > 0 else c0
        centres = torch.cat([c0, c1])
        for _ in range(iters):
            lab = torch.cdist(z, centres).argmin(1)
            new = torch.stack([z[lab == k].mean(0) if (lab == k).any() else centres[k] for k in range(2)])
            if torch.allclose(new, centres):
                break
            centres = new
        inertia = (z - centres[lab]).pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = lab, inertia
    return best


def _pca(f: torch.Tensor, dims: int) -> torch.Tensor:
    f = f - f.mean(0)
    _, _, v = torch.linalg.svd(f.double(), full_matrices=False)
    return (f.double() @ v[:dims].T).float()


def _summary(suspect: torch.Tensor, is_poison: torch.Tensor, flagged: list[int], stat: float) -> Clusters:
    hit = (suspect & is_poison).sum().item()
    return Clusters(flagged, hit / max(1, is_poison.sum().item()), hit / max(1, suspect.sum().item()), stat)


def activation_clustering(features: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor, target: int, *,
                          dims: int = 10, max_size: float = 0.35, seed: int = 0) -> Clusters:
    """AC: per label, 2-means on the activations reduced to ``dims``; a label is flagged when
    its smaller cluster holds <= ``max_size`` of it, and that cluster becomes suspect."""
    gen = torch.Generator().manual_seed(seed)
    suspect = torch.zeros(len(labels), dtype=torch.bool)
    flagged, target_size = [], float("nan")
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().flatten()
        lab = _two_means(_pca(features[idx], dims), gen)
        small = int(lab.float().mean() > 0.5) ^ 1  # the smaller cluster's id
        size = (lab == small).float().mean().item()
        if k == target:
            target_size = size
        if size <= max_size:
            flagged.append(k)
            suspect[idx[lab == small]] = True
    return _summary(suspect, is_poison, flagged, target_size)


def spectral_signatures(features: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor, target: int, *,
                        factor: float = 1.5) -> Clusters:
    """SS: per label, score = squared projection of the centred activations on their top singular
    vector; the ``factor`` x (that label's poison fraction of the whole set) x label size largest
    scores are removed. Every label is inspected (``flagged`` = labels that lose a poisoned sample)."""
    eps = is_poison.float().mean().item()
    suspect = torch.zeros(len(labels), dtype=torch.bool)
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().flatten()
        f = features[idx].double()
        f = f - f.mean(0)
        _, _, v = torch.linalg.svd(f, full_matrices=False)
        score = (f @ v[0]).pow(2)
        remove = min(len(idx), int(round(factor * eps * len(labels))))  # NC's 1.5 eps n, eps n = poison count
        suspect[idx[score.topk(remove).indices]] = True
    flagged = sorted(set(labels[suspect & is_poison].tolist()))
    n_target = (labels == target).sum().item()
    random_recall = min(1.0, factor * eps * len(labels) / max(1, n_target))
    return _summary(suspect, is_poison, flagged, random_recall)


# ---------------------------------------------------------------------------------------------
# Fine-Pruning's pruning stage, on the model at any precision


class Pruned(nn.Module):
    """``model`` with channels of the activation entering ``layer`` set to zero (float or quantized)."""

    def __init__(self, model: nn.Module, layer: str, channels: torch.Tensor) -> None:
        super().__init__()
        self.model, self.layer, self.channels = model, layer, channels

    def _mask(self, _m, args):
        a = args[0]
        d = a.dequantize() if a.is_quantized else a.clone()
        d[:, self.channels] = 0
        if a.is_quantized:  # zero is exact on an affine grid whose range holds 0 (ReLU outputs)
            return (torch.quantize_per_tensor(d, a.q_scale(), a.q_zero_point(), a.dtype),)
        return (d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _pre_hook(self.model, self.layer, self._mask):
            return self.model(x)


def prune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, layer: str, max_drop: float = 0.05,
          step: float = 0.05) -> tuple[Pruned, float]:
    """Rank the channels entering ``layer`` by mean activation on clean (x, y), mask the least
    active in steps of ``step`` while accuracy on (x, y) stays within ``max_drop``. Returns the
    masked model and the pruned fraction. No retraining: an integer model has no gradients."""
    order = torch.argsort(_layer_inputs(model, x, layer).transpose(0, 1).flatten(1).mean(1))  # least active first
    floor = metrics.benign_accuracy(model, x, y) - max_drop
    keep = pruning_depth(order, lambda ch: metrics.benign_accuracy(Pruned(model, layer, ch), x, y), floor, step)
    return Pruned(model, layer, order[:keep]), keep / len(order)
