"""torchao PT2E (``torch.export`` -> ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``).

The prepared model is a GraphModule of aten ops. BN is already folded into the weight
parameters at prepare; every weight flows ``get_attr -> weight observer -> aten.conv2d/linear``
and ``convert_pt2e`` asks that observer for its qparams. Any forward re-observes weights and
activations, so we

* simulate on a copy (observers frozen into fake-quantizers; a tap module inserted in front
  of each quantized layer to read its input),
* read each unit's float module from the node's ``nn_module_stack`` (BN statistics and I^fp
  come from the float model), and
* write W = s (q - z) into the user's parameter and replace its weight observer by one that
  keeps the calibrated qparams whatever it sees later, so convert reproduces q exactly.

The plan is three steps: :func:`_discover` (quantized nodes, their float twins, grids),
:func:`_simulate` (a tapped, frozen copy to read unit inputs from) and :func:`_commit`.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from ..grid import WeightGrid
from ..units import LayerOp, Unit, Unsupported, float_bn, float_layer
from ._capture import ModuleCapture
from ._common import (Plan, execution_order, following_bn, freeze_observers, input_observer_range, is_aten_graph,
                      match_float_layer, output_observer, pin_activation_scales, torchao_observer_base, weight_writer)
from ._graph import CONV_OPS, LINEAR_OP, attr_value, get_attr, in_execution_order, tap_inputs

log = logging.getLogger(__name__)


def matches(prepared: nn.Module) -> bool:
    if not is_aten_graph(prepared):
        return False
    base = torchao_observer_base()
    if base is None:
        raise ImportError("this looks like a torch.export / PT2E model; purifying it needs torchao: "
                          "pip install 'qcb-ptq-plugin[pt2e]' (torchao==0.18.0)")
    if not any(isinstance(m, base) for m in prepared.modules()):
        raise ValueError("the exported model has no torchao observers: call prepare_pt2e(exported, quantizer) and "
                         "calibrate before purify (and purify before convert_pt2e)")
    return True


def mode_of(prepared: nn.Module) -> str:
    return "pt2e"


def _ignore_new_data(x):
    return x


def _pinned(observer):
    """A copy of a torchao weight observer that keeps its calibrated min/max whatever it sees.

    torchao's own observer classes get a twin defined at import time in :mod:`._pt2e_pinned`
    (so pinned models unpickle in a fresh process); any other observer keeps its class and gets
    a module-level ``forward`` on the instance, which pickles by reference too.
    """
    from ._pt2e_pinned import pinned_class

    new = copy.deepcopy(observer)
    twin = pinned_class(type(observer))
    if twin is not None:
        new.__class__ = twin
    else:
        new.forward = _ignore_new_data
    return new


def fixed_batch_size(prepared: GraphModule) -> int | None:
    """The batch size an exported model was specialised to, or None if it is dynamic."""
    for n in prepared.graph.nodes:
        if n.op == "placeholder" and hasattr(n.meta.get("val"), "shape"):
            b = n.meta["val"].shape[0] if n.meta["val"].dim() else None
            return b if isinstance(b, int) else None
    return None


def _weight_node(node):
    """(weight get_attr node, weight observer node) of an aten conv/linear, or None."""
    w = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w, torch.fx.Node) or w.op != "call_module" or not w.args or getattr(w.args[0], "op", None) != "get_attr":
        return None
    return w.args[0], w


def _layer_kwargs(node) -> dict:
    a = list(node.args) + [None] * 8
    return dict(stride=a[3] or 1, padding=a[4] or 0, dilation=a[5] or 1, groups=a[6] or 1)


def _exported_float_side(float_gm: GraphModule) -> tuple[GraphModule, dict[str, tuple]]:
    """A float model given as an exported graph (``.pt2``): tap its layer inputs and rebuild the
    float Conv/Linear and BatchNorm modules the algorithm needs. Returns (tapped copy,
    {module path: (fp_layer, bn or None, tap)})."""
    gm = copy.deepcopy(float_gm)
    side, taps = {}, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target not in CONV_OPS and node.target != LINEAR_OP):
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        w, b = attr_value(gm, node.args[1]), attr_value(gm, node.args[2]) if len(node.args) > 2 else None
        if not stack or w is None:
            continue
        layer = float_layer(w, b, **({} if node.target == LINEAR_OP else _layer_kwargs(node)))
        bn, users = None, list(node.users)
        if len(users) == 1 and users[0].target == torch.ops.aten.batch_norm.default:
            a = users[0].args  # (x, weight, bias, running_mean, running_var, training, momentum, eps, ...)
            bn = float_bn(*(attr_value(gm, arg) for arg in a[1:5]), eps=a[7], spatial_dims=w.dim() - 2)
        path = stack[-1][0]
        tap = tap_inputs(gm, taps.setdefault(path, f"qcb_fp_tap_{len(taps)}"), [node])  # shared module: one tap
        side.setdefault(path, (layer, bn, tap))
    gm.recompile()
    return gm, side


@dataclass(eq=False)
class _Site:
    """A quantized aten conv/linear node of the prepared graph with what purifying it needs."""

    nodes: list[str]  # node names (the same in the prepared graph and its copies); several for a shared module
    name: str  # the float module it came from
    weight_target: str  # get_attr target of the weight parameter
    observer_targets: list[str]  # the weight observer module of each node
    fp_layer: nn.Module
    bn: nn.Module | None
    grid: WeightGrid
    weight: torch.Tensor  # the prepared model's parameter (BN folded)
    bias: torch.Tensor | None
    relu: bool
    out_observer: str | None = None  # path of the observer of the layer's output (activation scale)


def plan(prepared: GraphModule, float_model: nn.Module, example: torch.Tensor) -> Plan:
    exported_side = None
    if is_aten_graph(float_model):  # e.g. loaded from a .pt2 file: no hookable Conv modules
        float_model, exported_side = _exported_float_side(float_model)
    sites, unsupported = _discover(prepared, float_model, example, exported_side)
    simulator, units = _simulate(prepared, sites)
    order = in_execution_order(units, simulator, example)  # purify in execution order
    sites, units = [sites[i] for i in order], [units[i] for i in order]
    fp_points = {u.name: exported_side[u.name][2] for u in units} if exported_side is not None else None
    return Plan(units=units, capture=ModuleCapture(simulator, float_model, units, fp_points=fp_points),
                commit=functools.partial(_commit, prepared, sites, units), unsupported=unsupported,
                input_range=input_observer_range(prepared))


def _discover(prepared: GraphModule, float_model: nn.Module, example: torch.Tensor,
              exported_side: dict | None) -> tuple[list[_Site], list[Unsupported]]:
    """Every aten conv/linear whose weight passes a torchao observer, matched to its float module
    (one site per weight: a module called twice is one unit); quantized ops we cannot purify
    (conv_transpose, conv3d, ...) are returned named."""
    base = torchao_observer_base()
    fp_modules = dict(float_model.named_modules())
    fp_order = execution_order(float_model, example)
    sites: dict[str, _Site] = {}  # weight target -> site
    unsupported = []
    float_uses = {n.args[1].target for n in prepared.graph.nodes  # weights some op reads unobserved
                  if n.op == "call_function" and len(n.args) > 1 and isinstance(n.args[1], torch.fx.Node)
                  and n.args[1].op == "get_attr"}
    for node in prepared.graph.nodes:
        found = _weight_node(node) if node.op == "call_function" else None
        if found is None or not isinstance(prepared.get_submodule(found[1].target), base):
            continue
        w_node, obs_node = found
        stack = list(node.meta.get("nn_module_stack", {}).values())
        fp_name = stack[-1][0] if stack else None
        if node.target not in CONV_OPS and node.target != LINEAR_OP:
            unsupported.append(Unsupported(fp_name or node.name, str(node.target),
                                           "LAC supports linear, conv1d and conv2d (any overload)"))
            continue
        if w_node.target in sites:  # the same weight at another call site
            sites[w_node.target].nodes.append(node.name)
            sites[w_node.target].observer_targets.append(obs_node.target)
            continue
        if exported_side is not None:
            fp_layer, fp_bn, _ = exported_side.get(fp_name, (None, None, None))
        else:
            fp_layer = fp_modules.get(fp_name) if fp_name is not None else None
            fp_bn = following_bn(fp_layer, fp_order) if fp_layer is not None else None
        if fp_layer is None:
            raise ValueError(f"float model does not match the prepared model: it has no module '{fp_name}' "
                             f"(the source of node '{node.name}'). Pass the float model that was exported")
        if w_node.target in float_uses:
            unsupported.append(Unsupported(fp_name, str(node.target), "its weight is also used by a call site "
                                           "the quantizer left in float"))
            continue
        try:
            LayerOp.from_module(fp_layer)
        except NotImplementedError as e:
            unsupported.append(Unsupported(fp_name, str(node.target), str(e)))
            continue
        weight = get_attr(prepared, w_node.target)
        users = list(node.users)
        sites[w_node.target] = _Site(
            nodes=[node.name], name=fp_name, weight_target=w_node.target, observer_targets=[obs_node.target],
            fp_layer=fp_layer, bn=match_float_layer(fp_name, weight, fp_layer, fp_bn),
            grid=WeightGrid.from_observer(prepared.get_submodule(obs_node.target)), weight=weight,
            bias=attr_value(prepared, node.args[2]) if len(node.args) > 2 else None,
            relu=len(users) == 1 and users[0].target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default))
    if not sites and not unsupported:
        raise ValueError("no quantized Conv/Linear layer found in the prepared model; check the quantizer's config "
                         "(purify handles statically quantized linear, conv1d and conv2d)")
    return list(sites.values()), unsupported


def _simulate(prepared: GraphModule, sites: list[_Site]) -> tuple[GraphModule, list[Unit]]:
    """A copy of ``prepared`` with observers frozen, weights fake-quantized and a tap in front of
    every quantized node; one :class:`Unit` per site whose ``write`` updates that copy."""
    simulator = copy.deepcopy(prepared)
    sim_nodes = {n.name: n for n in simulator.graph.nodes}
    units = []
    for i, site in enumerate(sites):
        # one tap module at every call site: the capture reads them all
        tap = tap_inputs(simulator, f"qcb_tap_{i}", [sim_nodes[n] for n in site.nodes])
        sim_w = get_attr(simulator, site.weight_target)
        with torch.no_grad():
            sim_w.copy_(site.grid.fake_quantize(site.weight))

        units.append(Unit(name=site.name, layer=tap, fp_layer=site.fp_layer,
                          weight=site.weight.detach().clone(),
                          bias=None if site.bias is None else site.bias.detach().clone(),
                          grid=site.grid, write=weight_writer(sim_w), bn=site.bn, activation=torch.relu if site.relu else None))
        if len(site.nodes) == 1:  # a module called once: its output has one observer
            site.out_observer = output_observer(prepared, site.nodes[0])[0]
    simulator.recompile()
    freeze_observers(simulator)
    for site, unit in zip(sites, units):
        unit.out_quant = None if site.out_observer is None else simulator.get_submodule(site.out_observer)
    return simulator, units


def _commit(prepared: GraphModule, sites: list[_Site], units: list[Unit], codes: list[torch.Tensor]) -> None:
    """W = s (q - z) into the user's parameters; weight observers pinned to the calibrated qparams;
    output observers pinned where a method learned their scale."""
    for site, unit, q in zip(sites, units, codes):
        with torch.no_grad():
            site.weight.copy_(unit.grid.dequantize(q))
        for target in site.observer_targets:
            parent, _, attr = target.rpartition(".")
            owner = prepared.get_submodule(parent) if parent else prepared
            setattr(owner, attr, _pinned(getattr(owner, attr)))
    pin_activation_scales(prepared, {site.out_observer: unit.out_quant for site, unit in zip(sites, units)
                                     if unit.out_quant is not None})
