"""Projection of a dense weight onto the Monarch class (Dao et al., ICML 2022, "Monarch:
Expressive Structured Matrices for Efficient and Accurate Training", §3.2 and Algorithm 1).

Shape letters: K in features, N out features, b blocks (``nblocks``), P = K/b inputs per block,
S = N/b outputs per block, T the rank of one slab, Q = b·T the width of one block's
intermediate; k indexes the first (right) factor's blocks, l the second (left) factor's.

**The class.** ``M = P·L·Pᵀ·R`` with ``R`` block-diagonal (b blocks of Q×P) and ``L``
block-diagonal (b blocks of S×Q); ``P`` sends T of each right block's outputs to every left
block. With the layouts slimline stores::

    right_bPQ[k, π, l·T + j]      R_k's output (l, j) from input π: block k feeds block l through j
    left_bQS[l, k·T + j, σ]       L_l's output σ from intermediate (k, j)

    W[l·S + σ, k·P + π]  =  Σ_j  left_bQS[l, k·T + j, σ] · right_bPQ[k, π, l·T + j]

so the (l, k) slab of W — rows l·S…, columns k·P… — is ``A_lk · B_lk`` with
``A_lk = left[l, k·T:(k+1)·T, :]ᵀ`` (S×T) and ``B_lk = right[k, :, l·T:(l+1)·T]ᵀ`` (T×P).
Every parameter belongs to exactly one slab. Hence the projection (closest Monarch matrix in
Frobenius norm) splits into b² independent problems, each solved exactly by a rank-T truncated SVD
of the slab (Eckart–Young). With T = 1 this is the paper's "rank-1 SVD of each block slab"; the
paper's square case n = m², b = m is T = 1 with square blocks. Parameters:
``b·T·(K + N)``, the same count as a rank-``b·T`` factorisation ``W ≈ B·A``.

``slab_rank=None`` picks T = max(1, min(P, S) // b): a block's intermediate is as wide as its
narrower side, Q = min(P, S), as in Dao et al.'s ``MonarchLinear`` — for a square layer that is
``2·N²/b`` parameters, half the dense layer's at b = 4 (for a 1:4 MLP layer, 31 %).
``param_fraction`` instead picks the largest T whose factors hold at most that fraction of the
dense weights (0.5 gives a 1:4 layer half its weights too).

**Shapes b does not divide.** :func:`monarch_shape` either keeps b and pads (``uneven="pad"``:
W is zero-padded to (b·⌈N/b⌉, b·⌈K/b⌉); the padded inputs are zeros and the padded outputs are
dropped), or picks the divisor of gcd(K, N) nearest to b, padding only when no divisor ≥ 2
exists (``uneven="divisor"``). :attr:`MonarchShape.how` says which, in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimline.errors import ConfigError

__all__ = ["MonarchShape", "MonarchFactors", "monarch_shape", "project", "dense_from_factors",
           "random_factors", "slab_singular_values", "lowrank_equal_params_rank",
           "relative_errors", "UNEVEN_POLICIES"]

UNEVEN_POLICIES = ("divisor", "pad")
_TINY = 1e-300


@dataclass(frozen=True)
class MonarchShape:
    """How a (N, K) weight is cut: b blocks, slab rank T, and the padded sizes."""

    in_features: int          # K
    out_features: int         # N
    nblocks: int              # b
    slab_rank: int            # T
    padded_in: int            # b·P ≥ K
    padded_out: int           # b·S ≥ N
    how: str                  # "b=4 divides 768 and 3072", "padded in 100→104", ...

    @property
    def block_in(self) -> int:      # P
        return self.padded_in // self.nblocks

    @property
    def block_out(self) -> int:     # S
        return self.padded_out // self.nblocks

    @property
    def block_hidden(self) -> int:  # Q = b·T
        return self.nblocks * self.slab_rank

    @property
    def padded(self) -> bool:
        return self.padded_in != self.in_features or self.padded_out != self.out_features

    @property
    def params(self) -> int:
        """Weights of both factors: b·P·Q + b·Q·S."""
        return self.nblocks * self.block_hidden * (self.block_in + self.block_out)

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _auto_rank(nblocks: int, block_in: int, block_out: int) -> int:
    return max(1, min(block_in, block_out) // nblocks)


def monarch_shape(in_features: int, out_features: int, nblocks: int, slab_rank: int | None = None,
                  uneven: str = "divisor", param_fraction: float | None = None) -> MonarchShape:
    """The cut of a (out_features, in_features) weight into ``nblocks`` blocks (see module doc)."""
    if nblocks < 1 or in_features < 1 or out_features < 1:
        raise ConfigError(f"Monarch needs nblocks ≥ 1 and positive sizes, got nblocks={nblocks}, "
                          f"in={in_features}, out={out_features}", stage="passes",
                          where="monarch.nblocks", hint="use nblocks from (2, 4, 8, 16)")
    if uneven not in UNEVEN_POLICIES:
        raise ConfigError(f"unknown Monarch uneven policy {uneven!r}", stage="passes",
                          where="monarch.uneven", hint=f"use one of: {', '.join(UNEVEN_POLICIES)}")
    common = math.gcd(in_features, out_features)
    blocks = nblocks
    if common % nblocks == 0:
        how = f"b={nblocks} divides {in_features} and {out_features}"
    elif uneven == "divisor" and [d for d in _divisors(common) if d >= 2]:
        candidates = [d for d in _divisors(common) if d >= 2]
        # nearest on a log scale; ties go to the smaller (less compression, less error)
        blocks = min(candidates, key=lambda d: (abs(math.log(d / nblocks)), d))
        how = f"b={blocks} instead of {nblocks}: the nearest divisor of gcd({in_features}, {out_features})={common}"
    else:
        how = "padded"
    padded_in = -(-in_features // blocks) * blocks
    padded_out = -(-out_features // blocks) * blocks
    if how == "padded":
        parts = [f"{name} {old}→{new}" for name, old, new in
                 (("in", in_features, padded_in), ("out", out_features, padded_out)) if old != new]
        how = f"b={blocks}, padded {', '.join(parts)}"
    if slab_rank is not None:
        rank = int(slab_rank)
    elif param_fraction is not None:
        rank = max(1, int(param_fraction * in_features * out_features // (blocks * (padded_in + padded_out))))
    else:
        rank = _auto_rank(blocks, padded_in // blocks, padded_out // blocks)
    if rank < 1:
        raise ConfigError(f"Monarch slab rank must be ≥ 1, got {slab_rank!r}", stage="passes",
                          where="monarch.slab_rank", hint="leave it None for min(P, S) // b")
    return MonarchShape(in_features, out_features, blocks, rank, padded_in, padded_out, how)


@dataclass
class MonarchFactors:
    """The two block-diagonal factors of a Monarch matrix, in slimline's layouts (module doc)."""

    shape: MonarchShape
    right_bPQ: torch.Tensor   # (b, P, Q)
    left_bQS: torch.Tensor    # (b, Q, S)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "MonarchFactors":
        return MonarchFactors(self.shape, self.right_bPQ.to(device=device, dtype=dtype).contiguous(),
                              self.left_bQS.to(device=device, dtype=dtype).contiguous())

    def dense(self) -> torch.Tensor:
        """The (N, K) matrix these factors compute (padding dropped)."""
        return dense_from_factors(self.shape, self.right_bPQ, self.left_bQS)


