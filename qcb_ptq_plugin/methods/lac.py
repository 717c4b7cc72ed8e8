"""LAC+PDA, top to bottom: methods ``"lac_pda"`` (default) and ``"lac"`` (PDA off).

Knows nothing about torch.ao, torchao or ONNX.

Paper: "Purifying Quantization-conditioned Backdoors via Layer-wise Activation Correction with
Distribution Approximation" (ICML 2024). Notation as in the paper:

* a *unit* l is a Conv/Linear layer with the BatchNorm folded into it and its activation;
* I_l is the unit's input taken from the **quantized** model in which units 1..l-1 have
  already been purified (sequential, like BRECQ/GPTQ), T_l = W_o I_l^fp + b the **float**
  model's output of the same unit on the same samples;
* LAC (Eq. 3):  min_q  D(W_o I^fp, Q(W) I)  with  Q(W) = s (q - z),  D = squared error summed
  over channels, averaged over samples and positions;
* PDA (Sec. 4.3): before LAC, nudge I within ||dI||_inf <= gamma so that the statistics of the
  float unit's BN input match the BN running statistics, which remember the poisoned training
  distribution; LAC then fits the nudged inputs to the unnudged targets.

The pass (:mod:`qcb_ptq_plugin._pass`) hands each unit and its inputs (:class:`UnitData`: I
from the adapter's simulator of the quantized model, I^fp from the float model) to
:func:`lac_pda`, which returns the unit's integers; the pass writes them back before the next
unit.

Two solvers minimise the same objective:

* ``gram`` (default): D is quadratic in the weight, D(W) = tr(W H Wᵀ) - 2 tr(W Cᵀ) + t with
  H = Σ I Iᵀ and C = Σ T Iᵀ, so one pass over the data is enough. We jump to the ridge
  least-squares optimum W*, round it with GPTQ's error feedback (Frantar et al., 2022) and
  polish with exact coordinate descent over integers.
* ``adam`` (the paper's release): learn an offset delta on the weight through a straight-through
  rounding with Adam, one random cached minibatch per step (offset and lr in grid steps), and
  the scale of the activation quantizer at the unit's output (LSQ). Its objective is the unit's
  output error *after* the activation and that quantizer (the release's reconstruction loss);
  the report shows that same objective for this solver. The best scored iterate is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ..config import PDAMode, PurifyConfig, Solver
from ..grid import WeightGrid
from ..units import Gram, Unit, UnitData
from . import UnitResult, register_method

log = logging.getLogger(__name__)

__all__ = ["lac_pda"]


# ---------------------------------------------------------------------------------------------
# PDA


#: what the report says for a BatchNorm1d unit: batch statistics are our extension, not the paper's
BN1D_APPLIED = "applied (BatchNorm1d: batch statistics per feature; our extension, not the paper's)"


def _per_sample(bn) -> bool:
    """The paper's per-sample spatial statistics need a spatial map: BatchNorm2d/3d only."""
    return not isinstance(bn, torch.nn.BatchNorm1d)


