"""Toolchain adapters: turn a calibrated model into :class:`~qcb_ptq_plugin.units.Unit` objects
plus a simulator, and write the chosen integers back so that convert keeps them.

Each torch adapter module exposes ``matches(prepared) -> bool``, ``mode_of(prepared) -> str`` and
``plan(prepared, float_model, example) -> Plan``, built in three steps: discover (units, grids,
float twins), simulate (a frozen copy to read unit inputs from), commit (write + pin); the first
that matches wins. :mod:`.ort` does the same for onnxruntime models, used by
:func:`qcb_ptq_plugin.onnx.quantize_static`.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from . import pt2e, torch_ao
from ._common import Plan

__all__ = ["Plan", "detect"]

_ADAPTERS: tuple[ModuleType, ...] = (pt2e, torch_ao)


def detect(prepared: nn.Module) -> ModuleType:
    """The adapter for ``prepared``, or a ValueError saying what step is missing."""
    if not isinstance(prepared, nn.Module):
        raise TypeError(f"purify expects the prepared torch model, got {type(prepared).__name__}; "
                        "for ONNX files use qcb_ptq_plugin.onnx.quantize_static")
    for adapter in _ADAPTERS:
        if adapter.matches(prepared):
            return adapter
    raise ValueError(
        "the model has no quantization observers: it is not a prepared model (or it is already converted). "
        "Call prepare_fx(model, qconfig_mapping, example_inputs) / prepare(model) / prepare_pt2e(exported, "
        "quantizer), run calibration, then purify, then convert")
