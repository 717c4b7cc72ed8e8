"""onnxruntime: units of a QDQ model that ORT's ``quantize_static`` wrote, read through ORT sessions.

* discover: each Conv/Gemm/MatMul whose weight is ``DequantizeLinear(integer initializer)`` and
  whose FP32 twin (same node name) has a constant weight becomes a :class:`Unit`, with ORT's own
  grid (scale and zero point read from its initializers);
* simulate: the quantized model itself, run by onnxruntime in stages cut in front of each unit
  (one forward per batch for the whole pass, each stage's session built once), I^fp from one
  run of the FP32 model per batch that returns every unit's input;
* commit: the chosen integers overwrite ORT's integer weight initializers. Scales are unchanged,
  so ORT's int32 bias (scale = input scale x weight scale) stays exact.

Needs onnx and onnxruntime; imported only by :mod:`qcb_ptq_plugin.onnx`.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..grid import WeightGrid
from ..onnx._ort import constant_values, session
from ..units import Unit, Unsupported, float_bn, float_layer
from ._common import Plan

log = logging.getLogger(__name__)

__all__ = ["plan"]


#: ops whose second input is a weight: with an integer initializer there, a quantized layer
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Gather", "LSTM", "GRU", "RNN"}


def plan(fp: onnx.ModelProto, qmodel: onnx.ModelProto, qmin: int, qmax: int) -> Plan:
    """Units of ``qmodel`` (written in place by commit) matched to the FP32 model ``fp``."""
    q_vals = constant_values(qmodel)  # read once: discovery and the input range both need it
    sites, unsupported = _discover(fp, qmodel, q_vals, qmin, qmax)
    capture = _OnnxCapture(qmodel, fp, {s.name: (s.q_input, s.fp_input) for s in sites})
    units = [Unit(name=s.name, layer=s.init, fp_layer=s.fp_layer, weight=s.fp_layer.weight.detach().clone(),
                  bias=None if s.fp_layer.bias is None else s.fp_layer.bias.detach().clone(), grid=s.grid,
                  write=functools.partial(_write, s.init, s.grid, capture, s.name), bn=s.bn) for s in sites]
    return Plan(units=units, capture=capture, commit=functools.partial(_commit, units), unsupported=unsupported,
                input_range=_input_range(qmodel, q_vals))


def _input_range(qmodel: onnx.ModelProto, vals: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """The range calibration recorded at a single-input model's input: the grid of the QuantizeLinear
    reading it, [(qmin - zp) s, (qmax - zp) s]. None where there is no such node or several inputs."""
    inits = {i.name for i in qmodel.graph.initializer}
    inputs = [i.name for i in qmodel.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return None
    for n in qmodel.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == inputs[0] and len(n.input) > 2:
            s, zp = vals.get(n.input[1]), vals.get(n.input[2])
            if s is None or zp is None or np.size(s) != 1 or not np.issubdtype(zp.dtype, np.integer):
                return None
            info, z, s = np.iinfo(zp.dtype), int(np.ravel(zp)[0]), float(np.ravel(s)[0])
            return (info.min - z) * s, (info.max - z) * s
    return None


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _float_layer(node, w: np.ndarray, b: np.ndarray | None) -> nn.Module | None:
    """A torch layer equal to the FP32 node, or None when the methods cannot model it."""
    a = _attrs(node)
    kwargs = {}
    if node.op_type == "Conv" and w.ndim in (3, 4):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        k = w.ndim - 2
        pads = a.get("pads", [0] * (2 * k))
        if list(pads[:k]) != list(pads[k:]):
            return None  # asymmetric padding
        kwargs = dict(stride=tuple(a.get("strides", [1] * k)), padding=tuple(pads[:k]),
                      dilation=tuple(a.get("dilations", [1] * k)), groups=a.get("group", 1))
    elif node.op_type == "Gemm" and w.ndim == 2:
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            return None
        w = w if a.get("transB", 0) else w.T
    elif node.op_type == "MatMul" and w.ndim == 2:
        w, b = w.T, None  # x @ W, W (in, out)
    else:
        return None
    return float_layer(torch.from_numpy(np.array(w, dtype=np.float32)),
                       None if b is None else torch.from_numpy(np.array(b, dtype=np.float32)), **kwargs)


def _bn_after(graph, node, vals, spatial_dims: int) -> nn.Module | None:
    """The FP32 graph's BatchNormalization fed by ``node``, as a torch module (BatchNorm1d after a
    Gemm/MatMul/1-D Conv, whose PDA matches batch statistics, BatchNorm2d after a 2-D Conv)."""
    users = [n for n in graph.node if node.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "BatchNormalization":
        return None
    bn_node = users[0]
    try:
        scale, bias, mean, var = (vals[i] for i in bn_node.input[1:5])
    except KeyError:
        return None
    return float_bn(scale, bias, mean, var, eps=_attrs(bn_node).get("epsilon", 1e-5), spatial_dims=spatial_dims)


class _Initializer:
    """Where a unit's integers live in the quantized model (the unit's ``layer``)."""

    def __init__(self, proto, transpose: bool, dtype) -> None:
        self.proto, self.transpose, self.dtype = proto, transpose, dtype

    def store(self, q: torch.Tensor) -> None:
        q = q.numpy()
        self.proto.CopyFrom(numpy_helper.from_array((q.T if self.transpose else q).astype(self.dtype), self.proto.name))


@dataclass(eq=False)
class _Site:
    """A quantized node of ORT's model with what purifying it needs."""

    name: str  # node name, the same in the FP32 and the quantized graph
    q_input: str  # the node's input tensor in the quantized graph (I)
    fp_input: str  # ... and in the FP32 graph (I^fp)
    fp_layer: nn.Module
    bn: nn.Module | None
    grid: WeightGrid
    init: _Initializer


