"""``qcb_ptq_plugin.quantize_``: torchao's ``quantize_`` with purification inside, one line.

>>> qcb_ptq_plugin.quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), calib)

torchao is imported when the function is called, not when the package is.
"""

from __future__ import annotations

import logging

from torch import nn

from . import _pass
from ._data import as_batches, device_of
from .api import frozen_float_copy
from .config import MethodConfig
from .methods import DEFAULT_METHOD, get_method
from .report import PurifyReport

log = logging.getLogger(__name__)

__all__ = ["quantize_"]


def quantize_(model: nn.Module, config, calib_data, filter_fn=None, *, method: str = DEFAULT_METHOD,
              purify_config: MethodConfig | None = None, **overrides) -> PurifyReport:
    """Quantize ``model`` in place exactly like ``torchao.quantization.quantize_(model, config)``,
    with each Linear's integers chosen by a purification method instead of round-to-nearest.

    A frozen copy of the float model is taken first (the purification target); torchao's own
    grid is read from a quantized copy; the method runs layer by layer on ``calib_data``; then
    torchao quantizes the purified weights and the integers are read back.

    Args:
        model: float model with ``nn.Linear`` layers; modified in place, as torchao does.
        config: a torchao config: ``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig`` (e.g. int4,
            ``PerGroup(32)``), ``Int8DynamicActivationInt8WeightConfig`` or
            ``Int8DynamicActivationIntxWeightConfig``. Others raise ``NotImplementedError`` naming
            the problem and the config to use instead (``Int4WeightOnlyConfig`` needs the ``mslk``
            kernel library; FP8 configs store floats). NF4 (``torchao.quantization.to_nf4``) is not
            a ``quantize_`` config and is not covered: a 16-value non-uniform codebook, not the
            uniform integer grid s (q - z) the methods choose integers on.
        calib_data: unlabelled model inputs: a Tensor ``(N, ...)`` (float, or token ids for a
            language model), a list of batches or a DataLoader.
        filter_fn: torchao's ``filter_fn(module, fqn)``; default: every ``nn.Linear``.
        method: a registered method (:func:`qcb_ptq_plugin.available_methods`), as in ``purify``.
        purify_config: the method's config; keyword ``overrides`` replace its fields.

    Returns:
        A :class:`PurifyReport`; ``report.codes[name]`` equals ``model.<name>.weight.qdata``.
    """
    from .adapters import torchao_quantize  # torchao only now

    torchao_quantize.check_config(config)
    m = get_method(method)
    cfg = m.config(purify_config, **overrides)
    # float samples, or token ids for a language model; moved where the model is
    batches = as_batches(calib_data, cfg.batch_size, cfg.num_samples, device=device_of(model), allow_int=True)
    fp = frozen_float_copy(model, batches[0])
    plan, stats = torchao_quantize.plan(model, fp, batches[0], config, filter_fn)
    report = _pass.run_plan(plan, batches, m, cfg, f"torchao.quantize_({type(config).__name__})")
    report.config = {**report.config, "torchao_reproduced": stats["reproduced"], "torchao_pinned": stats["pinned"]}
    return report
