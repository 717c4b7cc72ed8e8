"""FP32 ONNX -> purified INT8 ONNX: onnxruntime's ``quantize_static`` with LAC+PDA inside.

1. ORT quantizes the model as usual (its calibration, its QDQ layout, its weight grid).
2. Each Conv/Gemm/MatMul with a constant weight becomes a :class:`~qcb_ptq_plugin.lac.Unit`:
   I is read from the quantized graph (onnxruntime, earlier units already purified), I^fp and
   W_o from the FP32 graph; the grid is ORT's own (scale/zero point read from its initializers).
3. LAC+PDA picks integers; we overwrite ORT's integer weight initializers with them. Scales are
   unchanged, so ORT's int32 bias (scale = input scale x weight scale) stays exact.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import lac
from ..config import PurifyConfig
from ..grid import WeightGrid
from ..report import PurifyReport
from ._ort import _require, constant_values, session

log = logging.getLogger(__name__)

_ELEM = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
         11: np.float64}


class _Replay:
    """A CalibrationDataReader over feeds we already hold (ORT's readers work only once)."""

    def __init__(self, feeds: list[dict]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _load(model_input):
    import onnx

    if isinstance(model_input, onnx.ModelProto):
        return copy.deepcopy(model_input)
    path = Path(model_input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}: {e}); pass an FP32 .onnx file") from e
    if not model.graph.node:
        raise ValueError(f"{path} is not an ONNX model (its graph has no nodes); pass an FP32 .onnx file")
    return model


def _graph_inputs(model) -> dict[str, tuple[np.dtype, list]]:
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[i.name] = (np.dtype(_ELEM.get(t.elem_type, np.float32)), dims)
    return out


def _read_feeds(reader, model) -> list[dict[str, np.ndarray]]:
    if not hasattr(reader, "get_next"):
        raise TypeError(f"calibration_data_reader must be an onnxruntime CalibrationDataReader (with get_next()), "
                        f"got {type(reader).__name__}")
    expected = _graph_inputs(model)
    feeds = []
    while (feed := reader.get_next()) is not None:
        if not isinstance(feed, Mapping):
            raise TypeError(f"the reader's get_next() returned a {type(feed).__name__}; it must return "
                            "{input_name: array} dicts and None at the end")
        if set(feed) != set(expected):
            raise ValueError(f"the reader yields inputs {sorted(feed)} but the model takes {sorted(expected)}")
        checked = {}
        for name, arr in feed.items():
            arr = np.asarray(arr)
            dtype, dims = expected[name]
            if arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, arr.shape)):
                raise ValueError(f"input '{name}' has shape {arr.shape} but the model expects "
                                 f"{['?' if d is None else d for d in dims]}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise ValueError(f"input '{name}' contains NaN/Inf values; clean or drop those samples")
            checked[name] = arr.astype(dtype, copy=False)
        feeds.append(checked)
    if not feeds:
        raise ValueError("the calibration data reader yielded no data; it must return at least one feed dict")
    return feeds


def _with_outputs(model, names: list[str]):
    """A copy of ``model`` that also returns the tensors ``names``."""
    import onnx

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _float_layer(node, w: np.ndarray, b: np.ndarray | None) -> nn.Module | None:
    """A torch layer equal to the FP32 node, or None when LAC cannot model it."""
    a = _attrs(node)
    if node.op_type == "Conv" and w.ndim in (3, 4):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        k = w.shape[2:]
        pads = a.get("pads", [0] * (2 * len(k)))
        if list(pads[: len(k)]) != list(pads[len(k):]):
            return None  # asymmetric padding
        cls = nn.Conv2d if w.ndim == 4 else nn.Conv1d
        layer = cls(w.shape[1] * a.get("group", 1), w.shape[0], tuple(k), stride=tuple(a.get("strides", [1] * len(k))),
                    padding=tuple(pads[: len(k)]), dilation=tuple(a.get("dilations", [1] * len(k))),
                    groups=a.get("group", 1), bias=b is not None)
    elif node.op_type == "Gemm" and w.ndim == 2:
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            return None
        w = w if a.get("transB", 0) else w.T
        layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    elif node.op_type == "MatMul" and w.ndim == 2:
        w = w.T  # x @ W, W (in, out)
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    else:
        return None
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        if b is not None:
            layer.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
    return layer.eval().requires_grad_(False)


def _bn_after(graph, node, vals) -> nn.Module | None:
    """The FP32 graph's BatchNormalization fed by ``node``, as a torch module."""
    users = [n for n in graph.node if node.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "BatchNormalization":
        return None
    bn_node = users[0]
    try:
        scale, bias, mean, var = (vals[i] for i in bn_node.input[1:5])
    except KeyError:
        return None
    bn = nn.BatchNorm2d(len(mean), eps=_attrs(bn_node).get("epsilon", 1e-5))
    with torch.no_grad():
        for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), (scale, bias, mean, var)):
            t.copy_(torch.from_numpy(np.array(v, dtype=np.float32)))
    return bn.eval()


