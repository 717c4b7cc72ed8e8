"""onnxruntime and ONNX-graph helpers shared by export and quantize_static."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the ONNX features need onnx and onnxruntime: pip install 'qcb-ptq-plugin[onnx]'") from e


def session(model):
    """An onnxruntime CPU session with exact integer arithmetic.

    ``session.x64quantprecision=1`` makes x64 CPUs without VNNI use the precise u8s8 kernels
    (otherwise ORT may saturate intermediate sums), so numerics match torch's fbgemm.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.x64quantprecision", "1")
    # no spinning after a run: the pass computes in torch between runs, on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


class OrtModel:
    """Callable wrapper: numpy/torch batch in, torch logits out (for qcb_ptq_plugin.evalkit.metrics)."""

    def __init__(self, model) -> None:
        self.sess = session(model)
        self.input = self.sess.get_inputs()[0].name

    def __call__(self, x):
        import torch

        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        return torch.from_numpy(self.sess.run(None, {self.input: x.astype(np.float32)})[0])


def constant_values(model) -> dict[str, np.ndarray]:
    """Initializers, Constant-node outputs and Identity copies of either, by tensor name.

    (torch.onnx stores a tensor equal to an earlier one, e.g. an untrained BN's zero running
    mean beside its zero bias, as an Identity of it.)"""
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # topological order: an Identity's input is resolved before it
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in vals:
            vals[n.output[0]] = vals[n.input[0]]
    return vals


def int_weights(model) -> list[tuple[str, np.ndarray]]:
    """Integer weights of Conv/Gemm/MatMul nodes in graph order: (node name, int array).

    Follows weight input <- DequantizeLinear <- integer constant (QDQ), or reads the weight
    input of QLinearConv/QLinearMatMul (QOperator).
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    vals = constant_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            src = producer.get(n.input[1])
            while src is not None and src.op_type in ("Identity", "Transpose", "Reshape") and src.input[0] not in vals:
                src = producer.get(src.input[0])
            if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in vals:
                q = vals[src.input[0]]
                if np.issubdtype(q.dtype, np.integer):
                    out.append((n.name or n.output[0], q.astype(np.int64)))
        elif n.op_type in ("QLinearConv", "QLinearMatMul"):
            w = n.input[3]
            if w in vals:
                out.append((n.name or n.output[0], vals[w].astype(np.int64)))
    return out
