"""Standard PTQ pipelines with purification as one optional step (used by the CLI, demo, benchmarks).

Each ``quantize_*`` runs exactly what a user script runs: prepare, calibrate, optionally
:func:`qcb_ptq_plugin.purify`, convert. Purification runs when ``method`` or ``purify_config``
is given (``method=None`` and no config: plain PTQ; a config alone: the default method). The
float model is deep-copied, never modified.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver, default_dynamic_quant_observer

from .adapters._common import execution_order
from .api import purify
from .config import MethodConfig
from .methods import DEFAULT_METHOD
from .report import PurifyReport

__all__ = ["fx_qconfig_mapping", "quantize_fx", "pt2e_quantizer", "quantize_pt2e", "fusion_plan", "QuantWrapper",
           "quantize_eager", "quiet_torch_ao", "quantized_engine"]


def fx_qconfig_mapping(bits: int = 8, backend: str = "x86", dynamic: bool = False) -> QConfigMapping:
    """The backend's default static qconfig with ``bits``-bit symmetric weights.

    Weights follow the backend's default weight observer: per-channel for x86/fbgemm
    (``PerChannelMinMaxObserver``), per-tensor for qnnpack (``MinMaxObserver``); fewer bits
    narrow ``quant_min``/``quant_max`` (4 bits: -8..7) on the same qint8 storage. Activations
    are the backend's default observer. Run a qnnpack model's calibration, convert and inference
    inside :func:`quantized_engine` ``("qnnpack")``. With ``dynamic=True``: Linear layers only,
    activations quantized per batch at run time (``default_dynamic_qconfig`` with these
    weights): weight-only INT8/INT4 for Linear stacks.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: torch.ao integer weights take 2..8 bits")
    qmax = 2 ** (bits - 1) - 1
    if backend == "qnnpack":
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                          quant_min=-qmax - 1, quant_max=qmax)
    else:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                    quant_min=-qmax - 1, quant_max=qmax)
    if dynamic:  # ReLU too, so Linear+ReLU fuses into one dynamic module
        qconfig = QConfig(activation=default_dynamic_quant_observer, weight=weight)
        mapping = QConfigMapping()
        for kind in (nn.Linear, nn.ReLU, torch.nn.functional.relu, torch.relu):
            mapping.set_object_type(kind, qconfig)
        return mapping
    return QConfigMapping().set_global(QConfig(activation=get_default_qconfig(backend).activation, weight=weight))


@contextmanager
def quantized_engine(name: str):
    """Run torch's quantized kernels of ``name`` ("qnnpack", "x86", "fbgemm") inside the block."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class quiet_torch_ao(warnings.catch_warnings):
    """Silence torch.ao's deprecation notices (noise for pipeline users) inside the block."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Please use quant_min and quant_max", UserWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        return out


