"""A Hyena-style byte model: long causal convolutions and gating in place of attention.

Each block is pre-LayerNorm: ``x + hyena(ln(x))`` then ``x + mlp(ln(x))``. The Hyena operator
projects its input to three streams q, k, v and computes

    y = q * (long_conv(k * v) + skip * (k * v))

where ``long_conv`` is a depthwise *causal* convolution whose filter is as long as the context
(config.filter_length, 1024 by default): output t sees inputs 0..t only.

The convolution is written in its plain direct form, which a reader can check by eye and which
the ``fft_conv`` pass later rewrites into FFT multiplies:

    F.conv1d(u (B, C, T), weight (C, 1, Lf), padding=Lf - 1, groups=C)[..., :T]

``conv1d`` is a cross-correlation, so the weight is stored *reversed in time*: its last tap
``weight[c, 0, Lf - 1]`` multiplies the current position and ``weight[c, 0, Lf - 1 - m]``
multiplies the input m steps back. Padding both sides by Lf - 1 and keeping the first T outputs
makes the result causal, for any T <= Lf.

Filters are explicit parameters by default (``filter="explicit"``, one constant filter per
channel, initialized as decaying noise). ``filter="implicit"`` instead produces them from a small
MLP over positional features, multiplied by a decaying window (the Hyena paper's parametrization).

``Hyena.forward(idx (B, T) int64) -> logits (B, T, V)``, the head tied to the byte embedding.

Shape legend:
    B   batch size
    T   sequence length (T <= Lf)
    C   channel width (config.d_model)
    Lf  long filter length (config.filter_length)
    Fp  positional features of the implicit filter
    W   implicit filter MLP width
    V   vocabulary size = 256 (bytes)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import ConfigError, InputError

__all__ = ["HyenaConfig", "Hyena", "ExplicitFilter", "ImplicitFilter", "causal_long_conv"]


@dataclass(frozen=True)
class HyenaConfig:
    vocab_size: int = 256
    filter_length: int = 1024  # long filter length Lf = the longest sequence
    n_layer: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    filter: Literal["explicit", "implicit"] = "explicit"
    implicit_frequencies: int = 8  # Fp = 1 + 2 * implicit_frequencies
    implicit_width: int = 64  # W
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.filter not in ("explicit", "implicit"):
            raise ConfigError(f"filter must be 'explicit' or 'implicit', got {self.filter!r}", stage="models",
                              where="HyenaConfig")


def causal_long_conv(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution: u (B, C, T), weight (C, 1, Lf), time-reversed -> (B, C, T)."""
    T = u.shape[-1]
    filter_length = weight.shape[-1]
    y = F.conv1d(u, weight, padding=filter_length - 1, groups=u.shape[1])  # (B, C, T + Lf - 1)
    return y[..., :T]  # (B, C, T): output t saw inputs t-Lf+1 .. t


def decay_rates(channels: int) -> torch.Tensor:
    """(C,) per-channel decay rates over normalized lag, spread log-uniformly from slow to fast."""
    return torch.logspace(math.log10(0.3), math.log10(30.0), channels)


class ExplicitFilter(nn.Module):
    """One free filter per channel, stored in conv1d layout (C, 1, Lf), time-reversed."""

    def __init__(self, config: HyenaConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.d_model, 1, config.filter_length))  # (C, 1, Lf)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C, _, Lf = self.weight.shape
        lag = torch.linspace(0.0, 1.0, Lf)  # (Lf,) normalized lag m / (Lf - 1)
        window = torch.exp(-decay_rates(C)[:, None] * lag)  # (C, Lf)
        filter_by_lag = torch.randn(C, Lf) * window / math.sqrt(Lf)  # (C, Lf): [c, m] multiplies x[t - m]
        self.weight.copy_(filter_by_lag.flip(-1)[:, None, :])  # (C, 1, Lf)

    def forward(self) -> torch.Tensor:
        return self.weight  # (C, 1, Lf)


class ImplicitFilter(nn.Module):
    """Filters produced by an MLP over positional features, times a decaying window."""

    def __init__(self, config: HyenaConfig) -> None:
        super().__init__()
        Lf, C = config.filter_length, config.d_model
        lag = torch.linspace(0.0, 1.0, Lf)  # (Lf,)
        frequencies = torch.arange(1, config.implicit_frequencies + 1, dtype=torch.float32)  # (Fp/2,)
        angles = 2 * math.pi * lag[:, None] * frequencies  # (Lf, Fp/2)
        features = torch.cat([lag[:, None], angles.sin(), angles.cos()], dim=-1)  # (Lf, Fp)
        window = torch.exp(-decay_rates(C)[:, None] * lag)  # (C, Lf)
        self.register_buffer("features", features, persistent=False)  # (Lf, Fp)
        self.register_buffer("window", window, persistent=False)  # (C, Lf)
        self.first = nn.Linear(features.shape[1], config.implicit_width)
        self.second = nn.Linear(config.implicit_width, config.implicit_width)
        self.out = nn.Linear(config.implicit_width, C)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in (self.first, self.second, self.out):
            layer.reset_parameters()  # PyTorch's default uniform init keeps sin() in its curved range

    def forward(self) -> torch.Tensor:
        h = torch.sin(self.first(self.features))  # (Lf, W)
        h = torch.sin(self.second(h))  # (Lf, W)
        filter_by_lag = self.out(h).transpose(0, 1) * self.window  # (C, Lf): [c, m] multiplies x[t - m]
        return filter_by_lag.flip(-1).unsqueeze(1)  # (C, 1, Lf), time-reversed for conv1d


class HyenaOperator(nn.Module):
    def __init__(self, config: HyenaConfig) -> None:
        super().__init__()
        C = config.d_model
        self.in_proj = nn.Linear(C, 3 * C)
        self.filter = ExplicitFilter(config) if config.filter == "explicit" else ImplicitFilter(config)
        self.skip = nn.Parameter(torch.ones(C))  # (C,) direct path, Hyena's "D" term
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x).chunk(3, dim=-1)  # (B, T, C) each
        u = (k * v).transpose(1, 2)  # (B, C, T) gated input
        y = causal_long_conv(u, self.filter()) + u * self.skip[:, None]  # (B, C, T)
        y = q * y.transpose(1, 2)  # (B, T, C) output gate
        return self.out_proj(y)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: HyenaConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.ln_mix = nn.LayerNorm(config.d_model)
        self.mix = HyenaOperator(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.up = nn.Linear(config.d_model, hidden)
        self.down = nn.Linear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.ln_mix(x))  # (B, T, C)
        x = x + self.down(F.gelu(self.up(self.ln_mlp(x))))  # (B, T, C), through (B, T, 4C)
        return x


class Hyena(nn.Module):
    """``forward(idx (B, T) int64) -> logits (B, T, V)``, T <= filter_length."""

    def __init__(self, config: HyenaConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, module in self.named_modules():
            if ".filter" in name:
                continue  # the long filters have their own init, below
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.mix.filter.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.filter_length:
            raise InputError(f"sequence length {T} exceeds filter_length {self.config.filter_length}", stage="models",
                             where="Hyena.forward", hint="feed at most filter_length tokens")
        x = self.token_embedding(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.ln_final(x))  # (B, T, V)
