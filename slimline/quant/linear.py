"""The quantized linear layer as the rewritten graph calls it: plain torch ops, one function.

``quantized_linear(x, packed, scales, zeros, bias, **layout)`` unpacks the codes, dequantizes
them (``(q - zero) * scale``, :mod:`slimline.quant.scheme`) and calls ``F.linear``. The quantize
pass puts one ``call_function`` node with this function as its target in place of each
``aten.linear`` it rewrites: the graph stays runnable in torch, ``torch.export`` (and so the
ONNX exporter) and Inductor trace straight through it into standard ops, and a backend that
has a kernel for the layer (``MatMulNBits`` in ONNX Runtime, a Triton dequant-GEMV on CUDA)
finds the layer by this one target and its keyword arguments.

``activations="dynamic_int8"`` also rounds the input to 8 bits on the fly, exactly as ONNX's
``DynamicQuantizeLinear`` does (one asymmetric uint8 scale for the whole tensor, round half to
even), so the graph computes what ONNX Runtime's ``DynamicQuantizeMatMul`` computes::

    scale = (max(x, 0) - min(x, 0)) / 255;   zero = round(-min(x, 0) / scale)
    x_q   = clamp(round(x / scale) + zero, 0, 255);   x ≈ (x_q - zero) * scale

Shape legend:  N out_features,  K in_features,  Kq K padded to whole groups,  ... leading dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimline.quant.scheme import dequantize_packed

__all__ = ["quantized_linear", "fake_quantize_dynamic_uint8", "ACTIVATIONS"]

ACTIVATIONS = ("none", "dynamic_int8")


def fake_quantize_dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ONNX ``DynamicQuantizeLinear``'s per-tensor uint8 grid, back in float."""
    low = x.min().clamp(max=0)  # full reductions: the exporter has no amin over all dims
    high = x.max().clamp(min=0)
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, 255)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (codes - zero) * scale


def quantized_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int,
                     layout: str, group_size: int, padded_features: int, in_features: int,
                     activations: str = "none") -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through the dequantized weight; ``zeros=None``: symmetric."""
    zero_values = zeros if zeros is not None else float(1 << (bits - 1))
    weight = dequantize_packed(packed, scales, zero_values, bits=bits, layout=layout,
                               group_size=group_size, padded_features=padded_features,
                               in_features=in_features, dtype=x.dtype)  # (N, K)
    if activations == "dynamic_int8":
        x = fake_quantize_dynamic_uint8(x)
    return F.linear(x, weight, bias)
