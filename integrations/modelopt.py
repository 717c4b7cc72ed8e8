"""NVIDIA ModelOpt: purification as a calibration algorithm of ``mtq.quantize``.

Importing this module registers the algorithm ``"qcb_purify"`` in ModelOpt's calibration
registry; select it like ``"max"`` or ``"awq_lite"``::

    import modelopt.torch.quantization as mtq
    from qcb_ptq_plugin.integrations import modelopt as qcb_modelopt   # registers "qcb_purify"

    model = mtq.quantize(model, {**mtq.INT8_DEFAULT_CFG, "algorithm": "qcb_purify"}, forward_loop)
    print(qcb_modelopt.report(model))                                  # the PurifyReport
    torch.onnx.export(model, ...)                                      # carries the purified integers

The algorithm runs ModelOpt's own ``max`` calibration first (weight and activation amax), then
the pass (default LAC+PDA) on the grid those frozen amax define, and writes W = s*q into the
layers, so every later consumer (fake-quant forward, ONNX export, TensorRT) rounds back to q.

The adapter is here rather than in ``qcb_ptq_plugin/adapters/`` because a ModelOpt model with
frozen amax only exists inside ``mtq.quantize``, where this algorithm runs: ``purify()`` never
has to recognise one, and the pass keeps importing no toolchain. Its three steps:

* discover: each quantized Conv1d/Conv2d/Linear (a module with an enabled integer
  ``weight_quantizer``), with grid s = amax / maxbound, range [-maxbound - 1 or -maxbound, maxbound]
  (ModelOpt's ``_tensor_quant``: round(W * maxbound / amax)); ModelOpt does not fold BN, so a
  BatchNorm that follows the layer stays in float and PDA reads it;
* simulate: the model itself with its quantizers on; a unit's input I is the layer's input after
  its ``input_quantizer``, I^fp the same point in a copy with every quantizer disabled;
* commit: W = s * q into each layer. The amax buffers are not touched, so the grid stays frozen
  (re-running ``max`` calibration afterwards would recompute amax from the new weights).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Literal

import torch
from torch import nn

from qcb_ptq_plugin import _pass
from qcb_ptq_plugin._data import as_batches, device_of
from qcb_ptq_plugin.adapters._capture import ModuleCapture
from qcb_ptq_plugin.adapters._common import Plan, execution_order, following_bn, weight_writer
from qcb_ptq_plugin.grid import WeightGrid
from qcb_ptq_plugin.methods import DEFAULT_METHOD, get_method
from qcb_ptq_plugin.report import PurifyReport
from qcb_ptq_plugin.units import LayerOp, Unit

try:
    from modelopt.torch.opt.config import ModeloptField
    from modelopt.torch.quantization.config import QuantizeAlgorithmConfig
    from modelopt.torch.quantization.mode import BaseCalibrateModeDescriptor, CalibrateModeRegistry
    from modelopt.torch.quantization.model_calib import max_calibrate
    from modelopt.torch.quantization.nn import TensorQuantizer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the ModelOpt integration needs nvidia-modelopt: pip install 'qcb-ptq-plugin[modelopt]' "
                      f"(with a constraint file pinning torch==2.13.0) ({e})") from e

log = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "QCBPurifyCalibConfig", "plan", "purify_calibrate", "report"]

#: the name to put in a ModelOpt config: ``{"algorithm": ALGORITHM}`` or ``{"algorithm": {"method": ALGORITHM, ...}}``
ALGORITHM = "qcb_purify"
_REPORT_ATTR = "_qcb_purify_report"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


class QCBPurifyCalibConfig(QuantizeAlgorithmConfig):
    """``{"method": "qcb_purify", "purify_method": "lac_pda", "options": {...}}``.

    ``options`` are the purify method's config fields (for LAC+PDA those of
    :class:`qcb_ptq_plugin.PurifyConfig`, e.g. ``{"progress": False, "num_samples": 512}``).
    """

    method: Literal["qcb_purify"] = ModeloptField("qcb_purify")
    purify_method: str = ModeloptField(DEFAULT_METHOD, title="A registered qcb_ptq_plugin method (lac_pda, lac).")
    options: dict[str, Any] = ModeloptField(default={}, title="Fields of the method's config (PurifyConfig).")


def purify_calibrate(model: nn.Module, forward_loop=None, purify_method: str = DEFAULT_METHOD,
                     options: dict | None = None, **_unused) -> None:
    """ModelOpt calibration function: ``max`` calibration, then purification of the weights in place."""
    if forward_loop is None:
        raise ValueError("the qcb_purify algorithm needs calibration data: pass forward_loop to mtq.quantize "
                         "(a function that runs your calibration batches through the model)")
    m = get_method(purify_method)
    cfg = m.config(**(options or {}))
    seen: list[torch.Tensor] = []

    def record(_module, args):
        if args and isinstance(args[0], torch.Tensor):
            seen.append(args[0].detach())  # stays where forward_loop put it (next to the model)

    float_model = _float_copy(model)  # before anything is written: the weights are still the float ones
    handle = model.register_forward_pre_hook(record)
    try:
        max_calibrate(model, forward_loop)  # ModelOpt's own amax for weights and activations
    finally:
        handle.remove()
    if not seen:
        raise ValueError("forward_loop did not call the model with a tensor as first argument; qcb_purify "
                         "reads the calibration samples from those calls")
    batches = as_batches(seen, cfg.batch_size, cfg.num_samples, device=device_of(model), allow_int=True)
    p = plan(model, float_model, batches[0])
    setattr(model, _REPORT_ATTR, _pass.run_plan(p, batches, m, cfg, "modelopt"))


def report(model: nn.Module) -> PurifyReport:
    """The :class:`~qcb_ptq_plugin.PurifyReport` of the last ``qcb_purify`` calibration of ``model``."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError("this model was not calibrated with the qcb_purify algorithm; quantize it with "
                         "mtq.quantize(model, {**cfg, 'algorithm': 'qcb_purify'}, forward_loop)")
    return rep


