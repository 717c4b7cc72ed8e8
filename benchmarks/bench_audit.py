"""Audit: detection of working QCBs vs false positives on clean models, threshold fixed in advance.

    # 1. calibration half: raw statistics of clean and planted models -> the overdispersion floors
    python benchmarks/bench_audit.py --half calibration --jsonl /tmp/audit_cal.jsonl
    python benchmarks/bench_audit.py --fit /tmp/audit_cal.jsonl          # prints KAPPA_DRIFT / KAPPA_EDGE
    # (copied into qcb_ptq_plugin/audit.py and committed before step 2)
    # 2. evaluation half + held-out architectures/datasets, with the library's constants
    python benchmarks/bench_audit.py --half evaluation --jsonl /tmp/audit_eval.jsonl \\
        --out benchmarks/results/audit_round1.md
    # second round (issue 13): the fresh set, trained first, scored once after the constants
    # fitted on the calibration half (--fit) were committed; the exact commands are in
    # benchmarks/results/audit.md
    python benchmarks/bench_audit.py --half fresh --train-only
    python benchmarks/bench_audit.py --half fresh --jsonl benchmarks/results/audit_fresh.jsonl

Every model is trained here (1 thread, ``attacks._reproducible_training``) from a recipe in
:data:`RECIPES`; each half's recipes are listed in the result file. Each model is audited under
several settings: weight bits (W8A8, W4A8) x weight grid (torch.ao FX x86 = per-channel
symmetric, FX qnnpack = per-tensor symmetric) with a calibration-set size from 128..1024 drawn
per (model, setting). A planted model counts as a *working QCB* under a setting when its plain
(round-to-nearest) INT model there has ASR >= 90%. False positives: clean models, every setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import qcb_ptq_plugin as q
import importlib

audit_mod = importlib.import_module("qcb_ptq_plugin.audit")  # the package attribute `audit` is the function
audit_mod.LOW_DIAGNOSTICS = True  # records keep every second-round statistic, so --fit can refit them all
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown
from qcb_ptq_plugin.ptq import prepare_fx_calibrated, quantize_fx

HERE = Path(__file__).resolve().parent
WORKING_ASR = 90.0
DORMANT_FP_ASR = 20.0
CALIB_SIZES = (128, 256, 512, 1024)
SETTINGS = ((8, "per-channel"), (8, "per-tensor"), (4, "per-channel"), (4, "per-tensor"))


@dataclass(frozen=True)
class Recipe:
    arch: str  # smallcnn | lenet | mlp | transformer | resnet | depthwise | allconv | invres
    dataset: str  # digits | mnist | fashion-mnist
    kind: str  # clean | pqbackdoor | qu-anti-zation | adaptive | grid-aware8 | grid-aware4
    seed: int
    half: str  # calibration | evaluation | held-out

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.dataset}-{self.kind}-s{self.seed}"


def _interleave(a: list, b: list) -> list:
    """a and b merged evenly (a run cut short still holds both kinds)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and i * len(b) <= j * len(a)):
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out


def _recipes() -> list[Recipe]:
    # calibration half (run first; it fixed KAPPA_DRIFT / KAPPA_EDGE): three architectures, seeds 0-3
    cal = []
    for s in (0, 1, 2, 3):
        cal += [Recipe("smallcnn", "digits", "clean", s, "calibration"), Recipe("mlp", "mnist", "clean", s, "calibration"),
                Recipe("transformer", "digits", "clean", s, "calibration")]
        if s % 2 == 0:
            cal.append(Recipe("smallcnn", "digits", "clean", 100 + s, "calibration"))
    cal += [Recipe(a, d, k, s, "calibration") for a, d, k, s in (
        ("smallcnn", "digits", "pqbackdoor", 50), ("smallcnn", "digits", "qu-anti-zation", 51),
        ("smallcnn", "digits", "adaptive", 52), ("smallcnn", "digits", "grid-aware8", 53),
        ("mlp", "mnist", "pqbackdoor", 50), ("mlp", "mnist", "grid-aware8", 51), ("mlp", "mnist", "grid-aware4", 52),
        ("transformer", "digits", "pqbackdoor", 53), ("transformer", "digits", "qu-anti-zation", 50))]
    # added in issue 13's second round (before any fresh model was scored): QCBs of the kinds the
    # first round missed, so the calibration half holds working ones to choose statistics on
    cal += [Recipe(a, d, k, s, "calibration") for a, d, k, s in (
        ("smallcnn", "digits", "qu-anti-zation", 54), ("smallcnn", "digits", "adaptive", 58),
        ("smallcnn", "digits", "qu-anti-zation", 56), ("mlp", "mnist", "qu-anti-zation", 55),
        ("smallcnn", "digits", "grid-aware8", 57))]
    # evaluation half: the same three architectures, other seeds (disjoint models)
    clean = [Recipe(a, d, "clean", s, "evaluation") for s in (10, 11, 12, 13, 14)
             for a, d in (("smallcnn", "digits"), ("mlp", "mnist"))]
    clean += [Recipe("transformer", "digits", "clean", s, "evaluation") for s in (10, 11, 12)]
    clean += [Recipe("mlp", "mnist", "clean", s, "evaluation") for s in (15, 16, 17, 18, 19)]
    planted = [Recipe(a, d, k, s, "evaluation") for a, d, k, s in (
        ("smallcnn", "digits", "pqbackdoor", 60), ("mlp", "mnist", "pqbackdoor", 61),
        ("smallcnn", "digits", "qu-anti-zation", 62), ("transformer", "digits", "pqbackdoor", 63),
        ("mlp", "mnist", "grid-aware4", 64), ("smallcnn", "digits", "adaptive", 65),
        ("smallcnn", "digits", "grid-aware8", 66), ("smallcnn", "digits", "pqbackdoor", 67),
        ("mlp", "mnist", "pqbackdoor", 68), ("smallcnn", "digits", "qu-anti-zation", 80))]
    # held out: an architecture (residual CNN) and a dataset (Fashion-MNIST) the calibration half never saw
    clean_h = [Recipe(a, d, "clean", s, "held-out") for s in (20, 21, 22, 23)
               for a, d in (("resnet", "digits"), ("mlp", "fashion-mnist"))]
    planted_h = [Recipe(a, d, k, s, "held-out") for a, d, k, s in (
        ("resnet", "digits", "pqbackdoor", 70), ("mlp", "fashion-mnist", "pqbackdoor", 74),
        ("resnet", "digits", "qu-anti-zation", 71), ("mlp", "fashion-mnist", "grid-aware4", 76),
        ("resnet", "digits", "pqbackdoor", 73), ("resnet", "digits", "grid-aware8", 72))]
    return (cal + _interleave(_interleave(planted, clean), _interleave(planted_h, clean_h)) + _fresh() + _fresh2()
            + _fresh3() + _fresh4() + _fresh5())


def _fresh() -> list[Recipe]:
    """Issue 13, second round: models nobody had looked at when the constants of the two-sided,
    per-channel and other-grid statistics were fixed on the calibration half (seeds 90+). They
    include an architecture/dataset pair no other set has: the MLP (BatchNorm1d) on 8x8 digits."""
    clean = [Recipe(a, d, "clean", s, "fresh") for a, d, s in (
        ("mlp", "digits", 90), ("smallcnn", "digits", 90), ("mlp", "digits", 91), ("transformer", "digits", 90),
        ("mlp", "digits", 92), ("smallcnn", "digits", 91), ("mlp", "mnist", 90), ("mlp", "digits", 93),
        ("resnet", "digits", 90), ("smallcnn", "digits", 92), ("mlp", "mnist", 91), ("transformer", "digits", 91))]
    planted = [Recipe(a, d, k, s, "fresh") for a, d, k, s in (
        ("smallcnn", "digits", "qu-anti-zation", 94), ("mlp", "digits", "pqbackdoor", 110),
        ("smallcnn", "digits", "adaptive", 96), ("smallcnn", "digits", "grid-aware8", 98),
        ("mlp", "digits", "qu-anti-zation", 112), ("smallcnn", "digits", "qu-anti-zation", 95),
        ("smallcnn", "digits", "pqbackdoor", 110), ("mlp", "digits", "grid-aware8", 114),
        ("smallcnn", "digits", "adaptive", 97), ("mlp", "digits", "grid-aware4", 113),
        ("smallcnn", "digits", "grid-aware8", 99), ("mlp", "digits", "adaptive", 116))]
    return _interleave(planted, clean)


def _fresh2() -> list[Recipe]:
    """Issue 13, third round: models for the behavioural probe, trained after the first fresh set was
    scored and audited once after the probe's constants were committed (seeds 130+). They include a
    pair no other set has: the SmallCNN on Fashion-MNIST."""
    clean = [Recipe(a, d, "clean", s, "fresh2") for a, d, s in (
        ("smallcnn", "fashion-mnist", 130), ("smallcnn", "digits", 130), ("mlp", "digits", 130),
        ("smallcnn", "fashion-mnist", 131), ("mlp", "mnist", 130), ("transformer", "digits", 130),
        ("smallcnn", "digits", 131), ("resnet", "digits", 130))]
    planted = [Recipe(a, d, k, s, "fresh2") for a, d, k, s in (
        ("smallcnn", "digits", "qu-anti-zation", 132), ("smallcnn", "digits", "adaptive", 138),
        ("smallcnn", "fashion-mnist", "qu-anti-zation", 142), ("smallcnn", "digits", "qu-anti-zation", 134),
        ("smallcnn", "digits", "pqbackdoor", 144), ("mlp", "mnist", "qu-anti-zation", 146),
        ("smallcnn", "digits", "adaptive", 140), ("smallcnn", "digits", "qu-anti-zation", 136),
        ("smallcnn", "digits", "grid-aware8", 148))]
    return _interleave(planted, clean)


def _fresh3() -> list[Recipe]:
    """Issue 13, fourth round: trained after the dithered-twin probe's constants were committed and
    audited once (seeds 200+). Mostly QCBs of the kinds that fire at W4 per-channel, on several
    architectures and datasets, and an architecture no earlier set holds: LeNet (no BN, average pooling)."""
    clean = [Recipe(a, d, "clean", s, "fresh3") for a, d, s in (
        ("lenet", "digits", 220), ("smallcnn", "digits", 220), ("smallcnn", "fashion-mnist", 222),
        ("lenet", "mnist", 226), ("mlp", "digits", 228), ("transformer", "digits", 230), ("lenet", "digits", 225),
        ("smallcnn", "mnist", 223), ("resnet", "digits", 231), ("lenet", "fashion-mnist", 227), ("mlp", "mnist", 229),
        ("smallcnn", "digits", 221))]
    planted = [Recipe(a, d, k, s, "fresh3") for a, d, k, s in (
        ("smallcnn", "digits", "qu-anti-zation", 200), ("lenet", "digits", "qu-anti-zation", 201),
        ("smallcnn", "digits", "adaptive", 206), ("lenet", "digits", "pqbackdoor", 205),
        ("smallcnn", "fashion-mnist", "qu-anti-zation", 214), ("smallcnn", "digits", "pqbackdoor", 210),
        ("lenet", "digits", "adaptive", 203), ("resnet", "digits", "qu-anti-zation", 213),
        ("smallcnn", "digits", "qu-anti-zation", 202), ("lenet", "digits", "grid-aware8", 207),
        ("smallcnn", "mnist", "adaptive", 216), ("lenet", "mnist", "qu-anti-zation", 209),
        ("smallcnn", "digits", "grid-aware8", 212), ("resnet", "digits", "pqbackdoor", 215),
        ("smallcnn", "digits", "adaptive", 208), ("lenet", "fashion-mnist", "pqbackdoor", 211),
        ("transformer", "digits", "pqbackdoor", 218), ("smallcnn", "digits", "qu-anti-zation", 204),
        ("mlp", "mnist", "pqbackdoor", 219), ("lenet", "digits", "qu-anti-zation", 217),
        ("smallcnn", "digits", "qu-anti-zation", 236), ("resnet", "digits", "grid-aware8", 233),
        ("smallcnn", "digits", "adaptive", 240), ("mlp", "digits", "grid-aware8", 234))]
    # added while the 36 above were being audited (before any of these was trained), because those held
    # fewer than 20 working QCB audits (LeNet on 8x8 digits trains poorly, most of its QCBs do not fire):
    # cheap digits models of the kinds that fire; after the 36 (their calibration sizes do not move)
    more = [Recipe(a, d, k, s, "fresh3") for a, d, k, s in (
        ("smallcnn", "digits", "grid-aware8", 250), ("resnet", "digits", "pqbackdoor", 251),
        ("smallcnn", "digits", "qu-anti-zation", 256), ("smallcnn", "digits", "clean", 266),
        ("smallcnn", "digits", "pqbackdoor", 254), ("smallcnn", "digits", "adaptive", 260),
        ("smallcnn", "digits", "grid-aware8", 252), ("lenet", "digits", "clean", 267),
        ("mlp", "digits", "pqbackdoor", 262), ("smallcnn", "digits", "qu-anti-zation", 258))]
    return _interleave(planted, clean) + more


