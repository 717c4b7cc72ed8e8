"""Audit a calibrated model for QCB exposure before anything is purified. Changes nothing.

A quantization-conditioned backdoor lives in *where the float weights sit inside their
rounding cells*: the attacker places them so that rounding to nearest adds a coordinated error
(inject-then-repair and grid-aware attacks pile weights up near the cell edges; Qu-ANTI-zation
trains the float-vs-integer difference). A clean model's weights know nothing of the grid the
deployer will pick, so their rounding errors look like errors of weights placed uniformly at
random inside their cells. That is the null every statistic below is measured against; it is
built from the model itself (its grid, its weights' magnitudes, its layers' inputs), so it means
the same for every architecture, layer size, bit width and weight grid:

* **drift**: the layer's own rounding error e = Q(W) - W measured on its benign inputs I (from
  the deployed, round-to-nearest model), X_o = e_o H e_oᵀ with H = Σ I Iᵀ, against its exact mean
  and variance when every e_k is independent and uniform on its cell (±s_k/2). A coordinated
  error (the paper's "backdoor neurons drift on benign data") makes X large.
* **edges**: the share of weights farther than ``EDGE`` LSB from their code, against the
  uniform share ``1 - 2 EDGE`` (binomial).
* **correctability**, out of sample: LAC fitted on half of the calibration samples, its drift
  measured on the other half over round-to-nearest's there, for W and for W jittered uniformly
  inside its cells (the null's placement; ``CORRECT_DRAWS`` seeded draws since the fifth round,
  one before).

* **the other grid** (second round, issue 13): drift and edge share of the same weights on the
  same scheme at the other common bit width (8 bits for a 4-bit grid, 4 for an 8-bit one, same
  absmax), against the same null with the same floors. A grid-aware QCB planted for 8 bits that
  also fires at 4 sits at ordinary positions of the coarse cells but at the edges of the fine ones.

Each becomes a z-score (drift: log(X / E0[X]) over sqrt(KAPPA_DRIFT² + Var0[X] / E0[X]²); edges:
the share's excess over sqrt(binomial variance + KAPPA_EDGE²); correctability: log(null ratio /
model ratio) over sqrt(KAPPA_CORRECT² + the null draws' own spread), see :func:`_z_correct`). The
floors stand for how far clean models stray from the exact null; they were fitted on the clean models of one half of
``benchmarks/bench_audit.py`` (then doubled for the edge of that half's range) and checked on
the other half and on held-out architectures (``benchmarks/results/audit_round1.md``), then on a
fresh set scored once after the second round's constants were committed
(``benchmarks/results/audit.md``). One-sided p-values are Bonferroni-combined over the
statistics and the layers: ``p`` bounds the probability that a clean model looks at least this
exposed. The verdict is ``-log10 p > threshold``. Nothing is fitted on the data a statistic is
measured on.

* **the probe** (third round, model level): behaviour instead of weights. Benign calibration
  images with a square patch at the data maximum stamped at every position, through the float
  model, the deployed round-to-nearest simulator and twins whose weights are rounded with
  subtractive dither (fourth round: the same error law as round to nearest, independent of where
  a weight sits in its cell, so no planted pattern survives; the third round's stochastically
  rounded twins kept round to nearest's code for most weights, and a QCB partly with it). Per
  (position, class), how many patched images the INT model sends to that class while the float
  model does not, against the twins (16 since the fifth round, their dispersion pooled per class)
  and against the unpatched images it already sends there (the fifth round's control: a collapsed
  INT model is not a trigger); see :func:`_probe_z`. Its p and the layers' are combined (x2). It
  looks for square-patch triggers only; blended, warped or semantic triggers are not probed.

Also computed and kept in each unit's ``stats`` (raw figures), but not in the verdict: two-sided
and per-channel drift (with a Bonferroni correction over channels), per-channel and fine (0.45-0.495
LSB) edge shares, and (with ``LOW_DIAGNOSTICS``, as the benchmark sets it) the rounding error's
energy in the least-excited half of H's eigenbasis. On
the calibration half none of them caught a working QCB the statistics above missed
(``USED`` lists the ones in the verdict).

What the audit cannot see: the weight statistics miss QCBs trained through straight-through fake
quantization (Qu-ANTI-zation, and the LAC+PDA paper's adaptive attacker, who also aligns float
and integer activations on benign data): their rounding errors, cell positions and
correctability look like a clean model's, even per channel and near the cell edges. Only the
probe sees them, and only when their trigger is a patch it can stamp. "not exposed" is evidence,
not proof.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ._data import range_mismatch
from ._io import write_text
from ._pass import check_coverage, flush_denormals
from .api import prepare_plan
from .config import PurifyConfig
from .methods.lac import _solve_gram
from .units import Gram, Unit, UnitData, _gram

log = logging.getLogger(__name__)

__all__ = ["audit", "AuditReport", "DEFAULT_THRESHOLD"]

#: verdict threshold on the score -log10(p): exposed when a clean model would look this exposed
#: with probability below 1e-3. Fixed before the evaluation in benchmarks/results/audit.md.
DEFAULT_THRESHOLD = 3.0
#: distance from the code (in LSB) beyond which a weight counts as "at the cell edge"
EDGE = 0.35
#: overdispersion floors: how far clean layers stray from the uniform null (sd of the log drift ratio;
#: of the edge share; of log(null / model) of LAC's out-of-sample ratio). Fitted on the clean models
#: of the calibration half of benchmarks/bench_audit.py (``--fit``: 0.097-0.121, 0.000, 0.164) and set
#: to about twice that (0.03 for edges: a floor for layers larger than any it held) before the
#: evaluation half was scored. Fifth round: refitted on the calibration half's 56 clean audits and
#: fresh3's 56 (LeNet without BN among them: on a coarse grid its weights' density slopes inside the
#: cells, so its rounding error correlates with W and with the inputs' main direction), with the
#: correctability's 8 null draws: 0.335, 0.005, 0.174; twice that (edges kept), committed before the
#: fifth round's fresh4 models were audited.
KAPPA_DRIFT = 0.67
KAPPA_EDGE = 0.03
KAPPA_CORRECT = 0.35
#: fifth round: jittered copies behind the correctability's null (one before; its draw decided verdicts)
CORRECT_DRAWS = 8
#: second round (issue 13): LSB distances of the "fine" edge statistics (null share 1 - 2 t)
FINE_EDGES = (0.45, 0.48, 0.49, 0.495)
#: per channel: the share of weights beyond this distance from their code (null 1 - 2 FINE_CH)
FINE_CH = 0.49
#: second round: the bottom fractions of H's eigenbasis where the rounding error's energy is measured
LOW_FRACTIONS = (0.1, 0.25, 0.5)
#: compute the "low_*" statistics even where USED leaves them out of the verdict (benchmarks refit
#: them): they need an eigendecomposition of every layer's H, seconds per layer of fan-in 4608
LOW_DIAGNOSTICS = False
#: floors of the second round's statistics (see _second_round_z). ``--fit`` on the calibration half
#: found 0 for every one of them (no clean calibration audit needed one); the other grid's two take
#: the first round's floors for the same statistics (KAPPA_DRIFT, KAPPA_EDGE; the fifth round's fit
#: gave 0.326 and 0.005 for them), the rest stay diagnostics (not in USED) at these values
FLOORS = {"drift_lo": 0.25, "drift_ch_hi": 0.25, "drift_ch_lo": 0.25, "edge_ch": 0.03, "fine_0.45": 0.0,
          "fine_0.48": 0.0, "fine_0.49": 0.0, "fine_0.495": 0.0, "fine_ch": 0.0, "other_drift": KAPPA_DRIFT,
          "other_edges": KAPPA_EDGE, "low_0.1": 0.25, "low_0.25": 0.25, "low_0.5": 0.25}
#: the second-round statistics that enter the verdict: only those that caught a working QCB of the
#: calibration half the first round missed (the other grid's drift and edges: grid-aware QCBs
#: planted for 8 bits that fire at 4). Two-sided and per-channel drift, per-channel and fine edges,
#: low-excitation energy caught none the first round missed there, and cost multiplicity
USED = ("other_drift", "other_edges", "probe")
#: third round: the behavioural probe (see _probe) and its floor on the share of probed images
#: flipped. Fourth round: its twins are dithered (_dithered) instead of stochastically rounded; the
#: floor refitted on the calibration half's 56 clean audits with them (0.0217; stochastic twins gave
#: 0.013 -> 0.027 in the third round) and doubled (rounded up), committed before the fourth round's
#: fresh models (``fresh3``) were trained. Fifth round (16 twins, their dispersion pooled per class,
#: the unpatched control; see _probe_z): refitted on the same 56 audits with the library's own twin
#: draws, config seeds 0 and 1 (0.0276, 0.0333), twice the larger, rounded up; committed before the
#: fifth round's ``fresh4`` models were audited
PROBE = True
PROBE_FLOOR = 0.067
#: fifth round: dithered twins per probe (8 before: borderline verdicts depended on their draw)
PROBE_TWINS = 16
#: warn (never part of the verdict) when the INT model, as the audit simulates it, keeps the float
#: model's prediction on fewer of the first 128 calibration samples than this: the probe discounts what
#: the INT model does without a patch, so a backdoor that also leaks onto clean inputs hides behind such
#: a drop (sixth round; fresh4's one miss kept about 55%, a clean per-tensor W4 collapse 27%: the
#: warning is not a detector)
AGREEMENT_WARN = 0.8

LIMITS = ("The audit compares round-to-nearest with weights placed at random in their rounding cells, on your benign "
          "data, and probes the INT model with square patches against twins rounded with subtractive dither. Its "
          "weight statistics cannot see an attacker who trains through fake quantization (Qu-ANTI-zation) or aligns "
          "float and integer activations on benign data (the adaptive attack); only the probe can, and only for patch "
          "triggers, and it discounts what the INT model already does without a patch, so a backdoor that also leaks "
          f"onto clean inputs can pass (the report warns when the INT model changes over {1 - AGREEMENT_WARN:.0%} of "
          "the float model's predictions). A backdoor the float model already carries is not its business. Its "
          "floors were fitted at 8 and 4 bits: below 4 a clean model can be flagged (warned about). Calibration "
          "data with fewer samples (x positions) than a layer's fan-in is warned about: the statistics lose power. "
          "'not exposed' is evidence, not proof: purify anyway.")


@dataclass
class AuditReport:
    """The verdict, the p-value behind it, one row per quantized layer, the most exposed channels.

    ``score`` = -log10(``p_value``); ``p_value`` bounds the probability that a clean model looks at
    least this exposed (Bonferroni over layers and statistics). ``unsupported``: quantized layers
    the audit could not look at; ``warnings``: layers whose calibration data is thin, data ranges
    unlike the observers', weights below 4 bits, a lossy quantization (:data:`AGREEMENT_WARN`).
    """

    exposed: bool
    score: float
    threshold: float
    p_value: float
    units: list[dict] = field(default_factory=list)
    top_channels: list[dict] = field(default_factory=list)
    unsupported: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    limits: str = LIMITS
    probe: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2), "audit report")

    def table(self) -> str:
        verdict = "EXPOSED: quantization wakes up a likely backdoor" if self.exposed else "not exposed"
        lines = [f"verdict: {verdict} (score {self.score:.1f} = -log10 p, p = {self.p_value:.2g}, threshold "
                 f"{self.threshold:g}; {self.samples} calibration samples, {self.seconds:.1f}s)", "",
                 f"{'unit':<24} {'drift/null':>10} {'z':>6} {'edge %':>7} {'z':>6} {'LAC oos':>8} {'null':>6} "
                 f"{'z':>6} {'p':>8}  most telling"]
        for u in self.units:
            lac, null = ("" if v is None else f"{v:.3f}" for v in (u["lac_oos"], u["lac_oos_null"]))
            lines.append(f"{u['name'][:24]:<24} {u['drift_ratio']:>10.2f} {u['z_drift']:>6.1f} "
                         f"{100 * u['edge_share']:>7.1f} {u['z_edge']:>6.1f} {lac:>8} {null:>6} {u['z_correct']:>6.1f} "
                         f"{u['p']:>8.1e}  {_most_telling(u)}")
        lines += [f"(edge % under the null: {100 * (1 - 2 * EDGE):.0f}; LAC oos: drift of LAC fitted on half the "
                  "samples, measured on the other half, over round-to-nearest's there; null: the same for the "
                  "weights jittered uniformly inside their cells)"]
        if self.probe:
            pr = self.probe
            lines += ["", f"probe: {pr['samples']} images patched ({pr['side']}x{pr['side']} at the data maximum) "
                      f"at {pr['cells'] // 10} positions; most telling: at {tuple(pr['position'])} the INT model "
                      f"sends {pr['flips']:.0f} of them to class {pr['class']} where the float model does not, "
                      f"{pr['twins']} dithered twins {pr['twin_flips']:.1f} on average, the unpatched images "
                      f"{pr['unpatched_flips']:.0f} (z {pr['z']:.1f}, p {pr['p']:.1e}, corrected over positions x "
                      "classes)"]
        lines += ["", "most exposed channels (p per channel, not corrected for the number of channels):"]
        lines += [f"  {c['unit']}[{c['channel']}]: drift/null {c['drift_ratio']:.2f}, edge {100 * c['edge_share']:.0f}%, "
                  f"z {c['z']:.1f}, p {c['p']:.1e}" for c in self.top_channels]
        if self.unsupported:
            lines += ["", "NOT audited (unsupported quantized layers):"]
            lines += [f"  {u['name']} ({u['kind']}): {u['reason']}" for u in self.unsupported]
        if self.warnings:
            lines += ["", "warnings:"] + [f"  {w}" for w in self.warnings]
        lines += ["", f"limits: {self.limits}"]
        return "\n".join(lines)

    __str__ = table


def _most_telling(u: dict) -> str:
    ps = {"drift": _p_upper(u["z_drift"]), "edges": _p_upper(u["z_edge"]), "correct": _p_upper(u["z_correct"]),
          **u.get("p_stats", {})}
    name = min(ps, key=ps.get)
    return f"{name} (p {ps[name]:.1e})"


def audit(prepared: nn.Module, float_model: nn.Module, calib_data, threshold: float = DEFAULT_THRESHOLD,
          top_k: int = 10, config: PurifyConfig | None = None, probe: bool = PROBE) -> AuditReport:
    """Measure how far each quantized layer's rounding is from a clean model's and give a verdict.

    Same inputs as :func:`qcb_ptq_plugin.purify`; nothing is written to ``prepared``. Quantized
    layers the methods cannot handle are listed in the report (never silently dropped).

    Args:
        threshold: exposed when the score -log10(p) exceeds it (default :data:`DEFAULT_THRESHOLD`).
        top_k: channels listed in ``top_channels``.
        config: batching, sampling and progress (``PurifyConfig``); PDA is off.
        probe: run the behavioural probe (:func:`_probe`: patched calibration images through the
            float model, the INT model and ``PROBE_TWINS`` twins rounded with subtractive dither; one forward
            of up to 128 images per patch position and model, so minutes on large image models). False: the
            weight statistics alone, which cannot see QCBs trained through fake quantization.
    """
    t0 = time.perf_counter()
    cfg = (config or PurifyConfig(progress=False)).replace(pda="off", skip_unsupported=True)
    _, plan, batches = prepare_plan(prepared, float_model, calib_data, cfg)
    unsupported = check_coverage(plan.unsupported, cfg)
    mismatch = range_mismatch(batches, plan.input_range)
    warnings = [mismatch] if mismatch else []
    low = min((_bits(u.grid) for u in plan.units), default=8)
    if low < 4:
        warnings.append(f"{low}-bit weights: the audit's floors were fitted at 4 and 8 bits, and below 4 a clean "
                        "model's rounding strays further from its twins (a clean CNN with 3-bit per-tensor weights "
                        "scores over the threshold): read a verdict here as weak evidence")
    samples = sum(len(b) for b in batches)
    if samples < 4:
        raise ValueError(f"the audit needs at least 4 calibration samples, got {samples}")
    rows, channels = [], []
    with flush_denormals():
        for unit in tqdm(plan.units, desc="audit", unit="unit", disable=not cfg.progress):
            row, ch = _audit_unit(unit, UnitData(unit, plan.capture, batches), cfg)
            rows.append(row)
            channels += ch
            if row["positions"] < row["fan_in"]:
                warnings.append(f"{unit.name}: {row['positions']} calibration positions (samples x spatial) for a "
                                f"fan-in of {row['fan_in']}: its statistics are thin and LAC's out-of-sample figure "
                                "is unreliable; calibrate with more samples")
    lossy = _lossy_warning(plan, batches)
    if lossy:
        warnings.append(lossy)
    probe = _probe(plan, batches, cfg) if probe else None
    for w in warnings:
        log.warning("%s", w)
    p = min(1.0, len(rows) * min((r["p"] for r in rows), default=1.0))
    if probe is not None and "probe" in USED:
        p = min(1.0, 2 * min(p, probe["p"]))  # the layers' p and the probe's
    score = max(0.0, -math.log10(max(p, 1e-300)))
    channels.sort(key=lambda c: -c["z"])
    return AuditReport(exposed=score > threshold, score=score, threshold=threshold, p_value=p, units=rows,
                       top_channels=channels[:top_k], unsupported=unsupported, warnings=warnings, samples=samples,
                       seconds=time.perf_counter() - t0, probe=probe)


def _simulated(plan, batches, max_samples: int):
    """(round-to-nearest simulator, float model, the first ``max_samples`` calibration samples) of a
    torch plan; None where it has no simulator (ONNX) or there are no samples."""
    sim, fp = getattr(plan.capture, "simulator", None), getattr(plan.capture, "float_model", None)
    if sim is None or fp is None or not batches:
        return None
    return sim, fp, torch.cat(list(batches))[:max_samples]


def _lossy_warning(plan, batches, max_samples: int = 128) -> str | None:
    """The warning for a lossy quantization: round to nearest, as the audit simulates the INT model,
    changes the float model's prediction on more than 1 - :data:`AGREEMENT_WARN` of the first
    ``max_samples`` calibration samples. None otherwise, and where there is no torch simulator or the
    output is not (batch, classes). (torch.ao's convert can differ from the simulator by one code on a
    channel's largest weight below 8 bits: it clamps to int8, not to the observer's range.)"""
    models = _simulated(plan, batches, max_samples) if all(isinstance(b, torch.Tensor) for b in batches) else None
    if models is None:
        return None
    sim, fp, x = models
    with torch.no_grad():
        out, ref = sim(x), fp(x)
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor) and out.dim() == 2
            and ref.shape == out.shape):
        return None
    pred = out.argmax(-1)
    changed = pred != ref.argmax(-1)
    k, n = int(changed.sum()), len(x)
    if k <= (1 - AGREEMENT_WARN) * n:
        return None
    counts = torch.bincount(pred[changed], minlength=out.shape[1])
    c = int(counts.argmax())
    return (f"round to nearest (the INT model as the audit simulates it) changes the float model's prediction on {k} "
            f"of {n} calibration samples ({int(counts[c])} of them to class {c}): a quantization this lossy can hide a "
            "backdoor that also fires without its trigger, which the probe discounts; measure the deployed model's "
            "accuracy on labelled data")


# ---------------------------------------------------------------------------------------------
# per unit


def _z_ratio(x, mean, var, floor: float = KAPPA_DRIFT) -> torch.Tensor:
    """log(X / E0[X]) over its null sd: the relative sd sqrt(var)/mean of X under the uniform null,
    with a floor (default KAPPA_DRIFT) for how far clean layers stray from it (their ratios are
    right-skewed); 0 where E0[X] <= 0. Floats or tensors (elementwise); a float64 tensor back."""
    x, mean, var = (torch.as_tensor(t, dtype=torch.float64) for t in (x, mean, var))
    ok = mean > 0
    m = torch.where(ok, mean, torch.ones_like(mean))
    return torch.where(ok, (x.clamp_min(1e-300) / m).log() / (floor ** 2 + var / m.pow(2)).sqrt(), torch.zeros_like(m))


def _p_upper(z: float) -> float:
    """One-sided normal tail P(Z >= z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


class _Half:
    """Input statistics of one half of the calibration samples, enough to measure any weight V:
    H = Σ I Iᵀ, F = Σ I^fp Iᵀ, G = Σ I^fp I^fpᵀ (per group); V's target is V I^fp (bias cancels)."""

    def __init__(self) -> None:
        self.H = self.F = self.G = None
        self.n = 0

    def add(self, cols: torch.Tensor, cols_fp: torch.Tensor) -> None:  # (G, K, N) each
        h, f, g = _gram(cols).double(), torch.bmm(cols_fp, cols.transpose(1, 2)).double(), _gram(cols_fp).double()
        self.H, self.F, self.G = (h, f, g) if self.H is None else (self.H + h, self.F + f, self.G + g)
        self.n += cols.shape[-1]

    def gram(self, v: torch.Tensor) -> Gram:
        """The Gram the methods use for float weight ``v`` (G, Og, K): C = V F, t = diag(V G Vᵀ)."""
        g, v = Gram(), v.double()
        g.H, g.C, g.t_ch, g.n = self.H, torch.bmm(v, self.F), (torch.bmm(v, self.G) * v).sum(-1), self.n
        return g


def _audit_unit(unit: Unit, data: UnitData, cfg: PurifyConfig) -> tuple[dict, list[dict]]:
    """One unit's statistics against the uniform-in-cell null: drift, edges, correctability."""
    op, grid = unit.op, unit.grid
    halves = (_Half(), _Half())
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = 0
    for i_q, i_fp in data:
        parity = (torch.arange(len(i_q)) + seen) % 2
        seen += len(i_q)
        for h, half in enumerate(halves):
            keep = (parity == h).nonzero().flatten().to(i_q.device)
            if len(keep):
                with torch.no_grad():
                    cols, cols_fp = (op.columns(t.index_select(0, keep)) for t in (i_q, i_fp))
                if cfg.gram_positions is not None and cols.shape[-1] > cfg.gram_positions:
                    pick = torch.randperm(cols.shape[-1], generator=gen)[:cfg.gram_positions].to(cols.device)
                    cols, cols_fp = cols.index_select(-1, pick), cols_fp.index_select(-1, pick)
                half.add(cols, cols_fp)
    g_a, g_b = halves
    H = (g_a.H + g_b.H) / (g_a.n + g_b.n)  # (G, K, K), float64, per position

    w = unit.weight.detach().float()
    q = grid.quantize(w)
    s = grid.expand(w)[0]
    e = op.grouped(grid.dequantize(q) - w).double()  # (G, Og, K)
    s = op.grouped(s).double()

    # drift: X_o = e_o H e_oᵀ against e_k iid uniform on (-s_k/2, s_k/2): var s²/12, 4th moment s⁴/80
    x, mean, v = _quad_null(e, s, H)
    z_ch = _z_ratio(x, mean, v)
    z_drift = float(_z_ratio(x.sum(), mean.sum(), v.sum()))

    # edges: weights inside the grid's range (not clamped), distance from the code in LSB
    rows = e.shape[0] * e.shape[1]
    codes = op.grouped(q).reshape(rows, -1)
    dist, inside = _cells(e, s, codes, grid)
    edge = (dist > EDGE) & inside
    n_in = inside.sum(1).double()
    p0 = 1 - 2 * EDGE
    share_ch = edge.sum(1).double() / n_in.clamp_min(1)
    n_all = max(n_in.sum().item(), 1.0)
    share = edge.sum().item() / n_all
    z_edge = (share - p0) / math.sqrt(p0 * (1 - p0) / n_all + KAPPA_EDGE ** 2)
    z_edge_ch = (share_ch - p0) / (p0 * (1 - p0) / n_in.clamp_min(1) + KAPPA_EDGE ** 2).sqrt()

    # raw figures of the second round's statistics (issue 13): per channel, two-sided; the other
    # bit width's grid of the same scheme; rounding error in the directions benign inputs barely excite
    stats = {"drift": {"x": float(x.sum()), "mean": float(mean.sum()), "var": float(v.sum())},
             "drift_ch": {"x": x.tolist(), "mean": mean.tolist(), "var": v.tolist()},
             "edge_ch": {"k": edge.sum(1).tolist(), "n": n_in.tolist(), "p0": p0},
             **{f"fine_{t:g}": {"k": int(((dist > t) & inside).sum()), "n": n_all, "p0": 1 - 2 * t}
                for t in FINE_EDGES},
             # distances from the code, in 0.005-LSB bins (the fine edge statistics' raw material)
             "hist": torch.histc(dist[inside].double(), bins=100, min=0.0, max=0.5).tolist(),
             "fine_ch": {"k": ((dist > FINE_CH) & inside).sum(1).tolist(), "n": n_in.tolist(), "p0": 1 - 2 * FINE_CH}}
    other = _other_grid(grid)
    if other is not None:
        q2 = other.quantize(w)
        e2 = op.grouped(other.dequantize(q2) - w).double()
        s2 = op.grouped(other.expand(w)[0]).double()
        d2, in2 = _cells(e2, s2, op.grouped(q2).reshape(rows, -1), other)
        x2, m2, v2 = _quad_null(e2, s2, H)
        n2 = max(in2.sum().item(), 1.0)
        stats["other_grid"] = {"bits": _bits(other), "x": float(x2.sum()), "mean": float(m2.sum()),
                               "var": float(v2.sum()), "k": int(((d2 > EDGE) & in2).sum()), "n": n2, "p0": p0}
    if LOW_DIAGNOSTICS or any(f"low_{frac:g}" in USED for frac in LOW_FRACTIONS):
        evecs = torch.linalg.eigh(H)[1]  # (G, K, K), eigenvalues ascending
        for frac in LOW_FRACTIONS:  # e in the directions benign inputs excite least (bottom frac of H's eigenbasis)
            low = evecs[..., :max(1, round(frac * evecs.shape[-1]))]
            xb, mb, vb = _quad_null(e, s, torch.bmm(low, low.transpose(1, 2)))
            stats[f"low_{frac:g}"] = {"x": float(xb.sum()), "mean": float(mb.sum()), "var": float(vb.sum())}
    zs = _second_round_z(stats)

    # correctability: how much of round-to-nearest's drift LAC removes out of sample, vs the same
    # weights jittered uniformly inside their cells (the null's placement, same magnitudes and data)
    lac_oos, nulls = _lac_out_of_sample(g_a, g_b, unit, cfg)
    lac_null, lac_null_var = _log_spread(nulls)
    z_corr = _z_correct(lac_oos, lac_null, lac_null_var, len(nulls))
    p = unit_p({"drift": _p_upper(z_drift), "edges": _p_upper(z_edge), "correct": _p_upper(z_corr), **zs})
    name = unit.name
    row = {"name": name, "kind": type(unit.fp_layer).__name__, "fan_in": int(e.shape[-1]),
           "positions": int(min(g_a.n, g_b.n)), "drift_ratio": float(x.sum() / mean.sum().clamp_min(1e-300)),
           "z_drift": z_drift, "edge_share": share, "z_edge": z_edge, "lac_oos": lac_oos, "lac_oos_null": lac_null,
           "lac_oos_null_var": lac_null_var, "lac_oos_draws": len(nulls), "z_correct": z_corr, "p": p, "p_stats": zs,
           "min_drift_ratio_ch": float((x / mean.clamp_min(1e-300)).min()),
           # raw figures behind the z-scores (benchmarks refit the floors from them)
           "x": float(x.sum()), "null_mean": float(mean.sum()), "null_var": float(v.sum()), "n_weights": int(n_all),
           "stats": stats}
    z_comb = torch.maximum(z_ch, z_edge_ch)  # per channel: the same null and floors, no Bonferroni over channels
    ratio_ch = x / mean.clamp_min(1e-300)
    channels = [{"unit": name, "channel": o, "z": float(z_comb[o]), "p": min(1.0, 2 * _p_upper(float(z_comb[o]))),
                 "drift_ratio": float(ratio_ch[o]), "edge_share": float(share_ch[o])}
                for o in z_comb.argsort(descending=True)[:10].tolist()]
    return row, channels


def _quad_null(e: torch.Tensor, s: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row o: X_o = e_o M e_oᵀ and its exact mean and variance when every e_k is independent and
    uniform on (-s_k/2, s_k/2) (variance s²/12, 4th moment s⁴/80); e, s (G, Og, K), M (G, K, K) PSD."""
    x = (torch.bmm(e, M) * e).sum(-1).flatten()
    var = s.pow(2) / 12
    d = M.diagonal(dim1=1, dim2=2).unsqueeze(1)  # (G, 1, K)
    mean = (var * d).sum(-1).flatten()
    v = (2 * (torch.bmm(var, M * M) * var).sum(-1) - 2 * (var.pow(2) * d.pow(2)).sum(-1)
         + ((s.pow(4) / 80 - var.pow(2)) * d.pow(2)).sum(-1)).flatten().clamp_min(0)
    return x, mean, v


def _cells(e: torch.Tensor, s: torch.Tensor, codes: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance from the code in LSB, inside the range) per weight, rows flattened: weights clamped at
    the range's ends (they hold the absmax) are not inside."""
    rows = codes.shape[0]
    dist = (e.abs() / s).reshape(rows, -1)
    return dist, (dist <= 0.5 + 1e-4) & (codes > grid.qmin) & (codes < grid.qmax)


def _bits(grid) -> int:
    return int(round(math.log2(grid.qmax - grid.qmin + 1)))


def _other_grid(grid):
    """The same scheme at the other common bit width (8 for a grid of 4 bits or fewer, else 4), same
    absmax: a grid-aware attacker plants for one width and the deployer may pick another; symmetric
    signed grids only (zero point 0, range -2^(b-1)[+1]..2^(b-1)-1)."""
    from .grid import WeightGrid

    if bool((grid.zero_point != 0).any()) or grid.qmin not in (-grid.qmax - 1, -grid.qmax) or grid.qmax < 1:
        return None
    b = _bits(grid)
    b2 = 8 if b <= 4 else 4
    qmax = 2 ** (b2 - 1) - 1
    qmin = -qmax if grid.qmin == -grid.qmax else -qmax - 1
    scale = (grid.scale * ((grid.qmax - grid.qmin) / (qmax - qmin))).clamp_min(torch.finfo(torch.float32).eps)
    return WeightGrid(scale, grid.zero_point, qmin, qmax, grid.axis, grid.group_size, grid.reciprocal)


def _second_round_z(stats: dict, floors: dict | None = None, used: tuple | None = None) -> dict:
    """p-values of the second round's statistics from their raw figures, each corrected inside for
    its own multiplicity (channels); ``floors`` overrides :data:`FLOORS` and ``used`` :data:`USED`
    (benchmarks refit them). Share statistics: excess over the uniform share, binomial sd plus the
    floor; ratio statistics: log(X / E0[X]) over the null's relative sd plus the floor."""
    f = {**FLOORS, **(floors or {})}
    used = USED if used is None else used
    out = {}

    def ratio(st, floor, sign=1.0):
        return _p_upper(sign * float(_z_ratio(st["x"], st["mean"], st["var"], floor)))

    if "drift_lo" in used:
        out["drift_lo"] = ratio(stats["drift"], f["drift_lo"], -1.0)
    if {"drift_ch_hi", "drift_ch_lo"} & set(used) and "drift_ch" in stats:
        d = stats["drift_ch"]
        x, m, v = (torch.tensor(d[k], dtype=torch.float64) for k in ("x", "mean", "var"))
        ok = m > 0
        if ok.any():
            for name, sign in (("drift_ch_hi", 1.0), ("drift_ch_lo", -1.0)):
                if name in used:
                    z = sign * (x[ok].clamp_min(1e-300) / m[ok]).log() / (f[name] ** 2 + v[ok] / m[ok].pow(2)).sqrt()
                    out[name] = min(1.0, int(ok.sum()) * _p_upper(float(z.max())))
    for name in ("edge_ch", "fine_ch"):
        if name not in used or name not in stats:
            continue
        ec = stats[name]
        k, n = torch.tensor(ec["k"], dtype=torch.float64), torch.tensor(ec["n"], dtype=torch.float64)
        ok = n > 0
        if ok.any():
            p0 = ec["p0"]
            pmin = min(_share_p(kk, nn, p0, f[name]) for kk, nn in zip(k[ok].tolist(), n[ok].tolist()))
            out[name] = min(1.0, int(ok.sum()) * pmin)
    for t in FINE_EDGES:
        if f"fine_{t:g}" in used:
            fi = stats[f"fine_{t:g}"]
            out[f"fine_{t:g}"] = _share_p(fi["k"], fi["n"], fi["p0"], f[f"fine_{t:g}"])
    if "other_grid" in stats:
        o = stats["other_grid"]
        if "other_drift" in used:
            out["other_drift"] = ratio(o, f["other_drift"])
        if "other_edges" in used:
            out["other_edges"] = _share_p(o["k"], o["n"], o["p0"], f["other_edges"])
    for frac in LOW_FRACTIONS:
        if f"low_{frac:g}" in used and f"low_{frac:g}" in stats:  # computed only where asked (LOW_DIAGNOSTICS)
            out[f"low_{frac:g}"] = ratio(stats[f"low_{frac:g}"], f[f"low_{frac:g}"])
    return out


def _share_p(k: float, n: float, p0: float, floor: float) -> float:
    """P(share >= k / n) for n weights each beyond the distance with probability p0: the exact
    binomial tail without a floor, else the normal tail with the floor added to the binomial sd."""
    if n <= 0 or k <= n * p0:
        return 1.0
    if floor > 0:
        return _p_upper((k / n - p0) / math.sqrt(p0 * (1 - p0) / n + floor ** 2))
    k, n = int(round(k)), int(round(n))
    log_term = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p0)
                + (n - k) * math.log1p(-p0))
    total, j, term = 0.0, k, 1.0  # Σ_{j >= k} P(K = j), terms relative to P(K = k): they fall geometrically
    while j <= n and term > 1e-17 * total + 1e-300:
        total += term
        term *= (n - j) / (j + 1) * p0 / (1 - p0)
        j += 1
    return min(1.0, math.exp(log_term) * total)


