"""A byte-level GPT decoder with rotary positions and a static, preallocated KV cache.

The model reads bytes (vocabulary 256) and predicts the next byte. Blocks are pre-LayerNorm:
``x + attn(ln(x))`` then ``x + mlp(ln(x))``. Positions enter only through rotary embeddings
applied to queries and keys, so there is no learned position table. The output head is *tied*
to the token embedding (one 256 x C matrix serves both).

Attention is written out by hand, on purpose, as

    scores = (q @ k^T) * scale + causal_bias;  probs = softmax(scores);  y = probs @ v

and never through ``scaled_dot_product_attention``: the ``fuse_attention`` pass matches this
plain pattern, and a reader sees every step.

Three ways to run the same weights:

- ``GPT.forward(idx)``: full sequences, for training and evaluation.
- ``GPTPrefill`` / ``GPTDecode``: one step each with the KV cache passed as explicit tensors,
  ``(logits, k_cache, v_cache) = step(idx, [input_pos,] k_cache, v_cache)``. The cache is
  written out of place with ``index_copy`` at a position *tensor*, so there is no Python
  control flow that depends on data: each step captures with ``torch.export`` into one graph
  that serves every position, and exports to ONNX.
- ``generate(model, idx, max_new_tokens)``: prefill once, then decode token by token.

Shape legend:
    B   batch size
    T   sequence length of this call (tokens in; T = 1 for a decode step)
    Tm  cache length = config.context_length (the static KV cache holds Tm positions)
    C   embedding width (config.d_model)
    nh  number of attention heads
    hs  head size = C // nh
    L   number of layers
    V   vocabulary size = 256 (bytes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import ConfigError, InputError

__all__ = [
    "GPTConfig",
    "GPT_CONFIGS",
    "GPT",
    "GPTPrefill",
    "GPTDecode",
    "generate",
]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    context_length: int = 1024  # longest sequence; also the KV cache length Tm
    n_layer: int = 10
    n_head: int = 6
    d_model: int = 384
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}", stage="models",
                              where="GPTConfig", hint="pick n_head that divides d_model")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(f"head size {self.d_model // self.n_head} must be even for rotary positions",
                              stage="models", where="GPTConfig", hint="change d_model or n_head")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head


GPT_CONFIGS: dict[str, GPTConfig] = {
    # ~1.0M parameters: fast enough for every test.
    "gpt-tiny": GPTConfig(context_length=256, n_layer=5, n_head=4, d_model=128),
    # ~17.8M parameters (17.7M outside the embedding): the bundled default model.
    "gpt-small": GPTConfig(context_length=1024, n_layer=10, n_head=6, d_model=384),
}


def rotary_tables(context_length: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (Tm, hs): row t rotates pair (i, i + hs/2) by t * base^(-2i/hs)."""
    inverse_frequency = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    positions = torch.arange(context_length, dtype=torch.float64)  # (Tm,)
    angles = torch.outer(positions, inverse_frequency)  # (Tm, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (Tm, hs)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles of its positions; cos, sin are (T, hs)."""
    half = x.shape[-1] // 2
    x_first, x_second = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    rotated_half = torch.cat([-x_second, x_first], dim=-1)  # (B, nh, T, hs)
    return x * cos + rotated_half * sin


