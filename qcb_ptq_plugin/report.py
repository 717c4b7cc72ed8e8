"""What :func:`qcb_ptq_plugin.purify` returns: one row per unit, printable and JSON-able."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["UnitReport", "PurifyReport"]


@dataclass
class UnitReport:
    """One unit (Conv/Linear + folded BN + activation) of the quantized model.

    ``error_*`` is the LAC objective on the calibration set: squared error of the unit's
    pre-activation output against the float model, summed over channels, mean over samples
    and positions. ``flips`` counts integers that differ from round-to-nearest.
    """

    name: str
    kind: str
    weights: int
    levels: int
    error_before: float
    error_after: float
    target_energy: float  # mean squared norm of the float target, to read errors relatively
    flips: int
    pda: str  # "applied" or "skipped: <reason>"
    seconds: float

    @property
    def flip_rate(self) -> float:
        return self.flips / max(self.weights, 1)


@dataclass
class PurifyReport:
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    mode: str = ""
    config: dict = field(default_factory=dict)
    #: the integer weights chosen per unit (name -> int64 tensor), not part of the JSON
    codes: dict = field(default_factory=dict, repr=False)

    @property
    def error_before(self) -> float:
        return sum(u.error_before / max(u.target_energy, 1e-30) for u in self.units) / max(len(self.units), 1)

    @property
    def error_after(self) -> float:
        return sum(u.error_after / max(u.target_energy, 1e-30) for u in self.units) / max(len(self.units), 1)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "config": self.config,
            "units": [asdict(u) | {"flip_rate": u.flip_rate} for u in self.units],
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        head = f"{'unit':<28} {'kind':<8} {'levels':>6} {'rel.err before':>14} {'after':>9} {'flips':>7}  {'pda':<10} {'s':>6}"
        rows = [head, "-" * len(head)]
        for u in self.units:
            e = max(u.target_energy, 1e-30)
            pda = "applied" if u.pda == "applied" else "skipped"
            rows.append(
                f"{u.name[:28]:<28} {u.kind:<8} {u.levels:>6} {u.error_before / e:>14.3e} {u.error_after / e:>9.3e}"
                f" {100 * u.flip_rate:>6.1f}%  {pda:<10} {u.seconds:>6.2f}")
        rows.append(f"{len(self.units)} units in {self.seconds:.1f} s ({self.mode}), mean rel. error "
                    f"{self.error_before:.3e} -> {self.error_after:.3e}, peak RSS {self.peak_rss_mb:.0f} MB")
        skipped = {u.pda for u in self.units if u.pda != "applied"}
        rows += [f"PDA {reason}" for reason in sorted(skipped)]
        return "\n".join(rows)

    __str__ = table
