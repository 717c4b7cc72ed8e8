"""Audit a calibrated model for QCB exposure before anything is purified.

The paper's observation (Sec. 3): after quantization, backdoor neurons drift away from their
float activations even on benign inputs. Raw drift alone is ambiguous (coarse grids drift
everywhere), so we compare each layer's round-to-nearest drift with the drift that is
*achievable on the same grid* (LAC's optimum on the same data, nothing written back):

    excess_u = D_u(RTN) / D_u(LAC)      per unit u (D = output error vs float, calibration data)
    score    = max_u excess_u

On a clean model round-to-nearest is within a small factor of the best rounding (measured: 2-3
at 8 bits, 7-10 at 4 bits); a QCB places its weights so that rounding adds a coordinated error
or trains layers to be fragile to rounding, and excess jumps to 25-75 (planted W4 QCBs).
Channels are ranked by their excess drift (D_o(RTN) - D_o(LAC)) / E[T_o²]. The default threshold
was calibrated on planted vs clean models (benchmarks/results/audit.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from . import _pass
from ._io import write_text
from .api import prepare_plan
from .config import PurifyConfig
from .methods import get_method

__all__ = ["audit", "AuditReport", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 16.0  # calibrated at W4A8, see benchmarks/results/audit.md


@dataclass
class AuditReport:
    exposed: bool
    score: float
    threshold: float
    units: list[dict] = field(default_factory=list)  # name, rel. drift RTN, rel. drift achievable, excess
    top_channels: list[dict] = field(default_factory=list)  # unit, channel, rel. drift, excess drift

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2), "audit report")

    def table(self) -> str:
        verdict = "EXPOSED: quantization wakes up a likely backdoor" if self.exposed else "not exposed"
        lines = [f"verdict: {verdict} (score {self.score:.1f}, threshold {self.threshold:.1f})", "",
                 f"{'unit':<28} {'drift RTN':>10} {'achievable':>10} {'excess':>8}"]
        lines += [f"{u['name'][:28]:<28} {u['drift']:>10.3e} {u['achievable']:>10.3e} {u['excess']:>8.1f}"
                  for u in self.units]
        lines += ["", "most drifted channels:"]
        lines += [f"  {c['unit']}[{c['channel']}]: drift {c['drift']:.3e}, excess {c['excess']:.3e}"
                  for c in self.top_channels]
        return "\n".join(lines)

    __str__ = table


def audit(prepared: nn.Module, float_model: nn.Module, calib_data, threshold: float = DEFAULT_THRESHOLD,
          top_k: int = 10, config: PurifyConfig | None = None) -> AuditReport:
    """Measure FP-vs-quantized drift of a calibrated model and give a verdict. Changes nothing.

    Same inputs as :func:`qcb_ptq_plugin.purify`. PDA is off: the audit looks at benign data only.
    """
    cfg = (config or PurifyConfig(progress=False)).replace(pda="off")
    _, plan, batches = prepare_plan(prepared, float_model, calib_data, cfg)
    _, rep = _pass.run(plan.units, plan.capture, batches, get_method("lac"), cfg, write_back=False)
    units, channels = [], []
    for u in rep.units:
        energy = max(u.target_energy, 1e-30)
        excess = u.error_before / max(u.error_after, 1e-12 * energy)
        units.append({"name": u.name, "drift": u.error_before / energy, "achievable": u.error_after / energy,
                      "excess": excess})
        ch = rep.channels[u.name]
        rel = (ch["before"] - ch["after"]) / ch["energy"].clamp_min(1e-30)
        for o in rel.argsort(descending=True)[:top_k].tolist():
            channels.append({"unit": u.name, "channel": o, "drift": float(ch["before"][o] / max(ch["energy"][o], 1e-30)),
                             "excess": float(rel[o])})
    channels.sort(key=lambda c: -c["excess"])
    score = max((u["excess"] for u in units), default=0.0)
    return AuditReport(exposed=score > threshold, score=score, threshold=threshold, units=units,
                       top_channels=channels[:top_k])
