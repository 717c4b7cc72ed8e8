"""Torch INT8 -> ONNX, validated in onnxruntime."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
        path: where to write the ``.onnx`` file.
        validate: run the file in onnxruntime (``session.x64quantprecision=1``) on
            ``example_inputs`` and raise :class:`ExportMismatchError` unless every output is
            within ``atol`` of torch's and top-1 agrees on >= 99% of rows.
        atol: default 5% of the torch output's range plus 1e-5: INT8 kernels of different
            libraries may round a requantization tie differently (one output step).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _require()
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"example_inputs must be a Tensor (or a 1-tuple of one), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] < 1:
        raise ValueError("example_inputs needs a batch dimension with at least one sample")
    if any(isinstance(m, torch.ao.quantization.observer.ObserverBase) for m in model.modules()):
        raise ValueError("the model still holds observers: it is prepared, not converted. Run convert_fx / "
                         "convert / convert_pt2e first (and purify before that)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_pt2e = isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
        for n in model.graph.nodes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_pt2e:
            batch = torch.export.Dim("batch", min=1)
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=[input_name], output_names=[output_name],
                                     dynamic_shapes=({0: batch},), opset_version=max(opset, 18), verbose=False)
            prog.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    if validate:
        _validate(model, x, path, atol)
    log.info("wrote %s", path)
    return path


def _validate(model: nn.Module, x: torch.Tensor, path: Path, atol: float | None) -> None:
    with torch.no_grad():
        ref = model(x)
    ref = (ref.dequantize() if ref.is_quantized else ref).numpy()
    sess = session(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportMismatchError(f"onnxruntime output shape {got.shape} != torch {ref.shape}")
    tol = atol if atol is not None else 0.05 * float(ref.max() - ref.min()) + 1e-5
    diff = float(np.abs(got - ref).max())
    agree = float((got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)).mean())
    if diff > tol or agree < 0.99:
        raise ExportMismatchError(
            f"{path}: onnxruntime disagrees with the torch INT8 model (max |diff| {diff:.4g} > atol {tol:.4g} or "
            f"top-1 agreement {agree:.1%} < 99%). Check the opset and that the model is converted")
    log.info("validated %s in onnxruntime: max |diff| %.3g, top-1 agreement %.1f%%", path, diff, 100 * agree)
