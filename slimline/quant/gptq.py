"""GPTQ: round weights one input column at a time and push each rounding error onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs.

Follows Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), Algorithm 1. For a linear layer ``y = x Wᵀ`` the squared output error
of a perturbed weight is ``tr(ΔW H ΔWᵀ)`` with ``H = Xᵀ X`` over calibration rows ``X (M, K)``.
With ``U`` the upper Cholesky factor of ``H⁻¹`` (after damping ``H += λ·mean(diag H)·I``),
column ``k`` is rounded and its error spread over the columns after it::

    q_k   = round(W[:, k])                                   # under the column's group scale
    e_k   = (W[:, k] - dequant(q_k)) / U[k, k]
    W[:, k:] -= e_k ⊗ U[k, k:]                               # inside the block, column by column
    W[:, after block] -= E_block @ U[block, after block]     # lazily, once per block

Group scales are chosen when the first column of a group is reached, from the weights as the
error feedback has left them (as in the paper's code). ``act_order`` visits columns by
descending ``diag(H)`` (the inputs with most energy first); its group scales are then computed
up front from the original weights ("static groups"), so codes keep the natural layout and no
permutation index is stored.

Inputs never seen in calibration (``H[k, k] = 0``) get weight 0 (their codes mean 0).

Shape legend:  N out_features,  K in_features,  Kq K padded to whole groups,  B block of columns.
"""

from __future__ import annotations

import torch

from slimline.errors import PassError
from slimline.quant.scheme import QuantizedWeight, QuantScheme, group_parameters, quantize_to_codes

__all__ = ["gptq_quantize", "damped_cholesky_inverse"]


def damped_cholesky_inverse(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹``, raising λ tenfold (up to 3 times)
    when H is not positive definite; returns the factor and the damping used."""
    size = hessian.shape[0]
    mean_diagonal = float(hessian.diagonal().mean())
    identity = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(4):
        used = damping * 10 ** attempt
        lower, info = torch.linalg.cholesky_ex(hessian + used * mean_diagonal * identity)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, used
    raise PassError("the calibration Hessian is not positive definite even with damping "
                    f"{used:g}", stage="quantize", where="gptq",
                    hint="give more calibration inputs, or use method='rtn'")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *,
                  damping: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> QuantizedWeight:
    """Quantize ``weight (N, K)`` with error feedback under ``hessian (K, K)`` (``Xᵀ X``)."""
    out_features, in_features = weight.shape
    group = scheme.group(in_features)
    padded = scheme.padded(in_features)
    device = weight.device  # the solve runs where the weight lives
    work = torch.zeros(out_features, padded, dtype=torch.float32, device=device)
    work[:, :in_features] = weight.detach().float()
    h = torch.zeros(padded, padded, dtype=torch.float64, device=device)
    h[:in_features, :in_features] = hessian.double()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0

    static = act_order or group == padded  # one group per row: its scale is known up front
    scales = torch.ones(out_features, padded // group, device=device)
    zeros = torch.zeros(out_features, padded // group, device=device)
    if static:
        scales, zeros = group_parameters(work.view(out_features, -1, group), scheme)  # (N, G)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(padded, device=device)
    work = work[:, order]
    h = h[order][:, order]
    upper, _ = damped_cholesky_inverse(h, damping)
    upper = upper.float()

    # blocks hold whole groups, so a group's scale can be chosen from its updated columns
    block = max(block_size // group, 1) * group if not static else block_size
    codes = torch.zeros(out_features, padded, device=device)
    for start in range(0, padded, block):
        stop = min(start + block, padded)
        columns = work[:, start:stop].clone()  # (N, B)
        errors = torch.zeros_like(columns)
        upper_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = int(order[start + i])
            if not static and column % group == 0:
                fresh_scales, fresh_zeros = group_parameters(columns[:, i:i + group], scheme)
                scales[:, column // group] = fresh_scales
                zeros[:, column // group] = fresh_zeros
            scale, zero = scales[:, column // group], zeros[:, column // group]
            code = quantize_to_codes(columns[:, i], scale, zero, scheme)  # (N,)
            codes[:, start + i] = code
            error = (columns[:, i] - (code - zero) * scale) / upper_block[i, i]
            columns[:, i:] -= error.unsqueeze(1) * upper_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    codes[:, order] = codes.clone()
    return QuantizedWeight(scheme, codes.to(torch.uint8), scales,
                           None if scheme.symmetric else zeros.to(torch.uint8),
                           in_features, weight.dtype)
