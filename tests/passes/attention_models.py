"""Tiny attention modules, one per form the fuse_attention pass must match (or refuse).

Shape letters: B batch, H heads, Hkv key/value heads, L query length, S key length, E head width.
Every module takes ``x`` (B, L, C) and projects q, k, v itself, so the captured graph holds the
attention the way a model writes it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

B, L, C, H = 2, 6, 16, 4
E = C // H


class _Projections(nn.Module):
    def __init__(self, kv_heads: int = H):
        super().__init__()
        self.kv_heads = kv_heads
        self.query = nn.Linear(C, H * E)
        self.key = nn.Linear(C, kv_heads * E)
        self.value = nn.Linear(C, kv_heads * E)

    def heads(self, x):  # (B, L, C) -> q (B, H, L, E), k, v (B, Hkv, L, E)
        q = self.query(x).view(B, L, H, E).transpose(1, 2)
        k = self.key(x).view(B, L, self.kv_heads, E).transpose(1, 2)
        v = self.value(x).view(B, L, self.kv_heads, E).transpose(1, 2)
        return q, k, v


def merge(y):  # (B, H, L, E) -> (B, L, C)
    return y.transpose(1, 2).reshape(B, L, C)


class ScaledMasked(_Projections):
    """matmul · scale + additive (L, S) causal mask: nanoGPT-style."""

    def forward(self, x):
        q, k, v = self.heads(x)
        mask = torch.full((L, L), float("-inf")).triu(1)
        scores = torch.matmul(q, k.transpose(-2, -1)) * E ** -0.5 + mask
        return merge(torch.matmul(F.softmax(scores, dim=-1), v))


class DividedBoolFill(_Projections):
    """/ sqrt(E), then masked_fill(padding, -inf) with a (B, 1, 1, S) boolean padding mask."""

    def forward(self, x, padding):
        q, k, v = self.heads(x)
        scores = q @ k.transpose(2, 3) / math.sqrt(E)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        return merge(F.softmax(scores, dim=-1) @ v)


class WhereKeepMinimum(_Projections):
    """mask before scale: where(keep, scores + bias, finfo.min) * scale, softmax in float32."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, L, L))

    def forward(self, x):
        q, k, v = self.heads(x)
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        scores = torch.where(keep, q @ k.transpose(-1, -2) + self.bias, torch.finfo(torch.float32).min)
        probs = F.softmax(scores * 0.3, dim=-1, dtype=torch.float32).to(q.dtype)
        return merge(F.dropout(probs, p=0.1, training=self.training) @ v)


class Einsum(_Projections):
    """einsum on (B, L, H, E) layouts, as several research codebases write it."""

    def forward(self, x):
        q = self.query(x).view(B, L, H, E)
        k = self.key(x).view(B, L, H, E)
        v = self.value(x).view(B, L, H, E)
        scores = torch.einsum("blhe,bshe->bhls", q, k) * E ** -0.5
        return torch.einsum("bhls,bshe->blhe", scores.softmax(-1), v).reshape(B, L, C)