class _QCBPurifyModeDescriptor(BaseCalibrateModeDescriptor):
    """Registers ``qcb_purify`` next to ``max``, ``mse``, ``smoothquant``, ``awq_*``."""

    _supports_layerwise = False  # the pass reads every unit's input through the whole model

    @property
    def config_class(self) -> type[QuantizeAlgorithmConfig]:
        return QCBPurifyCalibConfig

    _calib_func = purify_calibrate


if BaseCalibrateModeDescriptor._get_mode_name(ALGORITHM) not in CalibrateModeRegistry:
    CalibrateModeRegistry.register_mode(_QCBPurifyModeDescriptor)


# ---------------------------------------------------------------------------------------------
# The adapter: discover / simulate / commit


def _float_copy(model: nn.Module) -> nn.Module:
    """The float model: a copy with every quantizer off (BN, weights and biases as calibrated)."""
    fp = copy.deepcopy(model).eval()
    for q in fp.modules():
        if isinstance(q, TensorQuantizer):
            q.disable()
    fp.requires_grad_(False)
    return fp


def _grid(name: str, wq: TensorQuantizer) -> WeightGrid:
    """The integer grid a calibrated ModelOpt weight quantizer rounds to."""
    if isinstance(wq.num_bits, tuple) or wq.block_sizes or wq.unsigned:
        raise ValueError(f"'{name}' quantizes weights as num_bits={wq.num_bits}, block_sizes={wq.block_sizes}, "
                         f"unsigned={wq.unsigned}; qcb_purify handles signed integer weights per channel "
                         "(axis=0) or per tensor (axis=None), e.g. INT8_DEFAULT_CFG")
    amax = wq.amax
    if amax is None:
        raise RuntimeError(f"'{name}' has no amax after calibration; check the config enables its weight quantizer")
    axis = wq.axis[0] if isinstance(wq.axis, (tuple, list)) and len(wq.axis) == 1 else wq.axis
    per_channel = amax.numel() > 1
    if per_channel and axis != 0:
        raise ValueError(f"'{name}' quantizes weights along axis {wq.axis}; use axis=0 (output channels)")
    bound = int(wq.maxbound)
    scale = (amax.detach().float() / bound).reshape(-1 if per_channel else ()).clamp_min(torch.finfo(torch.float32).eps)
    return WeightGrid(scale, torch.zeros_like(scale, dtype=torch.int64), -bound if wq.narrow_range else -bound - 1,
                      bound, 0 if per_channel else None)


def plan(model: nn.Module, float_model: nn.Module, example: torch.Tensor) -> Plan:
    """Units of a calibrated ModelOpt ``model`` (its quantizers on) matched to ``float_model``."""
    order = [m for m in execution_order(float_model, example, leaves_only=False)
             if not isinstance(m, TensorQuantizer)]
    rank = {id(m): i for i, m in enumerate(order)}
    fp_modules = dict(float_model.named_modules())
    units = []
    for name, layer in model.named_modules():
        wq = getattr(layer, "weight_quantizer", None)
        if not isinstance(layer, _LAYERS) or not isinstance(wq, TensorQuantizer) or not wq.is_enabled:
            continue
        fp_layer = fp_modules[name]
        if id(fp_layer) not in rank:
            log.info("'%s' is not called in forward(); left as is", name)
            continue
        LayerOp.from_module(layer)  # raises on unsupported layer flavours

        units.append(Unit(name=name, layer=layer, fp_layer=fp_layer, weight=layer.weight.detach().clone(),
                          bias=None if layer.bias is None else layer.bias.detach().clone(), grid=_grid(name, wq),
                          write=weight_writer(layer.weight), bn=following_bn(fp_layer, order)))
    if not units:
        raise ValueError("no quantized Conv/Linear layer found: the config enables no weight_quantizer of a "
                         "Linear/Conv1d/Conv2d (e.g. use mtq.INT8_DEFAULT_CFG)")
    units.sort(key=lambda u: rank[id(u.fp_layer)])
    return Plan(units=units, capture=_QuantizedInputCapture(model, float_model, units),
                commit=functools.partial(_commit, units))


class _QuantizedInputCapture(ModuleCapture):
    """I = the layer's input after its (frozen) input quantizer, as the quantized layer sees it."""

    @torch.no_grad()
    def __call__(self, unit: Unit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i_q, i_fp = super().__call__(unit, x)
        iq = getattr(unit.layer, "input_quantizer", None)
        if isinstance(iq, TensorQuantizer) and iq.is_enabled:
            i_q = iq(i_q)
        return i_q, i_fp


def _commit(units: list[Unit], codes: list[torch.Tensor]) -> None:
    """W = s * q into each layer; the weight quantizer rounds it back to exactly q."""
    for unit, q in zip(units, codes):
        unit.write(unit.grid.dequantize(q))
