"""The pass every method shares: units in execution order, one method call each, one report.

Sequential like GPTQ/BRECQ: unit l's inputs come from the quantized model in which units
1..l-1 already hold their new integers, so each unit corrects the drift its predecessors
leave. Knows no toolchain: the adapter's ``capture`` reads inputs, ``unit.write`` stores.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ._data import range_mismatch
from .config import MethodConfig
from .methods import Method, UnitResult
from .report import PurifyReport, UnitReport
from .units import Capture, Unit, UnitData, Unsupported

log = logging.getLogger(__name__)

__all__ = ["run", "run_plan", "check_coverage", "flush_denormals"]


def check_coverage(unsupported: Sequence[Unsupported], cfg: MethodConfig) -> list[dict]:
    """Every quantized layer is purified or named: an error listing the layers no method can
    handle, or with ``cfg.skip_unsupported`` a warning per layer; returns the report's rows."""
    if unsupported and not cfg.skip_unsupported:
        names = "; ".join(f"'{u.name}' ({u.kind}): {u.reason}" for u in unsupported)
        raise NotImplementedError(
            f"{len(unsupported)} quantized layer(s) cannot be purified: {names}. Exclude them from quantization "
            "(e.g. qconfig_mapping.set_module_name(name, None), or the quantizer's / ORT's nodes_to_exclude), or "
            "pass skip_unsupported=True to leave them at round-to-nearest")
    for u in unsupported:
        log.warning("'%s' (%s) is quantized but NOT purified (left at round-to-nearest): %s", u.name, u.kind, u.reason)
    return [{"name": u.name, "kind": u.kind, "reason": u.reason} for u in unsupported]


def run(units: Sequence[Unit], capture: Capture, batches: Sequence, method: Method, cfg: MethodConfig,
        write_back: bool = True, unsupported: Sequence[Unsupported] = ()) -> tuple[list[torch.Tensor], PurifyReport]:
    """Purify ``units`` in order with ``method``; returns the chosen integer weights and the report.

    With ``write_back=False`` (the audit) nothing is written: every unit sees the plain
    round-to-nearest model, and the report says how far each layer could be corrected.
    ``unsupported``: quantized layers the adapter found but cannot purify (:func:`check_coverage`).
    """
    skipped = check_coverage(unsupported, cfg)
    if method.check is not None:
        method.check(units, cfg)
    report = PurifyReport(method=method.name, config=cfg.to_dict(), skipped=skipped)
    codes: list[torch.Tensor] = []
    t_all = time.perf_counter()
    bar = tqdm(units, desc=method.name, unit="unit", disable=not cfg.progress)
    with flush_denormals():
        for unit in bar:
            bar.set_postfix_str(unit.name)
            t0 = time.perf_counter()
            result = method.purify_unit(unit, UnitData(unit, capture, batches), cfg)
            row, channels = _unit_report(unit, result, time.perf_counter() - t0)
            inflated = _dead_input_range(unit, result)
            if inflated:
                log.warning("%s", inflated)
                report.warnings.append(inflated)
            if write_back:
                unit.write(unit.grid.dequantize(result.codes))  # later units see this unit purified
                if result.act_scale is not None:
                    unit.out_quant.scale.copy_(result.act_scale.reshape(unit.out_quant.scale.shape))
            codes.append(result.codes)
            report.codes[unit.name] = result.codes
            report.channels[unit.name] = channels
            report.units.append(row)
            log.info("%s: error %.4g -> %.4g, %d flips, PDA %s, %.2fs", row.name, row.error_before,
                     row.error_after, row.flips, row.pda, row.seconds)
    report.seconds = time.perf_counter() - t_all
    report.peak_rss_mb = _peak_rss_mb()
    return codes, report


def _peak_rss_mb() -> float:
    """The process's peak resident memory in MB (0 where the platform does not report it, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_plan(plan, batches: Sequence, method: Method, cfg: MethodConfig, mode: str) -> PurifyReport:
    """What every entry point does with an adapter's plan: check the calibration data against the
    range the observers recorded (where the adapter read one), run the pass with the plan's
    unsupported layers named, commit the integers. ``plan``: an adapter's ``Plan``."""
    mismatch = range_mismatch(batches, plan.input_range)  # before LAC: is this the data the observers saw?
    if mismatch:
        log.warning("%s", mismatch)
    codes, report = run(plan.units, plan.capture, batches, method, cfg, unsupported=plan.unsupported)
    report.warnings += [mismatch] if mismatch else []
    plan.commit(codes)
    report.mode = mode
    report.samples = sum(len(next(iter(b.values())) if isinstance(b, dict) else b) for b in batches)
    log.info("purified %d layers in %.1fs (%s, %s)", len(report.units), report.seconds, method.name, mode)
    return report


