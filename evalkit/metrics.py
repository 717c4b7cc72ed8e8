"""Benign accuracy, attack success rate and defense effectiveness rating (as in the paper)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["predict", "benign_accuracy", "attack_success_rate", "der"]


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 labels of any callable returning logits (torch module, INT8 module, ORT wrapper)."""
    return torch.cat([torch.as_tensor(model(xb)).argmax(-1) for xb in x.split(batch_size)])


def benign_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of clean samples classified correctly."""
    return (predict(model, x) == y).float().mean().item()


def attack_success_rate(model, x: torch.Tensor, y: torch.Tensor, trigger, target: int) -> float:
    """Fraction of triggered samples classified as ``target``, excluding samples of class ``target``."""
    keep = y != target
    if not keep.any():
        raise ValueError(f"every sample has the target label {target}; ASR is undefined")
    return (predict(model, trigger(x[keep])) == target).float().mean().item()


def der(asr_before: float, asr_after: float, ba_before: float, ba_after: float) -> float:
    """DER = [max(0, ΔASR) - max(0, ΔBA) + 1] / 2, Δ = drop after defense (rates in [0, 1])."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ba_before - ba_after) + 1) / 2