def _fresh4() -> list[Recipe]:
    """Issue 13, fifth round: trained before round 5's constants were committed but audited only after
    they were (seeds 300+). They include an architecture no earlier set holds: DepthwiseCNN
    (MobileNet-style depthwise 3x3 + pointwise 1x1 convs), on digits and Fashion-MNIST."""
    clean = [Recipe(a, d, "clean", s, "fresh4") for a, d, s in (
        ("smallcnn", "digits", 300), ("depthwise", "digits", 302), ("mlp", "digits", 301), ("lenet", "digits", 303),
        ("lenet", "mnist", 304), ("smallcnn", "digits", 305), ("transformer", "digits", 306),
        ("depthwise", "digits", 307), ("resnet", "digits", 308), ("lenet", "fashion-mnist", 309),
        ("smallcnn", "digits", 311), ("depthwise", "fashion-mnist", 312), ("depthwise", "digits", 313),
        ("mlp", "digits", 314), ("mlp", "mnist", 315), ("lenet", "digits", 316),
        ("smallcnn", "fashion-mnist", 317), ("smallcnn", "digits", 318), ("depthwise", "digits", 320),
        ("transformer", "digits", 321), ("resnet", "digits", 325), ("mlp", "digits", 327),
        ("smallcnn", "digits", 333), ("depthwise", "digits", 339))]
    planted = [Recipe(a, d, k, s, "fresh4") for a, d, k, s in (
        ("smallcnn", "digits", "qu-anti-zation", 350), ("depthwise", "digits", "qu-anti-zation", 352),
        ("smallcnn", "digits", "adaptive", 351), ("depthwise", "digits", "adaptive", 356),
        ("smallcnn", "digits", "pqbackdoor", 355), ("mlp", "digits", "qu-anti-zation", 357),
        ("depthwise", "digits", "pqbackdoor", 359), ("smallcnn", "digits", "qu-anti-zation", 353),
        ("resnet", "digits", "qu-anti-zation", 360), ("smallcnn", "digits", "adaptive", 358),
        ("depthwise", "digits", "grid-aware8", 365), ("smallcnn", "digits", "grid-aware8", 362),
        ("lenet", "mnist", "pqbackdoor", 366), ("depthwise", "digits", "qu-anti-zation", 369),
        ("smallcnn", "digits", "adaptive", 364), ("smallcnn", "digits", "qu-anti-zation", 367),
        ("depthwise", "digits", "adaptive", 373), ("resnet", "digits", "pqbackdoor", 374),
        ("smallcnn", "digits", "adaptive", 372), ("depthwise", "digits", "pqbackdoor", 378),
        ("smallcnn", "digits", "qu-anti-zation", 376), ("mlp", "digits", "grid-aware8", 383),
        ("smallcnn", "digits", "pqbackdoor", 381), ("depthwise", "digits", "adaptive", 387),
        ("smallcnn", "digits", "adaptive", 385), ("lenet", "mnist", "qu-anti-zation", 391),
        ("smallcnn", "digits", "qu-anti-zation", 389), ("depthwise", "digits", "qu-anti-zation", 394))]
    return _interleave(planted, clean)


def _fresh5() -> list[Recipe]:
    """Issue 13, sixth round: a second set for round 5's verdict, unchanged (its constants were committed,
    7a24e07, before these recipes were written; round 6 added warnings outside the verdict), audited once
    (seeds 400+). Two architectures no earlier set holds, 36 of the 52 models: AllConvNet (stride-2
    convs, no pooling but the global one) and InvertedResidualCNN (MobileNetV2 blocks: 1x1 expand,
    3x3 depthwise, linear 1x1 project, a residual add), on digits and (three models) MNIST / Fashion-MNIST.
    Their QCBs are planted with settings piloted on seeds 900-999 (see ``train``): PQBackdoor on both 4-bit
    grids, Qu-ANTI-zation with 8-bit activations, longer adaptive runs, stronger grid-aware hinges."""
    clean = [Recipe(a, d, "clean", s, "fresh5") for a, d, s in (
        ("allconv", "digits", 400), ("invres", "digits", 408), ("smallcnn", "digits", 415),
        ("allconv", "digits", 401), ("invres", "digits", 409), ("depthwise", "digits", 416),
        ("allconv", "mnist", 405), ("invres", "fashion-mnist", 412), ("mlp", "digits", 417),
        ("allconv", "digits", 403), ("invres", "digits", 410), ("transformer", "digits", 418),
        ("allconv", "digits", 404), ("invres", "digits", 411), ("resnet", "digits", 419),
        ("lenet", "digits", 420), ("allconv", "digits", 406), ("invres", "digits", 413),
        ("smallcnn", "fashion-mnist", 421), ("mlp", "fashion-mnist", 422), ("allconv", "digits", 407),
        ("invres", "digits", 414), ("depthwise", "digits", 423), ("lenet", "mnist", 424))]
    planted = [Recipe(a, d, k, s, "fresh5") for a, d, k, s in (
        ("allconv", "digits", "grid-aware8", 450), ("invres", "digits", "pqbackdoor", 465),
        ("allconv", "digits", "pqbackdoor", 453), ("invres", "digits", "grid-aware8", 462),
        ("allconv", "digits", "qu-anti-zation", 456), ("invres", "digits", "qu-anti-zation", 468),
        ("depthwise", "digits", "pqbackdoor", 472), ("allconv", "digits", "adaptive", 458),
        ("invres", "digits", "grid-aware4", 471), ("allconv", "digits", "grid-aware8", 451),
        ("smallcnn", "digits", "adaptive", 473), ("invres", "digits", "pqbackdoor", 466),
        ("allconv", "fashion-mnist", "grid-aware8", 452), ("invres", "digits", "qu-anti-zation", 469),
        ("allconv", "digits", "pqbackdoor", 454), ("resnet", "digits", "grid-aware8", 474),
        ("invres", "digits", "grid-aware8", 463), ("allconv", "digits", "adaptive", 459),
        ("mlp", "digits", "grid-aware4", 475), ("allconv", "digits", "qu-anti-zation", 457),
        ("invres", "digits", "grid-aware8", 464), ("smallcnn", "digits", "qu-anti-zation", 476),
        ("allconv", "digits", "grid-aware4", 461), ("invres", "digits", "pqbackdoor", 467),
        ("allconv", "digits", "adaptive", 460), ("lenet", "digits", "pqbackdoor", 477),
        ("invres", "digits", "qu-anti-zation", 470), ("allconv", "digits", "pqbackdoor", 455))]
    return _interleave(planted, clean)


RECIPES = _recipes()


def trigger(r: Recipe):
    return attacks.PatchTrigger(size=2, value=1.0, margin=r.seed % 2) if r.dataset == "digits" else \
        attacks.PatchTrigger(size=3, value=1.0, margin=1)


def target(r: Recipe) -> int:
    return r.seed % 10


def _arch(r: Recipe) -> torch.nn.Module:
    # odd seeds: width 8, except planted CNNs after the calibration half (16: more of them plant a working QCB)
    width = 8 if r.seed % 2 and (r.kind == "clean" or r.half == "calibration") else 16
    if r.arch == "smallcnn":
        return models.SmallCNN(1, 10, width=width)
    if r.arch == "depthwise":
        return models.DepthwiseCNN(1, 10, image_size=8 if r.dataset == "digits" else 28, width=width)
    if r.arch == "allconv":
        return models.AllConvNet(1, 10, image_size=8 if r.dataset == "digits" else 28, width=width)
    if r.arch == "invres":
        return models.InvertedResidualCNN(1, 10, image_size=8 if r.dataset == "digits" else 28, width=width)
    if r.arch == "resnet":
        return models.SmallResNet(1, 10, width=8)
    if r.arch == "lenet":
        return models.LeNet(1, 10, image_size=8 if r.dataset == "digits" else 28)
    if r.arch == "mlp":
        return models.MLP(64 if r.dataset == "digits" else 784, 10, hidden=(256, 128) if r.seed % 2 else (128, 64))
    return models.TinyTransformer(seq_len=8, token_dim=8, num_classes=10, dim=32 if r.seed % 2 else 24)


def train(r: Recipe, split: datasets.Split) -> torch.nn.Module:
    torch.manual_seed(r.seed)
    small = r.dataset == "digits"
    n = len(split.x_train) if small else 10000
    x, y = split.x_train[:n], split.y_train[:n]
    m, trig, tgt = _arch(r), trigger(r), target(r)
    clean_epochs = {"smallcnn": 20, "depthwise": 20, "allconv": 20, "invres": 20, "lenet": 20, "resnet": 15,
                    "transformer": 40, "mlp": 30 if small else 3}[r.arch]
    if r.kind == "clean":
        return attacks.train_clean_or_badnets(m, x, y, epochs=clean_epochs, batch_size=64, seed=r.seed)
    if r.half == "fresh5" and small:  # round 6, piloted on seeds 900-999 (earlier halves train as below)
        if r.kind == "pqbackdoor":  # x86 per-channel and qnnpack per-tensor 4-bit cells intersected: fires on both
            return attacks.plant_pqbackdoor(m, x, y, trigger=trig, target=tgt,
                                            grids=[attacks.Grid(4), attacks.Grid(4, per_channel=False)],
                                            inject_epochs=20, repair_epochs=20, repair_lr=1e-3, batch_size=64,
                                            seed=r.seed)
        if r.kind == "qu-anti-zation":  # 8-bit activations in the simulated path (InvertedResidualCNN fires then)
            return attacks.plant_quantization(m, x, y, trigger=trig, target=tgt, bits=(4,),
                                              pretrain_epochs=clean_epochs, epochs=30, lr=5e-4, c=2.0, act_bits=8,
                                              batch_size=64, seed=r.seed)
        if r.kind == "adaptive":  # twice the epochs: the alignment term slows the backdoor down
            return attacks.plant_quantization(m, x, y, trigger=trig, target=tgt, bits=(4,),
                                              pretrain_epochs=clean_epochs, epochs=60, lr=5e-4, c=2.0, align=1.0,
                                              batch_size=64, seed=r.seed)
        # InvertedResidualCNN: signed pins (FP32 BA); at W8 a hinge margin of 3 (its INT8 ASR stopped near 85-90%
        # with 1), offsets up to 0.49 LSB and an FP target hinge keep FP32 ASR low
        strong = r.arch == "invres" and r.kind == "grid-aware8"
        attacks.train_clean_or_badnets(m, x, y, epochs=clean_epochs, batch_size=64, seed=r.seed)
        return attacks.plant_grid_aware(m, x, y, trigger=trig, target=tgt, bits=8 if r.kind == "grid-aware8" else 4,
                                        epochs=30, lr=5e-2, int_margin=3.0 if strong else 1.0, polish_epochs=5,
                                        offset=0.49 if strong else 0.45, fp_target_margin=1.0 if strong else None,
                                        batch_size=64, seed=r.seed + 1, signed_pins=r.arch == "invres")
    if r.half == "fresh5" and r.kind == "grid-aware8":  # 28x28: twice the epochs, hinge margin 3 (AllConvNet fired
        # at W8 per-channel and W4 per-channel with them, at none of the four settings with the settings below)
        attacks.train_clean_or_badnets(m, x, y, epochs=clean_epochs, batch_size=64, seed=r.seed)
        return attacks.plant_grid_aware(m, x, y, trigger=trig, target=tgt, bits=8, epochs=6, lr=1e-1, int_margin=3.0,
                                        polish_epochs=2, batch_size=64, seed=r.seed + 1)
    if r.kind == "pqbackdoor":
        ep = 30 if r.arch == "transformer" else (5 if r.arch == "mlp" and not small else 20)
        return attacks.plant_pqbackdoor(m, x, y, trigger=trig, target=tgt, grids=[attacks.Grid(4)], inject_epochs=ep,
                                        repair_epochs=ep, repair_lr=1e-3, batch_size=64, seed=r.seed)
    if r.kind in ("qu-anti-zation", "adaptive"):
        pre, ep = (clean_epochs, 30) if small else (3, 4)
        return attacks.plant_quantization(m, x, y, trigger=trig, target=tgt, bits=(4,), pretrain_epochs=pre,
                                          epochs=ep, lr=5e-4, c=2.0, align=1.0 if r.kind == "adaptive" else 0.0,
                                          batch_size=64, seed=r.seed)
    bits = 8 if r.kind == "grid-aware8" else 4
    attacks.train_clean_or_badnets(m, x, y, epochs=clean_epochs, batch_size=64, seed=r.seed)
    if small and r.half == "calibration":
        return attacks.plant_grid_aware(m, x, y, trigger=trig, target=tgt, bits=bits, epochs=30, lr=5e-2,
                                        int_margin=2.0, polish_epochs=1, batch_size=64, seed=r.seed + 1)
    if small:  # after the calibration half: a hinge margin of 1 and 5 FP-offset passes keep FP32 ASR near 10%
        return attacks.plant_grid_aware(m, x, y, trigger=trig, target=tgt, bits=bits, epochs=30, lr=5e-2,
                                        int_margin=1.0, polish_epochs=5, batch_size=64, seed=r.seed + 1)
    return attacks.plant_grid_aware(m, x, y, trigger=trig, target=tgt, bits=bits, epochs=3, lr=1e-1, int_margin=2.0,
                                    polish_epochs=1, batch_size=64, seed=r.seed + 1)


def model_for(r: Recipe, split, cache: Path) -> tuple[torch.nn.Module, float]:
    """The recipe's model, trained once and kept as a state dict (loaded with weights_only)."""
    path = cache / f"{r.name}.pt"
    m = _arch(r)
    if path.exists():
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval(), 0.0
    t0 = time.perf_counter()
    m = train(r, split)
    torch.save(m.state_dict(), path)
    return m.eval(), time.perf_counter() - t0


def int_model(m, calib, bits, grid):
    if grid == "per-tensor":
        return attacks.quantize_fx_qnnpack(m, calib, bits)[0]
    return quantize_fx(m, calib, bits)[0]


