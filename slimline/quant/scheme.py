"""Group-wise weight quantization: the scheme, its scales and zero points, round-to-nearest.

A weight ``W (N, K)`` is cut along K into groups of ``g`` inputs (``g = K``: one group per
output channel). Each group has a float ``scale`` and an integer ``zero`` point; a weight is
stored as an unsigned code ``q`` in ``[0, 2**bits - 1]`` and means::

    w ≈ (q - zero) * scale                                       # the dequantization, always

symmetric:   zero = 2**(bits-1),  scale = max|w| / (2**(bits-1) - 1)       # 4 bits: -7..7
asymmetric:  scale = (max(w, 0) - min(w, 0)) / (2**bits - 1),  zero = round(-min(w, 0) / scale)

(the range always holds 0, so padding and all-zero groups dequantize to exactly 0). With the
symmetric zero fixed at 2**(bits-1) the codes are what ONNX Runtime's ``MatMulNBits`` assumes
when no zero points are given (8 for 4 bits, 128 for 8 bits).

K is padded with zeros to ``Kq``, a multiple of ``g``, before grouping; :func:`dequantize_codes`
drops the padding again. Scales are float32; the dequantized weight is cast to the caller's
dtype at the end.

Shape legend:  N out_features,  K in_features,  Kq K padded to a whole number of groups,
G groups per row (Kq / g),  g group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimline.errors import ConfigError
from slimline.quant.pack import BITS, default_layout, pack, unpack

__all__ = ["QuantScheme", "QuantizedWeight", "group_parameters", "quantize_to_codes",
           "dequantize_codes", "quantize_rtn", "dequantize_packed", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128)  # besides None (per output channel)


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int | None = 128  # None: one group per output channel
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"cannot quantize to {self.bits!r} bits", stage="quantize",
                              where="QuantScheme.bits", hint=f"use one of {BITS}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 8 or self.group_size % 8):
            raise ConfigError(f"group size {self.group_size!r} is not a multiple of 8 (>= 8)",
                              stage="quantize", where="QuantScheme.group_size",
                              hint=f"use one of {GROUP_SIZES}, or None for one group per row")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        return 1 << (self.bits - 1)

    def group(self, in_features: int) -> int:
        """The group length for a layer with ``in_features`` inputs (a layer narrower than a
        group has one group per row, not a padded one)."""
        if self.group_size is None or in_features <= self.group_size:
            return in_features
        return self.group_size

    def padded(self, in_features: int) -> int:
        group = self.group(in_features)
        return -(-in_features // group) * group

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


def _grouped(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``(N, K)`` float -> ``(N, G, g)`` float32, zero-padded along K."""
    out_features, in_features = weight.shape
    padded = scheme.padded(in_features)
    weight = weight.detach().float()
    if padded != in_features:
        weight = torch.nn.functional.pad(weight, (0, padded - in_features))
    return weight.view(out_features, -1, scheme.group(in_features))


def group_parameters(groups: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, zeros)`` for weight groups ``(..., g)``: float32 and integer-valued float32, ``(...)``.

    Zeros are returned as floats holding integers (for arithmetic); store them as uint8.
    """
    groups = groups.float()
    if scheme.symmetric:
        scales = groups.abs().amax(-1) / (scheme.symmetric_zero - 1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return scales, torch.full_like(scales, float(scheme.symmetric_zero))
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    scales = (high - low) / scheme.max_code
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-low / scales).clamp(0, scheme.max_code)
    return scales, zeros


def quantize_to_codes(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest codes (float32 holding integers) of ``values`` under broadcastable scales."""
    return torch.clamp(torch.round(values.float() / scales) + zeros, 0, scheme.max_code)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float,
                     group_size: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` for codes ``(N, Kq)``; the weight ``(N, in_features)`` in ``dtype``.

    Plain torch ops: this very function is traced into the graph by the quantize pass, so the
    reference here and the rewritten model compute the same bits.
    """
    out_features = codes.shape[0]
    grouped = codes.to(torch.float32).view(out_features, -1, group_size)  # (N, G, g)
    if isinstance(zeros, torch.Tensor):
        zeros = zeros.to(torch.float32).unsqueeze(-1)  # (N, G, 1)
    weight = ((grouped - zeros) * scales.unsqueeze(-1)).flatten(1)  # (N, Kq)
    if weight.shape[1] != in_features:
        weight = weight[:, :in_features]
    return weight if dtype == torch.float32 else weight.to(dtype)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float, *,
                      bits: int, layout: str, group_size: int, padded_features: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack then dequantize: the weight ``(N, in_features)`` from packed bytes (plain torch)."""
    codes = unpack(packed, bits, padded_features, layout)  # (N, Kq) int32
    return dequantize_codes(codes, scales, zeros, group_size, in_features, dtype)


@dataclass
class QuantizedWeight:
    """A quantized ``(N, K)`` weight: codes ``(N, Kq)`` uint8, scales and zeros ``(N, G)``.

    ``zeros`` is None for symmetric schemes (the zero is ``2**(bits-1)`` everywhere).
    """

    scheme: QuantScheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int
    dtype: torch.dtype = torch.float32

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def group_size(self) -> int:
        return self.scheme.group(self.in_features)

    @property
    def zero_values(self) -> torch.Tensor | float:
        return float(self.scheme.symmetric_zero) if self.zeros is None else self.zeros

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zero_values, self.group_size,
                                self.in_features, dtype or self.dtype)

    def pack(self, layout: str | None = None) -> torch.Tensor:
        return pack(self.codes, self.scheme.bits, layout or default_layout(self.scheme.bits))

    def storage_bytes(self, layout: str | None = None) -> int:
        """Bytes of the packed codes, the float32 scales and the uint8 zero points."""
        zeros = self.zeros.numel() if self.zeros is not None else 0
        return self.pack(layout).numel() + 4 * self.scales.numel() + zeros


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest, group by group."""
    groups = _grouped(weight, scheme)  # (N, G, g)
    scales, zeros = group_parameters(groups, scheme)  # (N, G)
    codes = quantize_to_codes(groups, scales.unsqueeze(-1), zeros.unsqueeze(-1), scheme)
    return QuantizedWeight(scheme, codes.flatten(1).to(torch.uint8), scales,
                           None if scheme.symmetric else zeros.to(torch.uint8),
                           weight.shape[1], weight.dtype)