def _discover(fp, qmodel, q_vals: dict[str, np.ndarray], qmin: int, qmax: int) -> tuple[list[_Site], list[Unsupported]]:
    """Units for each node whose weight is ORT's integer initializer; nodes with such a weight we
    cannot purify (no float twin, another op type, a flavour the methods cannot model) named."""
    fp_vals = constant_values(fp)
    fp_nodes = {n.name: n for n in fp.graph.node if n.name}
    q_producer = {o: n for n in qmodel.graph.node for o in n.output}
    q_inits = {i.name: i for i in qmodel.graph.initializer}
    sites, unsupported = [], []
    for node in qmodel.graph.node:
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq = q_producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in q_inits:
            continue  # no integer weight
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            unsupported.append(Unsupported(node.name, node.op_type, "LAC supports Conv (1-D/2-D), Gemm and MatMul"))
            continue
        fnode = fp_nodes.get(node.name)
        if fnode is None:
            unsupported.append(Unsupported(node.name, node.op_type, "no node of this name in the FP32 model (its "
                                           "float twin), so there is no float output to match"))
            continue
        w = fp_vals.get(fnode.input[1])
        b = fp_vals.get(fnode.input[2]) if len(fnode.input) > 2 and fnode.input[2] else None
        layer = _float_layer(fnode, w, b) if w is not None else None
        if layer is None:
            unsupported.append(Unsupported(node.name, node.op_type, "a flavour the methods cannot model (a weight "
                                           "computed at run time, asymmetric/auto padding, a Gemm with alpha/beta/transA)"))
            continue
        init = q_inits[dq.input[0]]
        q_stored = numpy_helper.to_array(init)
        scale = torch.from_numpy(np.atleast_1d(q_vals[dq.input[1]]).astype(np.float32))
        zp = torch.from_numpy(np.atleast_1d(q_vals[dq.input[2]]).astype(np.int64)) if len(dq.input) > 2 \
            else torch.zeros_like(scale, dtype=torch.int64)
        transpose = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attrs(node).get("transB", 0))
        per_channel = scale.numel() > 1
        grid = WeightGrid(scale if per_channel else scale.reshape(()), zp if per_channel else zp.reshape(()),
                          qmin, qmax, 0 if per_channel else None)
        w_o = layer.weight.detach().clone()
        q_ort = q_stored.astype(np.int64)
        mismatch = (grid.quantize(w_o) != torch.from_numpy(q_ort.T.copy() if transpose else q_ort)).float().mean().item()
        if mismatch > 1e-3:
            raise RuntimeError(f"'{node.name}': could not reproduce ORT's weight grid with integers in [{qmin}, "
                               f"{qmax}] ({mismatch:.2%} of integers differ). If the model was quantized with another "
                               "weight range (e.g. extra_options WeightSymmetric=False: -128..127 for int8), pass "
                               "that range (quantize_static reads it from extra_options; Olive: weight_range); "
                               "otherwise please report this with your ORT version and quantization arguments")
        sites.append(_Site(node.name, node.input[0], fnode.input[0], layer, _bn_after(fp.graph, fnode, fp_vals, w.ndim - 2), grid,
                           _Initializer(init, transpose, q_stored.dtype)))
    return sites, unsupported


