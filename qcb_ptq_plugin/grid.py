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
    """Per-channel (``axis=0``) or per-tensor (``axis=None``) integer grid of one weight."""

    scale: torch.Tensor  # (C,) float32 per channel, () per tensor
    zero_point: torch.Tensor  # same shape as scale, int64
    qmin: int
    qmax: int
    axis: int | None = 0

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

    # ------------------------------------------------------------------ arithmetic
    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def _bcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (like.dim() - 1))) if self.per_channel else t

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest integers (int64) of ``weight`` on this grid."""
        s, z = self._bcast(self.scale, weight), self._bcast(self.zero_point, weight)
        return (torch.round(weight.detach().float() / s) + z).clamp(self.qmin, self.qmax).to(torch.int64)

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
        return WeightGrid(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.axis)

    def __repr__(self) -> str:
        kind = f"per-channel[{self.scale.numel()}]" if self.per_channel else "per-tensor"
        return f"WeightGrid({kind}, range=[{self.qmin}, {self.qmax}])"
