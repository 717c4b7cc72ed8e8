"""What :func:`qcb_ptq_plugin.purify` returns: one row per unit, printable and JSON-able."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._io import atomic_output, write_text

__all__ = ["UnitReport", "PurifyReport"]


@dataclass
class UnitReport:
    """One unit (Conv/Linear + folded BN + activation) of the quantized model.

    ``error_*`` is absolute: the LAC objective on the calibration set, the squared error of
    the unit's pre-activation output against the float model, summed over channels, mean over
    samples and positions (before = round to nearest, after = the method's integers).
    ``rel_error_*`` divides it by ``target_energy``. ``flips`` counts integers that differ
    from round-to-nearest.
    """

    name: str
    kind: str
    weights: int
    levels: int
    error_before: float
    error_after: float
    target_energy: float  # mean squared norm of the float target, to read errors relatively
    flips: int
    pda: str  # "applied", "applied (<variant>)" or "skipped: <reason>"
    seconds: float  # all of this unit: capture + PDA + solve
    pda_seconds: float = 0.0
    solve_seconds: float = 0.0

    @property
    def flip_rate(self) -> float:
        return self.flips / max(self.weights, 1)

    @property
    def rel_error_before(self) -> float:
        return self.error_before / max(self.target_energy, 1e-30)

    @property
    def rel_error_after(self) -> float:
        return self.error_after / max(self.target_energy, 1e-30)


@dataclass
class PurifyReport:
    """One row per unit, in execution order, plus totals. ``rel_error_*``: mean over units."""

    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    mode: str = ""
    method: str = ""
    config: dict = field(default_factory=dict)
    #: calibration samples the method fitted on (after ``num_samples``)
    samples: int = 0
    #: quantized layers left at round-to-nearest (``skip_unsupported=True``): {"name", "kind", "reason"}
    skipped: list = field(default_factory=list)
    #: notes on the calibration data (e.g. ranges unlike what the observers recorded)
    warnings: list = field(default_factory=list)
    #: the integer weights chosen per unit (name -> int64 tensor), not part of the JSON
    codes: dict = field(default_factory=dict, repr=False)
    #: per-channel errors (name -> {"before", "after", "energy"} float64 tensors), not part of the JSON
    channels: dict = field(default_factory=dict, repr=False)

    @property
    def rel_error_before(self) -> float:
        return sum(u.rel_error_before for u in self.units) / max(len(self.units), 1)

    @property
    def rel_error_after(self) -> float:
        return sum(u.rel_error_after for u in self.units) / max(len(self.units), 1)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "method": self.method,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "config": self.config,
            "samples": self.samples,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "units": [asdict(u) | {"flip_rate": u.flip_rate, "rel_error_before": u.rel_error_before,
                                   "rel_error_after": u.rel_error_after} for u in self.units],
        }

    def save_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2), "report")

    def table(self) -> str:
        head = f"{'unit':<28} {'kind':<8} {'levels':>6} {'rel.err before':>14} {'after':>9} {'flips':>7}  {'pda':<10} {'s':>6}"
        rows = [head, "-" * len(head)]
        for u in self.units:
            pda = "applied" if u.pda.startswith("applied") else "skipped"
            rows.append(
                f"{u.name[:28]:<28} {u.kind:<8} {u.levels:>6} {u.rel_error_before:>14.3e} {u.rel_error_after:>9.3e}"
                f" {100 * u.flip_rate:>6.1f}%  {pda:<10} {u.seconds:>6.2f}")
        rows.append(f"{len(self.units)} units in {self.seconds:.1f} s ({self.method}, {self.mode}, {self.samples} "
                    "calibration samples), mean rel. error "
                    f"{self.rel_error_before:.3e} -> {self.rel_error_after:.3e}, peak RSS {self.peak_rss_mb:.0f} MB")
        notes = {u.pda for u in self.units if u.pda != "applied"}  # skip reasons and PDA variants
        rows += [f"PDA {reason}" for reason in sorted(notes)]
        rows += [f"NOT PURIFIED (left at round-to-nearest): {s['name']} ({s['kind']}): {s['reason']}" for s in self.skipped]
        rows += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """Bar chart of each unit's FP-vs-INT output error (relative), before and after purification."""
        try:
            from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures stay as they are
        except ImportError as e:
            raise ImportError("plotting needs matplotlib: pip install 'qcb-ptq-plugin[plot]'") from e
        names = [u.name for u in self.units]
        before = [u.rel_error_before for u in self.units]
        after = [u.rel_error_after for u in self.units]
        fig = Figure(figsize=(max(6.0, 0.45 * len(names)), 4))
        ax = fig.add_subplot()
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="plain PTQ (round to nearest)")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label=f"purified ({self.method})")
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("relative output error vs float")
        ax.set_title("Per-layer FP-vs-INT activation drift on calibration data")
        ax.legend()
        fig.tight_layout()
        with atomic_output(path, "plot") as tmp:
            fig.savefig(tmp, dpi=120)
        return Path(path)

    __str__ = table
