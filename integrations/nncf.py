"""OpenVINO NNCF: purify what ``nncf.quantize`` returns, one call after it (ONNX and torch FX backends).

NNCF has no plugin registry for calibration passes, so the pass runs on its result::

    import nncf
    from qcb_ptq_plugin.integrations import nncf as qcb_nncf

    # ONNX backend
    dataset = nncf.Dataset(calib_batches, lambda b: {"input": b})
    int8 = nncf.quantize(fp32_onnx, dataset)                       # QDQ ModelProto, INT8 weight initializers
    report = qcb_nncf.purify_onnx(fp32_onnx, int8, dataset)         # the one line: int8 is purified in place
    onnx.save(int8, "model.int8.onnx")                              # or convert it with OpenVINO

    # torch FX backend
    exported = torch.export.export(model, (x,)).module()
    int8 = nncf.quantize(exported, nncf.Dataset(calib_batches))     # GraphModule with int8 weight constants
    report = qcb_nncf.purify_fx(model, int8, nncf.Dataset(calib_batches))   # the one line, in place
    torch.export.save(torch.export.export(int8, (x,)), "model.int8.pt2")     # the integers go along

NNCF's ONNX result is a QDQ model with integer weight initializers, i.e. what
:mod:`qcb_ptq_plugin.adapters.ort` already handles: each Conv/Gemm/MatMul is a unit on NNCF's own
weight grid (its scales, symmetric narrow range -127..127), I^fp comes from the FP32 model and
the chosen integers overwrite NNCF's initializers. Scales are unchanged, so NNCF's fast bias
correction and any later conversion keep the integers.

NNCF's FX result is a GraphModule in which each quantized conv/linear reads its weight as
``int8 constant * scale - zero_point`` (NNCF folds BatchNorm into the weight first). Each such
node is a unit on that grid, matched to the float module it came from (``nn_module_stack``);
the pass simulates on a copy of the graph (its activation quantize/dequantize nodes included)
and writes the chosen integers into NNCF's int8 constants. NNCF's torch backend compiles a C++
extension on first use; the FX backend does not need it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np

from qcb_ptq_plugin.config import MethodConfig
from qcb_ptq_plugin.methods import DEFAULT_METHOD
from qcb_ptq_plugin.report import PurifyReport

from ._qdq import purify_qdq

log = logging.getLogger(__name__)

__all__ = ["purify_onnx", "purify_fx", "WEIGHT_RANGE"]

#: NNCF's weight integers: symmetric, narrow range (levels 255 at 8 bits; its HW configs allow 8 bits only)
WEIGHT_RANGE = (-127, 127)


def _feeds(dataset, model) -> list[dict[str, np.ndarray]]:
    """Feed dicts from an ``nncf.Dataset`` (its transform's output) or any iterable of feeds/arrays."""
    from qcb_ptq_plugin.onnx._feeds import Replay, graph_inputs, read_feeds

    items = dataset.get_inference_data() if hasattr(dataset, "get_inference_data") else dataset
    names = list(graph_inputs(model))
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
    return read_feeds(Replay(feeds), model)  # names, shapes, NaN/Inf and dtypes checked as in quantize_static


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

    if not isinstance(model, onnx.ModelProto) or not isinstance(quantized_model, onnx.ModelProto):
        raise TypeError("purify_onnx takes the FP32 and the quantized onnx.ModelProto of NNCF's ONNX backend, got "
                        f"{type(model).__name__} and {type(quantized_model).__name__}")
    feeds = _feeds(calibration_dataset, model)
    return purify_qdq(model, quantized_model, feeds, WEIGHT_RANGE, config, method, overrides, "nncf-onnx",
                      "pass the model nncf.quantize returned and the FP32 model it was given")


# ---------------------------------------------------------------------------------------------
# torch FX backend: a converted GraphModule with int8 weight constants


def purify_fx(model, quantized_model, calibration_dataset, config: MethodConfig | None = None, *,
              method: str = DEFAULT_METHOD, **overrides) -> PurifyReport:
    """Purify ``quantized_model`` (what ``nncf.quantize(torch.export.export(model, ...).module(), dataset)``
    returned) in place: its int8 weight constants are rewritten.

    Args:
        model: the float ``nn.Module`` that was exported (never modified).
        quantized_model: NNCF's result, a ``torch.fx.GraphModule``.
        calibration_dataset: the ``nncf.Dataset`` given to ``nncf.quantize`` (its transform must
            return the input tensor), or tensors / batches as for :func:`qcb_ptq_plugin.purify`.
        config, method, overrides: as for :func:`qcb_ptq_plugin.purify`.
    """
    import torch

    from qcb_ptq_plugin import _pass
    from qcb_ptq_plugin._data import as_batches, device_of
    from qcb_ptq_plugin.adapters._common import is_aten_graph
    from qcb_ptq_plugin.methods import get_method

    if not isinstance(quantized_model, torch.fx.GraphModule) or not isinstance(model, torch.nn.Module):
        raise TypeError("purify_fx takes the float nn.Module and the torch.fx.GraphModule nncf.quantize returned, got "
                        f"{type(model).__name__} and {type(quantized_model).__name__}")
    if is_aten_graph(model):
        raise TypeError("pass the float nn.Module you gave to torch.export.export, not the exported graph: its "
                        "Conv/Linear/BatchNorm modules give each unit its float twin")
    m = get_method(method)
    cfg = m.config(config, **overrides)
    data = calibration_dataset.get_inference_data() if hasattr(calibration_dataset, "get_inference_data") \
        else calibration_dataset
    batches = as_batches(data, cfg.batch_size, cfg.num_samples, device=device_of(model))
    return _pass.run_plan(_fx_plan(quantized_model, model, batches[0]), batches, m, cfg, "nncf-fx")


def _fx_plan(quantized, model, example):
    """Units of NNCF's converted graph: discover (:func:`_fx_sites`), simulate on a tapped copy, commit."""
    import copy

    import torch

    from qcb_ptq_plugin.adapters._capture import ModuleCapture
    from qcb_ptq_plugin.adapters._common import Plan
    from qcb_ptq_plugin.adapters._graph import get_attr, in_execution_order, tap_inputs
    from qcb_ptq_plugin.units import Unit

    float_model = copy.deepcopy(model).eval()
    sites = _fx_sites(quantized, float_model, example)
    simulator = copy.deepcopy(quantized)  # NNCF's activation quantize/dequantize nodes run as they are
    nodes = {n.name: n for n in simulator.graph.nodes}
    units = []
    for i, site in enumerate(sites):
        tap = tap_inputs(simulator, f"qcb_tap_{i}", [nodes[site.node]])

        def write(w, _stored=get_attr(simulator, site.target), _grid=site.grid):
            with torch.no_grad():
                _stored.copy_(_grid.quantize(w).to(_stored.dtype))

        units.append(Unit(name=site.name, layer=tap, fp_layer=site.fp_layer,
                          weight=site.weight, bias=site.bias, grid=site.grid, write=write, bn=site.bn))
    simulator.recompile()
    order = in_execution_order(units, simulator, example)
    sites, units = [sites[i] for i in order], [units[i] for i in order]

    def commit(codes):
        with torch.no_grad():
            for site, q in zip(sites, codes):
                stored = get_attr(quantized, site.target)
                stored.copy_(q.to(stored.dtype))

    return Plan(units=units, capture=ModuleCapture(simulator, float_model, units), commit=commit)


@dataclasses.dataclass(eq=False)
class _FxSite:
    """A conv/linear node of NNCF's graph whose weight is ``int8 constant * scale - zero_point``."""

    node: str  # node name in NNCF's graph (and in its copies)
    name: str  # the float module it came from
    target: str  # get_attr target of the int8 constant
    fp_layer: object
    bn: object
    weight: object  # W_o: the float weight NNCF quantized (BN folded where NNCF folded it)
    bias: object
    grid: object


def _fx_sites(quantized, float_model, example) -> list[_FxSite]:
    import torch

    from qcb_ptq_plugin.adapters._common import execution_order, fold_bn, following_bn
    from qcb_ptq_plugin.adapters._graph import CONV_OPS, LINEAR_OP, attr_value
    from qcb_ptq_plugin.grid import WeightGrid

    aten = torch.ops.aten
    modules, order = dict(float_model.named_modules()), execution_order(float_model, example)
    sites = []
    for node in quantized.graph.nodes:
        if node.op != "call_function" or (node.target not in CONV_OPS and node.target != LINEAR_OP):
            continue
        sub = node.args[1]
        mul = sub.args[0] if getattr(sub, "target", None) == aten.sub.Tensor else None
        if getattr(mul, "target", None) != aten.mul.Tensor:
            continue  # a weight NNCF left in float
        q_stored, scale, zp = attr_value(quantized, mul.args[0]), attr_value(quantized, mul.args[1]), attr_value(quantized, sub.args[1])
        if q_stored is None or q_stored.dtype != torch.int8 or scale is None:
            continue
        stack = list(node.meta.get("nn_module_stack", {}).values())
        name = stack[-1][0] if stack else node.name
        fp_layer = modules.get(name)
        if fp_layer is None or not hasattr(fp_layer, "weight"):
            raise ValueError(f"the float model has no layer '{name}' (the source of NNCF's node '{node.name}'): "
                             "pass the nn.Module that was exported and given to nncf.quantize")
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"'{name}': NNCF quantized its weight with a nonzero zero point; purify_fx handles "
                             "NNCF's symmetric weights (its default)")
        per_channel = scale.numel() > 1
        scale = scale.detach().float().reshape(-1 if per_channel else ())
        grid = WeightGrid(scale, torch.zeros_like(scale, dtype=torch.int64), *WEIGHT_RANGE, 0 if per_channel else None,
                          reciprocal=True)  # quantized_decomposed rounds x * (1 / s)
        bn = following_bn(fp_layer, order)
        b = fp_layer.bias.detach() if fp_layer.bias is not None else None
        candidates = ([fold_bn(fp_layer.weight, b, bn)] if bn is not None else []) + [(fp_layer.weight.detach(), b)]
        found = next(((w, bias) for w, bias in candidates
                      if (grid.quantize(w) != q_stored.long()).float().mean() <= 1e-3), None)
        if found is None:
            raise ValueError(f"'{name}': NNCF's int8 weight is not the float layer's weight (nor with its BatchNorm "
                             "folded) on NNCF's grid: pass the float model given to nncf.quantize")
        sites.append(_FxSite(node.name, name, mul.args[0].target, fp_layer, bn, found[0].clone(),
                             None if found[1] is None else found[1].clone(), grid))
    if not sites:
        raise ValueError("no conv/linear with an int8 weight constant found: pass the GraphModule nncf.quantize "
                         "returned (with its default weight compression)")
    return sites
