"""LAC+PDA, top to bottom. Knows nothing about torch.ao, torchao or ONNX.

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

The adapters hand us :class:`Unit` objects and a ``capture(unit, batch) -> (I, I^fp)``
function. Torch adapters read I with a hook from a *simulator* (a copy of the calibrated model
whose observers are frozen into fake-quantizers, so its forward computes what the INT8 model
will); the ONNX adapter asks onnxruntime for the tensors. We choose integers and write the
fake-quantized weight back through ``unit.write`` before moving on to the next unit.

Two solvers minimise the same objective:

* ``gram`` (default): D is quadratic in the weight, D(W) = tr(W H Wᵀ) - 2 tr(W Cᵀ) + t with
  H = Σ I Iᵀ and C = Σ T Iᵀ, so one pass over the data is enough. We jump to the ridge
  least-squares optimum W*, round it with GPTQ's error feedback (Frantar et al., 2022) and
  polish with exact coordinate descent over integers.
* ``adam`` (the paper's release): learn an offset delta on the weight through a straight-through
  rounding with Adam, one random cached minibatch per step.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import PDAMode, PurifyConfig, Solver
from .grid import WeightGrid
from .report import PurifyReport, UnitReport

log = logging.getLogger(__name__)

__all__ = ["Unit", "LayerOp", "ModuleCapture", "run", "flush_denormals"]


# ---------------------------------------------------------------------------------------------
# Units


@dataclass(frozen=True)
class LayerOp:
    """How a unit applies its weight: Conv1d/Conv2d (as 2-D) or Linear."""

    kind: str  # "conv1d" | "conv2d" | "linear"
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)

    @classmethod
    def from_module(cls, m: nn.Module) -> LayerOp:
        if isinstance(m, nn.Linear):
            return cls("linear")
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise NotImplementedError(
                    f"{type(m).__name__} with padding={m.padding!r}, padding_mode={m.padding_mode!r} is not "
                    "supported; use numeric zero padding")
            two = (lambda v: (1, v[0])) if isinstance(m, nn.Conv1d) else (lambda v: tuple(v))
            pad = (0, m.padding[0]) if isinstance(m, nn.Conv1d) else tuple(m.padding)
            return cls("conv1d" if isinstance(m, nn.Conv1d) else "conv2d",
                       two(m.stride), pad, two(m.dilation), m.groups, two(m.kernel_size))
        raise NotImplementedError(
            f"{type(m).__name__} layers are not supported by LAC; supported: Linear, Conv1d, Conv2d "
            "(exclude the layer from quantization or open an issue)")

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2) if self.kind == "conv1d" else x

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        y = F.conv2d(self._as2d(x), self._as2d(w), b, self.stride, self.padding, self.dilation, self.groups)
        return y.squeeze(-2) if self.kind == "conv1d" else y

    def bias_view(self, b: torch.Tensor, out_dim: int) -> torch.Tensor:
        """The bias shaped to broadcast over an output of ``out_dim`` dims (channels last for Linear)."""
        return b if self.kind == "linear" else b.view(-1, *([1] * (out_dim - 2)))

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """Input columns the weight multiplies: (G, K, N) with K = in_features per group."""
        if self.kind == "linear":
            return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # (1, K, N)
        cols = F.unfold(self._as2d(x), self.kernel, self.dilation, self.padding, self.stride)  # (B, Cin*kh*kw, L)
        b, k, l = cols.shape
        g = self.groups
        return cols.view(b, g, k // g, l).permute(1, 2, 0, 3).reshape(g, k // g, b * l)

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """Layer outputs in the same layout: (G, O/G, N)."""
        if self.kind == "linear":
            return y.reshape(-1, y.shape[-1]).T.unsqueeze(0)
        y = y.flatten(2)  # (B, O, L)
        b, o, l = y.shape
        return y.view(b, self.groups, o // self.groups, l).permute(1, 2, 0, 3).reshape(self.groups, o // self.groups, b * l)


@dataclass
class Unit:
    """One quantized layer, as the algorithm sees it. Built by an adapter.

    Attributes:
        name: the layer's name in the user's prepared model (for the report).
        layer: where the capture finds the unit input I (a simulator module for torch).
        fp_layer: the plain float Conv/Linear (unfolded), whose output is the BN input PDA
            looks at; the torch capture also reads I^fp at its input.
        weight: W_o, the float weight the quantizer sees (BN already folded), (O, ...).
        bias: the unit's bias (BN folded), kept as is.
        grid: the weight grid convert will use.
        write: stores a fake-quantized weight into the simulator.
        bn: float BatchNorm fed by ``fp_layer`` (PDA), or None.
        activation: the unit's activation after the layer (adam objective), or None.
    """

    name: str
    layer: object
    fp_layer: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    grid: WeightGrid
    write: Callable[[torch.Tensor], None]
    bn: nn.Module | None = None
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def op(self) -> LayerOp:
        return LayerOp.from_module(self.fp_layer)


# ---------------------------------------------------------------------------------------------
# Capture: read a unit's input, stop the forward there (BRECQ's StopForwardException)


class _StopForward(Exception):
    pass


@contextmanager
def _input_tap(module: nn.Module):
    box: list[torch.Tensor] = []

    def hook(_m, args):
        box.append(args[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


Capture = Callable[[Unit, object], tuple[torch.Tensor, torch.Tensor]]


class ModuleCapture:
    """Capture for torch models: I at ``unit.layer`` of the simulator, I^fp at ``unit.fp_layer``.

    The float model never changes, so one forward per batch records the inputs of all remaining
    units (as float16, up to ``cache_mb``; each entry is freed when its unit is done) instead
    of one partial forward per unit. The quantized side changes after every unit: a graph
    simulator (FX, PT2E) is stepped node by node and paused in front of each unit, so the whole
    pass costs one forward per batch; other modules are re-run up to the unit each time.
    """

    def __init__(self, simulator: nn.Module, float_model: nn.Module, units: Sequence[Unit] = (),
                 cache_mb: float = 512, fp_points: dict[str, nn.Module] | None = None) -> None:
        self.simulator, self.float_model = simulator, float_model
        self.units = list(units)
        self.fp_points = fp_points or {}  # where I^fp is read, when not at unit.fp_layer itself
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._bytes = 0
        self._stepper = _GraphStepper(simulator) if isinstance(simulator, torch.fx.GraphModule) else None

    def __call__(self, unit: Unit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i_q = None if self._stepper is None else self._stepper.input_of(unit.layer, x)
        if i_q is None:
            i_q = _unit_input(self.simulator, unit.layer, x)
        point = self._fp_point(unit)
        key = (id(point), id(x))
        if key not in self._cache and unit in self.units:
            self._fill(x, self.units[self.units.index(unit):])
        cached = self._cache.pop(key, None)
        if cached is None:
            return i_q, _unit_input(self.float_model, point, x)
        self._bytes -= cached.numel() * cached.element_size()
        return i_q, cached.float()

    def _fp_point(self, unit: Unit) -> nn.Module:
        return self.fp_points.get(unit.name, unit.fp_layer)

    @torch.no_grad()
    def _fill(self, x: torch.Tensor, units: Sequence[Unit]) -> None:
        def hook(m, args):
            key = (id(m), id(x))
            t = args[0].detach()
            t = t.dequantize() if t.is_quantized else t
            if key in self._cache or self._bytes + t.numel() * 2 > self.cache_bytes:
                return
            small = t.half() if t.abs().max() < 6e4 else t.float()
            self._cache[key] = small
            self._bytes += small.numel() * small.element_size()

        handles = [self._fp_point(u).register_forward_pre_hook(hook) for u in units]
        try:
            self.float_model(x)
        finally:
            for h in handles:
                h.remove()


class _GraphStepper:
    """Runs a GraphModule forward node by node, one paused run per batch.

    ``input_of(layer, x)`` advances the batch's run to the node that calls ``layer`` and reads
    its input there; the node itself runs later, after the unit's new weight is written, so a
    sequential pass over all units costs one forward. Nodes that depend on parameters only
    (get_attr, weight fake-quantizers) are recomputed at each use, so weight writes are seen.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        self.site: dict[int, int] = {}  # id(module) -> index of the first node that calls it
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                for m in gm.get_submodule(n.target).modules():
                    self.site.setdefault(id(m), i)
        self.static: set = set()
        for n in self.nodes:
            if n.op == "get_attr" or (n.op.startswith("call_") and all(a in self.static for a in n.all_input_nodes)):
                self.static.add(n)
        self.last_use: dict = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.runs: dict[int, tuple[torch.Tensor, int, dict]] = {}  # id(x) -> (x kept alive, next node, env)

    def _static_value(self, node, memo: dict):
        if node not in memo:
            for a in node.all_input_nodes:
                self._static_value(a, memo)
            self.interp.env = memo
            memo[node] = self.interp.run_node(node)
        return memo[node]

    @contextmanager
    def _inputs_ready(self, node, env: dict):
        """env with fresh values of the node's parameter-only inputs, as the interpreter's env."""
        memo: dict = {}
        fresh = [a for a in node.all_input_nodes if a in self.static]
        for a in fresh:
            self._static_value(a, memo)
        env.update({a: memo[a] for a in fresh})
        self.interp.env = env
        try:
            yield
        finally:
            for a in fresh:
                env.pop(a, None)

    @torch.no_grad()
    def input_of(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        target = self.site.get(id(layer))
        if target is None:
            return None
        _, pos, env = self.runs.get(id(x), (x, 0, {}))
        if pos > target:  # asked for an earlier layer: start this batch again
            pos, env = 0, {}
        self.interp.args_iter = iter(self.interp.graph.process_inputs(x) if pos == 0 else ())
        for i in range(pos, target):
            node = self.nodes[i]
            if node in self.static or node.op == "output":
                continue
            with self._inputs_ready(node, env):
                env[node] = self.interp.run_node(node)
            for a in node.all_input_nodes:
                if self.last_use.get(a) == i and a in env:
                    del env[a]
        self.runs[id(x)] = (x, target, env)
        node = self.nodes[target]
        with self._inputs_ready(node, env):
            call_args, call_kwargs = self.interp.fetch_args_kwargs_from_env(node)
        return _tapped_input(layer, lambda: self.interp.fetch_attr(node.target)(*call_args, **call_kwargs))


def _tapped_input(module: nn.Module, forward: Callable[[], object]) -> torch.Tensor | None:
    """The (dequantized) input ``module`` receives when ``forward()`` runs, which stops there; None if never."""
    with _input_tap(module) as box:
        try:
            forward()
        except _StopForward:
            pass
    if not box:
        return None
    inp = box[0]
    return inp.dequantize() if inp.is_quantized else inp.float()


@torch.no_grad()
def _unit_input(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    inp = _tapped_input(module, lambda: model(x))
    if inp is None:
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}; is the layer used in forward()?")
    return inp


# ---------------------------------------------------------------------------------------------
# PDA


def _bn_input_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample spatial mean/std (B, C) for conv maps; batch mean/std (1, C) for vectors."""
    dims = tuple(range(2, z.dim())) if z.dim() > 2 else (0,)
    return z.mean(dims), (z.var(dims, unbiased=False) + 1e-6).sqrt()


def _pda(x: torch.Tensor, unit: Unit, cfg: PurifyConfig) -> tuple[torch.Tensor, float, float]:
    """Signed-gradient PGD on dI (||dI||_inf <= gamma) matching BN-input stats to running stats."""
    bn = unit.bn
    mu, sd = bn.running_mean.detach(), (bn.running_var.detach() + 1e-6).sqrt()
    delta = torch.zeros_like(x, requires_grad=True)
    step, first = cfg.pda_step_size, None
    loss = None
    for it in range(cfg.pda_steps):
        if it == cfg.pda_steps // 2:
            step /= 2  # the release halves the step half-way (at 250 of 500)
        m, s = _bn_input_stats(unit.fp_layer(x + delta))
        loss = ((m - mu) ** 2).sum(1).mean() + ((s - sd) ** 2).sum(1).mean()
        (grad,) = torch.autograd.grad(loss, delta)
        first = loss.item() if first is None else first
        with torch.no_grad():
            delta -= step * grad.sign()
            delta.clamp_(-cfg.gamma, cfg.gamma)
    with torch.no_grad():
        m, s = _bn_input_stats(unit.fp_layer(x + delta))
        last = (((m - mu) ** 2).sum(1).mean() + ((s - sd) ** 2).sum(1).mean()).item()
    return (x + delta).detach(), (first if first is not None else last), last


# ---------------------------------------------------------------------------------------------
# LAC, gram solver


class _Gram:
    """Running H = Σ I Iᵀ, C = Σ T' Iᵀ (T' = target minus bias) and t = Σ ||T'||², per group.

    Incremental like GPTQ's ``add_batch``: one batch in memory at a time.
    """

    def __init__(self) -> None:
        self.H = self.C = self.t_ch = None
        self.n = 0

    @property
    def t(self) -> float:
        return self.t_ch.sum().item()

    def add(self, cols: torch.Tensor, tgt: torch.Tensor) -> None:  # (G, K, N), (G, O/G, N)
        h = torch.bmm(cols, cols.transpose(1, 2)).double()
        c = torch.bmm(tgt, cols.transpose(1, 2)).double()
        t = tgt.double().pow(2).sum(-1)  # (G, O/G)
        self.H = h if self.H is None else self.H.add_(h)
        self.C = c if self.C is None else self.C.add_(c)
        self.t_ch = t if self.t_ch is None else self.t_ch.add_(t)
        self.n += cols.shape[-1]

    def channel_errors(self, w: torch.Tensor) -> torch.Tensor:
        """Per output channel D_o(W) = (w_o H w_oᵀ - 2 w_o·c_o + t_o) / N for w of shape (G, O/G, K);
        flat (G * O/G,), not clamped. Their sum is D(W) = (tr(W H Wᵀ) - 2 tr(W Cᵀ) + t) / N."""
        w = w.double()
        quad = (torch.bmm(w, self.H) * w).sum(-1) - 2 * (w * self.C).sum(-1)
        return ((quad + self.t_ch) / self.n).flatten()


def _solve_gram(g: _Gram, w_o: torch.Tensor, grid: WeightGrid, cfg: PurifyConfig) -> torch.Tensor:
    """Integers (G, O/G, K) minimising tr((W - W*) Hd (W - W*)ᵀ) on the grid, Hd = H + λI.

    Statistics are accumulated in float64; the solve runs in float32 like GPTQ (the damping
    keeps it well conditioned) so a 4608x4608 H costs ~85 MB per copy, not 170.
    """
    G, Og, K = w_o.shape
    H = g.H.float()
    lam = cfg.damp * H.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (G,)
    H.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    # Ridge optimum towards the float weight: W* = (C + λ W_o) Hd⁻¹
    rhs = (g.C.float() + lam[:, None, None] * w_o.float()).transpose(1, 2)  # (G, K, Og)
    w_star = torch.cholesky_solve(rhs, _cholesky(H)).transpose(1, 2).contiguous()  # (G, Og, K)
    del rhs

    s = grid.scale.float().view(G, Og, 1) if grid.per_channel else grid.scale.float().expand(G, Og, 1)
    z = grid.zero_point.view(G, Og, 1) if grid.per_channel else grid.zero_point.expand(G, Og, 1)
    q = _gptq(w_star, H, s, z, grid)
    return _coordinate_descent(q, w_star, H, s, z, grid, cfg.steps)


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    eye = None
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        if extra:
            eye = torch.eye(H.shape[-1], dtype=H.dtype) if eye is None else eye
            A = H + extra * H.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
        else:
            A = H
        L, info = torch.linalg.cholesky_ex(A)
        if not info.any():
            return L
    raise RuntimeError("the input Gram matrix is not positive definite even with damping; are the inputs finite?")


def _gptq(w: torch.Tensor, H: torch.Tensor, s, z, grid: WeightGrid, block: int = 128) -> torch.Tensor:
    """GPTQ rounding (act-order, lazy block updates), batched over groups. Returns codes."""
    G, Og, K = w.shape
    perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True)  # (G, K)
    inv = torch.argsort(perm, dim=1)
    W = torch.gather(w, 2, perm[:, None, :].expand(G, Og, K))
    U = torch.stack([H[g][perm[g]][:, perm[g]] for g in range(G)])  # Hp, permuted
    U = torch.linalg.cholesky(torch.cholesky_inverse(_cholesky(U)), upper=True)  # chol(Hp⁻¹), upper
    Q = torch.empty_like(W, dtype=torch.int64)
    for i0 in range(0, K, block):
        i1 = min(i0 + block, K)
        E = torch.empty(G, Og, i1 - i0, dtype=W.dtype)
        for i in range(i0, i1):
            col = W[:, :, i : i + 1]
            q = (torch.round(col / s) + z).clamp(grid.qmin, grid.qmax)
            Q[:, :, i] = q[..., 0].long()
            err = (col - s * (q - z)) / U[:, i, i].view(G, 1, 1)  # (G, Og, 1)
            W[:, :, i:i1] -= err * U[:, i : i + 1, i:i1]
            E[:, :, i - i0] = err[..., 0]
        W[:, :, i1:] -= torch.bmm(E, U[:, i0:i1, i1:])
    return torch.gather(Q, 2, inv[:, None, :].expand(G, Og, K))


def _coordinate_descent(q, w_star, H, s, z, grid: WeightGrid, passes: int) -> torch.Tensor:
    """Exact per-integer minimisation of (W - W*) H (W - W*)ᵀ; each move never increases it.

    grad = R H with R = W(q) - W*; moving q[o, k] by dq changes row o of grad by s_o dq H[k].
    Only rows that moved are updated, so a pass costs O(K·(O + moves·K)).
    """
    q = q.clone()
    grad = torch.bmm(s * (q - z).float() - w_star, H)  # (G, Og, K)
    step = 1.0 / (H.diagonal(dim1=1, dim2=2)[:, None, :] * s)  # (G, Og, K): dq per unit of grad
    for _ in range(passes):
        moved = 0
        for k in range(q.shape[-1]):
            dq = -torch.round(grad[:, :, k] * step[:, :, k])  # (G, Og)
            new = (q[:, :, k] + dq.long()).clamp(grid.qmin, grid.qmax)
            dq = new - q[:, :, k]
            idx = dq.nonzero()
            if not len(idx):
                continue
            moved += len(idx)
            q[:, :, k] = new
            gi, oi = idx[:, 0], idx[:, 1]
            grad[gi, oi] += (s[gi, oi] * dq[gi, oi, None].float()) * H[gi, k]  # rows that moved only
        if moved == 0:
            break
    return q


# ---------------------------------------------------------------------------------------------
# LAC, adam solver (the paper's release)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _solve_adam(inputs: torch.Tensor, targets: torch.Tensor, unit: Unit, cfg: PurifyConfig) -> torch.Tensor:
    """W_q = s (clamp(round_ste((W + delta)/s) + z) - z); min D(act(T), act(W_q I + b)) with Adam."""
    grid, op = unit.grid, unit.op
    w_o = unit.weight.detach().float()
    s, z = grid._bcast(grid.scale, w_o), grid._bcast(grid.zero_point, w_o).float()
    delta = torch.zeros_like(w_o, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    act = unit.activation or (lambda t: t)
    gen = torch.Generator().manual_seed(cfg.seed)
    tgt_all = act(targets)
    for _ in range(cfg.steps):
        idx = torch.randint(0, inputs.shape[0], (min(cfg.adam_batch_size, inputs.shape[0]),), generator=gen)
        q = (_RoundSTE.apply((w_o + delta) / s) + z).clamp(grid.qmin, grid.qmax)
        out = act(op.apply(inputs[idx], s * (q - z), unit.bias))
        loss = (out - tgt_all[idx]).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return grid.quantize(w_o + delta)


# ---------------------------------------------------------------------------------------------
# The loop


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.reshape(groups, w.shape[0] // groups, -1)  # (G, O/G, K)


def run(units: Sequence[Unit], capture: Capture, batches: Sequence, cfg: PurifyConfig, write_back: bool = True
        ) -> tuple[list[torch.Tensor], PurifyReport]:
    """Purify ``units`` in order; returns the chosen integer weights and the report.

    With ``write_back=False`` (the audit) nothing is written: every unit sees the plain
    round-to-nearest model, and the report says how far each layer could be corrected.
    """
    if cfg.pda is PDAMode.ON and not any(u.bn is not None for u in units):
        raise ValueError("pda='on' but no quantized layer of this model feeds a BatchNorm; use pda='auto' or 'off'")
    report = PurifyReport(config=cfg.to_dict())
    codes: list[torch.Tensor] = []
    t_all = time.perf_counter()
    bar = tqdm(units, desc="purify", unit="unit", disable=not cfg.progress)
    with flush_denormals():
        _run_units(units, capture, batches, cfg, bar, report, codes, write_back)
    report.seconds = time.perf_counter() - t_all
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return codes, report


_flush_depth = 0


@contextmanager
def flush_denormals():
    """Flush denormal floats to zero inside the block (re-entrant).

    PGD and small gradients produce denormals that slow x86 CPUs down 3-10x.
    """
    global _flush_depth
    supported = torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if supported and _flush_depth == 0:
            torch.set_flush_denormal(False)


def _run_units(units, capture, batches, cfg, bar, report, codes, write_back) -> None:
    for unit in bar:
        bar.set_postfix_str(unit.name)
        t0 = time.perf_counter()
        q, row, channels = _purify_unit(unit, capture, batches, cfg)
        row.seconds = time.perf_counter() - t0
        if write_back:
            unit.write(unit.grid.dequantize(q))  # later units see this unit purified
        report.channels[unit.name] = channels
        codes.append(q)
        report.codes[unit.name] = q
        report.units.append(row)
        log.info("%s: error %.4g -> %.4g, %d flips, PDA %s, %.2fs", row.name, row.error_before,
                 row.error_after, row.flips, row.pda, row.seconds)


def _pda_skip_reason(unit: Unit, cfg: PurifyConfig) -> str | None:
    if cfg.pda is PDAMode.OFF:
        return "skipped: pda='off'"
    if unit.bn is None:
        return "skipped: no BatchNorm after this layer in the float model"
    if cfg.pda_steps == 0 or cfg.gamma == 0:
        return "skipped: pda_steps or gamma is 0"
    return None


def _purify_unit(unit: Unit, capture: Capture, batches: Sequence, cfg: PurifyConfig
                 ) -> tuple[torch.Tensor, UnitReport]:
    op, grid = unit.op, unit.grid
    w_o = unit.weight.detach().float()
    q_rtn = grid.quantize(w_o)
    skip = _pda_skip_reason(unit, cfg)
    if skip and unit.bn is None and cfg.pda is not PDAMode.OFF:
        log.info("%s: PDA %s", unit.name, skip)
    gram = _Gram()
    cache_in, cache_tgt = [], []
    pda_first = pda_last = pda_s = 0.0
    for x in batches:
        i_q, i_fp = capture(unit, x)
        with torch.no_grad():
            target = op.apply(i_fp, w_o, unit.bias)  # T = W_o I^fp + b (unnudged)
        if skip is None:
            t_pda = time.perf_counter()
            i_q, a, b = _pda(i_q, unit, cfg)
            pda_first, pda_last, pda_s = pda_first + a, pda_last + b, pda_s + time.perf_counter() - t_pda
        with torch.no_grad():
            bias = 0 if unit.bias is None else op.bias_view(unit.bias, target.dim())
            gram.add(op.columns(i_q), op.outputs(target - bias))
        if cfg.solver is Solver.ADAM:
            cache_in.append(i_q)
            cache_tgt.append(target)
    if skip is None:
        log.info("%s: PDA BN-statistics gap %.4g -> %.4g", unit.name, pda_first, pda_last)

    G = op.groups
    t_solve = time.perf_counter()
    if cfg.solver is Solver.GRAM:
        q = _solve_gram(gram, _grouped(w_o, G), grid, cfg).reshape(w_o.shape)
    else:
        q = _solve_adam(torch.cat(cache_in), torch.cat(cache_tgt), unit, cfg)
    solve_s = time.perf_counter() - t_solve
    before, after = (gram.channel_errors(_grouped(grid.dequantize(codes), G)) for codes in (q_rtn, q))
    row = UnitReport(
        name=unit.name, kind=type(unit.fp_layer).__name__, weights=w_o.numel(), levels=grid.levels,
        error_before=max(before.sum().item(), 0.0), error_after=max(after.sum().item(), 0.0),
        target_energy=gram.t / gram.n,
        flips=int((q != q_rtn).sum()), pda="applied" if skip is None else skip, seconds=0.0,
        pda_seconds=pda_s, solve_seconds=solve_s)
    if not math.isfinite(row.error_after):
        raise FloatingPointError(f"{unit.name}: LAC produced a non-finite error; inputs or weights contain NaN/Inf")
    channels = {"before": before.clamp_min(0), "after": after.clamp_min(0), "energy": (gram.t_ch / gram.n).flatten()}
    return q, row, channels
