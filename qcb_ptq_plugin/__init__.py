"""qcb-ptq-plugin: purify quantization-conditioned backdoors as a step of post-training quantization.

>>> report = qcb_ptq_plugin.purify(prepared, float_model, calib)   # between calibration and convert
"""

from .api import purify
from .audit import AuditReport, audit
from .config import PDAMode, PurifyConfig, Solver
from .grid import WeightGrid
from .report import PurifyReport, UnitReport

__all__ = ["purify", "audit", "AuditReport", "PurifyConfig", "Solver", "PDAMode", "WeightGrid", "PurifyReport", "UnitReport"]
__version__ = "0.1.0"
