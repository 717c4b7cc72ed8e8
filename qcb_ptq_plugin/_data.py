"""Calibration data in any common shape -> a list of float batches, validated once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = ["as_batches", "device_of", "range_mismatch"]

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


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter or buffer lives (CPU for a model with neither)."""
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def as_batches(data, batch_size: int, num_samples: int | None = None, device=None,
               allow_int: bool = False) -> list[torch.Tensor]:
    """Accepts a Tensor/array of samples, an iterable of batches, or a DataLoader of x or (x, y).

    Streamed: each item is checked and cut into ``batch_size`` batches as it arrives (moved to
    ``device`` on the way), so the set is never concatenated into one tensor; only a partial
    batch waits for the next item. The batches equal ``torch.cat(items).split(batch_size)``.
    Samples must be floating point unless ``allow_int`` (token ids of a language model).
    """
    if isinstance(data, (torch.Tensor, np.ndarray)):
        items: Iterable = [_sample_tensor(data)]
    elif isinstance(data, Iterable):
        items = data
    else:
        raise TypeError(f"calibration data of type {type(data).__name__} is not supported; "
                        "pass a Tensor, a list of Tensors or a DataLoader")
    batches: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []  # samples of the batch being filled
    shapes: set = set()
    n = n_pending = 0
    for item in items:
        c = _sample_tensor(item)
        if c.dim() == 0:
            raise ValueError("calibration data contains a scalar; pass samples shaped (N, *input_shape) "
                             "or batches shaped (batch, *input_shape)")
        shapes.add(tuple(c.shape[1:]))
        if len(shapes) != 1:
            raise ValueError(f"calibration batches have different sample shapes {sorted(shapes)}; "
                             "every batch must be (batch, *input_shape) with the same input_shape")
        if num_samples is not None:
            c = c[: num_samples - n]
        if c.numel() and not c.is_floating_point() and not allow_int:
            raise TypeError(f"calibration data has dtype {c.dtype}; convert it to the float inputs the model takes "
                            "(e.g. x.float() / 255 with your normalisation)")
        bad = (~torch.isfinite(c)).sum().item() if c.numel() else 0
        if bad:
            raise ValueError(f"calibration data contains {bad} NaN/Inf values; clean or drop those samples")
        n += c.shape[0]
        while c.shape[0]:
            take = c[: batch_size - n_pending]
            c = c[take.shape[0] :]
            pending.append(take)
            n_pending += take.shape[0]
            if n_pending == batch_size:
                batches.append(_batch(pending, device))
                pending, n_pending = [], 0
        if num_samples is not None and n >= num_samples:
            break
    if pending:
        batches.append(_batch(pending, device))
    if not batches:
        raise ValueError("calibration data is empty; pass the (unlabelled) samples you calibrated the observers with")
    return batches


def _batch(parts: list[torch.Tensor], device) -> torch.Tensor:
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    return x.to(device=device, dtype=torch.float32 if x.is_floating_point() else x.dtype)  # token ids stay ints


def range_mismatch(batches: list[torch.Tensor], observed: tuple[float, float] | None,
                   factor: float = RANGE_FACTOR) -> str | None:
    """A warning when the calibration data's range differs from the range the input observer
    recorded by more than ``factor`` (e.g. images in 0..255 after observers saw 0..1), else None.

    LAC fits the integers to the data it is given; on data unlike what set the activation scales,
    it fits the wrong distribution (98.99% -> 8.65% accuracy on MNIST images x1000).
    """
    if observed is None:
        return None
    # ONNX feeds are {input name: array}; adapters read a range only for single-input models
    values = [next(iter(b.values())) if isinstance(b, dict) else b for b in batches]
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    span_data, span_obs = hi - lo, observed[1] - observed[0]
    if span_obs <= 0 or span_data <= 0:
        return None
    ratio = span_data / span_obs
    if 1 / factor <= ratio <= factor:
        return None
    return (f"calibration data spans [{lo:.4g}, {hi:.4g}] but the observers recorded [{observed[0]:.4g}, "
            f"{observed[1]:.4g}] at the model input ({ratio:.4g}x); purify with the data you calibrated with "
            "(same preprocessing), or the result fits the wrong distribution")
