"""Adapters: how the cached decode loop runs one family of decoder models.

An adapter runs the model's own modules (embedding, norms, projections, MLPs, head) and does the
attention itself, over slimline's compact cache (:mod:`slimline.kv.cache`): a prefill that hands
every layer's attention logits to the policy's scorer, and a decode step over a cache of any
number of slots. Two families:

    GPTAdapter              slimline's reference GPT (slimline.models.gpt.GPT; GPTPrefill /
                            GPTDecode wrappers are unwrapped)
    LlamaFamilyAdapter      transformers Llama, Mistral and Qwen2 causal LMs (pre-norm blocks,
                            rotary positions, grouped-query attention, no sliding window used)

Hugging Face's ``StaticCache`` is not used: its layout is one shared slot per position, and a
pruned cache keeps different tokens per layer and head. Keys are stored after rotary embedding,
as both families do, so evicting or reordering slots leaves positions correct.

:class:`CompactDecodeStep` is the decode step as an ``nn.Module`` with the cache as explicit,
out-of-place inputs and outputs: it captures with ``torch.export`` and exports to ONNX with the
slot count S dynamic, so ONNX Runtime runs it on a pruned cache.

Shape legend: L layers, B batch, T tokens in, H query heads, Hkv key/value heads, G = H / Hkv,
S cache slots, D head size, C model width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from slimline.errors import InputError
from slimline.kv.attention import PREFILL_CHUNK_ELEMENTS, decode_attention, prefill_attention

__all__ = ["DecoderAdapter", "GPTAdapter", "LlamaFamilyAdapter", "CompactDecodeStep", "adapter_for",
           "LLAMA_FAMILY"]

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (both families): x·cos + [-x2, x1]·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def write_slot(cache: torch.Tensor, slot: int | torch.Tensor, new: torch.Tensor, in_place: bool) -> torch.Tensor:
    """Put new (B, Hkv, 1, D) into cache (B, Hkv, S, D) at ``slot``: an int, or (B, Hkv) per head."""
    if isinstance(slot, int):
        if in_place:
            cache.narrow(2, slot, 1).copy_(new)
            return cache
        index = torch.tensor([slot], device=cache.device)
        return cache.index_copy(2, index, new)
    index = slot[:, :, None, None].expand(*new.shape)  # (B, Hkv, 1, D)
    return cache.scatter_(2, index, new) if in_place else cache.scatter(2, index, new)


class DecoderAdapter:
    """The layer loop shared by both families; subclasses say how one block computes."""

    n_layer: int
    n_head: int
    n_kv_head: int
    head_size: int
    max_positions: int
    scale: float
    model: nn.Module
    kernel: str | None = None  # decode attention kernel: None = triton on CUDA, else torch

    @property
    def reference_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.reference_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_weight.dtype

    # per-family pieces -----------------------------------------------------------------------
    def embed(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        raise NotImplementedError

    def rotary(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable against (B, H, T, D) for positions (T,)."""
        raise NotImplementedError

    def qkv(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, C) -> q (B, H, T, D), k (B, Hkv, T, D) after rotary, v (B, Hkv, T, D)."""
        raise NotImplementedError

    def finish_layer(self, layer: int, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual stream after the layer, from its input x (B, T, C) and attention (B, H, T, D)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        raise NotImplementedError

    def check_length(self, total: int) -> None:
        if total > self.max_positions:
            raise InputError(f"prompt + generated tokens = {total} exceeds the model's "
                             f"{self.max_positions} positions", stage="generate", where=type(self.model).__name__,
                             hint="shorten the prompt or generate fewer tokens (kv_prune shrinks the cache, "
                                  "not the positions)")

    # the loops -------------------------------------------------------------------------------
    def prefill(self, idx: torch.Tensor, observe: Callable[[int, torch.Tensor], None] | None = None,
                all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompt idx (B, T) at positions 0..T-1.

        Returns logits (B, T, V) (or (B, 1, V), the last position, unless ``all_logits``) and the
        keys and values (L, B, Hkv, T, D). ``observe(layer, logits (B, Hkv, G, Tq, T))`` sees each
        chunk of attention logits.
        """
        B, T = idx.shape
        x = self.embed(idx)  # (B, T, C)
        cos, sin = self.rotary(torch.arange(T, device=idx.device), x)
        keys, values = [], []
        chunk_elements = PREFILL_CHUNK_ELEMENTS * (8 if idx.is_cuda else 1)  # 512 MiB of fp32 logits on a GPU
        for layer in range(self.n_layer):
            q, k, v = self.qkv(layer, x, cos, sin)
            layer_observer = None if observe is None else (lambda logits, layer=layer: observe(layer, logits))
            attended = prefill_attention(q, k, v, self.scale, layer_observer, chunk_elements)  # (B, H, T, D)
            x = self.finish_layer(layer, x, attended)
            keys.append(k)
            values.append(v)
        if not all_logits:
            x = x[:, -1:]
        return self.head(x), torch.stack(keys), torch.stack(values)

    def decode(self, idx: torch.Tensor, input_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               slot: int | torch.Tensor, want_attention: bool = False, in_place: bool = True,
               length: torch.Tensor | None = None):
        """One token idx (B, 1) at position input_pos (1,) against the cache (L, B, Hkv, S, D).

        The new key/value goes into ``slot`` (an int, or (L, B, Hkv) per head) before attention,
        in place unless ``in_place`` is False. ``length`` (a (1,) device tensor): only slots below
        it hold tokens (see :func:`slimline.kv.attention.decode_attention`). Returns (logits (B, 1, V), attention logits
        (L, B, Hkv, G, S) or None, keys', values') — keys'/values' are the inputs when in place.
        """
        x = self.embed(idx)  # (B, 1, C)
        cos, sin = self.rotary(input_pos, x)
        new_keys, new_values, attention = [], [], []
        for layer in range(self.n_layer):
            q, k, v = self.qkv(layer, x, cos, sin)  # (B, H, 1, D), (B, Hkv, 1, D) x2
            layer_slot = slot if isinstance(slot, int) else slot[layer]
            key_cache = write_slot(keys[layer], layer_slot, k, in_place)  # (B, Hkv, S, D)
            value_cache = write_slot(values[layer], layer_slot, v, in_place)
            attended, logits = decode_attention(q, key_cache, value_cache, self.scale, want_attention,
                                                 self.kernel, length)
            x = self.finish_layer(layer, x, attended)
            if want_attention:
                attention.append(logits)
            if not in_place:
                new_keys.append(key_cache)
                new_values.append(value_cache)
        logits = self.head(x)
        attention_logits = torch.stack(attention) if want_attention else None
        if in_place:
            return logits, attention_logits, keys, values
        return logits, attention_logits, torch.stack(new_keys), torch.stack(new_values)