def unit_p(ps: dict) -> float:
    """A layer's p-value: Bonferroni over its statistics' p-values (each already corrected inside)."""
    ps = [p for p in ps.values() if p is not None]
    return min(1.0, len(ps) * min(ps))


def _dithered(w: torch.Tensor, grid, gen: torch.Generator) -> torch.Tensor:
    """A twin of round to nearest that no attacker can have targeted: subtractively dithered rounding
    Q(W + s u) - s u, u uniform on (-1/2, 1/2) per weight (seeded). Its error is uniform on (-s/2, s/2)
    like round to nearest's on a clean model (same law, so a clean model's twins flip as many images
    as its INT model does), but independent of where W sits in its cell: none of the planted choices
    survive. (Stochastic rounding, Q(W + s u), the third round's twins, keeps round to nearest's code
    for a weight with probability 1 - its distance from it, at least 1/2: a QCB partly survives it.)
    The twin's weights are off the grid (the simulator takes any float weight): it stands for an INT
    model, not one the deployer could build."""
    jitter = (torch.rand(w.shape, generator=gen) - 0.5).to(w) * grid.expand(w)[0]
    return grid.fake_quantize(w + jitter) - jitter


def _patches(x: torch.Tensor):
    """The probe's stimuli for images ``x`` (N, C, H, W): a square of side max(2, H/10) at the data's
    maximum, at every position (stride 1 up to 12 px, else 2). Returns (side, positions, patched),
    ``patched(i, j)`` a copy of ``x`` with the square's corner at (i, j)."""
    h, w = x.shape[-2:]
    side, stride, value = max(2, round(h / 10)), 1 if max(h, w) <= 12 else 2, float(x.max())
    pos = [(i, j) for i in range(0, h - side + 1, stride) for j in range(0, w - side + 1, stride)]

    def patched(i: int, j: int) -> torch.Tensor:
        xp = x.clone()
        xp[:, :, i:i + side, j:j + side] = value
        return xp

    return side, pos, patched


