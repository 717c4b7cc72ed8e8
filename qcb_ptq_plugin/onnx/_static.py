"""FP32 ONNX -> purified INT8 ONNX: onnxruntime's ``quantize_static`` with purification inside.

1. ORT quantizes the model as usual (its calibration, its QDQ layout, its weight grid).
2. The onnxruntime adapter (:mod:`qcb_ptq_plugin.adapters.ort`) turns each Conv/Gemm/MatMul
   with a constant weight into a unit on ORT's own grid.
3. The method (default LAC+PDA) picks integers; they overwrite ORT's integer weight
   initializers. Scales are unchanged, so ORT's int32 bias stays exact.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import _pass
from ..config import MethodConfig
from ..methods import DEFAULT_METHOD, get_method
from ..report import PurifyReport
from .._io import atomic_output, check_output
from ._ort import _require, session

log = logging.getLogger(__name__)

_ELEM = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
         11: np.float64}


class _Replay:
    """A CalibrationDataReader over feeds we already hold (ORT's readers work only once)."""

    def __init__(self, feeds: list[dict]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _load(model_input):
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


def _graph_inputs(model) -> dict[str, tuple[np.dtype, list]]:
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[i.name] = (np.dtype(_ELEM.get(t.elem_type, np.float32)), dims)
    return out


def _read_feeds(reader, model) -> list[dict[str, np.ndarray]]:
    if not hasattr(reader, "get_next"):
        raise TypeError(f"calibration_data_reader must be an onnxruntime CalibrationDataReader (with get_next()), "
                        f"got {type(reader).__name__}")
    expected = _graph_inputs(model)
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


def _weight_qrange(weight_type, reduce_range: bool, extra_options: dict | None) -> tuple[int, int]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    signed = weight_type in (QuantType.QInt8, QuantType.QInt16, QuantType.QInt4)
    symmetric = (extra_options or {}).get("WeightSymmetric", signed)
    qmin, qmax = get_qmin_qmax_for_qType(weight_type.tensor_type, reduce_range=reduce_range, symmetric=symmetric)
    return int(qmin), int(qmax)


def quantize_static(model_input, model_output, calibration_data_reader, quant_format=None, op_types_to_quantize=None,
                    per_channel: bool = False, reduce_range: bool = False, activation_type=None, weight_type=None,
                    nodes_to_quantize=None, nodes_to_exclude=None, extra_options: dict | None = None, *,
                    purify_config: MethodConfig | None = None, method: str = DEFAULT_METHOD,
                    **ort_kwargs) -> PurifyReport:
    """``onnxruntime.quantization.quantize_static`` with purification; same arguments and defaults.

    The quantized file at ``model_output`` is what ORT would have written, except that the
    integer weights of every Conv/Gemm/MatMul with a constant weight are chosen by ``method``
    (default LAC+PDA; PDA only where a BatchNormalization node follows in the FP32 graph) with
    ``purify_config`` (the method's config). Only the QDQ format is supported. Returns the
    :class:`~qcb_ptq_plugin.PurifyReport`.
    """
    _require()
    import onnx

    from ..adapters import ort
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    quant_format = QuantFormat.QDQ if quant_format is None else quant_format
    activation_type = QuantType.QInt8 if activation_type is None else activation_type
    weight_type = QuantType.QInt8 if weight_type is None else weight_type
    if quant_format != QuantFormat.QDQ:
        raise NotImplementedError("purification writes QDQ models; pass quant_format=QuantFormat.QDQ "
                                  "(ORT runs QDQ models with the same integer kernels)")
    m = get_method(method)
    cfg = m.config(purify_config)
    check_output(model_output, "model_output")  # before any work
    fp = _load(model_input)
    feeds = _read_feeds(calibration_data_reader, fp)

    with tempfile.TemporaryDirectory() as tmp:  # ORT writes helper files next to its inputs
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp, str(src))
        ort_quantize_static(str(src), str(dst), _Replay(feeds), quant_format=quant_format,
                            op_types_to_quantize=op_types_to_quantize, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=activation_type, weight_type=weight_type,
                            nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                            extra_options=extra_options, **ort_kwargs)
        qmodel = onnx.load(str(dst))

    qmin, qmax = _weight_qrange(weight_type, reduce_range, extra_options)
    plan = ort.plan(fp, qmodel, qmin, qmax)
    if not plan.units and not plan.unsupported:
        raise ValueError("the model has no Conv/Gemm/MatMul with a constant weight that ORT quantized; "
                         "nothing to purify (check op_types_to_quantize / nodes_to_exclude)")
    report = _pass.run_plan(plan, feeds, m, cfg, "onnxruntime")
    with atomic_output(model_output, "model_output") as tmp:
        onnx.save(qmodel, str(tmp))
        session(str(tmp))  # onnxruntime accepts the written file before it replaces anything
    return report
