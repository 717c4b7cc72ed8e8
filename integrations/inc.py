"""Intel Neural Compressor 3.x on CPU: ``prepare`` -> calibrate -> ``purify`` -> ``convert``.

INC's static INT8 flow on CPU is torchao PT2E underneath (``prepare`` calls ``prepare_pt2e`` with
an X86 inductor quantizer, ``convert`` calls ``convert_pt2e``), so the one line is the same as for
PT2E and :mod:`qcb_ptq_plugin.adapters.pt2e` does the work::

    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    exported = export(model, example_inputs=(x,))
    prepared = prepare(exported, StaticQuantConfig())
    for xb in calib: prepared(xb)
    qcb_ptq_plugin.purify(prepared, model, calib)      # the one line
    int8 = convert(prepared)

:func:`quantize` runs exactly these steps. INC's static config maps weights to int8 only
(``w_dtype`` "int8"/"uint8", grid absmax/127.5 on -128..127, torch x86's).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import qcb_ptq_plugin
from qcb_ptq_plugin._data import as_batches, device_of
from qcb_ptq_plugin.config import MethodConfig
from qcb_ptq_plugin.report import PurifyReport

__all__ = ["quantize"]


def quantize(model: nn.Module, calib, quant_config=None, purify_config: MethodConfig | None = None,
             dynamic_batch: bool = True, **purify_kwargs) -> tuple[nn.Module, PurifyReport]:
    """INC's static PT2E quantization of ``model`` with purification between calibration and convert.

    Args:
        model: the float model (not modified).
        calib: calibration samples (a Tensor, a list of batches or a DataLoader of x / (x, y)).
        quant_config: an INC ``StaticQuantConfig`` (default: INC's default static INT8 config).
        purify_config, purify_kwargs: passed to :func:`qcb_ptq_plugin.purify`.
        dynamic_batch: export with a dynamic batch dimension.

    Returns:
        (the converted INT8 model, the purify report).
    """
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    batches = as_batches(calib, 64, device=device_of(model))
    float_model = copy.deepcopy(model).eval()
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    exported = export(copy.deepcopy(float_model), example_inputs=(batches[0],), dynamic_shapes=dynamic)
    prepared = prepare(exported, quant_config or StaticQuantConfig())
    with torch.no_grad():
        for xb in batches:
            prepared(xb)
    report = qcb_ptq_plugin.purify(prepared, float_model, batches, purify_config, **purify_kwargs)
    return convert(prepared), report