def _unit_report(unit: Unit, result: UnitResult, seconds: float) -> tuple[UnitReport, dict]:
    """The unit's row: output error of round-to-nearest (before) and of the method's integers (after)."""
    op, grid = unit.op, unit.grid
    q_rtn = grid.quantize(unit.weight.detach().float())
    if result.errors is not None:  # the method's own objective (e.g. after the activation)
        before, after, energy = result.errors
    else:
        before, after = (result.gram.channel_errors(op.grouped(grid.dequantize(q))) for q in (q_rtn, result.codes))
        energy = (result.gram.t_ch / result.gram.n).flatten()
    row = UnitReport(
        name=unit.name, kind=type(unit.fp_layer).__name__, weights=q_rtn.numel(), levels=grid.levels,
        error_before=max(before.sum().item(), 0.0), error_after=max(after.sum().item(), 0.0),
        target_energy=energy.sum().item(), flips=int((result.codes != q_rtn).sum()), pda=result.pda,
        seconds=seconds, pda_seconds=result.pda_seconds, solve_seconds=result.solve_seconds)
    if not math.isfinite(row.error_after):
        raise FloatingPointError(f"{unit.name}: the method produced a non-finite error; inputs or weights contain "
                                 "NaN/Inf")
    channels = {"before": before.clamp_min(0), "after": after.clamp_min(0), "energy": energy}
    return row, channels


#: a grid counts as inflated where weights on dead inputs are this many times the largest live one
RANGE_INFLATION = 1.5
#: an input column is dead where its mean square is below this share of the layer's average one
DEAD_INPUT = 1e-4


def _dead_input_range(unit: Unit, result: UnitResult) -> str | None:
    """A warning where the unit's weight grid is set by weights whose inputs are 0 on every
    calibration sample (up to PDA's nudge): they change no output on that data, they only make
    the grid coarser, and a coarser grid gives the float offsets a planted QCB hides in more room
    than purification can take back (``plant_grid_aware(dead_input_absmax=...)``,
    benchmarks/results/attacks.md)."""
    gram = result.gram
    if gram is None or gram.H is None or unit.grid.group_size is not None:
        return None
    d = gram.H.diagonal(dim1=1, dim2=2)  # (G, K): sum of each input column's squares
    dead = d <= DEAD_INPUT * d.mean(-1, keepdim=True)  # not == 0: PDA nudges dead inputs by up to gamma
    if not dead.any() or dead.all():
        return None
    w = unit.op.grouped(unit.weight.detach().float()).abs()  # (G, O/G, K)
    on_dead = w.masked_fill(~dead.unsqueeze(1), 0).amax(-1).flatten()
    on_live = w.masked_fill(dead.unsqueeze(1), 0).amax(-1).flatten()
    if unit.grid.axis is None:  # one scale for the tensor
        on_dead, on_live = on_dead.amax(0, keepdim=True), on_live.amax(0, keepdim=True)
    inflated = on_dead > RANGE_INFLATION * on_live
    if not inflated.any():
        return None
    ratio = (on_dead / on_live.clamp_min(1e-30))[inflated].max().item()
    return (f"{unit.name}: the weight grid of {int(inflated.sum())} of {len(inflated)} scale group(s) is set by "
            f"weights whose inputs are (almost) 0 on every calibration sample (up to {ratio:.1f}x the largest weight "
            "on a live input). "
            "They change no output on this data and only make the grid coarser, which leaves a planted QCB room "
            "that purification cannot fully take back. Set those weights to 0 in a copy of the float model (its "
            "outputs on this data do not change), then prepare, calibrate and purify that copy")


_flush_depth = 0
_flush_before = False


def _flushing() -> bool:
    """Whether denormals are flushed now (torch has no getter): does 1e-40 survive a multiply?"""
    return (torch.tensor([1e-20]) * torch.tensor([1e-20])).item() == 0.0


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero inside the block (re-entrant); the caller's setting is restored.

    PGD and small gradients produce denormals that slow x86 CPUs down 3-10x.
    """
    global _flush_depth, _flush_before
    if _flush_depth == 0:
        _flush_before = _flushing()
    supported = torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if supported and _flush_depth == 0:
            torch.set_flush_denormal(_flush_before)
