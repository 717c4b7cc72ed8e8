"""qcb-ptq-plugin: purify quantization-conditioned backdoors as a step of post-training quantization.

>>> report = qcb_ptq_plugin.purify(prepared, float_model, calib)   # between calibration and convert
>>> report = qcb_ptq_plugin.quantize_(model, IntxWeightOnlyConfig(...), calib)   # torchao's call, purified

The package is the pass (methods, weight grid, config, report: torch, numpy and tqdm only) and
its toolchain adapters (``adapters/``: torch.ao FX and eager, torchao PT2E, onnxruntime). The
evaluation kit (``qcb_ptq_plugin.evalkit``: attacks, models, data, metrics, demo) and the
pipeline glue (``qcb_ptq_plugin.integrations``) are imported only when asked for.
"""

from .api import purify
from .audit import AuditReport, audit
from .config import MethodConfig, PDAMode, PurifyConfig, Solver
from .grid import WeightGrid
from .methods import Method, available_methods, get_method, register_method
from .report import PurifyReport, UnitReport

__all__ = ["purify", "quantize_", "audit", "AuditReport", "PurifyConfig", "MethodConfig", "Solver", "PDAMode", "WeightGrid",
           "PurifyReport", "UnitReport", "Method", "available_methods", "get_method", "register_method"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # quantize_ (torchao's one-call flow) is loaded on first use: `import qcb_ptq_plugin` never imports torchao
    if name == "quantize_":
        from .quantize import quantize_

        return quantize_
    raise AttributeError(f"module 'qcb_ptq_plugin' has no attribute {name!r}")