def _bn_input_stats(z: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std of the BN input z, per channel.

    per_sample (the paper, BN2d): over H, W for each sample -> (B, C).
    else (BatchNorm1d, our extension): an (N, C) input has no spatial axis and per-sample
    statistics over L of (N, C, L) are not what BN1d normalises by, so match the batch
    statistics over N (and L) -> (1, C), the quantities the running mean/var track.
    """
    dims = tuple(range(2, z.dim())) if per_sample else (0, *range(2, z.dim()))
    m, v = z.mean(dims), z.var(dims, unbiased=False)
    if not per_sample:
        m, v = m.unsqueeze(0), v.unsqueeze(0)  # (1, C)
    return m, (v + 1e-6).sqrt()


def _pda(x: torch.Tensor, unit: Unit, cfg: PurifyConfig, measure_last: bool = True
         ) -> tuple[torch.Tensor, float, float]:
    """Signed-gradient PGD on dI (||dI||_inf <= gamma) matching BN-input stats to running stats.

    Returns the nudged input and the gap before and after; ``measure_last=False`` skips the
    extra forward that measures the gap after (NaN), which only the log reads."""
    bn = unit.bn
    per_sample = _per_sample(bn)
    mu, sd = bn.running_mean.detach().to(x), (bn.running_var.detach().to(x) + 1e-6).sqrt()

    def gap(d: torch.Tensor) -> torch.Tensor:  # sum_i ||mu_i(I) - mu_i||^2 + ||sd_i(I) - sd_i||^2
        m, s = _bn_input_stats(unit.fp_layer(x + d), per_sample)
        return ((m - mu) ** 2).sum(1).mean() + ((s - sd) ** 2).sum(1).mean()

    delta = torch.zeros_like(x, requires_grad=True)
    step, first = cfg.pda_step_size, None
    for it in range(cfg.pda_steps):
        if it == cfg.pda_steps // 2:
            step /= 2  # the release halves the step half-way (at 250 of 500)
        loss = gap(delta)
        (grad,) = torch.autograd.grad(loss, delta)
        first = loss.item() if first is None else first
        with torch.no_grad():
            delta -= step * grad.sign()
            delta.clamp_(-cfg.gamma, cfg.gamma)
    with torch.no_grad():
        last = gap(delta).item() if measure_last or first is None else float("nan")
    return (x + delta).detach(), (first if first is not None else last), last


# ---------------------------------------------------------------------------------------------
# LAC, gram solver


def _solve_gram(g: Gram, w_o: torch.Tensor, grid: WeightGrid, cfg: PurifyConfig) -> torch.Tensor:
    """Integers (G, O/G, K) minimising tr((W - W*) Hd (W - W*)ᵀ) on the grid, Hd = H + λI.

    Statistics are accumulated in float64; the solve runs in float32 like GPTQ (the damping
    keeps it well conditioned) so a 4608x4608 H costs ~85 MB per copy, not 170. One Cholesky
    factor of Hd, in GPTQ's act-order, serves both the ridge optimum and GPTQ.
    """
    G, Og, K = w_o.shape
    H = g.H.float()
    lam = cfg.damp * H.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (G,)
    H.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True)  # act-order, (G, K)
    inv = torch.argsort(perm, dim=1)

    def permuted(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # columns of (G, R, K) reordered by p
        return torch.gather(t, 2, p[:, None, :].expand(t.shape))

    # GPTQ wants U = chol((P Hd Pᵀ)⁻¹), upper. With the factor of the reversed matrix,
    # J P Hd Pᵀ J = L Lᵀ (J reverses), P Hd Pᵀ = R Rᵀ with R = J L J upper, so U = R⁻¹: one
    # factorisation and one triangular inverse instead of factor, inverse, factor.
    rev = perm.flip(1)
    R = _cholesky(H[torch.arange(G)[:, None, None], rev[:, :, None], rev[:, None, :]]).flip(1, 2)
    U = _upper_inverse(R)
    del R
    # Ridge optimum towards the float weight: W* = (C + λ W_o) Hd⁻¹, with Hd⁻¹ = Pᵀ Uᵀ U P
    rhs = permuted(g.C.float() + lam[:, None, None] * w_o.float(), perm)  # (G, Og, K)
    w_star_p = torch.bmm(torch.bmm(rhs, U.transpose(1, 2)), U)  # (G, Og, K), act-order
    w_star = permuted(w_star_p, inv)  # the same in the weight's column order
    del rhs

    if grid.per_group:  # a scale per element: (G, Og, K)
        s, z = (t.reshape(G, Og, K) for t in grid.expand(w_star.reshape(G * Og, K)))
        s_p, z_p = permuted(s, perm), permuted(z, perm)
    else:
        s = grid.scale.float().view(G, Og, 1) if grid.per_channel else grid.scale.float().expand(G, Og, 1)
        z = grid.zero_point.view(G, Og, 1) if grid.per_channel else grid.zero_point.expand(G, Og, 1)
        s_p, z_p = s, z
    q = permuted(_gptq(w_star_p, U, s_p, z_p, grid), inv)
    return _coordinate_descent(q, w_star, H, s, z, grid, cfg.cd_passes)


def _upper_inverse(R: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """R⁻¹ of a batch of upper-triangular matrices, by halves: [[A, B], [0, D]]⁻¹ =
    [[A⁻¹, -A⁻¹ B D⁻¹], [0, D⁻¹]]. Two thirds of the multiply-adds of a triangular solve against
    the identity, and in matrix products (1.8x faster at K = 4608 on 2 cores)."""
    n = R.shape[-1]
    if n <= leaf:
        return torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device).expand_as(R), upper=True)
    h = n // 2
    U = torch.zeros_like(R)
    U[..., :h, :h] = A_inv = _upper_inverse(R[..., :h, :h], leaf)
    U[..., h:, h:] = D_inv = _upper_inverse(R[..., h:, h:], leaf)
    U[..., :h, h:] = -(A_inv @ R[..., :h, h:]) @ D_inv
    return U


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    eye = None
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        if extra:
            eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device) if eye is None else eye
            A = H + extra * H.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
        else:
            A = H
        L, info = torch.linalg.cholesky_ex(A)
        if not info.any():
            return L
    raise RuntimeError("the input Gram matrix is not positive definite even with damping; are the inputs finite?")


def _gptq(W: torch.Tensor, U: torch.Tensor, s, z, grid: WeightGrid, block: int = 128) -> torch.Tensor:
    """GPTQ rounding with lazy block updates, batched over groups. Returns codes.

    ``W`` (G, Og, K) and ``U`` = chol(H⁻¹) (upper) are in the column order to quantize in (the
    caller's act-order); ``s``, ``z``: (G, Og, 1) per channel or (G, Og, K) per group, same order.
    The loop runs on the transposed weight, so each column it reads and updates is contiguous.
    """
    G, Og, K = W.shape
    per_group = s.shape[-1] != 1
    Wt = W.transpose(1, 2).contiguous()  # (G, K, Og)
    st, zt = s.transpose(1, 2).contiguous(), z.transpose(1, 2).float().contiguous()  # (G, 1 or K, Og)
    inv_d = U.diagonal(dim1=1, dim2=2).reciprocal().unsqueeze(-1)  # (G, K, 1)
    Qt = torch.empty_like(Wt)
    for i0 in range(0, K, block):
        i1 = min(i0 + block, K)
        E = torch.empty(G, i1 - i0, Og, dtype=W.dtype, device=W.device)  # scaled errors of the block
        for i in range(i0, i1):
            col = Wt[:, i]  # (G, Og)
            si, zi = (st[:, i], zt[:, i]) if per_group else (st[:, 0], zt[:, 0])
            q = torch.round(col / si).add_(zi).clamp_(grid.qmin, grid.qmax)
            Qt[:, i] = q
            err = torch.sub(col, (q - zi).mul_(si), out=E[:, i - i0]).mul_(inv_d[:, i])
            if i + 1 < i1:
                Wt[:, i + 1 : i1] -= U[:, i, i + 1 : i1, None] * err[:, None, :]
        if i1 < K:
            Wt[:, i1:] -= torch.bmm(U[:, i0:i1, i1:].transpose(1, 2), E)
    return Qt.transpose(1, 2).long()


def _coordinate_descent(q, w_star, H, s, z, grid: WeightGrid, passes: int) -> torch.Tensor:
    """Exact per-integer minimisation of (W - W*) H (W - W*)ᵀ; each move never increases it.

    grad = R H with R = W(q) - W*; moving q[o, k] by dq changes row o of grad by s_o dq H[k].
    Only rows that moved are updated, so a pass costs O(K·(O + moves·K)). Codes are kept as
    floats, transposed so the column each step visits is contiguous.
    """
    per_group = s.shape[-1] != 1
    grad = torch.bmm(s * (q.float() - z.float()) - w_star, H)  # (G, Og, K)
    step = (1.0 / (H.diagonal(dim1=1, dim2=2)[:, None, :] * s)).transpose(1, 2).contiguous()  # (G, K, Og)
    qt = q.float().transpose(1, 2).contiguous()  # (G, K, Og)
    for _ in range(passes):
        moved = 0
        for k in range(qt.shape[1]):
            cur = qt[:, k]
            new = (cur - torch.round(grad[:, :, k] * step[:, k])).clamp_(grid.qmin, grid.qmax)
            dq = new - cur
            idx = dq.nonzero()
            if not len(idx):
                continue
            moved += len(idx)
            cur.copy_(new)
            if 4 * len(idx) > dq.numel():  # most rows moved: one dense rank-1 update beats a scatter
                grad += (s[:, :, k if per_group else 0] * dq)[:, :, None] * H[:, k, None, :]
                continue
            gi, oi = idx[:, 0], idx[:, 1]
            s_k = s[gi, oi, k if per_group else 0]
            grad[gi, oi] += (s_k * dq[gi, oi])[:, None] * H[gi, k]  # rows that moved only
        if moved == 0:
            break
    return qt.transpose(1, 2).long()


# ---------------------------------------------------------------------------------------------
# LAC, adam solver (the paper's release)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _UnitObjective:
    """The adam solver's one objective, optimised and reported: the unit's quantized output
    against the float unit's output, both after the activation,

        D_a = Σ_channels mean_(samples, positions) (FQ_a(act(Q(W) I + b)) - act(W_o I^fp + b))²,

    FQ_a the fake-quantizer convert applies to the unit's output (``unit.out_quant``) with a
    learnable per-tensor scale (LSQ gradient, as MQBench's learnable fake-quantizer in the
    release). Without an output quantizer or activation, the matching factor is the identity.
    """

    def __init__(self, unit: Unit, targets: torch.Tensor) -> None:
        self.unit, self.op = unit, unit.op
        self.act = unit.activation or (lambda y: y)
        fq = unit.out_quant
        self.fq = fq if fq is not None and not fq.identity and fq.axis is None else None
        with torch.no_grad():
            self.targets = self.act(targets)
        if self.fq is not None:
            self.zero_point = fq.zero_point.float().reshape(1)

    def output(self, x: torch.Tensor, w: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor:
        y = self.act(self.op.apply(x, w, self.unit.bias))
        if self.fq is None:
            return y
        grad_factor = 1.0 / (y.numel() * self.fq.qmax) ** 0.5  # LSQ's gradient scale, as MQBench
        return torch._fake_quantize_learnable_per_tensor_affine(y, act_scale, self.zero_point, self.fq.qmin,
                                                                self.fq.qmax, grad_factor)

    def loss(self, x, idx, w, act_scale) -> torch.Tensor:
        """Minibatch D_a: squared error summed over channels, mean over samples and positions."""
        d = self.op.outputs(self.output(x, w, act_scale) - self.targets[idx])  # (G, O/G, N)
        return d.pow(2).sum((0, 1)).mean()

    @torch.no_grad()
    def channels(self, inputs: torch.Tensor, w: torch.Tensor, act_scale, chunk: int = 256) -> torch.Tensor:
        """Per-channel D_a on all cached inputs, flat (G * O/G,)."""
        total, n = 0.0, 0
        for i in range(0, inputs.shape[0], chunk):
            d = self.op.outputs(self.output(inputs[i:i + chunk], w, act_scale) - self.targets[i:i + chunk])
            total, n = total + d.double().pow(2).sum(-1), n + d.shape[-1]
        return (total / n).flatten()

    def energy(self) -> torch.Tensor:
        t = self.op.outputs(self.targets).double()
        return (t.pow(2).sum(-1) / t.shape[-1]).flatten()


def _solve_adam(inputs: torch.Tensor, targets: torch.Tensor, unit: Unit, cfg: PurifyConfig,
                start: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """W_q = s (clamp(round_ste(W/s + u) + z) - z); min D_a (:class:`_UnitObjective`) over the
    offset u and, with ``cfg.act_lr`` > 0, the output quantizer's scale, with Adam, from the
    integers ``start`` (None: round to nearest, u = 0).

    The offset u is in grid steps (the release's delta = s u), so ``cfg.lr`` means the same at
    every bit width; the activation scale moves with Adam at ``cfg.act_lr`` (scale units, as
    released); both learning rates are cosine-annealed to 0 (the release anneals only the
    scale's). Every ``adam_steps // 20`` steps the rounded iterate is scored
    on all cached inputs and the best one (never worse than round-to-nearest with the calibrated
    scale, and than ``start``) is returned: (codes, learned scale or None, per-channel (before,
    after, energy) of D_a; before = round to nearest).
    """
    grid = unit.grid
    obj = _UnitObjective(unit, targets)
    w_o = unit.weight.detach().float()
    s, z = (t.float() for t in grid.expand(w_o))
    u = torch.zeros_like(w_o) if start is None else (start.float() - z) - w_o / s  # W/s + u lands on start - z
    u.requires_grad_(True)
    learn_act = obj.fq is not None and cfg.act_lr > 0
    a0 = None if obj.fq is None else obj.fq.scale.detach().float().reshape(1).clone()
    a = None if a0 is None else a0.clone().requires_grad_(learn_act)
    # one Adam, two groups (Adam is per parameter, so this equals two optimisers); both cosine to 0
    opt = torch.optim.Adam([{"params": [u], "lr": cfg.lr}] + ([{"params": [a], "lr": cfg.act_lr}] if learn_act else []))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.adam_steps, 1), eta_min=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)

    best_q = grid.quantize(w_o)
    before = obj.channels(inputs, grid.dequantize(best_q), a0)
    best, best_ch, best_a, best_step = before.sum().item(), before, a0, 0
    if start is not None:
        ch = obj.channels(inputs, grid.dequantize(start), a0)
        if ch.sum().item() < best:
            best, best_ch, best_q = ch.sum().item(), ch, start
    curve = []  # the scored objective of every checkpoint: does it fall, or only the kept best?
    every = max(1, cfg.adam_steps // 20)
    for step in range(cfg.adam_steps):
        idx = torch.randint(0, inputs.shape[0], (min(cfg.adam_batch_size, inputs.shape[0]),), generator=gen
                            ).to(inputs.device)  # CPU generator: the same draws on every device
        q = (_RoundSTE.apply(w_o / s + u) + z).clamp(grid.qmin, grid.qmax)
        loss = obj.loss(inputs[idx], idx, s * (q - z), a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if learn_act:
            with torch.no_grad():  # as MQBench: a positive scale
                a.abs_().clamp_(min=1e-8)
        if (step + 1) % every == 0 or step + 1 == cfg.adam_steps:
            with torch.no_grad():
                q_now = grid.quantize(w_o + s * u)
            a_now = None if a is None else a.detach().clone()
            ch = obj.channels(inputs, grid.dequantize(q_now), a_now)
            curve.append(ch.sum().item())
            if curve[-1] < best:
                best, best_ch, best_q, best_a, best_step = curve[-1], ch, q_now, a_now, step + 1
    log.info("%s: adam objective %.6g at round to nearest; scored every %d steps: %s; kept step %d (%.6g)",
             unit.name, before.sum().item(), every, [float(f"{e:.6g}") for e in curve], best_step, best)
    act_scale = best_a if learn_act and not torch.equal(best_a, a0) else None
    return best_q, act_scale, (before, best_ch, obj.energy())


# ---------------------------------------------------------------------------------------------
# The method


def _check(units: Sequence[Unit], cfg: PurifyConfig) -> None:
    if cfg.pda is PDAMode.ON and not any(u.bn is not None for u in units):
        raise ValueError("pda='on' but no quantized layer of this model feeds a BatchNorm; use pda='auto' or 'off'")


def _pda_skip_reason(unit: Unit, cfg: PurifyConfig) -> str | None:
    if cfg.pda is PDAMode.OFF:
        return "skipped: pda='off'"
    if unit.bn is None:
        return "skipped: no BatchNorm after this layer in the float model"
    if cfg.pda_steps == 0 or cfg.gamma == 0:
        return "skipped: pda_steps or gamma is 0"
    return None


@register_method("lac", PurifyConfig, summary="layer-wise activation correction (LAC) without PDA",
                 check=_check, pda="off")
@register_method("lac_pda", PurifyConfig, summary="LAC with poisoned distribution approximation (ICML 2024)",
                 check=_check)
def lac_pda(unit: Unit, data: UnitData, cfg: PurifyConfig) -> UnitResult:
    """One unit: PDA nudges I where a BN follows, then LAC picks the integers (Eq. 3)."""
    skip = _pda_skip_reason(unit, cfg)
    if skip and unit.bn is None and cfg.pda is not PDAMode.OFF:
        log.info("%s: PDA %s", unit.name, skip)
    gram, use_gram = Gram(), cfg.solver is Solver.GRAM or cfg.adam_start == "gram"  # the fast solver, or adam's start
    gen = torch.Generator().manual_seed(cfg.seed)  # position subsampling (cfg.gram_positions)
    cache_in, cache_tgt = [], []
    pda_first = pda_last = pda_s = 0.0
    for i_q, i_fp in data:
        with torch.no_grad():
            target = unit.target(i_fp)  # T = W_o I^fp + b (unnudged)
        if skip is None:
            t_pda = time.perf_counter()
            i_q, a, b = _pda(i_q, unit, cfg, measure_last=log.isEnabledFor(logging.INFO))
            pda_first, pda_last, pda_s = pda_first + a, pda_last + b, pda_s + time.perf_counter() - t_pda
        if use_gram:
            gram.add_batch(unit, i_q, target, cfg.gram_positions, gen)
        if cfg.solver is Solver.ADAM:  # adam scores and reports its own objective on the cached inputs
            cache_in.append(i_q)
            cache_tgt.append(target)
    if skip is None:
        log.info("%s: PDA BN-statistics gap %.4g -> %.4g", unit.name, pda_first, pda_last)

    w_o = unit.weight.detach().float()
    t_solve = time.perf_counter()
    q = None
    if use_gram:
        q = unit.op.ungrouped(_solve_gram(gram, unit.op.grouped(w_o), unit.grid, cfg), w_o.shape)
    act_scale = errors = None
    if cfg.solver is Solver.ADAM:
        q, act_scale, errors = _solve_adam(torch.cat(cache_in), torch.cat(cache_tgt), unit, cfg, start=q)
    applied = "applied" if _per_sample(unit.bn) else BN1D_APPLIED
    return UnitResult(codes=q, gram=gram, pda=applied if skip is None else skip, pda_seconds=pda_s,
                      solve_seconds=time.perf_counter() - t_solve, act_scale=act_scale, errors=errors)
