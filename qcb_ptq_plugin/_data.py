"""Calibration data in any common shape -> a list of float batches, validated once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = ["as_batches", "range_mismatch"]

#: calibration ranges this many times wider or narrower than the observers' are suspicious
RANGE_FACTOR = 4.0


def _sample_tensor(item) -> torch.Tensor:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]  # (x, y) from a labelled DataLoader: the method is label-free
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if isinstance(item, Mapping):
        raise TypeError("calibration batches are dicts; pass the model's input tensor (or (x, y) tuples) instead")
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"calibration data yielded a {type(item).__name__}; expected Tensors, arrays or (x, y) tuples")
    return item


def as_batches(data, batch_size: int, num_samples: int | None = None) -> list[torch.Tensor]:
    """Accepts a Tensor/array of samples, an iterable of batches, or a DataLoader of x or (x, y)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        chunks = [_sample_tensor(data)]
    elif isinstance(data, Iterable):
        chunks = []
        for item in data:
            chunks.append(_sample_tensor(item))
            if num_samples is not None and sum(c.shape[0] if c.dim() else 1 for c in chunks) >= num_samples:
                break
    else:
        raise TypeError(f"calibration data of type {type(data).__name__} is not supported; "
                        "pass a Tensor, a list of Tensors or a DataLoader")
    if not chunks or all(c.numel() == 0 for c in chunks):
        raise ValueError("calibration data is empty; pass the (unlabelled) samples you calibrated the observers with")
    shapes = {tuple(c.shape[1:]) for c in chunks if c.dim()}
    if len(shapes) != 1 or any(c.dim() == 0 for c in chunks):
        raise ValueError(f"calibration batches have different sample shapes {sorted(shapes)}; "
                         "every batch must be (batch, *input_shape) with the same input_shape")
    x = torch.cat(chunks)
    if num_samples is not None:
        x = x[:num_samples]
    if not x.is_floating_point():
        raise TypeError(f"calibration data has dtype {x.dtype}; convert it to the float inputs the model takes "
                        "(e.g. x.float() / 255 with your normalisation)")
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(f"calibration data contains {bad} NaN/Inf values; clean or drop those samples")
    return list(x.float().split(batch_size))


def range_mismatch(batches: list[torch.Tensor], observed: tuple[float, float] | None,
                   factor: float = RANGE_FACTOR) -> str | None:
    """A warning when the calibration data's range differs from the range the input observer
    recorded by more than ``factor`` (e.g. images in 0..255 after observers saw 0..1), else None.

    LAC fits the integers to the data it is given; on data unlike what set the activation scales,
    it fits the wrong distribution (98.99% -> 8.65% accuracy on MNIST images x1000).
    """
    if observed is None:
        return None
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    span_data, span_obs = hi - lo, observed[1] - observed[0]
    if span_obs <= 0 or span_data <= 0:
        return None
    ratio = span_data / span_obs
    if 1 / factor <= ratio <= factor:
        return None
    return (f"calibration data spans [{lo:.4g}, {hi:.4g}] but the observers recorded [{observed[0]:.4g}, "
            f"{observed[1]:.4g}] at the model input ({ratio:.4g}x); purify with the data you calibrated with "
            "(same preprocessing), or the result fits the wrong distribution")
