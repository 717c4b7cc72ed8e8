"""FP32 ONNX -> purified INT8 ONNX: onnxruntime's ``quantize_static`` with purification inside.

1. ORT quantizes the model as usual (its calibration, its QDQ layout, its weight grid).
2. The onnxruntime adapter (:mod:`qcb_ptq_plugin.adapters.ort`) turns each Conv/Gemm/MatMul
   with a constant weight into a unit on ORT's own grid.
3. The method (default LAC+PDA) picks integers; they overwrite ORT's integer weight
   initializers. Scales are unchanged, so ORT's int32 bias stays exact.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .. import _pass
from .._io import atomic_output, check_output
from ..config import MethodConfig
from ..methods import DEFAULT_METHOD, get_method
from ..report import PurifyReport
from ._feeds import Replay, first_samples, load_model, read_feeds
from ._ort import _require, session

log = logging.getLogger(__name__)

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
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from ..adapters import ort

    quant_format = QuantFormat.QDQ if quant_format is None else quant_format
    activation_type = QuantType.QInt8 if activation_type is None else activation_type
    weight_type = QuantType.QInt8 if weight_type is None else weight_type
    if quant_format != QuantFormat.QDQ:
        raise NotImplementedError("purification writes QDQ models; pass quant_format=QuantFormat.QDQ "
                                  "(ORT runs QDQ models with the same integer kernels)")
    m = get_method(method)
    cfg = m.config(purify_config)
    check_output(model_output, "model_output")  # before any work
    fp = load_model(model_input)
    feeds = read_feeds(calibration_data_reader, fp)

    with tempfile.TemporaryDirectory() as tmp:  # ORT writes helper files next to its inputs
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp, str(src))
        ort_quantize_static(str(src), str(dst), Replay(feeds), quant_format=quant_format,
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
    report = _pass.run_plan(plan, first_samples(feeds, cfg.num_samples), m, cfg, "onnxruntime")
    with atomic_output(model_output, "model_output") as tmp:
        onnx.save(qmodel, str(tmp))
        session(str(tmp))  # onnxruntime accepts the written file before it replaces anything
    return report