def _flip_counts(model, patched, pos, ref_preds, classes: int) -> torch.Tensor:
    """(positions, classes) float64: per patch position, how many patched images ``model`` sends to
    each class where ``ref_preds`` (the float model's predictions on the same images) does not."""
    out = []
    with torch.no_grad():
        for (i, j), ref in zip(pos, ref_preds):
            pred = model(patched(i, j)).argmax(-1)
            out.append(torch.bincount(pred[pred != ref], minlength=classes).double())
    return torch.stack(out)


def _probe(plan, batches, cfg: PurifyConfig, twins: int = PROBE_TWINS, max_samples: int = 128) -> dict | None:
    """Behaviour, not weights: benign images with a square patch (side max(2, H/10), at the data's
    maximum) stamped at every position (stride 1 up to 12 px, else 2), run through the float model,
    the deployed round-to-nearest simulator and ``twins`` copies of the simulator whose weights are
    rounded with subtractive dither (:func:`_dithered`: the same error law as round to nearest, no
    planted pattern). Per (position, class): F = how many patched images the INT model sends to that
    class while the float model does not. A QCB's trigger makes F of its target class large at its
    position for round to nearest only; see :func:`_probe_z` for the score. Torch simulators on 4-D
    inputs only (None otherwise)."""
    models = _simulated(plan, batches, max_samples)
    if models is None or models[2].dim() != 4 or not plan.units:
        return None
    sim, fp, x = models
    with torch.no_grad():
        out = fp(x[:2])
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        log.info("probe skipped: the float model's output is not (batch, classes)")
        return None
    classes = out.shape[1]
    n = x.shape[0]
    side, pos, patched = _patches(x)
    log.info("probe: %d patch positions x %d models x %d images", len(pos), twins + 2, n)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    rtn = [u.grid.fake_quantize(u.weight.detach().float()) for u in plan.units]
    with torch.no_grad():
        ref = [fp(patched(i, j)).argmax(-1) for i, j in pos]
        p0, ref0 = sim(x).argmax(-1), fp(x).argmax(-1)  # the control: no patch
    f_ctl = torch.bincount(p0[p0 != ref0], minlength=classes).double()
    try:
        f_rtn = _flip_counts(sim, patched, pos, ref, classes)
        f_twin = []
        for _ in range(twins):
            for u in plan.units:
                u.write(_dithered(u.weight.detach().float(), u.grid, gen))
            f_twin.append(_flip_counts(sim, patched, pos, ref, classes))
    finally:
        for u, q in zip(plan.units, rtn):
            u.write(q)
    t = torch.stack(f_twin)
    z = _probe_z(f_rtn, f_ctl, t, n)
    k = int(z.argmax())
    pi, cls = divmod(k, z.shape[1])
    zmax = float(z.max())
    return {"p": min(1.0, z.numel() * _p_upper(zmax)), "z": zmax, "position": list(pos[pi]), "class": cls,
            "flips": float(f_rtn.flatten()[k]), "twin_flips": float(t.mean(0).flatten()[k]),
            "unpatched_flips": float(f_ctl[cls]), "side": side, "samples": n, "cells": int(z.numel()), "twins": twins,
            "raw": {"rtn": f_rtn.int().tolist(), "control": f_ctl.int().tolist(), "twins": t.int().tolist()}}