def _slabs(weight: torch.Tensor, shape: MonarchShape) -> torch.Tensor:
    """(N, K) -> zero-padded slabs (b_l, b_k, S, P)."""
    b, S, P = shape.nblocks, shape.block_out, shape.block_in
    padded = weight.new_zeros(shape.padded_out, shape.padded_in)
    padded[: shape.out_features, : shape.in_features] = weight
    return padded.view(b, S, b, P).permute(0, 2, 1, 3)


def dense_from_factors(shape: MonarchShape, right_bPQ: torch.Tensor, left_bQS: torch.Tensor) -> torch.Tensor:
    """W[l·S + σ, k·P + π] = Σ_j left[l, k·T + j, σ] · right[k, π, l·T + j], as (N, K)."""
    b, T, S, P = shape.nblocks, shape.slab_rank, shape.block_out, shape.block_in
    left_lkTS = left_bQS.reshape(b, b, T, S)                    # [l, k, j, σ]
    right_kPlT = right_bPQ.reshape(b, P, b, T)                  # [k, π, l, j]
    slabs_lkSP = torch.einsum("lkjs,kplj->lksp", left_lkTS, right_kPlT)
    dense = slabs_lkSP.permute(0, 2, 1, 3).reshape(shape.padded_out, shape.padded_in)
    return dense[: shape.out_features, : shape.in_features]


