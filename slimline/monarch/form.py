"""The plain-torch Monarch layer: reshape, two ``bmm``, transposes — standard ops only.

This is the form the ``monarch`` pass writes into graphs (Inductor fuses around it; the ONNX
exporter writes Reshape/Transpose/MatMul), the reference the Triton kernel is tested against, and
the "two-bmm" baseline of ``benchmarks/monarch_gpu.py``.

Shape letters as in :mod:`slimline.monarch.projection`; M is every leading dimension of ``x``::

    x_MK -> x_bMP        (b, M, P)     block k of the input, batch first (a strided view)
    h_bMQ = x_bMP @ R    (b, M, Q)     Q = (l, j): block k's outputs for every left block l
    h_bMQ'               (b, M, Q)     permuted: [l, m, (k, j)] = h[k, m, (l, j)]
    y_bMS = h' @ L       (b, M, S)
    y_MN                 (M, N)        block l's outputs at columns l·S…
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimline.monarch.projection import MonarchShape

__all__ = ["monarch_forward"]


def monarch_forward(x: torch.Tensor, right_bPQ: torch.Tensor, left_bQS: torch.Tensor,
                    shape: MonarchShape, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dense(right, left).T + bias`` computed through the factors, for x of shape (..., K)."""
    b, T, P, S = shape.nblocks, shape.slab_rank, shape.block_in, shape.block_out
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, shape.in_features)
    if shape.padded_in != shape.in_features:
        x_MK = F.pad(x_MK, (0, shape.padded_in - shape.in_features))
    x_bMP = x_MK.reshape(-1, b, P).transpose(0, 1)
    h_bMQ = torch.bmm(x_bMP, right_bPQ)                                   # [k, m, (l, j)]
    h_bMQ = h_bMQ.reshape(b, -1, b, T).permute(2, 1, 0, 3).reshape(b, -1, b * T)  # [l, m, (k, j)]
    y_bMS = torch.bmm(h_bMQ, left_bQS)
    y_MN = y_bMS.transpose(0, 1).reshape(-1, b * S)
    if shape.padded_out != shape.out_features:
        y_MN = y_MN[:, : shape.out_features]
    if bias is not None:
        y_MN = y_MN + bias
    return y_MN.reshape(*lead, shape.out_features)