class _OnnxCapture:
    """I from the quantized graph (rebuilt after each write), I^fp from the FP32 graph."""

    def __init__(self, qmodel, fpmodel, q_inputs: dict[str, str], fp_inputs: dict[str, str]) -> None:
        self.qmodel, self.q_inputs, self.fp_inputs = qmodel, q_inputs, fp_inputs
        self.fp = session(_with_outputs(fpmodel, list(fp_inputs.values())))
        self._q = None

    def invalidate(self) -> None:
        self._q = None

    def __call__(self, unit: lac.Unit, feed: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self._q is None:
            self._q = session(_with_outputs(self.qmodel, list(self.q_inputs.values())))
        (i_q,) = self._q.run([self.q_inputs[unit.name]], feed)
        (i_fp,) = self.fp.run([self.fp_inputs[unit.name]], feed)
        return torch.from_numpy(i_q).float(), torch.from_numpy(i_fp).float()


def _weight_qrange(weight_type, reduce_range: bool, extra_options: dict | None) -> tuple[int, int]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    signed = weight_type in (QuantType.QInt8, QuantType.QInt16, QuantType.QInt4)
    symmetric = (extra_options or {}).get("WeightSymmetric", signed)
    qmin, qmax = get_qmin_qmax_for_qType(weight_type.tensor_type, reduce_range=reduce_range, symmetric=symmetric)
    return int(qmin), int(qmax)


def quantize_static(model_input, model_output, calibration_data_reader, quant_format=None, op_types_to_quantize=None,
                    per_channel: bool = False, reduce_range: bool = False, activation_type=None, weight_type=None,
                    nodes_to_quantize=None, nodes_to_exclude=None, extra_options: dict | None = None, *,
                    purify_config: PurifyConfig | None = None, **ort_kwargs) -> PurifyReport:
    """``onnxruntime.quantization.quantize_static`` with purification; same arguments and defaults.

    The quantized file at ``model_output`` is what ORT would have written, except that the
    integer weights of every Conv/Gemm/MatMul with a constant weight are chosen by LAC+PDA
    (PDA only where a BatchNormalization node follows in the FP32 graph). Only the QDQ format
    is supported. Returns the :class:`~qcb_ptq_plugin.PurifyReport`.
    """
    _require()
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    quant_format = QuantFormat.QDQ if quant_format is None else quant_format
    activation_type = QuantType.QInt8 if activation_type is None else activation_type
    weight_type = QuantType.QInt8 if weight_type is None else weight_type
    if quant_format != QuantFormat.QDQ:
        raise NotImplementedError("purification writes QDQ models; pass quant_format=QuantFormat.QDQ "
                                  "(ORT runs QDQ models with the same integer kernels)")
    cfg = purify_config or PurifyConfig()
    fp = _load(model_input)
    feeds = _read_feeds(calibration_data_reader, fp)

    with tempfile.TemporaryDirectory() as tmp:  # ORT writes helper files next to its inputs
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp, str(src))
        ort_quantize_static(str(src), str(dst), _Replay(feeds), quant_format=quant_format,
                            op_types_to_quantize=op_types_to_quantize, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=activation_type, weight_type=weight_type,
                            nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                            extra_options=extra_options, **ort_kwargs)
        qmodel = onnx.load(str(dst))

    qmin, qmax = _weight_qrange(weight_type, reduce_range, extra_options)
    units, capture = _units(fp, qmodel, qmin, qmax)
    if not units:
        raise ValueError("the model has no Conv/Gemm/MatMul with a constant weight that ORT quantized; "
                         "nothing to purify (check op_types_to_quantize / nodes_to_exclude)")
    codes, report = lac.run(units, capture, feeds, cfg)
    report.mode = "onnxruntime"
    Path(model_output).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qmodel, str(model_output))
    return report


