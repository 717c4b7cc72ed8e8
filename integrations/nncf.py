"""OpenVINO NNCF: purify what ``nncf.quantize`` returns, one call after it (ONNX backend).

NNCF has no plugin registry for calibration passes, so the pass runs on its result::

    import nncf
    from qcb_ptq_plugin.integrations import nncf as qcb_nncf

    dataset = nncf.Dataset(calib_batches, lambda b: {"input": b})
    int8 = nncf.quantize(fp32_onnx, dataset)                       # QDQ ModelProto, INT8 weight initializers
    report = qcb_nncf.purify_onnx(fp32_onnx, int8, dataset)         # the one line: int8 is purified in place
    onnx.save(int8, "model.int8.onnx")                              # or convert it with OpenVINO

NNCF's ONNX result is a QDQ model with integer weight initializers, i.e. what
:mod:`qcb_ptq_plugin.adapters.ort` already handles: each Conv/Gemm/MatMul is a unit on NNCF's own
weight grid (its scales, symmetric narrow range -127..127), I^fp comes from the FP32 model and
the chosen integers overwrite NNCF's initializers. Scales are unchanged, so NNCF's fast bias
correction and any later conversion keep the integers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from qcb_ptq_plugin import _pass
from qcb_ptq_plugin.config import MethodConfig
from qcb_ptq_plugin.methods import DEFAULT_METHOD, get_method
from qcb_ptq_plugin.report import PurifyReport

log = logging.getLogger(__name__)

__all__ = ["purify_onnx", "WEIGHT_RANGE"]

#: NNCF's weight integers: symmetric, narrow range (levels 255 at 8 bits; its HW configs allow 8 bits only)
WEIGHT_RANGE = (-127, 127)


def _feeds(dataset, model) -> list[dict[str, np.ndarray]]:
    """Feed dicts from an ``nncf.Dataset`` (its transform's output) or any iterable of feeds/arrays."""
    from qcb_ptq_plugin.onnx._static import _graph_inputs, _read_feeds, _Replay

    items = dataset.get_inference_data() if hasattr(dataset, "get_inference_data") else dataset
    names = list(_graph_inputs(model))
    feeds = []
    for item in items:
        if isinstance(item, Mapping):
            feeds.append({k: np.asarray(v, dtype=np.float32) for k, v in item.items()})
        elif len(names) == 1:
            feeds.append({names[0]: np.asarray(item, dtype=np.float32)})
        else:
            raise TypeError(f"the dataset yields a {type(item).__name__} but the model takes inputs {names}; "
                            "give nncf.Dataset a transform that returns {input_name: array}")
    if not feeds:
        raise ValueError("the calibration dataset is empty; pass the nncf.Dataset given to nncf.quantize")
    return _read_feeds(_Replay(feeds), model)  # names, shapes, NaN/Inf and dtypes checked as in quantize_static


def purify_onnx(model, quantized_model, calibration_dataset, config: MethodConfig | None = None, *,
                method: str = DEFAULT_METHOD, **overrides) -> PurifyReport:
    """Purify ``quantized_model`` (what ``nncf.quantize(model, calibration_dataset)`` returned) in place.

    Args:
        model: the FP32 ``onnx.ModelProto`` given to ``nncf.quantize`` (never modified).
        quantized_model: its result; its integer weight initializers are rewritten.
        calibration_dataset: the ``nncf.Dataset`` given to ``nncf.quantize`` (or feed dicts).
        config, method, overrides: as for :func:`qcb_ptq_plugin.purify`.
    """
    import onnx

    from qcb_ptq_plugin.adapters import ort

    if not isinstance(model, onnx.ModelProto) or not isinstance(quantized_model, onnx.ModelProto):
        raise TypeError("purify_onnx takes the FP32 and the quantized onnx.ModelProto of NNCF's ONNX backend, got "
                        f"{type(model).__name__} and {type(quantized_model).__name__}")
    m = get_method(method)
    cfg = m.config(config, **overrides)
    feeds = _feeds(calibration_dataset, model)
    plan = ort.plan(model, quantized_model, *WEIGHT_RANGE)
    if not plan.units:
        raise ValueError("no Conv/Gemm/MatMul with integer weights found: pass the model nncf.quantize returned "
                         "and the FP32 model it was given")
    return _pass.run_plan(plan, feeds, m, cfg, "nncf-onnx")
