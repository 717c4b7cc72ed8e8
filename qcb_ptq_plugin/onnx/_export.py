"""Torch INT8 -> ONNX, validated in onnxruntime."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import atomic_output, check_output
from ._ort import _require, session

log = logging.getLogger(__name__)


class ExportMismatchError(RuntimeError):
    """onnxruntime's outputs disagree with the torch INT8 model's."""


def export(model: nn.Module, example_inputs, path: str | Path, *, validate: bool = True, atol: float | None = None,
           opset: int = 17, input_name: str = "input", output_name: str = "output") -> Path:
    """Write a converted (INT8) torch model as a QDQ ONNX file with a dynamic batch dimension.

    Args:
        model: the output of ``convert_fx`` / eager ``convert`` (TorchScript exporter,
            weights become int8 constants) or torchao ``convert_pt2e`` (dynamo exporter).
        example_inputs: a Tensor or a 1-tuple with one batch of inputs; also used to validate.
        path: where to write the ``.onnx`` file: checked before any work, written to a temporary
            file next to it, validated, then renamed over it (a failed run leaves it as it was).
        validate: run the file in onnxruntime (``session.x64quantprecision=1``) on
            ``example_inputs`` and raise :class:`ExportMismatchError` unless every output is
            within ``atol`` of torch's and top-1 agrees on >= 99% of rows.
        atol: default 5% of the torch output's range plus 1e-5: INT8 kernels of different
            libraries may round a requantization tie differently (one output step).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _require()
    import onnx

    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"example_inputs must be a Tensor (or a 1-tuple of one), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] < 1:
        raise ValueError("example_inputs needs a batch dimension with at least one sample")
    if any(isinstance(m, torch.ao.quantization.observer.ObserverBase) for m in model.modules()):
        raise ValueError("the model still holds observers: it is prepared, not converted. Run convert_fx / "
                         "convert / convert_pt2e first (and purify before that)")
    path = check_output(path, "ONNX output")  # before any work
    is_pt2e = isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
        for n in model.graph.nodes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_pt2e:
            batch = torch.export.Dim("batch", min=1)
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=[input_name], output_names=[output_name],
                                     dynamic_shapes=({0: batch},), opset_version=max(opset, 18), verbose=False)
            proto = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
            proto = onnx.load_from_string(buf.getvalue())
    _unshare_weight_qparams(proto)
    with atomic_output(path, "ONNX output") as tmp:  # validated before it replaces anything
        onnx.save(proto, str(tmp))
        if validate:
            _validate(model, x, tmp, atol, shown=path)
    return path


def _last_line(e: Exception) -> str:
    """The exception's last message line (where ORT puts the reason), at most 300 characters."""
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:300]


def _unshare_weight_qparams(model) -> None:
    """Give every weight DequantizeLinear its own scale and zero-point initializers.

    The dynamo exporter deduplicates equal initializers, so two weights with the same channel
    count share one all-zero zero point. onnxruntime's x64 precise-quantization transform
    (``session.x64quantprecision=1``) rewrites each weight's zero point in place under a derived
    name and then fails on the second ("AddInitializedOrtValue Attempt to replace the existing
    tensor"). Copies are a few bytes per layer.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        for k in range(1, len(node.input)):
            name = node.input[k]
            if name in inits and users[name] > 1:
                new = f"{node.input[0]}_qparam{k}"
                while new in inits:
                    new += "_"
                copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]), new)
                model.graph.initializer.append(copy)
                inits[new] = copy
                users[name] -= 1
                node.input[k] = copy.name


def _validate(model: nn.Module, x: torch.Tensor, path: Path, atol: float | None, shown: Path | None = None) -> None:
    shown = shown or path
    with torch.no_grad():
        ref = model(x)
    ref = (ref.dequantize() if ref.is_quantized else ref).numpy()
    try:
        sess = session(str(path))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportMismatchError(f"{shown}: onnxruntime cannot load the exported file ({_last_line(e)}); nothing "
                                  "was written. Try another opset or report the model") from e
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportMismatchError(f"onnxruntime output shape {got.shape} != torch {ref.shape}")
    tol = atol if atol is not None else 0.05 * float(ref.max() - ref.min()) + 1e-5
    diff = float(np.abs(got - ref).max())
    agree = float((got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)).mean())
    if diff > tol or agree < 0.99:
        raise ExportMismatchError(
            f"{shown}: onnxruntime disagrees with the torch INT8 model (max |diff| {diff:.4g} > atol {tol:.4g} or "
            f"top-1 agreement {agree:.1%} < 99%). Check the opset and that the model is converted")
    log.info("validated %s in onnxruntime: max |diff| %.3g, top-1 agreement %.1f%%", shown, diff, 100 * agree)