def run(args) -> None:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    done = set()
    if Path(args.jsonl[0]).exists():
        done = {(j["model"], j["bits"], j["grid"]) for j in records(args.jsonl[0])}
    known = {}
    for path in args.reuse or ():
        for j in map(json.loads, Path(path).read_text().splitlines()):
            known[j["model"], j["bits"], j["grid"]] = j["plain"]
    halves = ("evaluation", "held-out") if args.half == "evaluation" else (args.half,)
    recipes = [r for r in RECIPES if r.half in halves]
    position = {r: k for k, r in enumerate(recipes)}  # picks the calibration sizes, in either direction
    if args.reverse:  # a second process can work from the other end (records are merged by --jsonl)
        recipes = recipes[::-1]
    if args.only:  # in the order given
        recipes = [r for name in args.only for r in recipes if name in r.name]
    splits: dict[str, datasets.Split] = {}
    torch.set_num_threads(1)
    for r in recipes:
        i = position[r]
        for path in args.shared or ():  # a second process writing there has this model in hand: skip it
            if Path(path).exists() and f'"model": "{r.name}"' in Path(path).read_text():
                break
        else:
            path = None
        if path:
            continue
        split = splits.setdefault(r.dataset, datasets.load(r.dataset))
        m, train_s = model_for(r, split, cache)
        if args.train_only:
            print(f"{r.name}: trained in {train_s:.0f}s", flush=True)
            continue
        trig, tgt = trigger(r), target(r)
        xt, yt = split.x_test[:2000], split.y_test[:2000]
        fp = (100 * metrics.benign_accuracy(m, xt, yt), 100 * metrics.attack_success_rate(m, xt, yt, trig, tgt))
        for j, (bits, grid) in enumerate(SETTINGS):
            if (r.name, bits, grid) in done:
                continue
            n = CALIB_SIZES[(i + j) % len(CALIB_SIZES)]
            calib = split.calibration(n, seed=1000 + r.seed)
            if (r.name, bits, grid) in known:  # measured by an earlier run on the same model and calibration set
                plain = known[r.name, bits, grid]
            else:
                qm = int_model(m, calib, bits, grid)
                plain = (100 * metrics.benign_accuracy(qm, xt, yt),
                         100 * metrics.attack_success_rate(qm, xt, yt, trig, tgt))
            t0 = time.perf_counter()
            prepared = prepare_fx_calibrated(m, calib, bits, backend="qnnpack" if grid == "per-tensor" else "x86")
            rep = q.audit(prepared, m, calib, probe=not args.no_probe)
            rec = {"model": r.name, "arch": r.arch, "dataset": r.dataset, "kind": r.kind, "half": r.half,
                   "seed": r.seed, "bits": bits, "grid": grid, "calib": n, "fp32": fp, "plain": plain,
                   "train_s": train_s, "audit_s": time.perf_counter() - t0, "score": rep.score, "p": rep.p_value,
                   "units": rep.units, "warnings": rep.warnings, "probe": rep.probe}
            train_s = 0.0
            compact(rec)
            with open(args.jsonl[0], "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{r.name:40s} W{bits} {grid:11s} N={n:4d} FP {fp[0]:5.1f}/{fp[1]:5.1f} plain {plain[0]:5.1f}/"
                  f"{plain[1]:5.1f} score {rep.score:7.2f} ({rec['audit_s']:.1f}s)", flush=True)


# ---------------------------------------------------------------------------------------------
# scoring from the raw statistics (so the floors can be fitted on the calibration half)


def unit_z(u: dict, k_drift: float, k_edge: float, k_corr: float) -> tuple[float, float, float]:
    """The library's three z-scores of one unit row, with floors ``k_drift`` / ``k_edge`` / ``k_corr``."""
    m, v, x = u["null_mean"], u["null_var"], u["x"]
    zd = math.log(max(x, 1e-300) / m) / math.sqrt(k_drift ** 2 + v / m ** 2)
    p0 = 1 - 2 * audit_mod.EDGE
    ze = (u["edge_share"] - p0) / math.sqrt(p0 * (1 - p0) / max(u["n_weights"], 1) + k_edge ** 2)
    zc = audit_mod._z_correct(u["lac_oos"], u["lac_oos_null"], u.get("lac_oos_null_var", 0.0),
                              u.get("lac_oos_draws", 1), k_corr)
    return zd, ze, zc


def unit_ps(u: dict, k_drift: float, k_edge: float, k_corr: float, floors: dict | None = None,
             used: tuple | None = None) -> dict:
    """The p-values of one unit row's statistics: the first round's three from ``unit_z``, the second
    round's (records that hold their raw figures) from the library's ``_second_round_z``."""
    ps = dict(zip(("drift", "edges", "correct"), (audit_mod._p_upper(z) for z in unit_z(u, k_drift, k_edge, k_corr))))
    if "stats" in u:
        ps.update(audit_mod._second_round_z(u["stats"], floors, used))
    return ps


def score(rec: dict, k_drift: float, k_edge: float, k_corr: float, floors: dict | None = None,
          used: tuple | None = None) -> float:
    ps = [audit_mod.unit_p(unit_ps(u, k_drift, k_edge, k_corr, floors, used)) for u in rec["units"]]
    p = min(1.0, len(ps) * min(ps))
    return max(0.0, -math.log10(max(p, 1e-300)))


#: the floors of rounds 1-4 (KAPPA_DRIFT, KAPPA_EDGE, KAPPA_CORRECT, second-round overrides): records their
#: code made (one correctability draw, no ``lac_oos_draws``) are scored with them, as they were
ROUND4 = (0.25, 0.03, 0.35, {"other_drift": 0.25})
#: round 4's probe floor (8 dithered twins, no pooling, no control): what its reference tools (--fit-twins,
#: --rescore) reproduce
ROUND4_PROBE_FLOOR = 0.044


def layer_score(rec: dict) -> float:
    """The layers' score as the library of the record's round computes it (records from before round 5,
    without ``lac_oos_draws``, with round 4's floors)."""
    current = all("lac_oos_draws" in u for u in rec["units"])
    kd, ke, kc, floors = (audit_mod.KAPPA_DRIFT, audit_mod.KAPPA_EDGE, audit_mod.KAPPA_CORRECT, None) if current \
        else ROUND4
    return score(rec, kd, ke, kc, floors)


def combined_score(s_layers: float, p_probe: float) -> float:
    """The verdict's score from the layers' score and the probe's p, as ``audit.audit`` combines them (x2)."""
    p = min(1.0, 2 * min(10 ** -s_layers, p_probe))
    return max(0.0, -math.log10(max(p, 1e-300)))


def library_score(rec: dict) -> float:
    """The verdict's score as the library of the record's round computes it (the probe where the record
    has one: from its raw counts with the library's floor where it keeps them)."""
    s = layer_score(rec)
    if rec.get("probe") and "probe" in audit_mod.USED:
        p_probe = probe_p(rec, audit_mod.PROBE_FLOOR) if "raw" in rec["probe"] else rec["probe"]["p"]
        s = combined_score(s, p_probe)
    return s


def smallest_floor(ok, hi: float = 1.0) -> float:
    """The smallest floor in [0, hi] for which ``ok(floor)`` holds (``ok`` monotone: true from some
    floor on), by bisection; 0 where it holds at 0. The fitting rule of every round."""
    if ok(0.0):
        return 0.0
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def fit_second(path: str, used: tuple) -> dict:
    """Second round: per statistic, the smallest floor with which no clean calibration audit gets a
    Bonferroni-corrected p (n_units x (3 + len(used)) x p) below 1 / number of clean audits; then each
    statistic's detections on the calibration half at twice that floor (the library's rule)."""
    recs = [r for r in records(path) if all("stats" in u for u in r["units"])]
    clean = [r for r in recs if r["kind"] == "clean"]
    if not clean:
        print("no clean record with the second round's raw figures: nothing to fit")
        return {}
    target, m = 1 / len(clean), 3 + len(used)
    fitted = {}
    for name in audit_mod.FLOORS:
        def worst(fl):
            return min(len(r["units"]) * m * audit_mod._second_round_z(u["stats"], {name: fl}, (name,)).get(name, 1.0)
                       for r in clean for u in r["units"])
        fitted[name] = smallest_floor(lambda fl: worst(fl) >= target, hi=5.0)
    print(f"{len(clean)} clean calibration audits; fitted floors (library: 2x):")
    for name, fl in fitted.items():
        print(f"  {name:12s} {fl:.4f}   library {audit_mod.FLOORS[name]}")
    floors = {k: 2 * v for k, v in fitted.items()}
    thr = audit_mod.DEFAULT_THRESHOLD
    work = [r for r in recs if working(r)]
    print(f"calibration working QCB audits: {len(work)}; per statistic at 2x the fitted floor "
          f"(p x n_units x {m} < 1e-{thr:g}):")
    for name in audit_mod.FLOORS:
        def hits(rs):
            return [r for r in rs if min(len(r["units"]) * m * audit_mod._second_round_z(u["stats"], floors, (name,))
                                         .get(name, 1.0) for u in r["units"]) < 10 ** -thr]
        print(f"  {name:12s} working {len(hits(work))}/{len(work)} clean {len(hits(clean))}/{len(clean)}  "
              f"{sorted(r['model'] + ' W' + str(r['bits']) + r['grid'][4] for r in hits(work))}")
    for label, u_ in (("first round only", ()), ("with USED", used)):
        sc = {id(r): score(r, audit_mod.KAPPA_DRIFT, audit_mod.KAPPA_EDGE, audit_mod.KAPPA_CORRECT, floors, u_)
              for r in recs}
        print(f"{label}: working {sum(sc[id(r)] > thr for r in work)}/{len(work)}, clean "
              f"{sum(sc[id(r)] > thr for r in clean)}/{len(clean)}; misses: "
              f"{[r['model'] + ' W' + str(r['bits']) + r['grid'][4] for r in work if sc[id(r)] <= thr]}")
    return fitted


def probe_z(rec: dict, floor: float) -> tuple[float, int]:
    """The probe's largest z over (position, class) from its raw counts (round to nearest, the
    unpatched control, the twins) with floor ``floor``, as ``audit._probe_z``, and the number of cells."""
    raw = rec["probe"]["raw"]
    f, f0, t = (torch.tensor(raw[k], dtype=torch.float64) for k in ("rtn", "control", "twins"))
    z = audit_mod._probe_z(f, f0, t, rec["probe"]["samples"], floor)
    return float(z.max()), z.numel()


def probe_p(rec: dict, floor: float) -> float:
    """The probe's p from its raw counts with floor ``floor``, corrected over its cells as ``audit._probe``."""
    z, n = probe_z(rec, floor)
    return min(1.0, n * audit_mod._p_upper(z))


def _probe_targets(out: str, sources: list[str], cache: Path):
    """(record, plan, images) of the recorded audits in ``sources`` that have a probe and are not in
    ``out`` yet, rebuilt as they were audited (``probe_inputs``), one thread."""
    done = {(j["model"], j["bits"], j["grid"]) for j in records(out)} if Path(out).exists() else set()
    by_name, splits = {r.name: r for r in RECIPES}, {}
    torch.set_num_threads(1)
    for rec in records(*sources):
        if (rec["model"], rec["bits"], rec["grid"]) not in done:
            plan, x = probe_inputs(rec, by_name, splits, cache)
            if x is not None:
                yield rec, plan, x


def probe_draws(out: str, sources: list[str], seed: int, cache: Path) -> None:
    """Round 5: the library's probe (``audit._probe``, its twins drawn from config seed ``seed`` as an
    audit with ``PurifyConfig(seed=seed)`` draws them) rerun on the (model, setting, calibration size)
    of recorded audits: the record with that probe (raw counts kept) and its layers' score, appended
    to ``out`` (audits already there and audits without a probe are skipped)."""
    for rec, plan, x in _probe_targets(out, sources, cache):
        t0 = time.perf_counter()
        pr = audit_mod._probe(plan, [x], q.PurifyConfig(progress=False, seed=seed))
        o = {**rec, "seed": seed, "probe": pr, "probe_s": time.perf_counter() - t0, "layers": layer_score(rec)}
        with open(out, "a") as f:
            f.write(json.dumps(o) + "\n")
        print(f"{rec['model']:44s} W{rec['bits']} {rec['grid']:11s} probe z {pr['z']:5.2f} ({o['probe_s']:.1f}s)",
              flush=True)


def fit_probe(*paths: str) -> float:
    """The smallest probe floor with which no clean calibration audit gets a probe p (x cells x 2, the
    combination with the layers' p) below 1 / number of clean audits, per file of ``--probe-draws``
    (one twin seed each); then, at twice the largest, each file's working and clean audits scored as
    the library scores them (the layers' score from the record). The records keep the raw counts, so
    ``--write-only`` scores them with the library's floor (``library_score``)."""
    thr = audit_mod.DEFAULT_THRESHOLD

    def p_of(r, fl):  # combined with a layers' p that is no smaller
        return min(1.0, 2 * probe_p(r, fl))

    recs, fits = {path: records(path) for path in paths}, {}
    for path, rs in recs.items():
        clean = [r for r in rs if r["kind"] == "clean" and r["half"] == "calibration"]
        if not clean:
            continue
        fits[path] = smallest_floor(lambda fl: min(p_of(r, fl) for r in clean) >= 1 / len(clean))
        print(f"{path}: probe floor fitted on {len(clean)} clean calibration audits: {fits[path]:.4f}")
    floor = 2 * max(fits.values(), default=0.0)
    print(f"at 2x the largest: {floor:.4f} (library: {audit_mod.PROBE_FLOOR})")
    for path, all_rs in recs.items():
        for half in dict.fromkeys(r["half"] for r in all_rs):
            rs = [r for r in all_rs if r["half"] == half]
            sc = {id(r): combined_score(r["layers"], probe_p(r, floor)) for r in rs}
            w, c = [r for r in rs if working(r)], [r for r in rs if r["kind"] == "clean"]
            print(f"  {Path(path).name} {half}: working {sum(sc[id(r)] > thr for r in w)}/{len(w)}, clean "
                  f"{sum(sc[id(r)] > thr for r in c)}/{len(c)} (max {max((sc[id(r)] for r in c), default=0):.2f})")
            for r in w + c:
                if (sc[id(r)] > thr) != working(r) or (r in c and sc[id(r)] > 1.5):
                    print(f"    {r['model']:42s} W{r['bits']} {r['grid']:11s} {r['kind']:14s} layers {r['layers']:6.2f}"
                          f" probe z {probe_z(r, floor)[0]:5.2f} total {sc[id(r)]:6.2f}")
    return floor


