"""An MLP-Mixer for 8x8 single-channel images (scikit-learn's digits, 10 classes).

No attention at all: each block mixes information across patches with an MLP applied to every
channel (token mixing, over the N axis), then across channels with an MLP applied to every patch
(channel mixing, over the C axis), each pre-LayerNorm with a residual. The head averages the
patches and classifies.

``Mixer.forward(images (B, 1, 8, 8) float) -> logits (B, 10)``

Shape legend:
    B   batch size
    Ci  input channels (1)
    p   patch size
    N   number of patches = (8 / p)^2
    C   channel width (config.d_model)
    Dt  token-mixing MLP width
    Dc  channel-mixing MLP width
    K   number of classes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import ConfigError

from slimline.models.vit import patchify

__all__ = ["MixerConfig", "Mixer"]


@dataclass(frozen=True)
class MixerConfig:
    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    n_layer: int = 4
    d_model: int = 64
    token_mlp_width: int = 64
    channel_mlp_width: int = 256
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}",
                              stage="models", where="MixerConfig")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class MixerBlock(nn.Module):
    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.ln_token = nn.LayerNorm(config.d_model)
        self.token_up = nn.Linear(config.num_patches, config.token_mlp_width)
        self.token_down = nn.Linear(config.token_mlp_width, config.num_patches)
        self.ln_channel = nn.LayerNorm(config.d_model)
        self.channel_up = nn.Linear(config.d_model, config.channel_mlp_width)
        self.channel_down = nn.Linear(config.channel_mlp_width, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_token(x).transpose(1, 2)  # (B, C, N)
        y = self.token_down(F.gelu(self.token_up(y)))  # (B, C, Dt) -> (B, C, N)
        x = x + y.transpose(1, 2)  # (B, N, C)
        y = self.channel_down(F.gelu(self.channel_up(self.ln_channel(x))))  # (B, N, Dc) -> (B, N, C)
        return x + y  # (B, N, C)


class Mixer(nn.Module):
    """``forward(images (B, 1, 8, 8)) -> logits (B, 10)``."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.config = config
        patch_dim = config.in_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.d_model)
        self.blocks = nn.ModuleList(MixerBlock(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.init_std)
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(patchify(images, self.config.patch_size))  # (B, N, C)
        for block in self.blocks:
            x = block(x)  # (B, N, C)
        pooled = self.ln_final(x).mean(dim=1)  # (B, C)
        return self.head(pooled)  # (B, K)