def _probe_z(f: torch.Tensor, f0: torch.Tensor, t: torch.Tensor, n: int, floor: float = PROBE_FLOOR) -> torch.Tensor:
    """Per (position, class) z of round to nearest's flips ``f`` (positions, classes), the smaller of two:

    * against the twins ``t`` (twins, positions, classes): (F - mean) / sqrt((mean + 1)(1 + phi_c) +
      (floor n)²), phi_c the median over positions of the twins' var / (mean + 1) for class c (fifth
      round: a dispersion pooled over positions is steadier than one cell's variance over 16 twins,
      whose quiet draws made z swing either way);
    * against the control ``f0`` (classes,): the unpatched images round to nearest sends to the class
      where the float model does not (fifth round: an INT model that collapses to a class without any
      patch is not a trigger), (F - f0) / sqrt(f0 + 1 + (floor n)²).

    ``floor`` (on the share of the ``n`` probed images flipped) stands for how far clean models stray
    from the twins."""
    m = t.mean(0)
    phi = (t.var(0) / (m + 1)).median(0).values
    z = (f - m) / ((m + 1) * (1 + phi) + (floor * n) ** 2).sqrt()
    return torch.minimum(z, (f - f0) / (f0 + 1 + (floor * n) ** 2).sqrt())


def _lac_out_of_sample(g_a: _Half, g_b: _Half, unit: Unit, cfg: PurifyConfig,
                       draws: int = CORRECT_DRAWS) -> tuple[float | None, list[float]]:
    """D_B(LAC fitted on A) / D_B(round to nearest) for the unit's weight W, and for ``draws`` copies
    W + s u, u uniform on (-1/2, 1/2) per weight (one seeded generator): what purification achieves on
    samples it did not see (< 1: it helps; >= 1: nothing to correct or too few samples), for the
    model and for the null. Ratios that cannot be formed (no drift to correct) are left out."""
    if g_a.n == 0 or g_b.n == 0:
        return None, []
    op, grid = unit.op, unit.grid
    w = unit.weight.detach().float()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for k in range(draws + 1):
        v = w if k == 0 else w + grid.expand(w)[0] * (torch.rand(w.shape, generator=gen).to(w) - 0.5)
        vg = op.grouped(v)
        q_lac = op.ungrouped(_solve_gram(g_a.gram(vg), vg, grid, cfg), v.shape)
        g = g_b.gram(vg)
        rtn, lac = (g.channel_errors(op.grouped(grid.dequantize(c))).sum().item() for c in (grid.quantize(v), q_lac))
        out.append(lac / rtn if rtn > 0 and lac > 0 else None)
    return out[0], [r for r in out[1:] if r is not None]


def _log_spread(ratios: list[float]) -> tuple[float | None, float]:
    """Geometric mean of ``ratios`` and the sample variance of their logs (0 for fewer than two)."""
    if not ratios:
        return None, 0.0
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    var = sum((v - mean) ** 2 for v in logs) / (len(logs) - 1) if len(logs) > 1 else 0.0
    return math.exp(mean), var


def _z_correct(model: float | None, null: float | None, null_var: float = 0.0, draws: int = 1,
               floor: float = KAPPA_CORRECT) -> float:
    """log(null / model) of LAC's out-of-sample ratios (null: the draws' geometric mean) over
    sqrt(floor² + (1 + 1/draws) x the variance of the draws' log ratios): the null ratio is itself
    random, and on a layer whose inputs are nearly one direction (a first conv on mostly-constant
    images) one draw of it ranged 0.09-0.83 (fifth round); 0 where a ratio is missing."""
    if not model or not null:
        return 0.0
    return math.log(null / model) / math.sqrt(floor ** 2 + (1 + 1 / max(draws, 1)) * null_var)
