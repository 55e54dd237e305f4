"""A BERT-style sentence encoder: bidirectional attention, mean pooling, one embedding per input.

Layout follows BERT (and so the MiniLM encoder that slimline also optimizes): token + learned
position embeddings, an embedding LayerNorm, then *post*-LayerNorm blocks
``x = ln(x + attn(x)); x = ln(x + mlp(x))``. Padding is hidden from attention by an additive
mask built from ``attention_mask`` (1 = real token, 0 = padding). Attention is written by hand
as ``softmax((q @ k^T) * scale + padding_bias) @ v`` so the ``fuse_attention`` pass can match it.
The head averages the hidden states of the real tokens.

``BertEncoder.forward(input_ids (B, T) int64, attention_mask (B, T) int64) -> embeddings (B, C)``

The vocabulary defaults to bytes (256 ids, id 0 = padding), like the project's other text models.

Shape legend:
    B   batch size
    T   sequence length
    C   hidden width (config.d_model)
    nh  number of attention heads
    hs  head size = C // nh
    V   vocabulary size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import ConfigError, InputError

__all__ = ["BertConfig", "BertEncoder"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 256
    max_positions: int = 512
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}", stage="models",
                              where="BertConfig", hint="pick n_head that divides d_model")


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) of 1/0 -> additive bias (B, 1, 1, T): 0 for real tokens, the most negative value for padding.

    A finite minimum rather than -inf keeps an all-padding row finite instead of NaN.
    """
    keep = attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, T)
    return (1.0 - keep) * torch.finfo(dtype).min


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.d_model // config.n_head
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.split_heads(self.query(x))  # (B, nh, T, hs)
        k = self.split_heads(self.key(x))  # (B, nh, T, hs)
        v = self.split_heads(self.value(x))  # (B, nh, T, hs)
        scale = self.head_size**-0.5
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale + bias  # (B, nh, T, T)
        probs = F.softmax(scores, dim=-1)  # (B, nh, T, T)
        y = torch.matmul(probs, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class EncoderBlock(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.attn = SelfAttention(config)
        self.ln_attn = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.up = nn.Linear(config.d_model, hidden)
        self.down = nn.Linear(hidden, config.d_model)
        self.ln_mlp = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn(x + self.attn(x, bias))  # (B, T, C)
        x = self.ln_mlp(x + self.down(F.gelu(self.up(x))))  # (B, T, C), through (B, T, 4C)
        return x


class BertEncoder(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T)) -> mean-pooled embeddings (B, C)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.ln_embedding = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT style: weights N(0, 0.02), biases 0, LayerNorms at identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_positions:
            raise InputError(f"sequence length {T} exceeds max_positions {self.config.max_positions}", stage="models",
                             where="BertEncoder.forward", hint="truncate the input or raise max_positions")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)
        x = self.ln_embedding(x)  # (B, T, C)
        bias = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, bias)  # (B, T, C)
        # Mean over the real tokens only.
        keep = attention_mask[:, :, None].to(x.dtype)  # (B, T, 1)
        summed = (x * keep).sum(dim=1)  # (B, C)
        count = keep.sum(dim=1).clamp(min=1.0)  # (B, 1)
        return summed / count  # (B, C)