def _units(fp, qmodel, qmin: int, qmax: int) -> tuple[list[lac.Unit], _OnnxCapture]:
    from onnx import numpy_helper

    fp_vals, q_vals = constant_values(fp), constant_values(qmodel)
    fp_nodes = {n.name: n for n in fp.graph.node if n.name}
    q_producer = {o: n for n in qmodel.graph.node for o in n.output}
    q_inits = {i.name: i for i in qmodel.graph.initializer}
    units, q_inputs, fp_inputs = [], {}, {}
    for node in qmodel.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name not in fp_nodes:
            continue
        dq = q_producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in q_inits:
            continue
        fnode = fp_nodes[node.name]
        w = fp_vals.get(fnode.input[1])
        b = fp_vals.get(fnode.input[2]) if len(fnode.input) > 2 and fnode.input[2] else None
        layer = _float_layer(fnode, w, b) if w is not None else None
        if layer is None:
            log.info("'%s' (%s) is quantized but not supported by LAC; left as ORT rounded it", node.name, node.op_type)
            continue
        init = q_inits[dq.input[0]]
        q_stored = numpy_helper.to_array(init)
        q_ort = q_stored.astype(np.int64)
        scale = torch.from_numpy(np.atleast_1d(q_vals[dq.input[1]]).astype(np.float32))
        zp = torch.from_numpy(np.atleast_1d(q_vals[dq.input[2]]).astype(np.int64)) if len(dq.input) > 2 \
            else torch.zeros_like(scale, dtype=torch.int64)
        transpose = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attrs(node).get("transB", 0))
        per_channel = scale.numel() > 1
        grid = WeightGrid(scale if per_channel else scale.reshape(()), zp if per_channel else zp.reshape(()),
                          qmin, qmax, 0 if per_channel else None)
        w_o = layer.weight.detach().clone()
        rtn = grid.quantize(w_o)
        ort_codes = torch.from_numpy(q_ort.T.copy() if transpose else q_ort)
        mismatch = (rtn != ort_codes).float().mean().item()
        if mismatch > 1e-3:
            raise RuntimeError(f"'{node.name}': could not reproduce ORT's weight grid ({mismatch:.2%} of integers "
                               "differ); please report this with your ORT version and quantization arguments")

        def write(w_hat, _init=init, _grid=grid, _t=transpose, _dtype=q_stored.dtype):
            q = _grid.quantize(w_hat).numpy()
            arr = (q.T if _t else q).astype(_dtype)
            _init.CopyFrom(numpy_helper.from_array(arr, _init.name))
            capture.invalidate()

        units.append(lac.Unit(name=node.name, layer=node.name, fp_layer=layer, weight=w_o,
                              bias=None if layer.bias is None else layer.bias.detach().clone(), grid=grid,
                              write=write, bn=_bn_after(fp.graph, fnode, fp_vals)))
        q_inputs[node.name], fp_inputs[node.name] = node.input[0], fnode.input[0]
    capture = _OnnxCapture(qmodel, fp, q_inputs, fp_inputs)
    return units, capture