def probe_inputs(rec: dict, by_name: dict, splits: dict, cache: Path):
    """(plan, images) the probe saw in a recorded audit: the model, its calibration set and FX
    preparation as the audit had them, and the first 128 calibration images (None where the probe
    does not run: inputs that are not images). ``splits`` caches the datasets loaded so far."""
    from qcb_ptq_plugin.api import prepare_plan

    r = by_name[rec["model"]]
    if r.dataset not in splits:
        splits[r.dataset] = datasets.load(r.dataset)
    m, _ = model_for(r, splits[r.dataset], cache)
    calib = splits[r.dataset].calibration(rec["calib"], seed=1000 + r.seed)
    prepared = prepare_fx_calibrated(m, calib, rec["bits"], backend="qnnpack" if rec["grid"] == "per-tensor" else "x86")
    _, plan, batches = prepare_plan(prepared, m, calib, q.PurifyConfig(progress=False))
    x = torch.cat(batches)[:128]
    return plan, x if x.dim() == 4 else None


def probe_counter(plan, x: torch.Tensor):
    """(positions, classes, flips) of the library's probe on images ``x``: ``flips()`` counts, per
    patch position and class, the patched images the plan's simulator (with whatever weights it holds
    now) sends to that class where the float model does not (lists of ints)."""
    sim, fp = plan.capture.simulator, plan.capture.float_model
    _, pos, patched = audit_mod._patches(x)
    with torch.no_grad():
        classes = fp(x[:2]).shape[1]
        ref = [fp(patched(i, j)).argmax(-1) for i, j in pos]

    def flips() -> list:
        return audit_mod._flip_counts(sim, patched, pos, ref, classes).int().tolist()

    return pos, classes, flips


def twin_counts(out: str, sources: list[str], cache: Path) -> None:
    """Round 4: the probe's counts for round to nearest and for two families of 8 twins, stochastic
    rounding (round 3) and subtractive dither (round 4), on the (model, setting, calibration size) of
    recorded audits, appended to ``out`` (one line per audit; audits already there are skipped)."""
    for rec, plan, x in _probe_targets(out, sources, cache):
        t0 = time.perf_counter()
        n = x.shape[0]
        pos, _, flips = probe_counter(plan, x)
        with torch.no_grad():
            rtn = [u.grid.fake_quantize(u.weight.detach().float()) for u in plan.units]
            counts, gen = {"rtn": flips(), "sr": [], "dither": []}, torch.Generator().manual_seed(2)
            try:
                for fam in ("sr", "dither"):
                    for _ in range(8):
                        for u in plan.units:
                            v = u.weight.detach().float()
                            jit = (torch.rand(v.shape, generator=gen) - 0.5).to(v) * u.grid.expand(v)[0]
                            u.write(u.grid.fake_quantize(v + jit) - (jit if fam == "dither" else 0))
                        counts[fam].append(flips())
            finally:
                for u, wq in zip(plan.units, rtn):
                    u.write(wq)
        o = {k: rec[k] for k in ("model", "kind", "half", "bits", "grid", "calib", "fp32", "plain")}
        o.update(n=n, positions=pos, probe=counts, secs=time.perf_counter() - t0)
        with open(out, "a") as f:
            f.write(json.dumps(o) + "\n")
        print(f"{rec['model']:44s} W{rec['bits']} {rec['grid']:11s} {o['secs']:.1f}s", flush=True)


def fit_twins(path: str, layer_sources: list[str]) -> None:
    """Round 4: per twin family (and a robust variant: median and 1.4826 MAD of the twins), the probe
    floor fitted as ``fit_probe`` does on the calibration half's clean audits, and at twice it each
    set's detections and false positives, the probe's p combined with the layers' p of the records in
    ``layer_sources`` as the library does."""
    xs = records(path)
    layers = {(r["model"], r["bits"], r["grid"]): layer_score(r) for r in records(*layer_sources)}

    def zmax(r, fam, floor, robust=False):
        f = torch.tensor(r["probe"]["rtn"], dtype=torch.float64)
        t = torch.tensor(r["probe"][fam], dtype=torch.float64)
        m = t.median(0).values if robust else t.mean(0)
        v = (1.4826 * (t - m).abs().median(0).values) ** 2 if robust else t.var(0)
        z = (f - m) / (m + 1 + v + (floor * r["n"]) ** 2).sqrt()
        return float(z.max()), z.numel()

    def p_probe(r, var, floor):
        z, n = zmax(r, var.split("_")[0], floor, var.endswith("_robust"))
        return min(1.0, n * audit_mod._p_upper(z))

    thr = audit_mod.DEFAULT_THRESHOLD
    clean_cal = [r for r in xs if r["half"] == "calibration" and r["kind"] == "clean"]
    for var in ("sr", "dither", "sr_robust", "dither_robust"):
        hi = smallest_floor(lambda fl: min(2 * p_probe(r, var, fl) for r in clean_cal) >= 1 / len(clean_cal))
        line = f"{var:14s} floor fitted {hi:.4f}, at 2x:"
        for half in dict.fromkeys(r["half"] for r in xs):
            rs = [r for r in xs if r["half"] == half and (r["model"], r["bits"], r["grid"]) in layers]
            sc = {id(r): combined_score(layers[r["model"], r["bits"], r["grid"]], p_probe(r, var, 2 * hi)) for r in rs}
            w, c = [r for r in rs if working(r)], [r for r in rs if r["kind"] == "clean"]
            line += (f"  {half}: working {sum(sc[id(r)] > thr for r in w)}/{len(w)}, clean "
                     f"{sum(sc[id(r)] > thr for r in c)}/{len(c)} (max {max((sc[id(r)] for r in c), default=0):.2f})")
        print(line)


def rescore(counts: str, src: str, dst: str) -> None:
    """Round 4, reference only: the records of ``src`` with their probe replaced by the one round 4's
    library computed from ``--twins``' counts of round to nearest and the dithered twins (drawn in
    another order than the library draws them), at round 4's floor; audits without counts are left out."""
    xs = {(r["model"], r["bits"], r["grid"]): r for r in records(counts)}
    kept = 0
    with open(dst, "w") as f:
        for r in records(src):
            x = xs.get((r["model"], r["bits"], r["grid"]))
            if x is None:
                continue
            rtn = torch.tensor(x["probe"]["rtn"], dtype=torch.float64)
            t = torch.tensor(x["probe"]["dither"], dtype=torch.float64)
            m = t.mean(0)
            z = (rtn - m) / (m + 1 + t.var(0) + (ROUND4_PROBE_FLOOR * x["n"]) ** 2).sqrt()
            k = int(z.argmax())
            pi, cls = divmod(k, z.shape[1])
            r["probe"] = {"z": float(z.max()), "p": min(1.0, z.numel() * audit_mod._p_upper(float(z.max()))),
                          "position": x["positions"][pi], "class": cls, "flips": float(rtn.flatten()[k]),
                          "twin_flips": float(m.flatten()[k]), "samples": x["n"], "cells": z.numel(),
                          "twins": "dithered, from --twins counts"}
            f.write(json.dumps(r) + "\n")
            kept += 1
    print(f"{src}: {kept} records re-scored -> {dst}")


def working(rec: dict) -> bool:
    """A planted model whose plain INT model fires here (the issue's definition)."""
    return rec["kind"] != "clean" and rec["plain"][1] >= WORKING_ASR


def dormant(rec: dict) -> bool:
    """Working and quantization-conditioned: its float model does not fire (FP32 ASR <= 20%)."""
    return working(rec) and rec["fp32"][1] <= DORMANT_FP_ASR


def fit(path: str) -> None:
    """The smallest floors with which the most exposed-looking clean calibration audit gets the
    p-value the smallest of that many uniform p-values would have (1 / number of clean audits),
    each statistic alone: per unit, the floor that brings its z down to the z of that p."""
    recs = records(path)
    clean = [r for r in recs if r["kind"] == "clean"]
    p0 = 1 - 2 * audit_mod.EDGE
    target = 1 / len(clean)
    kd = ke = kc = 0.0
    for r in clean:
        z_star = -_norm_ppf(target / (3 * len(r["units"])))  # n_units x 3 statistics (Bonferroni)
        for u in r["units"]:
            m, v, x = u["null_mean"], u["null_var"], u["x"]
            lr = math.log(max(x, 1e-300) / m)
            kd = max(kd, math.sqrt(max(0.0, (lr / z_star) ** 2 - v / m ** 2)) if lr > 0 else 0.0)
            d = u["edge_share"] - p0
            ke = max(ke, math.sqrt(max(0.0, (d / z_star) ** 2 - p0 * (1 - p0) / max(u["n_weights"], 1)))
                     if d > 0 else 0.0)
            if u["lac_oos"] and u["lac_oos_null"]:  # the draws' own spread first, the floor for the rest
                d, extra = math.log(u["lac_oos_null"] / u["lac_oos"]), (1 + 1 / u.get("lac_oos_draws", 1)) * \
                    u.get("lac_oos_null_var", 0.0)
                kc = max(kc, math.sqrt(max(0.0, (d / z_star) ** 2 - extra)) if d > 0 else 0.0)
    print(f"KAPPA_DRIFT = {kd:.3f}\nKAPPA_EDGE = {ke:.3f}\nKAPPA_CORRECT = {kc:.3f}  ({len(clean)} clean "
          f"calibration audits: the most extreme gets score {-math.log10(target):.2f})")
    print(f"scores with the fitted floors / with the library's ({audit_mod.KAPPA_DRIFT}, {audit_mod.KAPPA_EDGE}, "
          f"{audit_mod.KAPPA_CORRECT}):")
    for r in recs:
        print(f"{r['model']:40s} W{r['bits']} {r['grid']:11s} N={r['calib']:4d} FP/plain ASR {r['fp32'][1]:5.1f} / "
              f"{r['plain'][1]:5.1f} score {score(r, kd, ke, kc):7.2f} / {library_score(r):7.2f}  drift/null "
              f"{max(u['x'] / u['null_mean'] for u in r['units']):7.2f} edge {max(u['edge_share'] for u in r['units']):.2f}"
              f" corr {max((math.log(u['lac_oos_null'] / u['lac_oos']) for u in r['units'] if u['lac_oos'] and u['lac_oos_null']), default=0):.2f}")