class GPTAdapter(DecoderAdapter):
    def __init__(self, gpt: nn.Module):
        config = gpt.config
        self.model = gpt
        self.n_layer = config.n_layer
        self.n_head = self.n_kv_head = config.n_head
        self.head_size = config.head_size
        self.max_positions = config.context_length
        self.scale = config.head_size ** -0.5

    @property
    def reference_weight(self) -> torch.Tensor:
        return self.model.token_embedding.weight

    def embed(self, idx):
        return self.model.token_embedding(idx)

    def rotary(self, positions, x):
        return self.model.rope_cos[positions], self.model.rope_sin[positions]  # (T, D) each

    def qkv(self, layer, x, cos, sin):
        block = self.model.blocks[layer]
        attention = block.attn
        h = block.ln_attn(x)
        q = rotate(attention.split_heads(attention.query(h)), cos, sin)
        k = rotate(attention.split_heads(attention.key(h)), cos, sin)
        return q, k, attention.split_heads(attention.value(h))

    def finish_layer(self, layer, x, attended):
        block = self.model.blocks[layer]
        B, H, T, D = attended.shape
        x = x + block.attn.proj(attended.transpose(1, 2).reshape(B, T, H * D))
        return x + block.mlp(block.ln_mlp(x))

    def head(self, x):
        return self.model.head(self.model.ln_final(x))


