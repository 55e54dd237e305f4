"""Bit packing of low-bit weight codes, in plain torch ops (they export to ONNX and trace in FX).

A weight matrix quantized to ``bits`` bits is a matrix of unsigned *codes* ``(N, K)`` in
``[0, 2**bits - 1]`` (see :mod:`slimline.quant.scheme` for what a code means). Codes are packed
along K, the reduction dimension, in one of two layouts, both in ``uint8`` bytes:

``"bytes"`` (bits 1, 2, 4, 8): ``8 // bits`` codes per byte, the first code in the lowest bits::

    byte[n, j] = code[n, per*j] | code[n, per*j + 1] << bits | ...        # (N, Kp / per)

  For 4 bits this is ONNX Runtime's ``MatMulNBits`` blob, row by row (low nibble first), and
  for 8 bits it is the codes themselves.

``"planes"`` (any of 1..8 bits; the default for 3, 5, 6 and 7): one bit-plane per bit, eight
codes per byte, the first code in the lowest bit, as in the bit-level decomposition of
"Efficient Arbitrary Precision Acceleration for LLMs on GPU Tensor Cores" (Ma et al., 2024)::

    plane[b, n, j] = sum_i  ((code[n, 8j + i] >> b) & 1) << i              # (bits, N, Kp / 8)

  Storage is exactly ``bits`` bits per weight, whatever ``bits`` is.

K is padded with zero codes to ``Kp``, a multiple of :data:`K_ALIGN` (32), so every packed row
is a whole number of little-endian 32-bit words: a kernel may ``.view(torch.int32)`` the bytes
and find, in both layouts, code ``32w + i`` (or its plane bit) at bit ``i`` (times ``bits``) of
word ``w``. :func:`unpack` takes the true ``in_features`` and drops the padding.

Shape legend:  N out_features (rows),  K in_features,  Kp K padded to K_ALIGN,  b bit index.
"""

from __future__ import annotations

import torch

from slimline.errors import ConfigError

__all__ = ["K_ALIGN", "BITS", "LAYOUTS", "default_layout", "padded_in_features", "pack", "unpack",
           "packed_shape", "packed_bits_per_weight"]

K_ALIGN = 32
BITS = (2, 3, 4, 5, 6, 8)  # the widths slimline quantizes to (pack/unpack accept 1..8)
LAYOUTS = ("bytes", "planes")


def default_layout(bits: int) -> str:
    """``"bytes"`` where whole codes fit a byte evenly (1, 2, 4, 8 bits), ``"planes"`` otherwise."""
    _check_bits(bits)
    return "bytes" if 8 % bits == 0 else "planes"


def padded_in_features(in_features: int, multiple: int = K_ALIGN) -> int:
    return -(-in_features // multiple) * multiple


def packed_shape(out_features: int, in_features: int, bits: int, layout: str | None = None) -> tuple[int, ...]:
    layout = _check_layout(bits, layout)
    padded = padded_in_features(in_features)
    if layout == "bytes":
        return (out_features, padded * bits // 8)
    return (bits, out_features, padded // 8)


def packed_bits_per_weight(in_features: int, bits: int) -> float:
    """Stored bits per real weight, padding included (both layouts store ``bits`` per code)."""
    return bits * padded_in_features(in_features) / in_features


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"cannot pack {bits!r}-bit codes", stage="quantize", where="pack",
                          hint="use 1 to 8 bits (slimline quantizes to 2, 3, 4, 5, 6 or 8)")


def _check_layout(bits: int, layout: str | None) -> str:
    _check_bits(bits)
    layout = layout or default_layout(bits)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown packing layout {layout!r}", stage="quantize", where="pack",
                          hint=f"use one of: {', '.join(LAYOUTS)}")
    if layout == "bytes" and 8 % bits:
        raise ConfigError(f"{bits}-bit codes do not fit a byte evenly", stage="quantize",
                          where="pack(layout='bytes')", hint="use layout='planes'")
    return layout


def pack(codes: torch.Tensor, bits: int, layout: str | None = None) -> torch.Tensor:
    """Pack unsigned codes ``(N, K)`` into ``uint8`` (see the module docstring for the layouts)."""
    layout = _check_layout(bits, layout)
    if codes.dim() != 2:
        raise ConfigError(f"codes must be 2-D (out, in), got shape {tuple(codes.shape)}",
                          stage="quantize", where="pack")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ConfigError(f"codes outside [0, {(1 << bits) - 1}] for {bits} bits", stage="quantize",
                          where="pack", hint="quantize first (slimline.quant.scheme)")
    out_features, in_features = codes.shape
    padded = torch.zeros(out_features, padded_in_features(in_features), dtype=torch.int32,
                         device=codes.device)
    padded[:, :in_features] = codes.to(torch.int32)
    if layout == "bytes":
        per = 8 // bits
        grouped = padded.view(out_features, -1, per)  # (N, Kp/per, per)
        shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
        return (grouped << shifts).sum(-1).to(torch.uint8)  # (N, Kp/per)
    grouped = padded.view(out_features, -1, 8)  # (N, Kp/8, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    planes = [(((grouped >> b) & 1) * weights).sum(-1) for b in range(bits)]
    return torch.stack(planes).to(torch.uint8)  # (bits, N, Kp/8)


def unpack(packed: torch.Tensor, bits: int, in_features: int, layout: str | None = None) -> torch.Tensor:
    """Codes ``(N, in_features)`` as ``int32`` from :func:`pack`'s output; plain torch ops only.

    The bytes are widened to int32 first: torch's ONNX exporter types a uint8 ``x & 15`` with an
    int8 constant (ORT refuses the file) and has no translation for uint8 tensor shifts.
    """
    layout = _check_layout(bits, layout)
    words = packed.to(torch.int32)
    if layout == "bytes":
        per = 8 // bits
        mask = (1 << bits) - 1
        fields = [(words >> (j * bits)) & mask if j else words & mask for j in range(per)]
        codes = torch.stack(fields, dim=-1) if per > 1 else words.unsqueeze(-1)  # (N, Kp/per, per)
        return codes.flatten(1)[:, :in_features]
    bit_fields = torch.stack([(words >> i) & 1 if i else words & 1 for i in range(8)], dim=-1)  # (bits, N, Kp/8, 8)
    codes = bit_fields[0]
    for b in range(1, bits):
        codes = codes | (bit_fields[b] << b)  # (N, Kp/8, 8)
    return codes.flatten(1)[:, :in_features]