def _factors_from_slab_terms(shape: MonarchShape, left_lkST: torch.Tensor,
                             right_lkTP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_lk (S×T) and B_lk (T×P) of every slab -> (right_bPQ, left_bQS)."""
    b, T, S, P = shape.nblocks, shape.slab_rank, shape.block_out, shape.block_in
    left_bQS = left_lkST.permute(0, 1, 3, 2).reshape(b, b * T, S)          # [l, (k, j), σ]
    right_bPQ = right_lkTP.permute(1, 3, 0, 2).reshape(b, P, b * T)        # [k, π, (l, j)]
    return right_bPQ.contiguous(), left_bQS.contiguous()


def slab_singular_values(weight: torch.Tensor, shape: MonarchShape) -> torch.Tensor:
    """Singular values of every (l, k) slab, float64: (b, b, min(S, P))."""
    return torch.linalg.svdvals(_slabs(weight.detach().to(torch.float64), shape))


def project(weight: torch.Tensor, shape: MonarchShape, dtype: torch.dtype | None = None) -> MonarchFactors:
    """The Monarch matrix nearest to ``weight`` (N, K) in Frobenius norm: a rank-T SVD per slab.

    Computed in float64; the factors come back in ``dtype`` (default: the weight's), with each
    slab's singular values split evenly (√σ on both sides) so the factors have equal scale.
    """
    if tuple(weight.shape) != (shape.out_features, shape.in_features):
        raise ConfigError(f"weight shape {tuple(weight.shape)} does not match the Monarch shape "
                          f"({shape.out_features}, {shape.in_features})", stage="passes",
                          where="monarch.project", hint="build the shape with monarch_shape(K, N, b)")
    T = shape.slab_rank
    slabs = _slabs(weight.detach().to(torch.float64), shape)                   # (b, b, S, P)
    u, sigma, vh = torch.linalg.svd(slabs, full_matrices=False)                # r = min(S, P)
    kept = min(T, sigma.shape[-1])
    root = sigma[..., :kept].sqrt()
    left_lkST = slabs.new_zeros(*slabs.shape[:2], shape.block_out, T)
    right_lkTP = slabs.new_zeros(*slabs.shape[:2], T, shape.block_in)
    left_lkST[..., :kept] = u[..., :kept] * root[..., None, :]
    right_lkTP[..., :kept, :] = root[..., :, None] * vh[..., :kept, :]
    right, left = _factors_from_slab_terms(shape, left_lkST, right_lkTP)
    out = dtype or weight.dtype
    return MonarchFactors(shape, right.to(out), left.to(out))


def random_factors(shape: MonarchShape, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> MonarchFactors:
    """Random factors scaled so that ``x @ dense.T`` keeps x's scale (for tests and benchmarks)."""
    b, T, S, P = shape.nblocks, shape.slab_rank, shape.block_out, shape.block_in
    right = torch.randn(b, P, b * T, generator=generator, dtype=torch.float64) / math.sqrt(P)
    left = torch.randn(b, b * T, S, generator=generator, dtype=torch.float64) / math.sqrt(b * T)
    return MonarchFactors(shape, right.to(dtype), left.to(dtype))


def lowrank_equal_params_rank(shape: MonarchShape) -> int:
    """The rank R whose factorisation ``R·(K + N)`` has as many weights as the Monarch factors."""
    return max(1, shape.params // (shape.in_features + shape.out_features))


def relative_errors(weight: torch.Tensor, approximation: torch.Tensor,
                    covariance: torch.Tensor | None = None) -> float:
    """‖(W − A)·xᵀ‖ / ‖W·xᵀ‖ under ``covariance`` = E[xᵀx] (K×K), or ‖W − A‖_F / ‖W‖_F without."""
    weight = weight.detach().to(torch.float64)
    difference = weight - approximation.detach().to(torch.float64)
    if covariance is None:
        return math.sqrt(float(difference.pow(2).sum()) / max(float(weight.pow(2).sum()), _TINY))
    covariance = covariance.to(torch.float64)
    error = float(((difference @ covariance) * difference).sum())
    total = float(((weight @ covariance) * weight).sum())
    return math.sqrt(max(error, 0.0) / max(total, _TINY))