def _with_outputs(model, names: list[str]):
    """A copy of ``model`` that also returns the tensors ``names``."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


class _OnnxCapture:
    """I from the quantized graph run in stages, I^fp from one FP32 run per batch.

    Quantized side: the graph is cut in front of each unit's node (:class:`_StagedRun`); a
    batch's run is paused there, so the pass over all units costs one forward per batch and
    each stage's session is built once (after the units before it are written). FP32 side:
    one run per batch returns every unit's I^fp, kept (up to ``cache_mb``) until its unit asks.
    """

    def __init__(self, qmodel, fpmodel, inputs: dict[str, tuple[str, str]], cache_mb: float = 1024) -> None:
        self.qmodel, self.inputs = qmodel, inputs
        self.fp = session(_with_outputs(fpmodel, [f for _, f in inputs.values()]))
        self.staged = _StagedRun.build(qmodel, inputs)
        self._q = None  # whole-graph session (fallback when the graph cannot be staged)
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[tuple[str, int], np.ndarray] = {}  # (fp tensor, id(feed)) -> I^fp
        self._filled: set[int] = set()  # id(feed) of batches whose FP32 run is done
        self._bytes = 0
        self._users: dict[tuple[str, int], int] = {}  # cached keys shared by several units: askers left
        self._keep: list = []  # feeds whose ids key the cache, kept alive

    def invalidate(self, unit_name: str | None = None) -> None:
        self._q = None
        if self.staged is not None:
            self.staged.invalidate(unit_name)

    def _fp_input(self, fp_name: str, feed: dict) -> np.ndarray:
        key = (fp_name, id(feed))
        if id(feed) not in self._filled:
            self._filled.add(id(feed))
            self._keep.append(feed)
            names = list(dict.fromkeys(f for _, f in self.inputs.values()))
            for n, v in zip(names, self.fp.run(names, feed)):
                if self._bytes + v.nbytes <= self.cache_bytes:
                    self._cache[(n, id(feed))] = v
                    self._bytes += v.nbytes
        if key in self._cache:
            # units sharing this FP32 tensor ask once each: copies until the last one, which takes it
            left = self._users.get(key, sum(1 for _, f in self.inputs.values() if f == fp_name)) - 1
            if left <= 0:
                self._users.pop(key, None)
                v = self._cache.pop(key)
                self._bytes -= v.nbytes
                return v
            self._users[key] = left
            return self._cache[key].copy()  # the callers get their own array to wrap
        (v,) = self.fp.run([fp_name], feed)
        return v

    def __call__(self, unit: Unit, feed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        q_name, fp_name = self.inputs[unit.name]
        if self.staged is not None:
            i_q = self.staged.input_of(unit.name, feed)
        else:
            if self._q is None:
                self._q = session(_with_outputs(self.qmodel, [q for q, _ in self.inputs.values()]))
            (i_q,) = self._q.run([q_name], feed)
        i_fp = self._fp_input(fp_name, feed)
        # onnxruntime returns fresh float32 arrays: wrapped, not copied (a 0.7 s copy on ResNet-18)
        return (torch.from_numpy(np.require(i_q, np.float32, "CW")),
                torch.from_numpy(np.require(i_fp, np.float32, "CW")))


class _StagedRun:
    """The quantized graph cut in front of each unit's node, run stage by stage per batch.

    Like the torch graph stepper: ``input_of(unit, feed)`` runs the batch on from where it is
    paused up to the unit's node and returns the node's input; the node itself runs in the next
    stage, whose session is built on first use, i.e. after the unit's integers are written.
    Nodes that depend on constants only (weight DequantizeLinear, shape arithmetic) are copied
    into every stage that needs them, so a stage reads the initializers as they are when built.
    """

    def __init__(self, model, pos: dict[str, int], q_input: dict[str, str]) -> None:
        self.model, self.pos, self.q_input = model, pos, q_input
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        const = set(self.inits) | {""}
        self.static: dict[str, object] = {}  # tensor -> producing node, constants only
        self.dynamic = []
        for n in g.node:
            if all(i in const or i in self.static for i in n.input):
                for o in n.output:
                    self.static[o] = n
            else:
                self.dynamic.append(n)
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.dynamic):
            for t in n.input:
                self.last_use[t] = i
        self.sessions: dict[tuple[int, int], object] = {}
        self.runs: dict[int, tuple[dict, int, dict]] = {}  # id(feed) -> (feed kept alive, next node, live tensors)

    @classmethod
    def build(cls, model, inputs: dict[str, tuple[str, str]]) -> _StagedRun | None:
        """None when the graph cannot be cut (subgraphs reading outer tensors, unnamed units)."""
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute):
            return None
        self = cls(model, {}, {})
        index = {n.name: i for i, n in enumerate(self.dynamic) if n.name}
        for name, (q, _) in inputs.items():
            if name not in index or q not in self.dynamic[index[name]].input:
                return None
            self.pos[name], self.q_input[name] = index[name], q
        return self

    def invalidate(self, unit_name: str | None) -> None:
        """A unit's weight changed: drop the stages that contain its node; runs past it restart."""
        if unit_name is None or unit_name not in self.pos:
            self.sessions.clear()
            self.runs.clear()
            return
        p = self.pos[unit_name]
        self.sessions = {k: s for k, s in self.sessions.items() if not k[0] <= p < k[1]}
        self.runs = {k: r for k, r in self.runs.items() if r[1] <= p}

    def _stage(self, a: int, b: int, env: dict):
        key = (a, b)
        if key not in self.sessions:
            nodes = self.dynamic[a:b]
            produced = {o for n in nodes for o in n.output}
            const = lambda t: t in self.static or t in self.inits  # noqa: E731
            ins = list(dict.fromkeys(t for n in nodes for t in n.input if t and t not in produced and not const(t)))
            outs = [t for t in dict.fromkeys(o for n in nodes for o in n.output) if self.last_use.get(t, -1) >= b]
            statics, seen, stack = [], set(), [t for n in nodes for t in n.input if const(t)]
            inits = set()
            while stack:  # constant-only ancestors of the stage's nodes, with their initializers
                t = stack.pop()
                if t in self.inits:
                    inits.add(t)
                    continue
                n = self.static.get(t)
                if n is None or id(n) in seen:
                    continue
                seen.add(id(n))
                statics.append(n)
                stack += [i for i in n.input if i]
            order = {id(n): i for i, n in enumerate(self.model.graph.node)}
            statics.sort(key=lambda n: order[id(n)])
            vi = [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(env[t].dtype), None)
                  for t in ins]
            graph = onnx.helper.make_graph(statics + list(nodes), f"stage_{a}_{b}", vi,
                                           [onnx.helper.make_empty_tensor_value_info(t) for t in outs],
                                           [self.inits[t] for t in sorted(inits)])
            m = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
            m.ir_version = self.model.ir_version
            self.sessions[key] = (session(m), ins, outs)
        return self.sessions[key]

    def input_of(self, unit_name: str, feed: dict) -> np.ndarray:
        target = self.pos[unit_name]
        _, pos, env = self.runs.get(id(feed), (feed, 0, None))
        if env is None or pos > target:  # a new batch, or asked for an earlier unit: start again
            pos, env = 0, dict(feed)
        if pos < target:
            sess, ins, outs = self._stage(pos, target, env)
            env.update(zip(outs, sess.run(outs, {t: env[t] for t in ins})))
            for t in [t for t in env if self.last_use.get(t, -1) < target and t not in feed]:
                del env[t]
        self.runs[id(feed)] = (feed, target, env)
        return env[self.q_input[unit_name]]


def _write(init: _Initializer, grid: WeightGrid, capture: _OnnxCapture, name: str, w_hat: torch.Tensor) -> None:
    init.store(grid.quantize(w_hat))
    capture.invalidate(name)


def _commit(units: list[Unit], codes: list[torch.Tensor]) -> None:
    for unit, q in zip(units, codes):
        unit.layer.store(q)