class LlamaFamilyAdapter(DecoderAdapter):
    def __init__(self, causal_lm: nn.Module):
        config = causal_lm.config
        self.model = causal_lm
        self.decoder = causal_lm.model
        self.n_layer = config.num_hidden_layers
        self.n_head = config.num_attention_heads
        self.n_kv_head = getattr(config, "num_key_value_heads", None) or self.n_head
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.max_positions = config.max_position_embeddings
        self.scale = self.decoder.layers[0].self_attn.scaling
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) and window:
            self.max_positions = min(self.max_positions, window)  # full attention is exact up to here

    @property
    def reference_weight(self) -> torch.Tensor:
        return self.decoder.embed_tokens.weight

    def embed(self, idx):
        return self.decoder.embed_tokens(idx)

    def rotary(self, positions, x):
        cos, sin = self.decoder.rotary_emb(x, positions[None])  # (1, T, D)
        return cos[:, None], sin[:, None]  # (1, 1, T, D)

    def qkv(self, layer, x, cos, sin):
        attention = self.decoder.layers[layer].self_attn
        h = self.decoder.layers[layer].input_layernorm(x)
        B, T, _ = h.shape
        q = attention.q_proj(h).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = attention.k_proj(h).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        v = attention.v_proj(h).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish_layer(self, layer, x, attended):
        block = self.decoder.layers[layer]
        B, H, T, D = attended.shape
        x = x + block.self_attn.o_proj(attended.transpose(1, 2).reshape(B, T, H * D))
        return x + block.mlp(block.post_attention_layernorm(x))

    def head(self, x):
        return self.model.lm_head(self.decoder.norm(x))


def adapter_for(model: Any) -> DecoderAdapter:
    """The adapter for a model, or an InputError that says which models are served."""
    from slimline.models.gpt import GPT, GPTDecode, GPTPrefill

    if isinstance(model, (GPTPrefill, GPTDecode)):
        model = model.gpt
    if isinstance(model, GPT):
        return GPTAdapter(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_FAMILY and hasattr(model, "lm_head") and hasattr(getattr(model, "model", None), "layers"):
        return LlamaFamilyAdapter(model)
    hint = ("pass slimline's GPT or a transformers Llama/Mistral/Qwen2 *ForCausalLM; an OptimizedModel "
            "is a full-sequence graph without a cache: generate with the original model")
    raise InputError(f"no cached decode loop for {type(model).__name__}"
                     + (f" (model_type {model_type!r})" if model_type else ""),
                     stage="generate", where=type(model).__name__, hint=hint)


class CompactDecodeStep(nn.Module):
    """``(idx (B, 1), input_pos (1,), k_cache, v_cache (L, B, Hkv, S, D), write_slot (L, B, Hkv))
    -> (logits (B, 1, V), k_cache', v_cache', attention_logits (L, B, Hkv, G, S))``.

    The decode step over a compact cache, out of place: the caller's loop owns eviction
    (see :mod:`slimline.passes.kv_prune`). S may be any size, the budget rather than the context.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.adapter = adapter_for(model)
        self.adapter.kernel = "torch"  # plain torch ops: what torch.export and the ONNX exporter see
        self.model = self.adapter.model

    def forward(self, idx, input_pos, k_cache, v_cache, write_slot):
        logits, attention, k_cache, v_cache = self.adapter.decode(
            idx, input_pos, k_cache, v_cache, write_slot, want_attention=True, in_place=False)
        return logits, k_cache, v_cache, attention
