"""A small Vision Transformer for 8x8 single-channel images (scikit-learn's digits, 10 classes).

The image is cut into non-overlapping p x p patches, each flattened and projected by one Linear
(the same map as a stride-p convolution, kept as a Linear so the linear-layer passes see it).
A learned class token is prepended, learned position embeddings are added, and pre-LayerNorm
blocks follow. Attention is written by hand as ``softmax((q @ k^T) * scale) @ v`` (no mask).
The class token's final state, normalized, feeds the classifier.

``ViT.forward(images (B, 1, 8, 8) float) -> logits (B, 10)``

Shape legend:
    B   batch size
    Ci  input channels (1)
    H W image height and width (8, 8)
    p   patch size
    N   number of patches = (H / p) * (W / p)
    S   tokens = N + 1 (class token first)
    C   embedding width (config.d_model)
    nh  number of attention heads
    hs  head size = C // nh
    K   number of classes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import ConfigError

__all__ = ["ViTConfig", "ViT", "patchify"]


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}",
                              stage="models", where="ViTConfig")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}", stage="models",
                              where="ViTConfig", hint="pick n_head that divides d_model")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, Ci, H, W) -> (B, N, Ci*p*p), patches in row-major order, each flattened as (Ci, p, p)."""
    B, Ci, H, W = images.shape
    p = patch_size
    x = images.reshape(B, Ci, H // p, p, W // p, p)  # (B, Ci, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, Ci, p, p)
    return x.reshape(B, (H // p) * (W // p), Ci * p * p)  # (B, N, Ci*p*p)


class SelfAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.d_model // config.n_head
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        return x.view(B, S, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, S, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q = self.split_heads(self.query(x))  # (B, nh, S, hs)
        k = self.split_heads(self.key(x))  # (B, nh, S, hs)
        v = self.split_heads(self.value(x))  # (B, nh, S, hs)
        scale = self.head_size**-0.5
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, nh, S, S)
        probs = F.softmax(scores, dim=-1)  # (B, nh, S, S)
        y = torch.matmul(probs, v)  # (B, nh, S, hs)
        y = y.transpose(1, 2).reshape(B, S, C)  # (B, S, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.up = nn.Linear(config.d_model, hidden)
        self.down = nn.Linear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))  # (B, S, C)
        x = x + self.down(F.gelu(self.up(self.ln_mlp(x))))  # (B, S, C), through (B, S, 4C)
        return x


class ViT(nn.Module):
    """``forward(images (B, 1, 8, 8)) -> logits (B, 10)``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        patch_dim = config.in_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.d_model)
        self.class_token = nn.Parameter(torch.zeros(1, 1, config.d_model))  # (1, 1, C)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.d_model))  # (1, S, C)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_token, std=std)
        nn.init.normal_(self.position_embedding, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        patches = patchify(images, self.config.patch_size)  # (B, N, Ci*p*p)
        x = self.patch_embedding(patches)  # (B, N, C)
        class_token = self.class_token.expand(B, -1, -1)  # (B, 1, C)
        x = torch.cat([class_token, x], dim=1) + self.position_embedding  # (B, S, C)
        for block in self.blocks:
            x = block(x)  # (B, S, C)
        return self.head(self.ln_final(x[:, 0]))  # (B, K)