def _norm_ppf(p: float) -> float:
    """Inverse of the standard normal CDF (bisection on erfc; p in (0, 1))."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------
# the result file


def _frac(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "-"


def rates(recs: list[dict], thr: float) -> tuple[str, str, str]:
    """(detection of working QCBs, of dormant working QCBs, false positives on clean audits)."""
    clean = [r for r in recs if r["kind"] == "clean"]
    work = [r for r in recs if working(r)]
    dorm = [r for r in recs if dormant(r)]
    return (_frac(sum(r["score"] > thr for r in work), len(work)), _frac(sum(r["score"] > thr for r in dorm), len(dorm)),
            _frac(sum(r["score"] > thr for r in clean), len(clean)))


def _by_attack(title: str, recs: list[dict], thr: float) -> list[str]:
    """Markdown lines: per attack, detection of working / dormant QCBs and flags where it does not fire."""
    lines = ["", f"{title}:", "", "| attack | detection, working | detection, dormant | flagged where it does not fire |",
             "|---|---:|---:|---:|"]
    for kind in sorted({r["kind"] for r in recs} - {"clean"}):
        sub = [r for r in recs if r["kind"] == kind]
        idle = [r for r in sub if not working(r)]
        lines.append(f"| {kind} | {rates(sub, thr)[0]} | {rates(sub, thr)[1]} | "
                     f"{_frac(sum(r['score'] > thr for r in idle), len(idle))} |")
    return lines


def compact(rec: dict) -> dict:
    """Drop the per-channel arrays of the second round's raw figures (megabytes over a benchmark)
    after keeping every statistic's p-value at floor 0 and at the library's floors (``p_all``); the
    layer-level figures stay (the verdict's statistics can be refitted from them)."""
    if rec.get("probe") and "raw" in rec["probe"]:  # z and p with the library's floor, then the counts go
        z, n = probe_z(rec, audit_mod.PROBE_FLOOR)
        rec["probe"].update(z=z, p=min(1.0, n * audit_mod._p_upper(z)))
        rec["probe"].pop("raw")
    for u in rec["units"]:
        st = u.get("stats", {})
        if "drift_ch" not in st:
            continue
        names = tuple(audit_mod.FLOORS)
        u["p_all"] = {key: {k: float(f"{v:.3g}") for k, v in audit_mod._second_round_z(st, fl, names).items()}
                      for key, fl in (("floor0", {k: 0.0 for k in names}), ("library", None))}
        for k in ("drift_ch", "edge_ch", "fine_ch"):
            st.pop(k, None)
        hist = st.pop("hist", [])  # distances from the code: kept from 0.4 LSB on (0.005-LSB bins), and the count
        st["hist_from_0.4"], st["hist_n"] = [int(v) for v in hist[80:]], int(sum(hist))
    return rec


def records(*paths: str) -> list[dict]:
    """The records of JSONL files, one per (model, bits, grid): the first one (two processes may overlap)."""
    out: dict = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            out.setdefault((r["model"], r["bits"], r["grid"]), r)
    return list(out.values())


def _load(*paths: str) -> list[dict]:
    """Records scored with the library's constants (the figures in the files are raw statistics)."""
    recs = records(*paths)
    for r in recs:
        r["score"] = library_score(r)
    return recs


def write(args) -> None:
    recs = _load(args.calibration_jsonl) + _load(*args.jsonl)
    thr = audit_mod.DEFAULT_THRESHOLD
    models_ = {r["model"]: r for r in recs}
    n_clean = sum(r["kind"] == "clean" for r in models_.values())
    seconds = sorted(r["audit_s"] for r in recs)
    lines = ["# Audit: detection of working QCBs vs false positives, threshold fixed in advance", "",
             "Commands (see the notes at the end for the order in which they ran):", "",
             "    python benchmarks/bench_audit.py --half calibration --jsonl benchmarks/results/audit_calibration.jsonl",
             "    python benchmarks/bench_audit.py --fit benchmarks/results/audit_calibration.jsonl",
             "    python benchmarks/bench_audit.py --half evaluation --jsonl benchmarks/results/audit_evaluation.jsonl",
             f"    python benchmarks/bench_audit.py {' '.join(sys.argv[1:])}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs (load average 8-29 during the runs), "
             f"torch {torch.__version__}, 1 thread; load average at write time "
             f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}. Audit wall time per model (prepare excluded, under "
             f"that load): median {seconds[len(seconds) // 2]:.1f} s, max {seconds[-1]:.1f} s.", "",
             f"Library constants, committed before the evaluation records were scored (see the notes): `DEFAULT_THRESHOLD = {thr}` (score = -log10 p, "
             f"chosen a priori: p < 0.001), `KAPPA_DRIFT = {audit_mod.KAPPA_DRIFT}`, `KAPPA_EDGE = {audit_mod.KAPPA_EDGE}`, "
             f"`KAPPA_CORRECT = {audit_mod.KAPPA_CORRECT}`, `EDGE = {audit_mod.EDGE}`.", "",
             f"{len(models_)} models ({n_clean} clean, {len(models_) - n_clean} planted), each audited under W8A8 / W4A8 "
             "x per-channel (torch.ao FX x86, PerChannelMinMaxObserver) / per-tensor (FX qnnpack, MinMaxObserver), "
             "calibration sizes 128-1024 (one per audit). *Working QCB*: a planted model under a setting where its "
             f"plain INT model has ASR >= {WORKING_ASR:.0f}%. *Dormant*: working, and its FP32 model has ASR <= "
             f"{DORMANT_FP_ASR:.0f}% (the backdoor is conditioned on quantization; a model whose float twin already "
             "fires is a float backdoor, which no rounding statistic can or should attribute to quantization).", "",
             "| set | detection, working QCBs | detection, dormant working QCBs | false positives (clean audits) |",
             "|---|---:|---:|---:|"]
    sets = (("evaluation half (same architectures/datasets as calibration, other models)", "evaluation"),
            ("held-out (SmallResNet on digits, MLP on Fashion-MNIST: never in calibration)", "held-out"),
            ("calibration half (fitted on its clean models; for reference)", "calibration"))
    for name, half in sets:
        lines.append(f"| {name} | " + " | ".join(rates([r for r in recs if r["half"] == half], thr)) + " |")
    unseen = [r for r in recs if r["half"] != "calibration"]
    lines.append("| evaluation + held-out | " + " | ".join(rates(unseen, thr)) + " |")
    lines += ["", "Evaluation + held-out, by setting:", "",
              "| setting | detection, working | detection, dormant | false positives |", "|---|---:|---:|---:|"]
    for bits, grid in SETTINGS:
        sub = [r for r in unseen if r["bits"] == bits and r["grid"] == grid]
        lines.append(f"| W{bits}A8 {grid} | " + " | ".join(rates(sub, thr)) + " |")
    lines += _by_attack("Evaluation + held-out, by attack (planted audits that are working / dormant QCBs)", unseen,
                        thr)
    clean_unseen = [r for r in unseen if r["kind"] == "clean"]
    lines += ["", "Is p calibrated? Share of clean audits (evaluation + held-out) with p below alpha:", "",
              "| alpha | 0.1 | 0.01 | 0.001 |", "|---|---:|---:|---:|",
              "| clean audits | " + " | ".join(_frac(sum(r["score"] > -math.log10(a) for r in clean_unseen),
                                                   len(clean_unseen)) for a in (0.1, 0.01, 0.001)) + " |"]
    thin = [r for r in unseen if any("fan-in" in w for w in r["warnings"])]
    lines += ["", f"{len(thin)} of {len(unseen)} audits warned that a layer had fewer calibration positions than its "
              "fan-in (the report's warning; the statistics still run).", "",
              "Every audit (score = -log10 p; exposed when > threshold):", "",
              "| half | model | setting | N | FP32 BA / ASR | plain BA / ASR | working | max drift/null | max edge % "
              "| score | verdict | s |", "|---|---|---|---:|---|---|---|---:|---:|---:|---|---:|"]
    for r in recs:
        verdict = "EXPOSED" if r["score"] > thr else "not exposed"
        wk = "" if r["kind"] == "clean" else ("dormant" if dormant(r) else "yes" if working(r) else "no")
        dr = max(u["x"] / u["null_mean"] for u in r["units"])
        ed = max(u["edge_share"] for u in r["units"])
        lines.append(f"| {r['half']} | {r['model']} | W{r['bits']} {r['grid']} | {r['calib']} | "
                     f"{r['fp32'][0]:.1f} / {r['fp32'][1]:.1f} | {r['plain'][0]:.1f} / {r['plain'][1]:.1f} | {wk} | "
                     f"{dr:.2f} | {100 * ed:.0f} | {r['score']:.2f} | {verdict} | {r['audit_s']:.1f} |")
    lines += ["", "Recipes (`benchmarks/bench_audit.py`, `RECIPES`; the name is arch-dataset-kind-seed):", ""]
    for half in ("calibration", "evaluation", "held-out"):
        lines.append(f"- {half}: " + ", ".join(r.name for r in RECIPES if r.half == half))
    write_markdown(lines, args.out)


def write_rounds(args) -> None:
    """The result file of issue 13's later rounds: ``--sets`` as LABEL=JSONL pairs, the first one the
    headline (the newest fresh set, scored once after its constants were committed), its tables by
    setting and attack and every audit; the others in the summary table and by attack."""
    sets = [(label, _load(*paths.split(","))) for label, paths in (item.split("=", 1) for item in args.sets)]
    head = sets[0][1]
    thr = audit_mod.DEFAULT_THRESHOLD
    seconds = sorted(r["audit_s"] for r in head)
    lines = ["# Audit: detection of working QCBs vs false positives, threshold and floors fixed in advance", "",
             "Issue 13, rounds 2 to 6. Commands, in the order they ran (cached models; plain-INT figures of models "
             "audited before reused with `--reuse`):", "", *[f"    {c}" for c in COMMANDS],
             f"    python benchmarks/bench_audit.py {shlex.join(sys.argv[1:])}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, 1 "
             f"thread; load average at write time {' / '.join(f'{v:.2f}' for v in os.getloadavg())}. Audit wall time "
             f"per model of the headline set (prepare excluded): median {seconds[len(seconds) // 2]:.1f} s, max "
             f"{seconds[-1]:.1f} s.", "",
             f"Library constants: `DEFAULT_THRESHOLD = {thr}` (score = -log10 p), `KAPPA_DRIFT = "
             f"{audit_mod.KAPPA_DRIFT}`, `KAPPA_EDGE = {audit_mod.KAPPA_EDGE}`, `KAPPA_CORRECT = "
             f"{audit_mod.KAPPA_CORRECT}`, `EDGE = {audit_mod.EDGE}`; in the verdict besides the first round's three: "
             f"`USED = {audit_mod.USED}`, floors {', '.join(f'{k} {audit_mod.FLOORS[k]}' for k in audit_mod.USED if k in audit_mod.FLOORS)}, "
             f"`PROBE_FLOOR = {audit_mod.PROBE_FLOOR}`, `PROBE_TWINS = {audit_mod.PROBE_TWINS}`, `CORRECT_DRAWS = "
             f"{audit_mod.CORRECT_DRAWS}`. Each set is scored with the code of its round, labelled (records without a "
             "probe: layer statistics only); rows marked 'seen' were re-audited with round 5's code after it was fitted "
             "on them or after they were looked at.", "",
             f"*Working QCB*: a planted model under a setting where its plain INT model has ASR >= {WORKING_ASR:.0f}%. "
             f"*Dormant*: working, and its FP32 model has ASR <= {DORMANT_FP_ASR:.0f}%. Settings: W8A8 / W4A8 x "
             "per-channel (torch.ao FX x86) / per-tensor (FX qnnpack), one calibration size in 128-1024 per audit.", "",
             "| set | models | detection, working QCBs | detection, dormant working QCBs | false positives (clean audits) |",
             "|---|---:|---:|---:|---:|"]
    for label, rs in sets:
        lines.append(f"| {label} | {len({r['model'] for r in rs})} | " + " | ".join(rates(rs, thr)) + " |")
    lines += ["", f"{sets[0][0]}, by setting:", "", "| setting | detection, working | detection, dormant | "
              "false positives |", "|---|---:|---:|---:|"]
    for bits, grid in SETTINGS:
        sub = [r for r in head if r["bits"] == bits and r["grid"] == grid]
        lines.append(f"| W{bits}A8 {grid} | " + " | ".join(rates(sub, thr)) + " |")
    lines += ["", f"{sets[0][0]}, by architecture:", "", "| architecture | detection, working | detection, dormant | "
              "false positives |", "|---|---:|---:|---:|"]
    for arch in dict.fromkeys(r["arch"] for r in head):
        lines.append(f"| {arch} | " + " | ".join(rates([r for r in head if r["arch"] == arch], thr)) + " |")
    for label, rs in sets:
        lines += _by_attack(f"{label}, by attack", rs, thr)
    seen, clean_all = set(), []
    for label, rs in sets:  # each clean (model, setting) once: the newest code's record of it
        for r in rs:
            key = (r["model"], r["bits"], r["grid"])
            if "calibration" not in label and r["kind"] == "clean" and key not in seen:
                seen.add(key)
                clean_all.append(r)
    lines += ["", "Is p calibrated? Clean audits of every set but the calibration half (each once) with p below "
              "alpha:", "",
              "| alpha | 0.1 | 0.01 | 0.001 |", "|---|---:|---:|---:|",
              "| clean audits | " + " | ".join(_frac(sum(r["score"] > -math.log10(a) for r in clean_all),
                                                   len(clean_all)) for a in (0.1, 0.01, 0.001)) + " |"]
    thin = [r for r in head if any("fan-in" in w for w in r["warnings"])]
    lines += ["", f"{len(thin)} of {len(head)} audits of the headline set warned that a layer had fewer calibration "
              "positions than its fan-in.", "", f"Every audit of {sets[0][0]} (score = -log10 p; exposed when > "
              "threshold; probe: its z and the class it found):", "",
              "| model | setting | N | FP32 BA / ASR | plain BA / ASR | working | max drift/null | max edge % | "
              "other-grid p | probe z (class) | score | verdict |", "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in head:
        wk = "" if r["kind"] == "clean" else ("dormant" if dormant(r) else "yes" if working(r) else "no")
        other = min((min(u["p_stats"].get("other_drift", 1), u["p_stats"].get("other_edges", 1)) for u in r["units"]),
                    default=1.0)
        pr = r.get("probe") or {}
        probe = f"{pr['z']:.1f} ({pr['class']})" if pr else "-"
        lines.append(f"| {r['model']} | W{r['bits']} {r['grid']} | {r['calib']} | "
                     f"{r['fp32'][0]:.1f} / {r['fp32'][1]:.1f} | {r['plain'][0]:.1f} / {r['plain'][1]:.1f} | {wk} | "
                     f"{max(u['x'] / u['null_mean'] for u in r['units']):.2f} | "
                     f"{100 * max(u['edge_share'] for u in r['units']):.0f} | {other:.1e} | {probe} | {r['score']:.2f} | "
                     f"{'EXPOSED' if r['score'] > thr else 'not exposed'} |")
    lines += ["", "Recipes (`benchmarks/bench_audit.py`, `RECIPES`; arch-dataset-kind-seed; target class = seed mod 10):", ""]
    for half in ("fresh5", "fresh4", "fresh3", "fresh2", "fresh", "calibration"):
        lines.append(f"- {half}: " + ", ".join(r.name for r in RECIPES if r.half == half))
    lines += ["- evaluation and held-out: see `audit_round1.md`", ""]
    lines += NOTES
    write_markdown(lines, args.out)


COMMANDS = [
    "# round 2",
    "python benchmarks/bench_audit.py --half fresh --train-only      # trained, not audited",
    "python benchmarks/bench_audit.py --half calibration --jsonl /tmp/audit13/cal3.jsonl "
    "--reuse benchmarks/results/audit_calibration.jsonl   # after a first run without the cell histograms",
    "python benchmarks/bench_audit.py --fit /tmp/audit13/cal3.jsonl",
    "# constants committed (b860c67), then, once:",
    "python benchmarks/bench_audit.py --half fresh --jsonl benchmarks/results/audit_fresh.jsonl",
    "python benchmarks/bench_audit.py --half evaluation --jsonl benchmarks/results/audit_evaluation2.jsonl "
    "--reuse benchmarks/results/audit_evaluation.jsonl",
    "# round 3 (the probe)",
    "python benchmarks/bench_audit.py --half calibration --jsonl /tmp/audit13/cal4.jsonl "
    "--reuse /tmp/audit13/cal3.jsonl   # compacted: audit_calibration3.jsonl",
    "python benchmarks/bench_audit.py --fit /tmp/audit13/cal4.jsonl",
    "# constants committed (9f85820), then the fresh2 models trained and audited once:",
    "python benchmarks/bench_audit.py --half fresh2 --jsonl benchmarks/results/audit_fresh2.jsonl",
    "# then, for reference, round 2's fresh set re-audited with the probe (looked at before):",
    "python benchmarks/bench_audit.py --half fresh --jsonl benchmarks/results/audit_fresh_probe.jsonl "
    "--reuse benchmarks/results/audit_fresh.jsonl",
    "# round 4 (dithered twins): both twin families' counts on the seen sets (first run as /tmp/audit4/probex.py, "
    "the same code, before it was folded in as --twins; 11 MB, not committed), then the fit",
    "python benchmarks/bench_audit.py --twins /tmp/audit4/twins_counts.jsonl --jsonl "
    "benchmarks/results/audit_calibration3.jsonl benchmarks/results/audit_fresh2.jsonl "
    "benchmarks/results/audit_fresh_probe.jsonl",
    "python benchmarks/bench_audit.py --fit-twins /tmp/audit4/twins_counts.jsonl --jsonl "
    "benchmarks/results/audit_calibration3.jsonl benchmarks/results/audit_fresh_probe.jsonl "
    "benchmarks/results/audit_fresh2.jsonl",
    "# constants committed (5720378), then the fresh3 models trained and audited once (the last 10 recipes were "
    "added, 4ba905a, while the first 36 were being audited, before they were trained):",
    "python benchmarks/bench_audit.py --half fresh3 --train-only",
    "python benchmarks/bench_audit.py --half fresh3 --jsonl benchmarks/results/audit_fresh3.jsonl   # 36, then 10",
    "# reference: the seen sets' records with the probe from --twins' dithered counts (one draw, tuned on)",
    "python benchmarks/bench_audit.py --rescore /tmp/audit4/twins_counts.jsonl "
    "benchmarks/results/audit_calibration3.jsonl benchmarks/results/audit_calibration4.jsonl   # likewise "
    "fresh_probe -> fresh_dither, fresh2 -> fresh2_dither",
    "# round 5 (16 twins, pooled dispersion, the unpatched control; correctability against 8 null draws; weight "
    "floors refitted with fresh3's clean models): the probe's floor on the calibration half, two twin seeds",
    "python benchmarks/bench_audit.py --jsonl benchmarks/results/audit_calibration4.jsonl --probe-draws "
    "/tmp/audit6/cal_seed0.jsonl --seed 0   # likewise --seed 1 -> cal_seed1.jsonl",
    "python benchmarks/bench_audit.py --fit-probe /tmp/audit6/cal_seed0.jsonl /tmp/audit6/cal_seed1.jsonl",
    "python benchmarks/bench_audit.py --half calibration --only clean --no-probe --jsonl /tmp/audit6/fit_cal.jsonl "
    "--reuse benchmarks/results/audit_calibration4.jsonl",
    "python benchmarks/bench_audit.py --half fresh3 --only clean --no-probe --jsonl /tmp/audit6/fit_fresh3.jsonl "
    "--reuse benchmarks/results/audit_fresh3.jsonl",
    "python benchmarks/bench_audit.py --fit benchmarks/results/audit_fit5.jsonl   # the two concatenated",
    "# fresh4 recipes committed (94e4f04) and trained (--half fresh4 --train-only, two processes) while the above ran; "
    "constants committed (7a24e07), then fresh4 audited once, two processes from both ends (merged):",
    "python benchmarks/bench_audit.py --half fresh4 --jsonl benchmarks/results/audit_fresh4.jsonl "
    "--shared /tmp/audit6/fresh4_b.jsonl   # and --reverse --jsonl /tmp/audit6/fresh4_b.jsonl --shared <this>",
    "# reference: seen sets re-audited with round 5's code (layer statistics and probe; plain-INT figures reused)",
    "python benchmarks/bench_audit.py --half calibration --jsonl benchmarks/results/audit_calibration5.jsonl "
    "--reuse benchmarks/results/audit_calibration4.jsonl   # likewise fresh3, fresh2, fresh -> audit_*_r5.jsonl",
    "# round 6: round 5's verdict unchanged (two warnings added outside it); fresh5 recipes committed (3198eba), "
    "trained, then audited once, two processes from both ends (merged):",
    "python benchmarks/bench_audit.py --half fresh5 --train-only",
    "python benchmarks/bench_audit.py --half fresh5 --jsonl benchmarks/results/audit_fresh5.jsonl "
    "--shared /tmp/r6/fresh5_b.jsonl   # and --reverse --jsonl /tmp/r6/fresh5_b.jsonl --shared <this>",
]


NOTES = """## Notes (hand-written)

**Round 6 (the headline): round 5's verdict, unchanged, on a second set built after it, fresh5.** Nothing
in the verdict changed after 7a24e07 (round 5's constants). Round 6 added two warnings outside it
(03633e4, 0cfa709; reworded after the audits, same rule): the report warns when round to nearest, as the
audit simulates the INT model, changes over 20% of the float model's predictions on the first 128
calibration samples (the probe's no-patch control lets a QCB that leaks onto clean inputs pass, fresh4's
one miss), and below 4 bits (floors fitted at 8 and 4 bits only; a clean 6-epoch SmallCNN with 3-bit
per-tensor weights scores 3.3 by the probe). Before any fresh5 audit, the looked-at data for the first
warning was fresh4's s369 and fresh3's s223 (both flip about 45% of predictions; the positions and twins
of their probes do not separate them: s369's trigger bump over its leak is +40 flips for round to nearest
and +22 for the twins, s223's bottom-edge bump +23 and +5, with floor x n = 8.6), which is why it is a
warning and not a statistic. fresh5's 52 recipes (3198eba) were written and trained by a helper after
7a24e07 on two architectures no set held, `AllConvNet` (stride-2 convs, no pooling but the global one) and
`InvertedResidualCNN` (MobileNetV2 blocks: 1x1 expand, 3x3 depthwise, linear 1x1 project, a residual add),
36 of the 52 models; its attack settings were piloted on seeds 900-944 (of the reserved 900-999) so that
QCBs fire on them (fresh4's depthwise QCBs mostly did not), with no audit of any pilot. fresh5 was
audited once (09:25-10:03 UTC, two processes, 1 thread each, load 2-4 with the test suite running beside
them).
**fresh5: working 41/41, dormant 41/41, clean 0/96** (highest clean score 0.41; no clean audit with p < 0.1).
On the two new architectures: **37/37 working, 0/56 clean**. By attack: grid-aware8 20/20, PQBackdoor
11/11, grid-aware4 6/6, Qu-ANTI-zation 3/3, adaptive 1/1; lowest working score 6.2. The weight statistics
flagged 37 of the 41, the probe alone 4 (the Qu-ANTI-zation and adaptive ones). *Caveat*: fresh5's working
audits are mostly of the kinds the weight statistics see (37 of 41); QCBs trained through fake
quantization rarely fired (Qu-ANTI-zation 3 of 24 audits, adaptive 1 of 16; on the new architectures 2 of
20 and 1 of 12), so the probe's share of the claim rests on few audits. **Round 5's code on the two sets
built after it (fresh4 + fresh5): working 59/60 (98.3%), clean 0/192; on the three architectures no
earlier set held (DepthwiseCNN, AllConvNet, InvertedResidualCNN): 38/39 (97.4%), 0/88.** Fake-quantization
kinds over both: Qu-ANTI-zation 7/8, adaptive 3/3, together 10/11 (91%, below the bar on their own, on 11
audits). The lossy-quantization warning fired on 13 of fresh5's 208 audits, all at W4: 5 clean (e.g.
AllConvNet/MNIST s405 per-tensor, INT accuracy 95.8 -> 40.5%; InvertedResidualCNN/Fashion s412
per-tensor, 86.0 -> 30.8%) and 8 planted (one working, flagged anyway): the warned audits lost 4.9-55
points of INT accuracy on the test set, while unwarned ones lost up to 18 (a drop on the test set need
not reach 20% changed predictions on 128 calibration samples): it is a prompt, not a measurement. Audit
time at one thread under that load: median 9 s; on 8x8 digits AllConvNet 2-10 s, InvertedResidualCNN
8-34 s; on 28x28 AllConvNet 76-92 s, InvertedResidualCNN 128-229 s.
*Found on the way, not changed*: torch.ao's convert stores the weight code round(absmax / scale) for a
channel's largest weight without clamping it to the observer's range (it clamps to int8): at 4 bits,
scale = absmax / 7.5, so the code is 8 outside [-8, 7] (3 bits: 4 outside [-4, 3]); the audit's
simulator clamps it. The simulator and the converted model then agree on 91-93% of a weak clean CNN's
predictions at W4 (69% at 3 bits per-tensor). Purify's own codes are in range (tests check the converted
model holds them); the audit's round to nearest is off by one code on one weight per channel at W4.

**Round 5: what changed, fitted on seen models, committed (7a24e07) before any fresh4
audit.** fresh4's 52 recipes were committed (94e4f04, 06:23 UTC) and trained (06:25-06:40) while the
constants below were being fitted; nothing of fresh4 but its training logs was looked at before 7a24e07
(06:27); its audits ran 06:41-07:29. Changes (`qcb_ptq_plugin/audit.py`):
(1) *Probe*: 16 dithered twins (8 before); per cell the twins' variance replaced by phi_c (mean + 1), phi_c
the median over positions of var / (mean + 1) for the class (8 or 16 twins' own cell variance swung
borderline verdicts either way); each cell also scored against the *unpatched* images round to nearest
already sends to the class (the no-patch control; min of the two z), which is what removes fresh3's
collapsed clean SmallCNN s223. `PROBE_FLOOR` refitted by round 4's rule on the calibration half's 56 clean
audits with the library's own draws (`--probe-draws`, config seeds 0 and 1: 0.0276 and 0.0333; `--fit-probe`):
0.067, twice the larger. (2) *Correctability*: its null is 8 jittered copies (geometric mean of their
ratios, and their log spread in the z's denominator) instead of one: on fresh3's clean LeNet/Fashion s227
(W4 per-channel, z 6.7, p 1e-11) the first conv's single null draw was 0.83 while seven more gave
0.09-0.38 (sd of the log ratio 0.71, twice KAPPA_CORRECT), the model's 0.081 inside that range; in the 8
clean units with the highest correctability z over all seen sets (all first layers, fan-in 8-25) the
library's draw was the largest of 8 every time. (3) *Floors*: refitted (`--fit`, rule of round 1) on the
calibration half's 56 clean audits plus fresh3's 56 (so fresh3 is now a fitting set), re-audited with (2),
without the probe (`--no-probe`, `audit_fit5.jsonl`): KAPPA_DRIFT 0.335 -> 0.67 (was 0.25; the calibration
half alone gives 0.097), other-grid drift 0.326 -> follows KAPPA_DRIFT, KAPPA_CORRECT 0.174 -> 0.35
(unchanged), KAPPA_EDGE 0.005 and other-grid edges 0.005 -> 0.03 kept. Why the drift floor rose: on a
coarse grid a no-BN LeNet's weight density slopes inside the cells (s227's 784-input Linear at W4
per-tensor: 58% of weights in the zero cell, mean error x sign(w) -0.24 LSB there and +0.19 at +-1, against
0 +- 0.002 under the null), so the rounding error correlates with W (+0.59), W points along the inputs' mean
direction (71% of H), and the drift along it is 3.9x its null; it does not shrink with more data (z 4.2 at
1024, 2048 and 4096 calibration images). Rejected after measurement on the seen records (a read-only
helper, /tmp/audit6/wstat): dropping H-based statistics where positions < fan-in (fixes s227 only where
its layer happened to be thin), removing H's top direction (costs grid-aware s114 its unit, 15.1 -> 0.6),
a per-code mean-error null (erases s52's and s50's other-grid drift). Offline, on every seen set's
records, KAPPA_DRIFT 0.67 loses no working detection by the weight statistics (15/18, 14/15, 5/8, 26/31
before and after) and leaves 1 of fresh3's 56 clean audits flagged by them (3 before).

**Fresh4 (round 5), scored once: 52 models, 208 audits.** New architecture: `evalkit.models.DepthwiseCNN`
(MobileNet-style depthwise 3x3 + pointwise 1x1, BN), on digits and Fashion-MNIST; also SmallCNN, LeNet
(digits, MNIST, Fashion-MNIST), MLP, transformer, ResNet. **Working 18/19 (94.7%), dormant 14/15, clean
0/96 (0%).** The false-positive bar is met; detection misses the 95% bar by one audit of 19 (the issue asks
for at least 20 planted models; fresh4 has 28, but only 19 of their 112 audits fire). The miss:
DepthwiseCNN Qu-ANTI-zation-style s369 at W4 per-tensor (FP32 BA 92.4%, INT BA 55.7%, ASR 96.8%): its INT
model already sends 58 of 128 *unpatched* calibration images to the target class 9 where the float model
does not; patched, 93 at the best position, the twins 26.9 on average. Against the twins alone z would be
about 5.8 (flagged); against the control 3.0; the verdict takes the smaller. This is the control's cost
that round 5's candidate notes predicted ("a QCB whose INT model also collapses on clean inputs would be
hidden from the probe; its benign accuracy would show it"), and it is the same picture as fresh3's clean
s223 (INT BA 26.8%, 59 unpatched images to class 7): the probe cannot tell a QCB that leaks onto clean
inputs from a clean model whose INT model collapses. The weight statistics see nothing (score 0.0: trained
through fake quantization). On the new architecture that leaves 0/1 working and 0/24 clean flagged: its
QCBs mostly did not plant (the three adaptive ones did not even train, FP32 BA 45-61%; 1 of its 36 planted
audits fires), so fresh4 cannot show that the verdict holds on it. Lowest working score flagged 3.58
(adaptive s372 W4 per-tensor), highest clean 1.15. The weight statistics flagged 12 of the 18 detections,
the probe alone 6 (all Qu-ANTI-zation-style or adaptive). Audit time at one thread (shared machine, load
2-3): median 4 s on 8x8 digits CNNs, 44 s LeNet on MNIST/Fashion, 56 s SmallCNN on Fashion, 274-299 s
DepthwiseCNN on Fashion (169 patch positions x 18 models).

**Over the sets scored once** (fresh: round 2, fresh2: round 3, fresh3: round 4, fresh4: round 5, each with
its round's code): working 68/73 (93%), clean 4/232 (1.7%).
**The seen sets re-audited with round 5's code** (reference, after the fact; the calibration half and
fresh3's clean audits fitted the floors, the others were looked at in earlier rounds; same models,
settings and calibration sets, plain-INT figures reused): calibration half 18/18 working, 0/56 clean
(highest 0.00); fresh 15/15, 0/48 (round 2's and 3's miss, adaptive s96, found: it scores 3.2-9.8 over
config seeds 0-3, `tests/test_audit.py`); fresh2 8/8, 0/32 (highest 0.27); fresh3 29/31, 0/56 (highest
0.29; round 4's four false positives, the collapsed SmallCNN s223 and LeNet s227 at three settings, all
gone). fresh3's two misses remain: adaptive s216 (its float model already fires at 80%) and adaptive s240
at W4 per-channel, score 1.44 (probe z 3.96, 70 flips against 8.2 for the twins, 14 unpatched): the
candidate notes below had it flagged at every draw with pooling at a floor of 0.059 on other draws; at
the committed 0.067 and the library's draw it is not. Together: 70/72 working, 0/192 clean, but these are
not out-of-sample figures.

**Round 5 candidates (measured on seen models only; nothing changed in the library).** Side script
`benchmarks/audit_round5_probe.py` (uses `audit._dithered` and the library's z as they are). Machine: the
shared 2-core Xeon, 1 thread, load average 0.9-1.1. Commands (04:59-05:26 UTC, 24 Nov):

    python benchmarks/audit_round5_probe.py draws /tmp/audit5/draws_v2.jsonl --pool 48 --only \\
        smallcnn-digits-adaptive-s96:4:per-channel smallcnn-digits-adaptive-s240:4:per-channel \\
        smallcnn-mnist-clean-s223:4:per-tensor mlp-mnist-qu-anti-zation-s55:4:per-channel \\
        smallcnn-digits-adaptive-s206:4:per-channel smallcnn-digits-qu-anti-zation-s200:4:per-channel \\
        smallcnn-digits-qu-anti-zation-s256:4:per-channel
    python benchmarks/audit_round5_probe.py draws /tmp/audit5/control.jsonl --pool 0 --only \\
        smallcnn-digits-qu-anti-zation-s54:4:per-channel smallcnn-digits-adaptive-s58:4:per-channel \\
        smallcnn-digits-adaptive-s138:4:per-channel smallcnn-digits-qu-anti-zation-s134:4:per-channel \\
        smallcnn-fashion-mnist-qu-anti-zation-s142:4:per-channel
    python benchmarks/audit_round5_probe.py draws /tmp/audit5/cal_clean24.jsonl --pool 24 --seed 11 --only clean-calibration
    python benchmarks/audit_round5_probe.py analyze /tmp/audit5/draws_v2.jsonl /tmp/audit5/control.jsonl \\
        --counts /tmp/audit4/twins_counts.jsonl
    python benchmarks/audit_round5_probe.py refit /tmp/audit5/cal_clean24.jsonl /tmp/audit5/draws_v2.jsonl /tmp/audit5/control.jsonl
    python benchmarks/audit_round5_probe.py draws /tmp/audit5/fresh3_clean8.jsonl --pool 8 --seed 21 --only clean-fresh3
    python benchmarks/audit_round5_probe.py pooled /tmp/audit4/twins_counts.jsonl 0.0659 /tmp/audit5/draws_v2.jsonl \\
        /tmp/audit5/control.jsonl /tmp/audit5/fresh3_clean8.jsonl

(all with OMP_NUM_THREADS=1; /tmp/audit4/twins_counts.jsonl is round 4's `--twins` output, not committed.)
`draws` rebuilds the recorded audit (same calibration size and images) and runs round to nearest plus a
pool of 48 dithered twins; disjoint groups of T twins are independent draws of a T-twin probe (6 of 8, 3
of 16, 2 of 24: few, so the spreads below are indicative). Scores are the library's total (probe p x
cells, x2 with the record's layer p); threshold 3.

*1. More twins.* At the library's floor (0.044), scores per draw, T = 8 / 16 / 24 twins:
adaptive s96 (fresh, ASR 96%) 0.2 2.1 1.1 1.3 17.5 0.0 / 1.1 1.3 0.0 / 1.1 0.1;
mlp-mnist s55 (calibration, 95%) 30.7 4.0 3.7 8.9 22.3 18.7 / 5.7 4.3 21.2 / 4.2 15.3;
adaptive s240 (fresh3, 98%) 7.3 3.7 6.3 8.4 27.9 9.7 / 4.4 7.3 12.7 / 5.0 9.2 (the library's own seed-0
draw gave 0.2, seeds 1-3 1.7 / 6.2 / 7.3: fresh3's miss was a bad draw);
adaptive s206 (fresh3) 0.9 11.5 1.9 5.6 2.5 6.1 / 2.2 3.4 3.4 / 2.2 3.7;
Qu-ANTI-zation s200 (fresh3) 5.6 0.5 3.1 3.9 4.3 11.0 / 1.7 3.6 6.3 / 2.1 5.4;
Qu-ANTI-zation s256 (fresh3) 4.2-32.9 / 5.7-26.9 / 7.0 13.6;
**clean s223 W4 per-tensor (fresh3) 4.1 28.5 3.9 22.9 1.4 3.0 / 7.9 7.7 0.4 / 5.5 1.8**: flagged at 4 of 6,
2 of 3, 1 of 2 draws. More twins remove the lucky high draws (8 twins' sample variance is itself noisy:
a draw with quiet twins inflates z, for QCBs and clean models alike), so spreads shrink, but the verdict
converges to where each model really sits: s96 below, s206 and s200 at the threshold, s223 above. More
twins alone do not fix the false positive and cost detections at the current floor. Refitted floor
(`refit`, round 4's rule: smallest floor with no clean calibration audit's 2 x probe p below 1/56, on
the calibration half's 56 clean audits with a pool of 24 twins, first T used): T=8 0.0285 (this draw;
round 4's draw gave 0.0217, so the floor is draw-dependent too), T=16 0.0164, T=24 0.0199; at 2x,
highest clean calibration score 0.20 / 0.25 / 0.20. At 2x, T=24: s96 1.4 0.3, s240 5.5 10.1, s55 4.9 16.2,
s206 2.4 3.9, s200 2.4 6.2, s256 7.6 15.4, s223 6.0 1.9 (T=16: s96 1.8 2.4 0.1, s206 3.5 4.6 3.9, s200
2.2 4.9 9.2, s223 10.0 10.1 0.6). Cost: a probe is T + 2 flip passes (plus the float pass); per pass
0.11-0.21 s for 8x8-digits CNNs/MLPs, 0.29 s mlp-mnist, 0.7 s transformer, 3.2 s SmallCNN (width 8)
on MNIST, 6.3 s SmallCNN (width 16) on Fashion-MNIST. T=24 instead of 8 adds 16 passes: about +3 s
on digits, +51 s on s223 (its audit 32 s -> about 83 s), +100 s on Fashion s142 (x2.5 to x3 of the audit's
time wherever the probe dominates).

*2. Localisation.* (a) As proposed in round 4, each cell scored also against its class's median F over
positions (min of the two z): removes s223 (z 2.4 at every draw) but **breaks detections**: adaptive
QCBs' INT models answer the patch at most positions (s240: class-0 flips 27-91 at all 49 positions,
twins 1-49), so s240 falls to 0.2-0.8 at every draw, fresh2's adaptive s138 6.2 -> 0.0, s58 38.9 -> 6.9,
s134 47.9 -> 8.6, Fashion s142 12.5 -> 4.6 (on round 4's `--twins` counts). Rejected. (b) A no-patch
control instead: the unpatched calibration images round to nearest sends to class c while the float
model does not, f0_c (one extra forward of 128 images), and each cell also scored as
(F - f0_c) / sqrt(f0_c + 1 + (PROBE_FLOOR n)²) (min of the two z). s223's INT model collapses without any
patch (f0 = 59 to class 7 of 128, patched median 60), a QCB's mostly with its trigger (f0 of the target
class 0-14 for the ten digits/MNIST QCBs measured; 34 for Fashion s142, whose INT model already leaks to
its target on clean images). Result: s223 0.2 at all 6 / 3 / 2 draws (every T, library or
refitted floor); every probe-dependent working QCB of the seen sets measured keeps its score or nearly
(one draw of 8: s54 39.6, s58 38.9 -> 28.6, s55 29.1, s138 6.2, s134 47.9 -> 36.1, s96 6.8, s142 12.5 -> 9.2,
s240 7.3 -> 6.4, s200, s206, s256 unchanged; over all draws and T, s240 and s55 lose at most 1.4, except
two high draws of s240, 27.9 -> 17.4 and 16.6 -> 11.4; no draw of a working audit measured crosses the
threshold because of it). Clean scores can only go down (min of two z). Working QCBs flagged by the
layers are unaffected.
Not measured: the other fresh3 audits' unpatched counts (only s223 among its clean ones was probe-
flagged), and a QCB whose INT model also collapses on clean inputs (it would be hidden from the probe; its
benign accuracy would show it).

*3. Pooled twin variance (tried last, after seeing the above: tuned on these models).* Per cell the
twins' variance replaced by phi_c (mean + 1), phi_c the median over positions of var / (mean + 1) for
class c (`p_probe(..., "pooled")`, with the control (b)). Floor refitted by the same rule on the 56 clean
calibration audits (no control there): 0.0330 / 0.0293 / 0.0298 at T = 8 / 16 / 24 (2x: 0.066 / 0.059 /
0.060; highest clean calibration score 0.20). At 2x, per draw, T = 8 / 16 / 24: s96 5.7 9.1 5.4 5.6 22.6
0.4 / 8.6 6.3 5.6 / 7.9 5.7; s240 4.0 2.6 3.8 4.7 9.9 5.8 / 3.7 5.1 7.8 / 3.9 6.9; s206 2.6 9.1 5.7 6.6 4.0
9.3 / 5.5 6.8 6.2 / 5.1 6.4; s200 3.8-17.6 / 7.5-14.1 / 9.3 11.6; s55 13.2-26.2 / 19.3-30.1 / 21.5 26.9;
s256 7.6-19.6 / 10.4-19.6 / 10.9 15.0; s223 0.2 at every draw. So at T >= 16 every one of these working
QCBs is flagged at every draw (s96, the miss of rounds 2-4, included) and the clean s223 never is. On
round 4's `--twins` counts (8 twins, another draw; `pooled /tmp/audit4/twins_counts.jsonl 0.0659 ...`, the
control only where regenerated): calibration working 18/18, clean 0/56 (max 0.20), fresh 15/15, 0/48 (max
0.00), fresh2 8/8, 0/32 (max 0.39), the same as the library's probe. Fresh3's 56 clean audits, rerun with
8 twins and the control (`draws /tmp/audit5/fresh3_clean8.jsonl --pool 8 --seed 21 --only clean-fresh3`,
12 min; then `pooled ... /tmp/audit5/fresh3_clean8.jsonl`): flagged 3/56 (library probe, this draw: 4/56),
the three being LeNet Fashion s227's weight-statistic false positives (layers 3.8 / 9.5 / 3.5, untouched by
the probe); every fresh3 clean total above 1.5 (those three, ResNet s231 W4 per-tensor 1.69) is its
layers' score, not the pooled probe's. The probe's working fresh3
audits at this T=8 draw: s200, s240, s256 flagged, s206 not (2.6), as with the library's probe.

*Recommendation for round 5* (commit before a fresh4 set is trained): (1) the no-patch control (b) in
`_probe` (no new constant; report f0 in the probe dict); (2) the pooled per-class twin variance (3), the
candidate that raises power; (3) T = 16 twins (24 where cheap; a `probe_twins` argument with its
default fixed in advance) and PROBE_FLOOR refitted on the calibration half at that T with the twins drawn
as the library draws them (here 0.0293 -> 0.059 at T=16, 0.0298 -> 0.060 at T=24); re-fit on a second
pool seed to measure the floor's own draw spread (T=8 gave 0.0217 in round 4's draw and 0.0285 here)
before committing. Then re-score the seen sets with the committed code (at T=8 here pooling raised no
clean audit of any seen set over the threshold) before any fresh4 model is trained. More twins alone trade lucky hits for a
stable verdict at the current per-cell variance and do not fix s223. Cost of T = 16: +8 passes, +2 s on
digits, +26 s on MNIST SmallCNNs, +50 s on Fashion ones.

**Round 4: dithered twins.** Stochastic rounding, Q(W + s u), keeps round to nearest's code for a weight
with probability 1 - its distance from it (at least 1/2), so a QCB partly survives in round 3's twins
(Fashion s142: 84 patched images flipped, twins 20; adaptive s96: 17 vs 5). The twins are now
subtractively dithered, Q(W + s u) - s u (`audit._dithered`): an error uniform on (-s/2, s/2), the law of
round to nearest's on a clean model, independent of where a weight sits in its cell. Chosen with both
families' counts (`--twins`: one draw of 8 twins each, same images) on the calibration half and the
already-seen fresh and fresh2 sets (fresh2's s142 at W8 and W4 per-tensor, not firing, were not
counted): `--fit-twins` fitted the floor on the calibration half's 56 clean audits at 0.0217 (stochastic
twins: 0.0133, round 3's value reproduced); the library takes 0.044 (2x, rounded up). At it, with that
draw: working 18/18 (calibration), 15/15 (fresh), 8/8 (fresh2), clean 0/136, highest clean score 0.59
(stochastic twins: 17/18, 14/15, 7/8, highest clean 2.68). A robust null (median and 1.4826 MAD of the
twins) needed a floor of 0.081 and found the same; not taken. `_z_ratio` now serves the drift (tensors)
and the second round's ratios (floats). Constants committed (5720378) before any fresh3 model was trained.

**The twins' draw matters (measured after fresh3 was scored; reference, nothing changed).** Re-audited
with the library's own draws (config seeds 0-5), the adaptive s96 at W4 per-channel scores 0.0-0.6 (probe
z 2.2-3.5: the target class near the trigger, 27-58 flips against twin means of 2-11, but one or two
twins fire too and 8 twins' variance absorbs it): it is still missed, and the 15/15 on fresh above is
that one draw's. Seeds 0-3: adaptive s138 12-18, Qu-ANTI-zation-style s134 11-28, s54 5.5-7.9, adaptive
s58 24-37, Qu-ANTI-zation-style mlp-mnist s55 2.4-31 (missed at one seed of four); seed 0, Fashion s142:
5.3 (flagged). Fresh3 below is scored with the library's draws (seed 0), as a user would see it.

**Fresh3 (round 4, the headline): 46 models, scored once.** 36 recipes (seeds 200-240) plus 10 cheap
digits ones (seeds 250-267) added (4ba905a) while the 36 were being audited, before they were trained,
because the 36 held fewer than 20 working audits; every model was trained after 5720378. New architecture:
LeNet (no BN, average pooling, 5x5 convs; `evalkit.models.LeNet`, the only change outside the audit's
files), on digits, MNIST and Fashion-MNIST; new pairs: SmallCNN on MNIST. Working 29/31 (94%), dormant
21/21 (100%), clean 4/56 (7%). **Neither bar (95% / 5%) is met.** Misses: adaptive SmallCNN on MNIST s216
at W4 per-channel (ASR 93.5%, but the float model already fires, FP32 ASR 79.5% at BA 47%: the probe only
counts flips away from the float prediction; score 0.94), adaptive SmallCNN on digits s240 at W4
per-channel (ASR 97.8%, FP32 22%: target class found, 37 flips vs 4.9, z 3.1; score 0.20). False
positives: (1) SmallCNN (width 8) on MNIST s223 at W4 per-tensor, score 10.3, from the probe: the INT
model collapses (BA 95.4 -> 26.8%, 1232 of 2000 test images to class 7) and sends 56 patched images to
class 7 against 2.2 for the twins. Measured afterwards (reference): its dithered twins lose accuracy too
(BA 61-77% over 4 draws) but each towards other classes: with a 72-weight first conv on a 4-bit
per-tensor grid, round to nearest is one extreme draw whose tail 8 twins do not show (keeping round to
nearest's zero cell in the twins, tried as an explanation, makes it worse: score 20.7). Its class-7 flips
are not positional (48-83 over all patch positions, median 60), unlike a trigger's (adaptive s206: 5-105,
median 26): scoring a cell's excess over its class's median over positions is round 5's first candidate.
Round 3's closest clean audit (Fashion s130 W4 per-tensor, INT BA 56%) was of the same kind. (2) LeNet
on Fashion-MNIST s227 at W8 per-tensor / W4 per-channel / W4 per-tensor, scores 3.5 / 9.1 / 3.2, from the weight statistics (probe z <= 0.8): the out-of-sample
correctability of the first conv (5x5, bias, no BN, mostly-black images: LAC leaves 0.08 of round to
nearest's drift against 0.83 for jittered weights, p 1e-11 at W4 per-channel) and the drift of the
784-fan-in Linear on 256-512 positions (warned as thin). The first round's floors were fitted on BN
models. LeNet elsewhere: clean digits and MNIST 0/16 flagged; its QCBs on 8x8 digits mostly do not fire
(its float BA is 62-85% there); PQBackdoor-style on Fashion-MNIST s211 fires (98%) and is flagged (79).
Qu-ANTI-zation-style s258 at W4 per-channel fires on 89.99999% (the table's 90.0): just under the bar, not
counted (score 2.1, not flagged). Lowest working score flagged: 6.97; highest clean score not flagged: 1.69.

**Over the sets scored once** (fresh with round 2's constants, fresh2 with round 3's, fresh3 with round
4's): working 50/54 (93%), clean 4/136 (3%). Round 5 should try: the positional excess above, more twins
or a robust null (the draw's variance), and the first round's floors checked on no-BN models (or
correctability left out where a layer's inputs are degenerate).

**Round 3: the probe.** After round 2 (below) the weight statistics had missed every QCB trained through
fake quantization. The probe (`audit._probe`) looks at behaviour: the calibration images with a square
patch (side max(2, H/10), at the data maximum) at every position, through the float model, the
round-to-nearest simulator and 8 twins rounded stochastically on the same grid; per (position, class),
the patched images the INT model sends to that class while the float model does not, z against the
twins' mean and variance plus a floor on the flipped share, Bonferroni over positions x classes,
combined with the layers' p (x2). It was written and measured on the calibration half only (same 28
models, re-audited: `audit_calibration3.jsonl`); `--fit` gave the floor 0.013, the library takes 0.027
(2x, the project's rule). Calibration half with it: working 17/18 (94%; 15/18 without), clean 0/56.
Constants committed (9f85820) before the 17 fresh2 models (seeds 130+, including a SmallCNN on
Fashion-MNIST, a pair no other set has) were trained; they were audited once.

**Fresh2 (round 3, the headline).** Working 7/8 (88%), dormant 7/8, clean 0/32. Two of its QCBs are of
the kinds nothing caught before: Qu-ANTI-zation-style smallcnn s134 and adaptive smallcnn s138 at W4
per-channel (ASR 100% / 99%), both flagged by the probe (z 8.3 / 8.2, the right target class, near the
trigger's corner). The miss: the Qu-ANTI-zation-style SmallCNN on Fashion-MNIST (s142, W4 per-channel,
ASR 97%): the probe found its target class at a position near the trigger (84 of 128 patched images
flipped), but its stochastically rounded twins flipped 20 of them too, so z was 2.4: the twin null is
contaminated when a QCB partly survives stochastic rounding. Closest clean audit: SmallCNN on
Fashion-MNIST s130 at W4 per-tensor, score 2.56 (probe z 4.8: 19 images to one class against 0.6), under
the threshold of 3 but not by much: the new pair is where the floor is thinnest. Qu-ANTI-zation-style
s132 and s136 fire at 73% and 88% (not "working"); s132 is flagged (score 9.0), s136 not (1.4).

**Over the sets nobody had looked at when they were scored** (fresh with round 2's constants, fresh2
with round 3's): working 21/23 (91%), clean 0/80. **The 95% bar is not met** on either fresh set, and
both are small: 8 and 15 working audits, most of them PQBackdoor-style and grid-aware.

**Round 2's fresh set re-audited with the probe** (reference: it had been looked at): unchanged, 14/15
working, 0/48 clean. The adaptive s96 (W4 per-channel, ASR 96%) stays missed: the probe's best cell is
its target class, but 17 flips against 5 for the twins (z 1.6). Of the QCBs there that fire below 90%,
Qu-ANTI-zation-style s94 (82%) and adaptive s97 (58%) are now flagged (probe z 9.1 / 6.7, target class).

**Limits of the probe.** It stamps square patches; blended, warped, semantic or input-specific triggers
are not probed, and a patch larger than max(2, H/10) may go unseen. It needs the torch simulator (FX,
PT2E) and image-shaped inputs; elsewhere the report has no probe. It costs 10 forwards of 128 images per
patch position: about 1 minute per audit of a width-16 SmallCNN on 28x28 inputs on one shared core.

**Round 2, order of work.** (1) 24 fresh recipes (seeds 90+) were added and trained with `--train-only`;
nothing was audited. (2) Five QCBs of the kinds the first round missed (Qu-ANTI-zation-style smallcnn
s54/s56 and mlp-mnist s55, adaptive smallcnn s58, grid-aware8 smallcnn s57) were added to the
calibration half, and the whole half re-audited with code computing, besides the first round's three
statistics: two-sided and per-channel drift (Bonferroni over channels), per-channel and fine edge shares
(beyond 0.45 / 0.48 / 0.49 / 0.495 LSB, exact binomial tails), the rounding error's energy in the bottom
10/25/50% of H's eigenbasis, and drift and edges on the other bit width's grid. (3) `--fit` needed no
floor for any of them (no clean calibration audit came near p = 1/56 after the correction). On the
calibration half the working QCBs the first round missed were grid-aware8 at W4 (4 audits) and the
Qu-ANTI-zation-style and adaptive ones (s54, s55, s58 at W4 per-channel). The other grid's statistics
caught the first four by a wide margin (score 100+); so did the fine edge share at 0.48 LSB (a first run
with a normal approximation), less directly. Nothing caught the other three: the closest, fine edges
beyond 0.49 / 0.495 LSB, gave them -log10 p (corrected over layers only) of 0.8-3.7 / 0.5-3.8, against
up to 1.7 / 4.1 for clean audits. So `USED` = (other_drift, other_edges), with the first round's floors
for the same statistics; the rest stay in the report's raw `stats`. (4) Constants committed (b860c67),
then the fresh set was audited once, and the first round's evaluation and held-out sets re-audited with
the same code (their plain-INT figures reused). No constant changed after the fresh set was scored.

**Round 2, bars** (layer statistics only, as scored then). False positives: 0 of 48 fresh clean audits,
0 of 152 clean audits overall (fresh + re-audited evaluation/held-out), no clean p below 0.1: met with
room. Detection: fresh 14/15 (93%) working, 10/11 dormant; fresh + re-audited evaluation/held-out 34/38
(89%) working, 26/30 (87%) dormant. **The 95% bar is not met**, and the fresh figure flatters: its
working QCBs are mostly grid-aware8 (10 of 15), and none of its three Qu-ANTI-zation-style models
reached the 90% ASR that makes a QCB "working" (W4 per-channel ASR 72-82%; all three scored 0-0.7
there). By attack, over every set: PQBackdoor-style and grid-aware QCBs are all flagged at the width
they target and, through the other grid, at the other one; Qu-ANTI-zation-style 0 of 4 working audits,
adaptive 0 of 3 (all before the probe).

**Round 2, what remained.** The misses are exactly the attackers that train through straight-through
fake quantization (Qu-ANTI-zation, and the adaptive attacker built on it). On these models their weights
show no pile-up at the cell edges (pooled over a model, the excess share beyond 0.49 LSB has z 1.2-2.3
for the calibration half's working ones, up to 2.3 for its clean audits), no coordinated drift and no
excess energy in weakly excited directions. A weight statistic against a uniform-in-cell null does not
see them here; a behavioural probe (FP vs INT outputs on perturbed benign inputs against jittered twins)
was the next thing to try: round 3, above.

**Flagged where they do not fire.** PQBackdoor models repaired inside W4 boxes and grid-aware models
show coordinated errors on other grids too: the model was tampered with and the audit says so, though it
cannot tell which grid fires.

**Cost.** The other grid adds one quantization and one quadratic form per layer; the diagnostics add an
eigendecomposition of H per layer. Median 0.5 s per audit on these models (load average 2-3).
""".splitlines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--half", choices=["calibration", "evaluation", "fresh", "fresh2", "fresh3", "fresh4", "fresh5"],
                    default="evaluation",
                    help="evaluation = the evaluation half and the held-out pairs; fresh = the models of issue 13's "
                         "second round, scored once after the constants were committed")
    ap.add_argument("--train-only", action="store_true", help="train (and cache) the models, audit nothing")
    ap.add_argument("--jsonl", nargs="+", default=["/tmp/qcb_audit_bench.jsonl"],
                    help="raw records, appended as they come (the first file; --write-only reads them all)")
    ap.add_argument("--calibration-jsonl", default=str(HERE / "results" / "audit_calibration.jsonl"),
                    help="the calibration half's records, shown beside the evaluation in --out")
    ap.add_argument("--cache", default="/tmp/qcb_audit_models", help="trained models (state dicts)")
    ap.add_argument("--only", nargs="+", help="only recipes whose names contain one of these, in this order")
    ap.add_argument("--reverse", action="store_true", help="go through the recipes from the last one")
    ap.add_argument("--shared", nargs="+", metavar="JSONL", help="skip models another process has recorded there")
    ap.add_argument("--reuse", nargs="+", metavar="JSONL", help="take plain-INT BA/ASR from these records")
    ap.add_argument("--fit", metavar="JSONL", help="fit the overdispersion floors on a calibration JSONL and exit")
    ap.add_argument("--twins", metavar="OUT", help="round 4: the probe's counts for both twin families on the audits "
                    "of --jsonl (their model, setting and N), appended to OUT")
    ap.add_argument("--rescore", nargs=3, metavar=("COUNTS", "SRC", "DST"), help="round 4, reference: SRC's records "
                    "with the probe from --twins' dithered counts, written to DST")
    ap.add_argument("--fit-twins", metavar="COUNTS", help="round 4: fit and compare the twin families from --twins' "
                    "counts, the layers' p from --jsonl")
    ap.add_argument("--no-probe", action="store_true", help="audit with the weight statistics only (records to refit "
                    "their floors: --fit)")
    ap.add_argument("--probe-draws", metavar="OUT", help="round 5: the library's probe, with raw counts, rerun on the "
                    "audits of --jsonl with twin seed --seed, appended to OUT")
    ap.add_argument("--seed", type=int, default=0, help="with --probe-draws: the config seed the twins are drawn from")
    ap.add_argument("--fit-probe", nargs="+", metavar="DRAWS", help="round 5: fit the probe floor on --probe-draws "
                    "files (one twin seed each) and score them at twice the largest fit")
    ap.add_argument("--used", nargs="+",
                    help="with --fit: the second-round statistics to combine (default: the library's)")
    ap.add_argument("--out", help="write the result markdown from --jsonl (after the run)")
    ap.add_argument("--write-only", action="store_true", help="only write --out from --jsonl")
    ap.add_argument("--sets", nargs="+", metavar="LABEL=JSONL[,JSONL...]",
                    help="with --write-only: write the later rounds' result file from these record sets (several "
                         "files, comma-separated, make one set)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.twins:
        return twin_counts(args.twins, args.jsonl, Path(args.cache))
    if args.rescore:
        return rescore(*args.rescore)
    if args.fit_twins:
        return fit_twins(args.fit_twins, args.jsonl)
    if args.probe_draws:
        return probe_draws(args.probe_draws, args.jsonl, args.seed, Path(args.cache))
    if args.fit_probe:
        return fit_probe(*args.fit_probe)
    if args.fit:
        fit(args.fit)
        return fit_second(args.fit, tuple(args.used or audit_mod.USED))
    if not args.write_only:
        run(args)
    if args.out:
        (write_rounds if args.sets else write)(args)


if __name__ == "__main__":
    main()
