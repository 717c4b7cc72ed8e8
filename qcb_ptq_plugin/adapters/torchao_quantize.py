"""torchao's one-call ``quantize_`` (weight-only and dynamic-activation LLM configs).

torchao has no prepare/convert split here: ``quantize_(model, config)`` swaps every selected
Linear weight for a tensor subclass holding integers (``qdata``), scales and zero points. So
the plan is

* **discover**: run torchao's own ``quantize_`` on a *copy* of the model and read each
  quantized Linear's grid back from the tensor subclass it produced (scale, zero point, block
  size, integer range): the grid is exactly torchao's, per row or per group;
* **simulate**: a copy of the float model whose selected Linears hold fake-quantized float
  weights s (q - z). Weight-only configs keep activations float (that is what the kernel does).
  Dynamic-activation configs quantize each Linear's input per token at run time; the simulator
  applies torchao's own per-token quantize-dequantize to the Linear's input (a forward pre-hook),
  so the unit input I is what the deployed kernel multiplies;
* **commit**: write the purified weights as floats that round to the chosen integers, call
  torchao's ``quantize_`` on the user's model, then read the integers back. Where torchao's
  rounding did not reproduce them (a changed extreme element moves the scale, or a value on a
  rounding tie), the tensor's ``qdata`` / ``scale`` / ``zero_point`` are set to the chosen grid:
  the torchao analogue of pinning the weight observer. The count is logged and returned.

Supported tensors (torchao 0.18): ``Int8Tensor`` (``Int8WeightOnlyConfig``,
``Int8DynamicActivationInt8WeightConfig``) and ``IntxUnpackedToInt8Tensor``
(``IntxWeightOnlyConfig``, ``Int8DynamicActivationIntxWeightConfig``; any ``PerGroup``/``PerAxis``).
Any other config is refused before anything runs (:func:`check_config`), with the reason and the
config to use instead: ``Int4WeightOnlyConfig`` needs a kernel library this build lacks, FP8
configs store floats, not integers. NF4 (``torchao.quantization.to_nf4``, QLoRA's format) is not a
``quantize_`` config in torchao 0.18 and is not covered: its weights are indices into a 16-value
non-uniform codebook with double-quantized block scales, while every method chooses integers on a
uniform grid s (q - z).
Imported only by :func:`qcb_ptq_plugin.quantize_`: ``import qcb_ptq_plugin`` never loads torchao.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization import quantize_ as torchao_quantize_
from torchao.quantization.quant_api import _is_linear
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS
from torchao.quantization.quantize_.common.quantize_tensor_kwargs import _choose_quant_func_and_quantize_tensor
from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
    _apply_int8_act_asym_per_token_quant_dequant,
)

from ..grid import WeightGrid
from ..units import Unit
from ._capture import ModuleCapture
from ._common import Plan, execution_order, weight_writer

log = logging.getLogger(__name__)

__all__ = ["plan", "read_grid", "int_weights", "check_config"]

_SUPPORTED_TYPES = (Int8WeightOnlyConfig, IntxWeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                    Int8DynamicActivationIntxWeightConfig)
_SUPPORTED = ", ".join(t.__name__ for t in _SUPPORTED_TYPES)
_INT4_FIX = "use IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), torchao's int4 " \
            "group-wise weight-only config that runs on CPU"
_WHY_NOT = {  # config class name -> (problem, fix)
    "Int4WeightOnlyConfig": ("its kernels need the 'mslk' library (torchao raises 'ImportError: Requires mslk >= "
                             "1.0.0' on this CPU build, and silently skips Linears whose width does not fit "
                             "group_size)", _INT4_FIX),
}


def check_config(config) -> None:
    """Refuse, before any work, a torchao config whose weights purify cannot choose integers for."""
    if isinstance(config, _SUPPORTED_TYPES):
        return
    name = type(config).__name__
    if name in _WHY_NOT:
        problem, fix = _WHY_NOT[name]
    elif "Float8" in name or "FP8" in name.upper() or "Float4" in name or "FP4" in name.upper():
        problem, fix = "it stores floating-point weights, not integers on a uniform grid", \
            "use Int8WeightOnlyConfig() for 8 bits or " + _INT4_FIX.removeprefix("use ")
    else:
        problem, fix = "purify only reads integer weights on a uniform grid from torchao's Int8Tensor / " \
            "IntxUnpackedToInt8Tensor", f"use one of {_SUPPORTED}"
    raise NotImplementedError(f"qcb_ptq_plugin.quantize_ cannot purify {name}: {problem}; {fix}")


@dataclass
class TorchaoTensorInfo:
    """What purify reads from one torchao weight tensor."""

    grid: WeightGrid
    act_quant: Callable[[torch.Tensor], torch.Tensor] | None  # dynamic activation quantize-dequantize


def read_grid(w: torch.Tensor, name: str = "") -> TorchaoTensorInfo:
    """The integer grid (and run-time activation quantizer) of a torchao quantized weight."""
    if isinstance(w, Int8Tensor):
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[torch.int8]
        if w.reduce_range:
            qmin, qmax = qmin // 2, qmax // 2
        if w.act_pre_scale is not None or w.act_quant_scale is not None:
            raise NotImplementedError(f"'{name}': static activation scales / pre-scaling (SmoothQuant, AWQ) are not "
                                      "supported; use a weight-only or dynamic-activation config")
        kw = w.act_quant_kwargs
        act = None if kw is None else (lambda x, _kw=kw: _choose_quant_func_and_quantize_tensor(x, _kw).dequantize())
    elif isinstance(w, IntxUnpackedToInt8Tensor):
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[w.target_dtype]
        aq = w.activation_quantization
        if aq is None:
            act = None
        elif str(getattr(aq, "value", aq)) == "int8_asym_per_token":
            act = _apply_int8_act_asym_per_token_quant_dequant
        else:
            raise NotImplementedError(f"'{name}': activation quantization {aq!r} is not supported")
    else:
        raise NotImplementedError(
            f"'{name}': torchao produced a {type(w).__name__} weight, which purify cannot read integers from; "
            f"supported configs: {_SUPPORTED} (integer weights on CPU)")
    if w.qdata.dim() != 2:
        raise NotImplementedError(f"'{name}': only 2-D Linear weights are supported, got {tuple(w.qdata.shape)}")
    out_f, in_f = w.qdata.shape
    block = tuple(int(b) for b in w.block_size)
    scale = w.scale.detach().float().reshape(out_f if block[0] == 1 else 1, -1)
    zp = torch.zeros_like(scale, dtype=torch.int64) if w.zero_point is None else w.zero_point.reshape(scale.shape)
    if block == (out_f, in_f):  # per tensor
        grid = WeightGrid(scale.reshape(()), zp.reshape(()).long(), qmin, qmax, None, reciprocal=True)
    elif block == (1, in_f):  # per row (PerAxis(0), PerRow)
        grid = WeightGrid(scale.reshape(-1), zp.reshape(-1).long(), qmin, qmax, 0, reciprocal=True)
    elif block[0] == 1 and in_f % block[1] == 0:
        grid = WeightGrid.from_groups(scale, zp, qmin, qmax, block[1], reciprocal=True)
    else:
        raise NotImplementedError(f"'{name}': block size {block} of a {tuple(w.qdata.shape)} weight is not supported")
    return TorchaoTensorInfo(grid, act)


def int_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The integers torchao stores for every quantized Linear of ``model`` (int64), by module name."""
    return {n: m.weight.qdata.long() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, (Int8Tensor, IntxUnpackedToInt8Tensor))}