def causal_bias(query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (T, Tk): 0 where key position <= query position, -inf elsewhere."""
    allowed = key_positions[None, :] <= query_positions[:, None]  # (T, Tk)
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    minus_infinity = torch.full((), float("-inf"), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, minus_infinity)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.query = nn.Linear(config.d_model, config.d_model, bias=False)
        self.key = nn.Linear(config.d_model, config.d_model, bias=False)
        self.value = nn.Linear(config.d_model, config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (T, hs)
        sin: torch.Tensor,  # (T, hs)
        bias: torch.Tensor,  # (T, Tk) additive causal mask
        input_pos: torch.Tensor | None = None,  # (T,) cache slots to write; None = no cache
        k_cache: torch.Tensor | None = None,  # (B, nh, Tm, hs) this layer's cache
        v_cache: torch.Tensor | None = None,  # (B, nh, Tm, hs)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q = apply_rotary(self.split_heads(self.query(x)), cos, sin)  # (B, nh, T, hs)
        k = apply_rotary(self.split_heads(self.key(x)), cos, sin)  # (B, nh, T, hs)
        v = self.split_heads(self.value(x))  # (B, nh, T, hs)
        if k_cache is not None:
            # Out-of-place write of the new keys/values into their slots; attend over all Tm
            # slots and let the causal bias hide the ones not yet written.
            k = k_cache.index_copy(2, input_pos, k)  # (B, nh, Tm, hs)
            v = v_cache.index_copy(2, input_pos, v)  # (B, nh, Tm, hs)
        scale = self.head_size**-0.5
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale + bias  # (B, nh, T, Tk)
        probs = F.softmax(scores, dim=-1)  # (B, nh, T, Tk)
        y = torch.matmul(probs, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, bias, input_pos=None, k_cache=None, v_cache=None):
        attended, k, v = self.attn(self.ln_attn(x), cos, sin, bias, input_pos, k_cache, v_cache)
        x = x + attended  # (B, T, C)
        x = x + self.mlp(self.ln_mlp(x))  # (B, T, C)
        return x, k, v


class GPT(nn.Module):
    """Byte-level decoder. ``forward(idx (B, T) int64) -> logits (B, T, V)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied
        cos, sin = rotary_tables(config.context_length, config.head_size, config.rope_base)
        # Derived from the config, so kept out of the state dict (and out of checkpoints).
        self.register_buffer("rope_cos", cos, persistent=False)  # (Tm, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (Tm, hs)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual projections shrunk by 1/sqrt(2L)."""
        std = self.config.init_std
        for name, parameter in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, std=std / (2 * self.config.n_layer) ** 0.5)
            elif parameter.dim() >= 2:
                nn.init.normal_(parameter, std=std)
        # LayerNorms keep their own init (weight 1, bias 0).

    def num_parameters(self, include_embedding: bool = True) -> int:
        count = sum(p.numel() for p in self.parameters())  # the tied head counts once
        if not include_embedding:
            count -= self.token_embedding.weight.numel()
        return count

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.context_length:
            raise InputError(f"sequence length {T} exceeds context_length {self.config.context_length}", stage="models",
                             where="GPT.forward", hint="feed at most context_length tokens")
        positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.token_embedding(idx)  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs)
        bias = causal_bias(positions, positions, x.dtype)  # (T, T)
        for block in self.blocks:
            x, _, _ = block(x, cos, sin, bias)  # (B, T, C)
        return self.head(self.ln_final(x))  # (B, T, V)

    def new_kv_cache(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (k_cache, v_cache), each (L, B, nh, Tm, hs)."""
        config = self.config
        reference = self.token_embedding.weight
        shape = (config.n_layer, batch_size, config.n_head, config.context_length, config.head_size)
        dtype = dtype or reference.dtype
        device = device or reference.device
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward_with_cache(
        self,
        idx: torch.Tensor,  # (B, T) int64
        input_pos: torch.Tensor,  # (T,) int64: the positions of these tokens = their cache slots
        k_cache: torch.Tensor,  # (L, B, nh, Tm, hs)
        v_cache: torch.Tensor,  # (L, B, nh, Tm, hs)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run T tokens at positions input_pos against the cache; returns (logits, k_cache', v_cache').

        The inputs are not modified. A query at position p sees every cache slot <= p, so the
        slots before input_pos must already hold this sequence's keys and values.
        """
        x = self.token_embedding(idx)  # (B, T, C)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, hs)
        cache_positions = torch.arange(k_cache.shape[3], device=idx.device)  # (Tm,)
        bias = causal_bias(input_pos, cache_positions, x.dtype)  # (T, Tm)
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, bias, input_pos, k_cache[layer], v_cache[layer])
            new_keys.append(k)  # (B, nh, Tm, hs)
            new_values.append(v)
        logits = self.head(self.ln_final(x))  # (B, T, V)
        return logits, torch.stack(new_keys), torch.stack(new_values)  # (L, B, nh, Tm, hs) each


class GPTPrefill(nn.Module):
    """Prefill step: ``(idx (B, T), k_cache, v_cache) -> (logits (B, T, V), k_cache', v_cache')``.

    The prompt occupies positions 0..T-1; caches are (L, B, nh, Tm, hs) and may be fresh zeros.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        input_pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        return self.gpt.forward_with_cache(idx, input_pos, k_cache, v_cache)


class GPTDecode(nn.Module):
    """Decode step: ``(idx (B, 1), input_pos (1,) int64, k_cache, v_cache) -> (logits (B, 1, V), k_cache', v_cache')``.

    input_pos holds the position of the new token (the number of tokens already cached); the
    same captured graph serves every position.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        return self.gpt.forward_with_cache(idx, input_pos, k_cache, v_cache)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens bytes: one prefill step, then one decode step per token.

    greedy=True takes the argmax; otherwise samples from softmax(logits / temperature).
    Returns (B, T + max_new_tokens).
    """
    B, T = idx.shape
    total = T + max_new_tokens
    if total > model.config.context_length:
        raise InputError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"context_length {model.config.context_length}",
            stage="models",
            where="generate",
            hint="shorten the prompt or generate fewer tokens",
        )
    if max_new_tokens <= 0:
        return idx

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, 1)
        if greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = F.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)

    prefill, decode = GPTPrefill(model), GPTDecode(model)
    k_cache, v_cache = model.new_kv_cache(B)
    logits, k_cache, v_cache = prefill(idx, k_cache, v_cache)  # (B, T, V)
    tokens = [idx, pick(logits[:, -1])]
    for position in range(T, total - 1):
        input_pos = torch.tensor([position], device=idx.device)  # (1,)
        logits, k_cache, v_cache = decode(tokens[-1], input_pos, k_cache, v_cache)  # (B, 1, V)
        tokens.append(pick(logits[:, -1]))
    return torch.cat(tokens, dim=1)
