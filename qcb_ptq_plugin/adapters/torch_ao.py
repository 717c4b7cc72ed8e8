"""torch.ao eager (``prepare``/``convert``) and FX (``prepare_fx``/``convert_fx``).

Both flows keep each quantized layer as a float module carrying ``.qconfig``; activation
observers are submodules; the weight observer does not exist yet: ``convert`` builds
``qconfig.weight()`` and observes the *current* float weight (FX: ``convert_weighted_module``,
eager: ``from_float``). So we

* read the grid by running exactly that observer on the (BN-folded) weight,
* write back W = s (q - z) and swap the layer's qconfig for one whose weight observer returns
  the frozen (s, z): convert then rounds W back to exactly q, and
* never forward the user's prepared model (observers would re-observe): the simulator is a copy.

The plan is three steps: :func:`_discover` (quantized layers, their float twins, grids),
:func:`_simulate` (a frozen copy to read unit inputs from) and :func:`_commit` (write + pin).

Dynamic qconfigs (``default_dynamic_qconfig``: INT8/INT4 weights, activations quantized per
batch at run time) are purified like weight-only quantization: the simulator keeps those
activations in float, since their scale is only known at inference.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import QConfig
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase, PlaceholderObserver
from torch.fx import GraphModule

from ..grid import WeightGrid
from ..units import LayerOp, Unit, Unsupported
from ._capture import ModuleCapture
from ._common import (Plan, execution_order, following_bn, freeze_observers, input_observer_range, is_aten_graph,
                      match_float_layer, output_observer, pin_activation_scales, weight_writer)

log = logging.getLogger(__name__)

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)  # the layer families convert gives integer weights
_QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


class PinnedWeightObserver(ObserverBase):
    """Weight "observer" that returns fixed qparams, so convert keeps the purified integers."""

    def __init__(self, scale, zero_point, qscheme, ch_axis, quant_min, quant_max, dtype=torch.qint8) -> None:
        super().__init__(dtype=dtype)
        self.qscheme, self.ch_axis = qscheme, ch_axis
        self.quant_min, self.quant_max = quant_min, quant_max
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())

    def forward(self, x):
        return x

    def calculate_qparams(self):
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"pinned {tuple(self.scale.shape)}, range=[{self.quant_min}, {self.quant_max}]"


def matches(prepared: nn.Module) -> bool:
    if is_aten_graph(prepared):
        return False
    fx_prepared = isinstance(prepared, GraphModule) and "_observed_graph_module_attrs" in prepared.meta
    return fx_prepared or any(isinstance(m, ObserverBase) for m in prepared.modules())


def mode_of(prepared: nn.Module) -> str:
    return "fx" if isinstance(prepared, GraphModule) else "eager"


@functools.cache
def _quantized_types() -> frozenset[type]:
    """Module types convert swaps for quantized ones (the exact-type lookup convert does)."""
    from torch.ao.quantization.quantization_mappings import (get_default_dynamic_quant_module_mappings,
                                                             get_default_static_quant_module_mappings)

    return frozenset(get_default_static_quant_module_mappings()) | frozenset(get_default_dynamic_quant_module_mappings())


def _layer(m: nn.Module) -> nn.Module | None:
    """The Conv/Linear (any flavour) inside a (possibly fused) module that convert quantizes, else None."""
    if type(m) not in _quantized_types():
        return None
    if isinstance(m, nni._FusedModule):
        m = m[0]
    return m if isinstance(m, _WEIGHTED) else None


def _activation(m: nn.Module):
    return torch.relu if isinstance(m, nni._FusedModule) and any(isinstance(c, nn.ReLU) for c in m) else None


def _weight_grid(name: str, qconfig: QConfig, weight: torch.Tensor) -> tuple[WeightGrid, tuple]:
    obs = qconfig.weight()
    act = qconfig.activation()
    if isinstance(obs, FakeQuantizeBase) or isinstance(act, FakeQuantizeBase):
        raise ValueError(f"'{name}' has a QAT (fake-quantize) qconfig; purify is a post-training pass: "
                         "use a PTQ qconfig (e.g. get_default_qconfig_mapping('x86')) with prepare_fx/prepare")
    if obs.dtype not in (torch.qint8, torch.quint8):
        raise ValueError(f"'{name}' quantizes weights to {obs.dtype}; purify handles integer weights "
                         "(torch.qint8/quint8 with any quant_min/quant_max, e.g. -8..7 for 4 bits)")
    if isinstance(act, PlaceholderObserver) and not getattr(act, "is_dynamic", False):
        raise ValueError(f"'{name}' keeps float activations (a weight-only qconfig), which torch.ao converts to "
                         "reference modules without an INT8 kernel; use a static qconfig (e.g. "
                         "get_default_qconfig_mapping('x86')) or a dynamic one (default_dynamic_qconfig)")
    obs(weight.detach())
    grid = WeightGrid.from_observer(obs)
    scale, zp = obs.calculate_qparams()
    pin = dict(scale=scale, zero_point=zp, qscheme=obs.qscheme, ch_axis=getattr(obs, "ch_axis", 0),
               quant_min=obs.quant_min, quant_max=obs.quant_max, dtype=obs.dtype)
    return grid, pin


@dataclass(eq=False)
class _Site:
    """A quantized layer of the prepared model with what purifying it needs."""

    name: str
    module: nn.Module  # the prepared module holding the qconfig (fused or plain)
    fp_layer: nn.Module
    bn: nn.Module | None
    grid: WeightGrid
    pin: dict  # PinnedWeightObserver arguments
    out_observer: str | None = None  # path of the observer of the layer's output (activation scale)

    @property
    def layer(self) -> nn.Module:
        return _layer(self.module)


def plan(prepared: nn.Module, float_model: nn.Module, example: torch.Tensor) -> Plan:
    sites, unsupported = _discover(prepared, float_model, example)
    simulator, units = _simulate(prepared, sites, [u.name for u in unsupported])
    return Plan(units=units, capture=ModuleCapture(simulator, float_model, units),
                commit=functools.partial(_commit, prepared, sites, units), unsupported=unsupported,
                input_range=input_observer_range(prepared))


def _discover(prepared: nn.Module, float_model: nn.Module, example: torch.Tensor
              ) -> tuple[list[_Site], list[Unsupported]]:
    """The quantized Conv/Linear layers in execution order, matched to the float model, and the
    quantized layers no method can purify (e.g. per-channel ConvTranspose), named."""
    if any(type(m).__module__.startswith(_QUANTIZED_MODULE_PREFIXES) for m in prepared.modules()):
        raise ValueError("the model is already converted to INT8; call purify after calibration and before convert")
    if any(isinstance(m, FakeQuantizeBase) for m in prepared.modules()):
        raise ValueError("the model was prepared for QAT (it holds FakeQuantize modules); purify is a "
                         "post-training pass: prepare with prepare_fx/prepare and a PTQ qconfig")
    candidates: dict[str, nn.Module] = {}
    for name, mod in prepared.named_modules():
        layer = _layer(mod)
        if layer is None or getattr(mod, "qconfig", None) is None or getattr(mod.qconfig, "weight", None) is None:
            continue
        if name in candidates or any(name.startswith(c + ".") for c in candidates):
            continue  # the Conv inside a fused module we already hold
        candidates[name] = mod

    fp_modules = dict(float_model.named_modules())
    # the prepared model has the float model's call order; one sample finds it (as prepare_fx's
    # example_inputs) without a whole batch's forward; the batch where one sample does not run
    try:
        fp_order = execution_order(float_model, example[:1])
    except Exception:  # e.g. a batch that is not sample-first
        fp_order = execution_order(float_model, example)
    rank = {id(m): i for i, m in enumerate(fp_order)}
    sites, unsupported = [], []
    for name, mod in candidates.items():
        fp = fp_modules.get(name)
        if fp is None:
            raise ValueError(f"float model does not match the prepared model: it has no module '{name}'. "
                             "Pass the float model that was given to prepare")
        fp_layer = _layer(fp) or (fp[0] if isinstance(fp, nni._FusedModule) else fp)
        if id(fp_layer) not in rank:
            log.info("'%s' is not called in forward(); left as is", name)
            continue
        layer = _layer(mod)
        try:
            op = LayerOp.from_module(layer)
        except NotImplementedError as e:
            unsupported.append(Unsupported(name, type(layer).__name__, str(e)))
            continue
        bn = match_float_layer(name, layer.weight, fp_layer, following_bn(fp_layer, fp_order))
        grid, pin = _weight_grid(name, mod.qconfig, layer.weight)
        if op.transposed and grid.per_channel:  # axis 0 of a ConvTranspose weight is its input channels
            unsupported.append(Unsupported(name, type(layer).__name__, (
                f"{type(layer).__name__} with per-channel weights (ch_axis={pin['ch_axis']}) is not supported: "
                "its weight axis 0 holds input channels; use per-tensor weights (the x86 default for ConvTranspose)")))
            continue
        sites.append(_Site(name, mod, fp_layer, bn, grid, pin))
    if not sites and not unsupported:
        raise ValueError("no quantized Conv/Linear layer found in the prepared model; check the qconfig mapping "
                         "(purify handles statically quantized Linear, Conv1d/2d/3d and ConvTranspose1d/2d)")
    return sorted(sites, key=lambda site: rank[id(site.fp_layer)]), unsupported


def _simulate(prepared: nn.Module, sites: list[_Site], unsupported: list[str] = ()) -> tuple[nn.Module, list[Unit]]:
    """A copy of ``prepared`` computing what the INT8 model will (observers frozen, weights
    fake-quantized, unsupported layers at round to nearest), and one :class:`Unit` per site
    whose ``write`` updates that copy."""
    simulator = copy.deepcopy(prepared).eval()
    freeze_observers(simulator)
    sim_modules = dict(simulator.named_modules())
    for name in unsupported:  # what convert will do to them: round to nearest on their qconfig's grid
        layer = _layer(sim_modules[name])
        obs = sim_modules[name].qconfig.weight()
        obs(layer.weight.detach())
        with torch.no_grad():
            layer.weight.copy_(WeightGrid.from_observer(obs).fake_quantize(layer.weight)
                               if getattr(obs, "ch_axis", 0) == 0 else layer.weight)
    units = []
    for site in sites:
        layer, w_sim = site.layer, _layer(sim_modules[site.name]).weight
        with torch.no_grad():
            w_sim.copy_(site.grid.fake_quantize(layer.weight))

        units.append(Unit(name=site.name, layer=sim_modules[site.name], fp_layer=site.fp_layer,
                          weight=layer.weight.detach().clone(),
                          bias=None if layer.bias is None else layer.bias.detach().clone(),
                          grid=site.grid, write=weight_writer(w_sim), bn=site.bn, activation=_activation(site.module)))
        site.out_observer, relu = output_observer(prepared, site.name)  # its output quantizer (activation scale)
        if site.out_observer is not None:
            units[-1].out_quant = simulator.get_submodule(site.out_observer)
            units[-1].activation = units[-1].activation or (torch.relu if relu else None)
    return simulator, units


def _commit(prepared: nn.Module, sites: list[_Site], units: list[Unit], codes: list[torch.Tensor]) -> None:
    """W = s (q - z) into the user's layers, a qconfig whose weight observer returns (s, z), and
    output observers pinned where a method learned their scale."""
    for site, unit, q in zip(sites, units, codes):
        layer = site.layer
        with torch.no_grad():
            layer.weight.copy_(unit.grid.dequantize(q))
        qconfig = QConfig(activation=site.module.qconfig.activation, weight=PinnedWeightObserver.with_args(**site.pin))
        site.module.qconfig = qconfig
        if layer is not site.module:
            layer.qconfig = qconfig  # eager from_float reads the inner layer's qconfig
    pin_activation_scales(prepared, {site.out_observer: unit.out_quant for site, unit in zip(sites, units)
                                     if unit.out_quant is not None})