class Batched3d(_Projections):
    """bmm over (B·H, L, E), baddbmm with a bias and alpha = scale (older GPT-2 / BART code)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(B * H, L, L))

    def forward(self, x):
        q, k, v = (t.reshape(B * H, L, E) for t in self.heads(x))
        scores = torch.baddbmm(self.bias, q, k.transpose(1, 2), beta=0.5, alpha=E ** -0.5)
        y = torch.bmm(torch.softmax(scores, dim=-1), v)
        return y.view(B, H, L, E).transpose(1, 2).reshape(B, L, C)


class RepeatKV(_Projections):
    """grouped-query attention with transformers' repeat_kv (expand + reshape)."""

    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        k, v = (t[:, :, None, :, :].expand(B, 2, H // 2, L, E).reshape(B, H, L, E) for t in (k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) * E ** -0.5
        return merge(torch.matmul(scores.softmax(-1), v))


class MultiQueryBroadcast(_Projections):
    """one key/value head broadcast by matmul over the query heads."""

    def __init__(self):
        super().__init__(kv_heads=1)

    def forward(self, x):
        q, k, v = self.heads(x)
        scores = torch.matmul(q, k.transpose(-2, -1)) * E ** -0.5
        return merge(torch.matmul(scores.softmax(-1), v))


class AlreadySdpa(_Projections):
    """SDPA called by the model, with a (B, 1, 1, S) float padding mask ORT's CPU kernel rejects."""

    def forward(self, x, padding):
        q, k, v = self.heads(x)
        mask = padding[:, None, None, :].float() * -1e9
        return merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class RowMaxShifted(_Projections):
    """subtracts the row maximum before the softmax (softmax-invariant), divides by sqrt(E)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(E)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        return merge(scores.softmax(-1) @ v)


# -- constant masks: computed from sizes only; causal ones become is_causal, zero ones go ----


class CausalFill(_Projections):
    """masked_fill(-inf) above the diagonal, the boolean mask built from sizes: causal."""

    def forward(self, x):
        q, k, v = self.heads(x)
        position = torch.arange(x.shape[1])
        future = position[None, :] > position[:, None]  # (L, S)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(E)).masked_fill(future, float("-inf"))
        return merge(scores.softmax(-1) @ v)


class ZeroMask(_Projections):
    """adds a constant all-zero (B, 1, L, S) mask, as transformers' ViT does: the mask goes."""

    def forward(self, x):
        q, k, v = self.heads(x)
        mask = torch.zeros(B, 1, L, L)
        return merge(torch.softmax(q @ k.transpose(-2, -1) * E ** -0.5 + mask, dim=-1) @ v)


class CausalBoolSdpa(_Projections):
    """SDPA called with a boolean causal mask (True on and below the diagonal)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        return merge(F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


class SlidingWindow(_Projections):
    """causal, but each query sees only its last 3 keys: constant, not causal; the mask stays."""

    def forward(self, x):
        q, k, v = self.heads(x)
        position = torch.arange(L)
        distance = position[:, None] - position[None, :]  # (L, S): query - key
        keep = (distance >= 0) & (distance < 3)
        scores = torch.where(keep, q @ k.transpose(-2, -1) * E ** -0.5, float("-inf"))
        return merge(scores.softmax(-1) @ v)


class ShiftedCausal(_Projections):
    """each query also sees the next key (tril(1)): constant, off by one, not causal."""

    def forward(self, x):
        q, k, v = self.heads(x)
        mask = torch.full((L, L), float("-inf")).triu(2)
        return merge(torch.softmax(q @ k.transpose(-2, -1) * E ** -0.5 + mask, dim=-1) @ v)


class ModerateCausal(_Projections):
    """an additive causal mask of -1e4: fused with its mask (exact), but not absorbing, so it
    does not become is_causal (a masked key still gets exp(-1e4 + ...) > 0 for large scores)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        mask = torch.full((L, L), -1e4).triu(1)
        return merge(torch.softmax(q @ k.transpose(-2, -1) * E ** -0.5 + mask, dim=-1) @ v)


class EmptyFilled(_Projections):
    """torch.empty(L, S).fill_(0): export keeps the in-place fill; a zero mask, which goes."""

    def forward(self, x):
        q, k, v = self.heads(x)
        mask = torch.empty(L, L).fill_(0.0)
        return merge(torch.softmax(q @ k.transpose(-2, -1) * E ** -0.5 + mask, dim=-1) @ v)


class WrittenAfterView(_Projections):
    """a causal mask written in place into a tensor after the view the scores read was taken:
    the write is no ancestor of the mask's node; the check finds it anyway and keeps the mask."""

    def forward(self, x):
        q, k, v = self.heads(x)
        base = torch.zeros(L, L)
        mask = base.view(L, L)
        base.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        return merge(torch.softmax(q @ k.transpose(-2, -1) * E ** -0.5 + mask, dim=-1) @ v)


# -- near-misses: look like attention, must not be fused ------------------------------------


class ScoreDependentMask(_Projections):
    """masks every score below its row's mean: the mask depends on the scores themselves."""

    def forward(self, x):
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) * E ** -0.5
        scores = scores.masked_fill(scores < scores.mean(-1, keepdim=True), float("-inf"))
        return merge(scores.softmax(-1) @ v)


class SoftmaxOverQueries(_Projections):
    def forward(self, x):
        q, k, v = self.heads(x)
        scores = q @ k.transpose(-2, -1) * E ** -0.5
        return merge(scores.softmax(-2) @ v)


class ReturnsProbabilities(_Projections):
    def forward(self, x):
        q, k, v = self.heads(x)
        probs = (q @ k.transpose(-2, -1) * E ** -0.5).softmax(-1)
        return merge(probs @ v), probs


class ModerateFill(_Projections):
    def forward(self, x, padding):
        q, k, v = self.heads(x)
        scores = (q @ k.transpose(-2, -1)).masked_fill(padding[:, None, None, :], -1e4)
        return merge(scores.softmax(-1) @ v)


class SoftCapped(_Projections):
    def forward(self, x):
        q, k, v = self.heads(x)
        scores = torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 30.0
        return merge(scores.softmax(-1) @ v)


def example_inputs(module: nn.Module) -> tuple:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, C, generator=generator)
    if "padding" in module.forward.__code__.co_varnames[:module.forward.__code__.co_argcount]:
        padding = torch.zeros(B, L, dtype=torch.bool)
        padding[1, L - 2:] = True
        return x, padding
    return (x,)
