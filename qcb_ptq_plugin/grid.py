"""The weight grid: which integers a backend can store and what float each one means.

Every toolchain we support quantizes a weight tensor ``W`` the same way,

    q = clamp(round(W / s) + z, qmin, qmax),      W_hat = s * (q - z),

with ``round`` = round-half-to-even (torch ``nearbyint``, ORT ``std::nearbyint``). They differ
only in how ``s``, ``z`` and ``[qmin, qmax]`` are chosen:

===================================  =====================  ==============  ==========
backend                              scale (symmetric)      range (8 bit)   zero point
===================================  =====================  ==============  ==========
torch.ao x86/fbgemm, torchao X86     absmax / 127.5         -128..127       0
onnxruntime, XNNPACK                 absmax / 127           -127..127       0
===================================  =====================  ==============  ==========

Both rows are ``absmax / ((qmax - qmin) / 2)``, which is what :meth:`WeightGrid.symmetric`
computes, so a grid is fully described by its range. Grids read from a torch observer
(:meth:`WeightGrid.from_observer`) also cover affine and per-tensor schemes.

Weight-only LLM quantization (torchao ``IntxWeightOnlyConfig(granularity=PerGroup(32))``,
GPTQ/AWQ-style INT4) gives every run of ``group_size`` consecutive input columns of a row its
own scale and zero point: :meth:`WeightGrid.from_groups`, scale of shape (O, K / group_size).
Everything below (quantize, dequantize, box, the solvers) reads scales through
:meth:`WeightGrid.expand`, so per-group grids are handled wherever per-channel ones are.

The grid is frozen once chosen: purification changes which integers are stored, never the
scale, so the toolchain must be told to reuse this exact scale at convert time (the adapters
"pin" it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WeightGrid"]

_EPS = torch.finfo(torch.float32).eps  # torch observers clamp scales to this


@dataclass(frozen=True)
class WeightGrid:
    """Per-channel (``axis=0``), per-group (``group_size`` set) or per-tensor (``axis=None``) grid of one weight."""

    scale: torch.Tensor  # (C,) float32 per channel, (C, K / group_size) per group, () per tensor
    zero_point: torch.Tensor  # same shape as scale, int64
    qmin: int
    qmax: int
    axis: int | None = 0
    group_size: int | None = None  # columns sharing one scale along the input axis (2-D weights)
    #: round(W * (1/s)) instead of round(W / s): torchao's quantize_affine. The two differ in
    #: the last bit, which decides ties such as the absmax element at exactly 127.5 LSB.
    reciprocal: bool = False

    def __post_init__(self) -> None:
        if self.group_size is not None and (self.scale.dim() != 2 or self.axis != 0 or self.group_size < 1):
            raise ValueError(f"a per-group grid needs a (rows, groups) scale and axis=0, got scale "
                             f"{tuple(self.scale.shape)}, axis={self.axis}, group_size={self.group_size}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def symmetric(cls, weight: torch.Tensor, qmin: int, qmax: int, per_channel: bool = True) -> WeightGrid:
        """absmax / ((qmax - qmin) / 2), zero point 0: torch x86 with (-128, 127), ORT with (-127, 127)."""
        w = weight.detach().float()
        absmax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax()
        scale = (absmax / ((qmax - qmin) / 2)).clamp_min(_EPS)
        return cls(scale, torch.zeros_like(scale, dtype=torch.int64), qmin, qmax, 0 if per_channel else None)

    @classmethod
    def for_bits(cls, weight: torch.Tensor, bits: int = 8, restricted: bool = False, per_channel: bool = True) -> WeightGrid:
        """Symmetric signed grid of ``bits`` bits; ``restricted`` drops -2^(b-1) (ORT / XNNPACK)."""
        qmax = 2 ** (bits - 1) - 1
        return cls.symmetric(weight, -qmax if restricted else -qmax - 1, qmax, per_channel)

    @classmethod
    def from_observer(cls, observer: torch.nn.Module) -> WeightGrid:
        """Read the grid a torch.ao / torchao weight observer would hand to ``convert``."""
        scale, zero_point = observer.calculate_qparams()
        qscheme = observer.qscheme
        per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        if qscheme not in (torch.per_channel_symmetric, torch.per_channel_affine,
                           torch.per_tensor_symmetric, torch.per_tensor_affine):
            raise ValueError(
                f"weight qscheme {qscheme} is not supported; use per-channel or per-tensor "
                "(symmetric or affine) integer weights")
        if per_channel and getattr(observer, "ch_axis", 0) != 0:
            raise ValueError(
                f"per-channel weight quantization along axis {observer.ch_axis} is not supported; "
                "quantize along the output-channel axis 0 (the torch.ao default)")
        scale = scale.detach().float().reshape(-1 if per_channel else ())
        zero_point = zero_point.detach().to(torch.int64).reshape(scale.shape)
        return cls(scale, zero_point, int(observer.quant_min), int(observer.quant_max), 0 if per_channel else None)

    @classmethod
    def from_groups(cls, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    group_size: int, reciprocal: bool = False) -> WeightGrid:
        """Grid with one (scale, zero point) per row and per ``group_size`` input columns: scale (O, K/gs)."""
        scale = scale.detach().float().reshape(scale.shape[0], -1)
        return cls(scale, zero_point.detach().to(torch.int64).reshape(scale.shape), qmin, qmax, 0, int(group_size),
                   reciprocal)

    # ------------------------------------------------------------------ arithmetic
    @property
    def per_channel(self) -> bool:
        """True for per-channel and per-group grids (a scale per output row, at least)."""
        return self.axis is not None

    @property
    def per_group(self) -> bool:
        return self.group_size is not None

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def _bcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:  # (O, K/gs) -> (O, K): each scale repeated over its group's columns
            if like.dim() != 2 or like.shape[1] != t.shape[1] * self.group_size:
                raise ValueError(f"per-group grid ({tuple(t.shape)} groups of {self.group_size}) does not fit a "
                                 f"weight of shape {tuple(like.shape)}")
            return t.repeat_interleave(self.group_size, dim=1)
        return t.reshape(-1, *([1] * (like.dim() - 1))) if self.per_channel else t

    def expand(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of every element of ``weight``, each of the weight's shape."""
        return (self._bcast(self.scale.float(), weight).expand(weight.shape),
                self._bcast(self.zero_point, weight).expand(weight.shape))

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest integers (int64) of ``weight`` on this grid."""
        s, z = self._bcast(self.scale, weight), self._bcast(self.zero_point, weight)
        x = weight.detach().float() * (1.0 / s) if self.reciprocal else weight.detach().float() / s
        return (torch.round(x) + z).clamp(self.qmin, self.qmax).to(torch.int64)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The float each integer stands for: s * (q - z)."""
        s, z = self._bcast(self.scale, q), self._bcast(self.zero_point, q)
        return s * (q - z).float()

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(weight))

    def box(self, q: torch.Tensor, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Float interval that rounds to ``q``: s * (q - z -+ (0.5 - margin)), margin in LSB."""
        half = 0.5 - margin
        s, z = self._bcast(self.scale, q), self._bcast(self.zero_point, q)
        return s * ((q - z).float() - half), s * ((q - z).float() + half)

    def to(self, device: torch.device | str) -> WeightGrid:
        return WeightGrid(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.axis,
                          self.group_size, self.reciprocal)

    def __repr__(self) -> str:
        if self.group_size is not None:
            kind = f"per-group[{self.scale.shape[0]}x{self.scale.shape[1]}, size {self.group_size}]"
        else:
            kind = f"per-channel[{self.scale.numel()}]" if self.per_channel else "per-tensor"
        return f"WeightGrid({kind}, range=[{self.qmin}, {self.qmax}])"
