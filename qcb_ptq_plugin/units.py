"""What every method works on: a *unit* (one quantized Conv/ConvTranspose/Linear), its inputs, its statistics.

Toolchain-free: adapters (torch.ao, torchao PT2E, onnxruntime) build :class:`Unit` objects and a
``capture(unit, batch) -> (I, I^fp)`` function; methods read a unit's inputs through
:class:`UnitData` and return integers. Notation as in the LAC+PDA paper:

* I   - the unit's input in the *quantized* model, earlier units already purified;
* I^fp - the same input in the float model;
* T = W_o I^fp + b - the float layer's output (BN folded), the target every method matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .grid import WeightGrid

__all__ = ["Unit", "Unsupported", "LayerOp", "Capture", "UnitData", "Gram", "float_layer", "float_bn"]


@dataclass(frozen=True)
class LayerOp:
    """How a unit applies its weight: Linear, Conv1d/Conv2d (as 2-D), Conv3d or ConvTranspose1d/2d/3d.

    Conv3d and ConvTranspose go through the same column machinery: a ConvTranspose is the conv
    (stride 1, same dilation) of its input zero-inserted by ``stride`` and padded by
    ``dilation*(k-1)-padding`` (plus ``output_padding`` on the right) with the kernel flipped and
    in/out channels swapped; :meth:`grouped` returns that equivalent conv weight, so the rows
    the methods see are output channels for every kind.
    """

    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d" | "conv_transpose1d" / "2d" / "3d"
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    kernel: tuple[int, ...] = (1, 1)
    output_padding: tuple[int, ...] = (0, 0)

    @classmethod
    def from_module(cls, m: nn.Module) -> LayerOp:
        if isinstance(m, nn.Linear):
            return cls("linear")
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise NotImplementedError(f"{type(m).__name__} with padding={m.padding!r}, padding_mode="
                                          f"{m.padding_mode!r} is not supported; use numeric zero padding")
            return cls(f"conv_transpose{len(m.kernel_size)}d", tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                       m.groups, tuple(m.kernel_size), tuple(m.output_padding))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = len(m.kernel_size)
            pad = numeric_padding(m.padding, m.kernel_size, m.dilation, m.stride)
            if m.padding_mode != "zeros" or pad is None:
                raise NotImplementedError(
                    f"{type(m).__name__} with padding={m.padding!r}, padding_mode={m.padding_mode!r} is not "
                    "supported; use numeric (or symmetric 'same') zero padding")
            if dims == 3:
                return cls("conv3d", tuple(m.stride), tuple(pad), tuple(m.dilation), m.groups, tuple(m.kernel_size))
            two = (lambda v: (1, v[0])) if dims == 1 else (lambda v: tuple(v))
            return cls("conv1d" if dims == 1 else "conv2d", two(m.stride), (0, pad[0]) if dims == 1 else pad,
                       two(m.dilation), m.groups, two(m.kernel_size))
        raise NotImplementedError(
            f"{type(m).__name__} layers are not supported by LAC; supported: Linear, Conv1d/2d/3d, "
            "ConvTranspose1d/2d/3d")

    @property
    def transposed(self) -> bool:
        return self.kind.startswith("conv_transpose")

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2) if self.kind == "conv1d" else x

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for weight ``w`` in the module's own layout."""
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv3d":
            return F.conv3d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(self.kernel) - 1]
            return fn(x, w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        y = F.conv2d(self._as2d(x), self._as2d(w), b, self.stride, self.padding, self.dilation, self.groups)
        return y.squeeze(-2) if self.kind == "conv1d" else y

    def bias_view(self, b: torch.Tensor, out_dim: int) -> torch.Tensor:
        """The bias shaped to broadcast over an output of ``out_dim`` dims (channels last for Linear)."""
        return b if self.kind == "linear" else b.view(-1, *([1] * (out_dim - 2)))

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C*prod(k), L) columns for Conv3d and ConvTranspose (as its equivalent stride-1 conv)."""
        nd = len(self.kernel)
        if self.transposed:  # zero-insert by stride, pad d(k-1)-p (negative: crop), output_padding on the right
            s = self.stride
            z = x.new_zeros(*x.shape[:2], *((n - 1) * si + 1 for n, si in zip(x.shape[2:], s)))
            z[(slice(None), slice(None), *(slice(None, None, si) for si in s))] = x
            pads = [(d * (k - 1) - p, d * (k - 1) - p + op) for k, d, p, op in
                    zip(self.kernel, self.dilation, self.padding, self.output_padding)]
            x, stride = z, (1,) * nd
        else:
            pads, stride = [(p, p) for p in self.padding], self.stride
        x = F.pad(x, [v for lr in reversed(pads) for v in lr])
        for i, (k, d, st) in enumerate(zip(self.kernel, self.dilation, stride)):
            x = x.unfold(2 + i, d * (k - 1) + 1, st)[..., ::d]  # appends a kernel axis
        b, c = x.shape[:2]
        out = x.shape[2:2 + nd]
        perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))  # (B, C, k..., out...)
        return x.permute(perm).reshape(b, c * math.prod(self.kernel), math.prod(out))

    def columns(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Input columns the weight multiplies: (G, K, N) with K = in_features per group.

        ``keep``: indices into the N positions (sample-major, as ``outputs`` orders them); only
        those columns are gathered, without materialising the others."""
        if self.kind == "linear":
            cols = x.reshape(-1, x.shape[-1])  # (N, K)
            return (cols if keep is None else cols.index_select(0, keep)).T.unsqueeze(0)  # (1, K, N)
        if self.kind in ("conv1d", "conv2d"):
            return self._patches(self._as2d(x), keep)
        return self._positions_last(self._unfold(x), keep)

    def outputs(self, y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Layer outputs in the same layout: (G, O/G, N) (``keep`` as in :meth:`columns`)."""
        if self.kind == "linear":
            y = y.reshape(-1, y.shape[-1])
            return (y if keep is None else y.index_select(0, keep)).T.unsqueeze(0)
        return self._positions_last(y.flatten(2), keep)  # (B, O, L)

    def _patches(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """2-D conv input patches at output positions ``keep`` (all if None), as (G, K, n): one
        gather from the padded channels-last input (faster than ``F.unfold`` and a permuting
        copy, and it never builds unkept columns)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        c, h, w = x.shape[1:]
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        per_sample = ow * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1)
        if keep is None:
            keep = torch.arange(x.shape[0] * per_sample, device=x.device)
        b, pos = keep // per_sample, keep % per_sample
        rows = (pos // ow * sh)[:, None] + torch.arange(kh, device=x.device) * dh  # (n, kh)
        cols = (pos % ow * sw)[:, None] + torch.arange(kw, device=x.device) * dw  # (n, kw)
        padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        patches = padded[b[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, kh, kw, C)
        g, n = self.groups, len(keep)
        # (G, n, C/G·kh·kw), returned as its transposed view: reordering within each patch is a
        # cheap local copy, while making n the contiguous axis would be a slow global transpose
        # (the Gram's bmm reads either layout at the same speed)
        patches = patches.view(n, kh, kw, g, c // g).permute(3, 0, 4, 1, 2).reshape(g, n, c * kh * kw // g)
        return patches.transpose(1, 2)

    def _positions_last(self, t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """(B, C, L) -> (G, C/G, B*L), or only the positions ``keep`` of the B*L (one gather)."""
        b, c, l = t.shape
        g = self.groups
        if keep is None:
            return t.view(b, g, c // g, l).permute(1, 2, 0, 3).reshape(g, c // g, b * l)
        picked = t[keep // l, :, keep % l]  # (n, C)
        return picked.T.reshape(g, c // g, len(keep))

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in the module's layout as (G, O/G, K), matching :meth:`columns` and :meth:`outputs`.

        ConvTranspose (Cin, O/G, k...): the equivalent conv weight, channels swapped per group
        and the kernel flipped."""
        g = self.groups
        if not self.transposed:
            return w.reshape(g, w.shape[0] // g, -1)
        nd = len(self.kernel)
        w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).flip(tuple(range(3, 3 + nd)))
        return w.reshape(g, w.shape[1], -1)

    def ungrouped(self, w: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The inverse of :meth:`grouped`: (G, O/G, K) back to the module's weight ``shape``."""
        if not self.transposed:
            return w.reshape(shape)
        g, nd = self.groups, len(self.kernel)
        w = w.reshape(g, shape[1], shape[0] // g, *shape[2:]).flip(tuple(range(3, 3 + nd))).transpose(1, 2)
        return w.reshape(shape)


def numeric_padding(padding, kernel, dilation, stride) -> tuple[int, ...] | None:
    """Zero padding per spatial dim; 'valid' -> 0, 'same' -> d(k-1)/2 where that is symmetric,
    None where it is not (an even d(k-1), which torch pads one more on the right)."""
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "valid":
        return (0,) * len(kernel)
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if padding != "same" or any(t % 2 for t in total) or any(s != 1 for s in stride):
        return None
    return tuple(t // 2 for t in total)


@dataclass(frozen=True)
class Unsupported:
    """A quantized layer no method can purify, found by an adapter: named, never silently skipped."""

    name: str  # the layer's name in the user's model
    kind: str  # its module type or graph op
    reason: str  # why, and what to do about it


@dataclass(eq=False)  # compared by identity: it holds tensors and is looked up with `in` / `.index`
class Unit:
    """One quantized layer, as the methods see it. Built by an adapter.

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
        out_quant: the fake-quantizer of the unit's output (after ``activation``) in the
            simulator, a frozen observer with a per-tensor ``scale`` buffer, or None where no
            observer directly follows the unit. A method may learn that scale
            (:attr:`UnitResult.act_scale`); the adapter's commit pins it for convert.
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
    out_quant: nn.Module | None = None

    @property
    def op(self) -> LayerOp:
        return LayerOp.from_module(self.fp_layer)

    def target(self, i_fp: torch.Tensor) -> torch.Tensor:
        """T = W_o I^fp + b: the float layer's output, what every method matches."""
        return self.op.apply(i_fp, self.weight.float(), self.bias)


#: ``capture(unit, batch) -> (I, I^fp)``, provided by an adapter
Capture = Callable[[Unit, object], tuple[torch.Tensor, torch.Tensor]]


class UnitData:
    """A unit's calibration inputs, one batch at a time: ``for i_q, i_fp in data``.

    Each iteration asks the adapter's capture, so I reflects every unit written so far.
    """

    def __init__(self, unit: Unit, capture: Capture, batches: Sequence) -> None:
        self.unit, self.capture, self.batches = unit, capture, batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x in self.batches:
            yield self.capture(self.unit, x)


class Gram:
    """Running H = Σ I Iᵀ, C = Σ T' Iᵀ (T' = target minus bias) and t = Σ ||T'||², per group.

    Incremental like GPTQ's ``add_batch``: one batch in memory at a time. The unit's output
    error of any weight W follows from them (:meth:`channel_errors`), so methods and the
    report measure errors without another pass over the data.
    """

    def __init__(self) -> None:
        self.H = self.C = self.t_ch = None
        self.n = 0

    @property
    def t(self) -> float:
        return self.t_ch.sum().item()

    def add(self, cols: torch.Tensor, tgt: torch.Tensor) -> None:  # (G, K, N), (G, O/G, N)
        h, c = _gram(cols), torch.bmm(tgt, cols.transpose(1, 2))
        t = tgt.double().pow(2).sum(-1)  # (G, O/G)
        if self.H is None:
            self.H, self.C, self.t_ch = h.double(), c.double(), t
        else:  # float64 sums of float32 batch products, cast on the fly
            self.H.add_(h)
            self.C.add_(c)
            self.t_ch.add_(t)
        self.n += cols.shape[-1]

    def add_batch(self, unit: Unit, i_q: torch.Tensor, target: torch.Tensor, positions: int | None = None,
                  generator: torch.Generator | None = None) -> None:
        """Accumulate one batch of unit inputs ``i_q`` against float outputs ``target`` (bias included).

        ``positions``: keep at most this many of the batch's output positions (samples x spatial
        locations), drawn uniformly without replacement with ``generator`` (a CPU generator, so
        every device draws the same); H, C, t and n are then those of the subsample, an unbiased
        estimate of the full statistics up to the factor n.
        """
        op = unit.op
        with torch.no_grad():
            bias = 0 if unit.bias is None else op.bias_view(unit.bias, target.dim())
            n = target.numel() // target.shape[-1 if op.kind == "linear" else 1]  # output positions N
            keep = None
            if positions is not None and n > positions:
                keep = torch.randperm(n, generator=generator)[:positions].to(target.device)
            self.add(op.columns(i_q, keep), op.outputs(target - bias, keep))

    def channel_errors(self, w: torch.Tensor) -> torch.Tensor:
        """Per output channel D_o(W) = (w_o H w_oᵀ - 2 w_o·c_o + t_o) / N for w of shape (G, O/G, K);
        flat (G * O/G,), not clamped. Their sum is D(W) = (tr(W H Wᵀ) - 2 tr(W Cᵀ) + t) / N."""
        w = w.double()
        quad = (torch.bmm(w, self.H) * w).sum(-1) - 2 * (w * self.C).sum(-1)
        return ((quad + self.t_ch) / self.n).flatten()


def _gram(cols: torch.Tensor, block: int = 512) -> torch.Tensor:
    """cols colsᵀ per group, (G, K, K). Wide K is done in row blocks, computing only the blocks on
    and above the diagonal and mirroring the rest: about half the multiply-adds of one bmm."""
    K = cols.shape[1]
    if K < 2 * block:
        return torch.bmm(cols, cols.transpose(1, 2))
    h = cols.new_empty(cols.shape[0], K, K)
    for i in range(0, K, block):
        rows = cols[:, i : i + block]
        upper = torch.bmm(rows, cols[:, i:].transpose(1, 2))  # (G, b, K - i)
        h[:, i : i + block, i:] = upper
        h[:, i:, i : i + block] = upper.transpose(1, 2)
    return h


def float_layer(weight: torch.Tensor, bias: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1,
                groups: int = 1) -> nn.Module:
    """An eval-mode Linear (2-D weight) or Conv1d/Conv2d (3-D/4-D) holding copies of ``weight``/``bias``.

    Adapters whose float model is a graph (an exported ``.pt2``, an ONNX file) use it to give a
    unit the float module the methods read.
    """
    w = weight.detach().float()
    if w.dim() == 2:
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    elif w.dim() in (3, 4):
        conv = nn.Conv2d if w.dim() == 4 else nn.Conv1d
        layer = conv(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias is not None)
    else:
        raise NotImplementedError(f"a {w.dim()}-D weight is neither Linear nor Conv1d/Conv2d")
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
    return layer.eval().requires_grad_(False)


def float_bn(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
             eps: float, spatial_dims: int) -> nn.Module:
    """An eval-mode BatchNorm (2d for ``spatial_dims`` = 2, else 1d) with the given affine and running stats
    (``weight`` / ``bias`` None, as ``affine=False`` exports them: 1 / 0)."""
    bn = (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm1d)(len(mean), eps=eps)
    weight = torch.ones(len(mean)) if weight is None else weight
    bias = torch.zeros(len(mean)) if bias is None else bias
    with torch.no_grad():
        for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), (weight, bias, mean, var)):
            t.copy_(v.float() if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float32))  # copies read-only arrays
    return bn.eval().requires_grad_(False)
