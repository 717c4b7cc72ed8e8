"""What the ONNX pipelines share: purify a QDQ model a pipeline wrote, on that pipeline's weight grid.

NNCF's ONNX backend and Olive's ``OnnxStaticQuantization`` both hand back a QDQ ``ModelProto``
with integer weight initializers, i.e. what :mod:`qcb_ptq_plugin.adapters.ort` handles: each
Conv/Gemm/MatMul is a unit on the pipeline's own scales, I^fp comes from the FP32 model (matched
by node name) and the chosen integers overwrite the pipeline's initializers in place.
"""

from __future__ import annotations

from qcb_ptq_plugin import _pass
from qcb_ptq_plugin.config import MethodConfig
from qcb_ptq_plugin.methods import get_method
from qcb_ptq_plugin.onnx._feeds import first_samples
from qcb_ptq_plugin.report import PurifyReport


def purify_qdq(model, quantized_model, feeds: list[dict], weight_range: tuple[int, int], config: MethodConfig | None,
               method: str, overrides: dict, mode: str, hint: str) -> PurifyReport:
    """Purify ``quantized_model`` (a QDQ ``onnx.ModelProto``) in place against the FP32 ``model``.

    ``feeds``: checked calibration feed dicts (the config's ``num_samples`` keeps the first ones); ``weight_range``: (qmin, qmax) of the weight integers;
    ``hint``: what to pass instead when no unit is found.
    """
    from qcb_ptq_plugin.adapters import ort

    m = get_method(method)
    cfg = m.config(config, **overrides)
    plan = ort.plan(model, quantized_model, *weight_range)
    if not plan.units:
        raise ValueError(f"no Conv/Gemm/MatMul with integer weights found that matches a node of the FP32 model "
                         f"by name: {hint}")
    return _pass.run_plan(plan, first_samples(feeds, cfg.num_samples), m, cfg, mode)