def _selected(model: nn.Module, config, filter_fn) -> dict[str, TorchaoTensorInfo]:
    """Quantize a copy with torchao itself and read each selected Linear's grid from its tensor."""
    probe = copy.deepcopy(model)
    try:
        torchao_quantize_(probe, config, filter_fn=filter_fn)
    except ImportError as e:  # a kernel library torchao needs for this config is missing
        raise NotImplementedError(f"torchao cannot run {type(config).__name__} here ({e}); install the library "
                                  f"it names, or use one of {_SUPPORTED}") from e
    found = {}
    for name, mod in probe.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and w is not None and type(w) not in (torch.Tensor, nn.Parameter):
            found[name] = read_grid(w, name)
    if not found:
        raise ValueError(f"torchao quantized no Linear layer with {type(config).__name__}; check filter_fn")
    return found


def plan(model: nn.Module, float_model: nn.Module, example: torch.Tensor, config,
         filter_fn=None) -> tuple[Plan, dict]:
    """Units (selected Linears in execution order), a simulator, and a commit that calls torchao."""
    filter_fn = filter_fn or _is_linear
    infos = _selected(model, config, filter_fn)
    order = {id(m): i for i, m in enumerate(execution_order(float_model, example))}
    fp_modules = dict(float_model.named_modules())
    names = sorted((n for n in infos if id(fp_modules[n]) in order), key=lambda n: order[id(fp_modules[n])])
    for n in set(infos) - set(names):
        log.info("'%s' is not called in forward(); torchao quantizes it, purify leaves it as rounded", n)

    simulator = copy.deepcopy(float_model).eval()
    sim_modules = dict(simulator.named_modules())
    units = []
    for name in names:
        fp_layer, sim_layer, info = fp_modules[name], sim_modules[name], infos[name]
        with torch.no_grad():
            sim_layer.weight.copy_(info.grid.fake_quantize(fp_layer.weight))
        if info.act_quant is not None:  # dynamic activations: the kernel quantizes the input per token
            sim_layer.register_forward_pre_hook(lambda _m, args, _f=info.act_quant: (_f(args[0]), *args[1:]))

        units.append(Unit(name=name, layer=sim_layer, fp_layer=fp_layer, weight=fp_layer.weight.detach().clone(),
                          bias=None if fp_layer.bias is None else fp_layer.bias.detach().clone(),
                          grid=info.grid, write=weight_writer(sim_layer.weight)))
    stats: dict = {}
    commit = functools.partial(_commit, model, config, filter_fn, units, stats)
    return Plan(units=units, capture=ModuleCapture(simulator, float_model, units), commit=commit), stats


