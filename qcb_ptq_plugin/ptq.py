"""Standard PTQ pipelines with purification as one optional step (used by the CLI, demo, benchmarks).

Each ``quantize_*`` runs exactly what a user script runs: prepare, calibrate, optionally
:func:`qcb_ptq_plugin.purify`, convert. The float model is deep-copied, never modified.
"""

from __future__ import annotations

import copy
import warnings
import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from .api import purify
from .config import PurifyConfig
from .report import PurifyReport

__all__ = ["fx_qconfig_mapping", "quantize_fx"]


def fx_qconfig_mapping(bits: int = 8, backend: str = "x86") -> QConfigMapping:
    """The backend's default static qconfig with ``bits``-bit per-channel symmetric weights.

    8 bits is exactly ``get_default_qconfig_mapping(backend)``'s weight observer; fewer bits
    narrow ``quant_min``/``quant_max`` (4 bits: -8..7) on the same qint8 storage.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: torch.ao integer weights take 2..8 bits")
    qmax = 2 ** (bits - 1) - 1
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-qmax - 1, quant_max=qmax)
    return QConfigMapping().set_global(QConfig(activation=get_default_qconfig(backend).activation, weight=weight))


def _calibrate(prepared: nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for xb in calib.split(batch_size):
            prepared(xb)


def quantize_fx(model: nn.Module, calib: torch.Tensor, bits: int = 8, purify_config: PurifyConfig | None = None,
                batch_size: int = 64, backend: str = "x86") -> tuple[nn.Module, PurifyReport | None]:
    """prepare_fx -> calibrate -> [purify] -> convert_fx; returns the INT8 model and the report."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_fx(copy.deepcopy(model).eval(), fx_qconfig_mapping(bits, backend), (calib[:1],))
        _calibrate(prepared, calib, batch_size)
        report = purify(prepared, model, calib, purify_config) if purify_config is not None else None
        return convert_fx(prepared), report
