"""``purify``: the one line between calibration and convert."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from . import _pass, adapters
from ._data import as_batches, device_of
from .config import MethodConfig
from .methods import DEFAULT_METHOD, get_method
from .report import PurifyReport

log = logging.getLogger(__name__)

__all__ = ["purify"]


def purify(prepared: nn.Module, float_model: nn.Module, calib_data, config: MethodConfig | None = None, *,
           method: str = DEFAULT_METHOD, **overrides) -> PurifyReport:
    """Purify quantization-conditioned backdoors of a calibrated model, in place (default: LAC+PDA).

    Call it after calibration and before convert; the INT8 model convert produces is purified::

        prepared = prepare_fx(model, qconfig_mapping, example_inputs)
        for x in calib: prepared(x)
        qcb_ptq_plugin.purify(prepared, model, calib)
        int8 = convert_fx(prepared)

    Args:
        prepared: the calibrated model from torch.ao ``prepare_fx``/``prepare`` or torchao
            ``prepare_pt2e``. Its quantized layers' weights (and how convert reads their
            scales) are changed in place; its activation observers are left as calibrated.
        float_model: the float model that was prepared, with its BatchNorm layers (they are
            folded in ``prepared``; PDA reads their running statistics). Never modified.
        calib_data: unlabelled calibration samples: a Tensor ``(N, ...)``, a list of batches,
            or a DataLoader yielding ``x`` or ``(x, y)`` (labels are ignored).
        config: the method's config (for the default ``"lac_pda"``: a :class:`PurifyConfig`);
            keyword ``overrides`` replace its fields.
        method: a registered method name (:func:`qcb_ptq_plugin.available_methods`):
            ``"lac_pda"`` (default) or ``"lac"`` (LAC without PDA).

    Returns:
        A :class:`PurifyReport` with one row per quantized layer (error before/after, rounding
        flips, PDA applied or why skipped, seconds).
    """
    m = get_method(method)
    cfg = m.config(config, **overrides)
    adapter, plan, batches = prepare_plan(prepared, float_model, calib_data, cfg)
    return _pass.run_plan(plan, batches, m, cfg, adapter.mode_of(prepared))


def prepare_plan(prepared: nn.Module, float_model: nn.Module, calib_data, cfg: MethodConfig):
    """Validate the inputs and build (adapter, plan, batches): shared by purify and audit."""
    if prepared is float_model:
        raise ValueError("`prepared` and `float_model` are the same object; pass the calibrated model returned "
                         "by prepare_fx/prepare/prepare_pt2e and the original float model")
    adapter = adapters.detect(prepared)
    fixed = getattr(adapter, "fixed_batch_size", lambda _: None)(prepared)
    # streamed: batched as it arrives, each batch moved where the model is (CUDA models)
    batches = as_batches(calib_data, fixed or cfg.batch_size, cfg.num_samples, device=device_of(prepared))
    if fixed:  # exported without dynamic_shapes: every forward must use the exported batch size
        batches = _exact_batches(batches, fixed)
    fp = frozen_float_copy(float_model, batches[0])
    return adapter, adapter.plan(prepared, fp, batches[0]), batches


def _exact_batches(batches: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    full = [b for b in batches if len(b) == size]
    if not full:
        x = torch.cat(batches)
        full = [x.repeat((size + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:size]]
        log.warning("the model was exported for batch size %d but only %d calibration samples were given; "
                    "repeating them (export with dynamic_shapes to avoid this)", size, len(x))
    elif len(full) < len(batches):
        log.info("dropping %d calibration samples that do not fill a batch of %d (the exported batch size)",
                 sum(len(b) for b in batches) - size * len(full), size)
    return full


def frozen_float_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A frozen eval copy of the user's float model (never modified), checked to run on ``example``."""
    fp = _frozen_copy(model)
    try:
        with torch.no_grad():
            fp(example)
    except Exception as e:  # the user's forward raised: say which input did not fit
        raise ValueError(f"calibration batch of shape {tuple(example.shape)} does not fit the float model "
                         f"({type(e).__name__}: {e}); pass samples shaped like the model's input") from e
    return fp


def _frozen_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"float_model must be the float nn.Module that was prepared, got {type(model).__name__}")
    fp = copy.deepcopy(model)
    try:
        fp.eval()
    except NotImplementedError:  # torch.export modules refuse .eval(); they are traced in eval mode already
        pass
    fp.requires_grad_(False)
    if any(p.is_quantized for p in fp.parameters()) or any(b.is_quantized for b in fp.buffers()):
        raise ValueError("float_model holds quantized tensors; pass the original float model")
    return fp