def _block_range(w: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the block each element shares a scale with (what torchao's scale is computed from)."""
    if not grid.per_channel:
        return w.amin().expand_as(w), w.amax().expand_as(w)
    gs = grid.group_size or w.shape[1]
    blocks = w.reshape(w.shape[0], -1, gs)  # (O, K/gs, gs)
    lo, hi = blocks.amin(-1, keepdim=True).expand_as(blocks), blocks.amax(-1, keepdim=True).expand_as(blocks)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def _commit(model: nn.Module, config, filter_fn, units: list[Unit], stats: dict, codes: list[torch.Tensor]) -> None:
    """Purified floats into ``model``, torchao's ``quantize_`` on it, integers read back (and pinned)."""
    modules = dict(model.named_modules())
    for unit, q in zip(units, codes):
        w_o, grid = unit.weight.float(), unit.grid
        kept = q == grid.quantize(w_o)
        # Unchanged integers keep their float (torchao then computes the same scale from the same
        # extremes); changed ones become s (q - z), inside the row's original range.
        w = torch.where(kept, w_o, grid.dequantize(q))
        lo, hi = _block_range(w_o, grid)
        w = torch.minimum(torch.maximum(w, lo), hi)
        with torch.no_grad():
            modules[unit.name].weight.copy_(w.to(modules[unit.name].weight.dtype))
    torchao_quantize_(model, config, filter_fn=filter_fn)
    reproduced = pinned = 0
    for unit, q in zip(units, codes):
        t = modules[unit.name].weight
        want_s = unit.grid.scale.reshape(t.scale.shape).to(t.scale.dtype)
        same = torch.equal(t.qdata.long(), q) and torch.equal(t.scale, want_s)
        log.debug("%s: torchao integers differ at %d places, scales at %d", unit.name,
                  (t.qdata.long() != q).sum().item(), (t.scale != want_s).sum().item())
        if same:
            reproduced += 1
            continue
        pinned += 1
        with torch.no_grad():  # torchao rounded differently (a moved extreme, a tie): store the chosen grid
            t.qdata.copy_(q.to(t.qdata.dtype))
            t.scale.copy_(want_s)
            if t.zero_point is not None:
                t.zero_point.copy_(unit.grid.zero_point.reshape(t.zero_point.shape).to(t.zero_point.dtype))
    stats.update(reproduced=reproduced, pinned=pinned)
    if pinned:
        log.info("torchao reproduced the chosen integers of %d layers; %d were pinned", reproduced, pinned)
