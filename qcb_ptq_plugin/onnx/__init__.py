"""ONNX in and out: export a purified INT8 torch model, or purify inside ORT's quantize_static.

* :func:`export` - converted torch INT8 model -> QDQ ``.onnx`` validated in onnxruntime.
* :func:`quantize_static` - FP32 ``.onnx`` -> purified INT8 ``.onnx``, with the call shape of
  ``onnxruntime.quantization.quantize_static``.
"""

from ._export import ExportMismatchError, export
from ._ort import OrtModel, int_weights
from ._static import quantize_static

__all__ = ["export", "quantize_static", "ExportMismatchError", "OrtModel", "int_weights"]