def _calibrate(prepared: nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for xb in calib.split(batch_size):
            prepared(xb)


def prepare_fx_calibrated(model: nn.Module, calib: torch.Tensor, bits: int = 8, batch_size: int = 64,
                          backend: str = "x86", dynamic: bool = False) -> nn.Module:
    """prepare_fx on a copy of ``model`` + calibration: the state purify and audit expect."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    with quiet_torch_ao():
        prepared = prepare_fx(copy.deepcopy(model).eval(), fx_qconfig_mapping(bits, backend, dynamic), (calib[:1],))
        _calibrate(prepared, calib, batch_size)
    return prepared


def _purify(prepared, model, calib, config: MethodConfig | None, method: str | None) -> PurifyReport | None:
    """The optional step: none without a method or config, else ``purify`` (default method for a bare config)."""
    if config is None and method is None:
        return None
    return purify(prepared, model, calib, config, method=method or DEFAULT_METHOD)


def quantize_fx(model: nn.Module, calib: torch.Tensor, bits: int = 8, purify_config: MethodConfig | None = None,
                batch_size: int = 64, backend: str = "x86", dynamic: bool = False, method: str | None = None
                ) -> tuple[nn.Module, PurifyReport | None]:
    """prepare_fx -> calibrate -> [purify] -> convert_fx; returns the INT8 model and the report."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = prepare_fx_calibrated(model, calib, bits, batch_size, backend, dynamic)
    with quiet_torch_ao():
        report = _purify(prepared, model, calib, purify_config, method)
        return convert_fx(prepared), report


# ---------------------------------------------------------------------------------------------
# torchao PT2E


def pt2e_quantizer(bits: int = 8, grid: str = "x86"):
    """torchao's X86InductorQuantizer with ``bits``-bit weights on the x86 grid (absmax/127.5,
    -2^(b-1)..2^(b-1)-1) or the XNNPACK/ORT grid (``grid="xnnpack"``: absmax/127, symmetric range)."""
    import dataclasses

    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    if grid not in ("x86", "xnnpack"):
        raise ValueError(f"grid={grid!r}: choose 'x86' or 'xnnpack'")
    qmax = 2 ** (bits - 1) - 1
    cfg = xiq.get_default_x86_inductor_quantization_config()
    weight = dataclasses.replace(cfg.weight, quant_min=-qmax if grid == "xnnpack" else -qmax - 1, quant_max=qmax)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(dataclasses.replace(cfg, weight=weight))
    return quantizer


def prepare_pt2e_calibrated(model: nn.Module, calib: torch.Tensor, bits: int = 8, batch_size: int = 64,
                            grid: str = "x86") -> nn.Module:
    """torch.export (dynamic batch; an already exported module is used as is) + prepare_pt2e + calibration."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    with quiet_torch_ao():
        if isinstance(model, torch.fx.GraphModule):
            exported = copy.deepcopy(model)
        else:
            exported = torch.export.export(copy.deepcopy(model).eval(), (calib[:2],),
                                           dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = prepare_pt2e(exported, pt2e_quantizer(bits, grid))
        _calibrate(prepared, calib, batch_size)
    return prepared


def quantize_pt2e(model: nn.Module, calib: torch.Tensor, bits: int = 8, purify_config: MethodConfig | None = None,
                  batch_size: int = 64, grid: str = "x86", method: str | None = None
                  ) -> tuple[nn.Module, PurifyReport | None]:
    """torch.export (dynamic batch) -> prepare_pt2e -> calibrate -> [purify] -> convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepare_pt2e_calibrated(model, calib, bits, batch_size, grid)
    with quiet_torch_ao():
        report = _purify(prepared, model, calib, purify_config, method)
        return convert_pt2e(prepared), report


# ---------------------------------------------------------------------------------------------
# torch.ao eager


def fusion_plan(model: nn.Module, example: torch.Tensor) -> list[list[str]]:
    """Groups of consecutive modules (in call order) that ``torch.ao.quantization.fuse_modules``
    knows how to fuse (Conv-BN-ReLU, Conv-BN, Linear-BN1d, Linear-ReLU, ...), longest first."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD as fusable

    plan, i = [], 0
    seq = _call_order_names(model, example)
    mods = dict(model.named_modules())
    while i < len(seq):
        n = next((n for n in (3, 2) if tuple(type(mods[s]) for s in seq[i:i + n]) in fusable), 1)
        if n > 1:
            plan.append(seq[i:i + n])
        i += n
    return plan


def _call_order_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    was = model.training
    try:
        order = execution_order(model.eval(), example)
    finally:
        model.train(was)
    return [names[id(m)] for m in order]


class QuantWrapper(nn.Module):
    """QuantStub -> model -> DeQuantStub: the float model as eager mode wants it (names under ``model.``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.model, self.dequant = QuantStub(), model, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.model(self.quant(x)))


def quantize_eager(model: nn.Module, calib: torch.Tensor, bits: int = 8, purify_config: MethodConfig | None = None,
                   batch_size: int = 64, backend: str = "x86", method: str | None = None
                   ) -> tuple[nn.Module, PurifyReport | None]:
    """QuantWrapper -> fuse_modules -> prepare -> calibrate -> [purify] -> convert (eager mode)."""
    from torch.ao.quantization import convert, fuse_modules, prepare

    float_model = QuantWrapper(copy.deepcopy(model)).eval()
    with quiet_torch_ao():
        plan = fusion_plan(float_model, calib[:2])
        fused = fuse_modules(copy.deepcopy(float_model), plan) if plan else copy.deepcopy(float_model)
        fused.qconfig = fx_qconfig_mapping(bits, backend).global_qconfig
        prepared = prepare(fused)
        _calibrate(prepared, calib, batch_size)
        report = _purify(prepared, float_model, calib, purify_config, method)
        return convert(prepared), report
