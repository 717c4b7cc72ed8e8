"""Calibration feeds for the ONNX flows: load a model safely, read and check a reader's feed dicts.

Shared by :func:`qcb_ptq_plugin.onnx.quantize_static`, the CLI and the NNCF / Olive integrations.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["Replay", "first_samples", "graph_inputs", "load_model", "read_feeds"]

_ELEM = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
         11: np.float64}


class Replay:
    """A CalibrationDataReader over feeds we already hold (ORT's readers work only once)."""

    def __init__(self, feeds: list[dict]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def load_model(model_input):
    """A private copy of an ONNX model given as a ModelProto or a path, with a clear error if it is not one."""
    import onnx

    if isinstance(model_input, onnx.ModelProto):
        return copy.deepcopy(model_input)
    path = Path(model_input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}: {e}); pass an FP32 .onnx file") from e
    if not model.graph.node:
        raise ValueError(f"{path} is not an ONNX model (its graph has no nodes); pass an FP32 .onnx file")
    return model


def graph_inputs(model) -> dict[str, tuple[np.dtype, list]]:
    """{name: (numpy dtype, dims with None where dynamic)} of the graph's inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[i.name] = (np.dtype(_ELEM.get(t.elem_type, np.float32)), dims)
    return out


def read_feeds(reader, model) -> list[dict[str, np.ndarray]]:
    """Every feed of an ORT ``CalibrationDataReader``, checked against the model's inputs (names, shapes,
    NaN/Inf) and cast to their dtypes."""
    if not hasattr(reader, "get_next"):
        raise TypeError(f"calibration_data_reader must be an onnxruntime CalibrationDataReader (with get_next()), "
                        f"got {type(reader).__name__}")
    expected = graph_inputs(model)
    feeds = []
    while (feed := reader.get_next()) is not None:
        if not isinstance(feed, Mapping):
            raise TypeError(f"the reader's get_next() returned a {type(feed).__name__}; it must return "
                            "{input_name: array} dicts and None at the end")
        if set(feed) != set(expected):
            raise ValueError(f"the reader yields inputs {sorted(feed)} but the model takes {sorted(expected)}")
        checked = {}
        for name, arr in feed.items():
            arr = np.asarray(arr)
            dtype, dims = expected[name]
            if arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, arr.shape)):
                raise ValueError(f"input '{name}' has shape {arr.shape} but the model expects "
                                 f"{['?' if d is None else d for d in dims]}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise ValueError(f"input '{name}' contains NaN/Inf values; clean or drop those samples")
            checked[name] = arr.astype(dtype, copy=False)
        feeds.append(checked)
    if not feeds:
        raise ValueError("the calibration data reader yielded no data; it must return at least one feed dict")
    return feeds


def first_samples(feeds: list[dict[str, np.ndarray]], num_samples: int | None) -> list[dict[str, np.ndarray]]:
    """The feeds cut to their first ``num_samples`` samples (the config's ``num_samples``; None: all).
    The reader's batching is kept: ORT's flows purify on the batches the reader yields."""
    if num_samples is None:
        return feeds
    out, n = [], 0
    for feed in feeds:
        if n >= num_samples:
            break
        take = num_samples - n
        cut = {k: v[:take] for k, v in feed.items()}
        out.append(cut)
        n += len(next(iter(cut.values())))
    return out
