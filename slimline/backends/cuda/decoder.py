"""Static-cache decoding on the GPU: torch prefill, then one CUDA graph of fused Triton kernels per token.

    decoder = StaticDecoder(model, max_length=1024)           # a private, fused copy of the weights
    tokens = decoder.generate(prompt_1P, max_new_tokens=256)  # greedy, batch 1
    logits_BV, keys, values = decoder.weights(prompt_BT)      # the prefill alone (any batch), torch

Serves what :func:`slimline.kv.decoders.adapter_for` serves: slimline's reference GPT and the
transformers Llama family (Llama and Mistral; Qwen2's Q/K/V biases are refused for now, there is no
bias epilogue yet). The user's model is
read once and never touched: the decoder holds its own copies of the weights, fused by rows
(Q/K/V as one matrix, gate/up as one matrix), so each layer's decode step is six Triton launches:

    qkv        gemv, norm folded in as its prologue                      (ln_1 → W_qkv)
    attention  rotary + cache write + split-K softmax; a combine launch  (static cache, position on device)
    o          gemv, residual added in its epilogue                      (x += W_o · attn)
    mlp up     gemv, norm prologue, SiLU(gate)·up (or GELU) epilogue     (ln_2 → W_gate_up)
    mlp down   gemv, residual epilogue                                   (x += W_down · h)

then the final norm folded into the head's GEMV, argmax, and the position advanced — all on the
device, so one CUDA graph replays every step (no host work, no synchronisation per token); on
Hopper the kernels are programmatic dependent launches (see :mod:`.decode_kernels`). The
prompt runs through :class:`FusedDecoderWeights` (plain torch ops on the same fused weights,
``torch.compile``-able), which also fills the cache.

Exact rewrites only (fusing matrices by rows, moving norms and residuals into the products): the
outputs differ from the model's by summation order and bf16 rounding, nothing else.

Shape legend: L layers, B batch, T tokens, C model width, H query heads, Hkv key/value heads,
D head size, F MLP width, S cache slots, V vocabulary.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import BackendError, InputError

__all__ = ["StaticDecoder", "FusedDecoderWeights", "fuse_weights"]


@dataclass
class LayerWeights:
    qkv: torch.Tensor  # ((H + 2·Hkv)·D, C)
    o: torch.Tensor  # (C, H·D)
    up: torch.Tensor  # (2F, C) [gate; up] for gated MLPs, (F, C) otherwise
    down: torch.Tensor  # (C, F)
    norm_attention: torch.Tensor  # (C,)
    norm_mlp: torch.Tensor  # (C,)
    norm_attention_bias: torch.Tensor | None = None  # LayerNorm only
    norm_mlp_bias: torch.Tensor | None = None


@dataclass
class FusedSpec:
    family: str  # "llama" or "gpt"
    n_layer: int
    n_head: int
    n_kv_head: int
    head_size: int
    width: int
    vocab: int
    eps: float
    scale: float
    norm: str  # "rms" or "layer"
    activation: str  # "silu_pair" or "gelu"
    max_positions: int


def _clone(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return tensor.detach().to(device=device, dtype=dtype, copy=True).contiguous()


def _cat(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().to(device=device, dtype=dtype) for t in tensors], dim=0).contiguous()


@torch.no_grad()
def fuse_weights(model: Any, max_length: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> "FusedDecoderWeights":
    """Private fused copies of a supported decoder's weights (the model is only read)."""
    from slimline.kv.decoders import GPTAdapter, LlamaFamilyAdapter, adapter_for

    adapter = adapter_for(model)
    dtype = dtype or adapter.dtype
    device = torch.device(device) if device is not None else adapter.device
    if max_length > adapter.max_positions:
        raise InputError(f"max_length {max_length} exceeds the model's {adapter.max_positions} positions",
                         stage="backend", where=type(adapter.model).__name__,
                         hint="pass a smaller max_length (prompt + new tokens)")
    layers: list[LayerWeights] = []
    if isinstance(adapter, LlamaFamilyAdapter):
        config = adapter.model.config
        activation = getattr(config, "hidden_act", "silu")
        if activation != "silu":
            raise BackendError(f"fused decode supports SiLU-gated MLPs, this model uses {activation!r}",
                               stage="backend", where=type(adapter.model).__name__,
                               hint="use slimline.generate (the torch decode loop) for this model")
        decoder = adapter.decoder
        for index, block in enumerate(decoder.layers):
            attention, mlp = block.self_attn, block.mlp
            biases = [name for name, p in (("q_proj", attention.q_proj.bias), ("k_proj", attention.k_proj.bias),
                                           ("v_proj", attention.v_proj.bias), ("o_proj", attention.o_proj.bias),
                                           ("gate_proj", mlp.gate_proj.bias), ("up_proj", mlp.up_proj.bias),
                                           ("down_proj", mlp.down_proj.bias)) if p is not None]
            if biases:
                raise BackendError(f"fused decode has no bias epilogue yet; layer {index} has biases on "
                                   f"{', '.join(biases)}", stage="backend", where=f"model.layers.{index}",
                                   hint="use slimline.generate (the torch decode loop) for this model")
            layers.append(LayerWeights(
                qkv=_cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight], dtype, device),
                o=_clone(attention.o_proj.weight, dtype, device),
                up=_cat([mlp.gate_proj.weight, mlp.up_proj.weight], dtype, device),
                down=_clone(mlp.down_proj.weight, dtype, device),
                norm_attention=_clone(block.input_layernorm.weight, dtype, device),
                norm_mlp=_clone(block.post_attention_layernorm.weight, dtype, device)))
        embedding = _clone(decoder.embed_tokens.weight, dtype, device)
        head_source = adapter.model.lm_head.weight
        head = embedding if head_source is decoder.embed_tokens.weight else _clone(head_source, dtype, device)
        positions = torch.arange(max_length, device=adapter.device)[None]
        probe = torch.zeros(1, dtype=adapter.dtype, device=adapter.device)
        cos, sin = decoder.rotary_emb(probe, positions)  # (1, S, D), in the model's dtype
        spec = FusedSpec("llama", adapter.n_layer, adapter.n_head, adapter.n_kv_head, adapter.head_size,
                         config.hidden_size, config.vocab_size, float(decoder.norm.variance_epsilon),
                         float(adapter.scale), "rms", "silu_pair", adapter.max_positions)
        final_norm, final_bias = _clone(decoder.norm.weight, dtype, device), None
        cos, sin = cos[0], sin[0]
    elif isinstance(adapter, GPTAdapter):
        gpt = adapter.model
        for block in gpt.blocks:
            attention = block.attn
            layers.append(LayerWeights(
                qkv=_cat([attention.query.weight, attention.key.weight, attention.value.weight], dtype, device),
                o=_clone(attention.proj.weight, dtype, device),
                up=_clone(block.mlp.up.weight, dtype, device),
                down=_clone(block.mlp.down.weight, dtype, device),
                norm_attention=_clone(block.ln_attn.weight, dtype, device),
                norm_mlp=_clone(block.ln_mlp.weight, dtype, device),
                norm_attention_bias=_clone(block.ln_attn.bias, dtype, device),
                norm_mlp_bias=_clone(block.ln_mlp.bias, dtype, device)))
        embedding = _clone(gpt.token_embedding.weight, dtype, device)
        head = embedding  # tied
        config = gpt.config
        spec = FusedSpec("gpt", adapter.n_layer, adapter.n_head, adapter.n_kv_head, adapter.head_size,
                         config.d_model, config.vocab_size, float(gpt.ln_final.eps), float(adapter.scale),
                         "layer", "gelu", adapter.max_positions)
        final_norm, final_bias = _clone(gpt.ln_final.weight, dtype, device), _clone(gpt.ln_final.bias, dtype, device)
        cos, sin = gpt.rope_cos[:max_length], gpt.rope_sin[:max_length]
    else:  # adapter_for only returns the two above
        raise BackendError(f"no fused decode for {type(adapter).__name__}", stage="backend",
                           where=type(adapter.model).__name__, hint="use slimline.generate")
    return FusedDecoderWeights(spec, layers, embedding, head, final_norm, final_bias,
                               _clone(cos, dtype, device), _clone(sin, dtype, device))


class FusedDecoderWeights(nn.Module):
    """The fused weights, and the prompt pass over them in plain torch (what ``torch.compile`` sees).

    ``forward(idx (B, T)) -> (logits of the last position (B, V), keys, values (L, B, Hkv, T, D))``.
    """

    def __init__(self, spec: FusedSpec, layers: list[LayerWeights], embedding: torch.Tensor, head: torch.Tensor,
                 final_norm: torch.Tensor, final_bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.spec = spec
        self.layers = layers
        self.embedding, self.head_weight = embedding, head
        self.final_norm, self.final_bias = final_norm, final_bias
        self.cos, self.sin = cos, sin  # (S, D)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def weight_bytes(self) -> int:
        """Bytes one decode step must read: every matrix once, one embedding row."""
        total = sum(t.numel() * t.element_size() for layer in self.layers
                    for t in (layer.qkv, layer.o, layer.up, layer.down))
        return total + self.head_weight.numel() * self.head_weight.element_size()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.spec.norm == "rms":  # as transformers' LlamaRMSNorm rounds
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.spec.eps)
            return weight * h.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.spec.eps)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, idx: torch.Tensor):
        spec = self.spec
        B, T = idx.shape
        H, Hkv, D = spec.n_head, spec.n_kv_head, spec.head_size
        x = F.embedding(idx, self.embedding)  # (B, T, C)
        cos, sin = self.cos[:T], self.sin[:T]  # (T, D)
        keys, values = [], []
        for layer in self.layers:
            h = self._norm(x, layer.norm_attention, layer.norm_attention_bias)
            qkv = F.linear(h, layer.qkv)  # (B, T, (H + 2Hkv)·D)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self._rotate(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = self._rotate(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale,
                                                      enable_gqa=H != Hkv)  # (B, H, T, D)
            x = x + F.linear(attended.transpose(1, 2).reshape(B, T, H * D), layer.o)
            h = self._norm(x, layer.norm_mlp, layer.norm_mlp_bias)
            up = F.linear(h, layer.up)
            if spec.activation == "silu_pair":
                gate, up = up.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(up)
            x = x + F.linear(h, layer.down)
            keys.append(k)
            values.append(v)
        last = self._norm(x[:, -1], self.final_norm, self.final_bias)  # (B, C)
        return F.linear(last, self.head_weight), torch.stack(keys), torch.stack(values)


def _median_ms(fn: Callable[[], Any], reps: int = 10) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph (launch overhead out, as in the decode graph)."""
    fn()  # compile and load outside the capture
    torch.cuda.synchronize()
    run = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - time the launches instead
        torch.cuda.synchronize()
    run()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for index in range(reps):
        start[index].record()
        run()
        end[index].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


class StaticDecoder:
    """Greedy batch-1 decoding of a supported model on a static cache of ``max_length`` slots.

    ``graph=True`` replays each step as one CUDA graph (CUDA only); ``pdl`` launches the kernels as
    programmatic dependent launches (default: where Triton has it, on CUDA); ``tune=True`` measures the
    GEMV candidates per weight family on the device (all layers' weights in turn, so the
    timing streams from memory as decoding does) and keeps the fastest. ``report`` says what
    was built, chosen, and what fell back.
    """

    def __init__(self, model: Any, max_length: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, graph: bool = True, tune: bool = True,
                 prefill: Callable | None = None, pdl: bool | None = None):
        from slimline.backends.cuda import decode_kernels as kernels

        if not kernels.AVAILABLE:
            raise BackendError("fused decode needs Triton, which is not installed", stage="backend",
                               where="StaticDecoder", hint="pip install triton, or use slimline.generate")
        self.kernels = kernels
        self.weights = fuse_weights(model, max_length, dtype, device)
        spec, device = self.weights.spec, self.weights.device
        self.spec, self.device, self.max_length = spec, device, max_length
        self.prefill_fn = prefill or self.weights
        H, Hkv, D, L = spec.n_head, spec.n_kv_head, spec.head_size, spec.n_layer
        dtype = self.weights.dtype
        self.k_cache = torch.zeros(L, Hkv, max_length, D, dtype=dtype, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.history = torch.zeros(max_length + 1, dtype=torch.int64, device=device)  # token at each position
        self.x = torch.zeros(spec.width, dtype=dtype, device=device)
        self.qkv = torch.zeros((H + 2 * Hkv) * D, dtype=dtype, device=device)
        self.attended = torch.zeros(H * D, dtype=dtype, device=device)
        mlp_width = self.weights.layers[0].down.shape[1]
        self.hidden = torch.zeros(mlp_width, dtype=dtype, device=device)
        self.logits = torch.zeros(spec.vocab, dtype=dtype, device=device)
        self.partials = kernels.attention_partials(H, max_length, D, device)
        default = kernels.DEFAULT_GEMV
        self.configs = {"qkv": default, "o": default, "up": default, "down": default, "head": default}
        self.use_graph = graph and device.type == "cuda"
        # programmatic dependent launch: each kernel reads its weights while the previous one drains
        self.pdl = kernels.PDL_AVAILABLE and device.type == "cuda" if pdl is None else pdl
        self._graph: torch.cuda.CUDAGraph | None = None
        self.prompt_length = 0
        self.report: dict[str, Any] = {"pdl": self.pdl, "family": spec.family, "dtype": str(dtype),
                                       "max_length": max_length,
                                       "weight_bytes": self.weights.weight_bytes(), "fallbacks": [],
                                       # 6 Triton launches a layer, the head, and 5 small torch ops
                                       "launches_per_step": 6 * L + 1 + 5}
        if tune and device.type == "cuda":
            self.tune()
        self.report["gemv_configs"] = {name: config.to_json() for name, config in self.configs.items()}

    # -- the step ------------------------------------------------------------------------------
    def _gemv_sites(self) -> dict[str, list[Callable[[Any], Any]]]:
        """For each weight family, one launch per layer as a function of the config."""
        kernels, spec = self.kernels, self.spec
        norm = kernels.NORM_RMS if spec.norm == "rms" else kernels.NORM_LAYER
        act = kernels.ACT_SILU_PAIR if spec.activation == "silu_pair" else kernels.ACT_GELU
        sites: dict[str, list] = {"qkv": [], "o": [], "up": [], "down": []}
        for layer in self.weights.layers:
            sites["qkv"].append(lambda c, w=layer: kernels.gemv(
                self.x, w.qkv, self.qkv, norm=norm, norm_weight=w.norm_attention,
                norm_bias=w.norm_attention_bias, eps=spec.eps, config=c, pdl=self.pdl))
            sites["o"].append(lambda c, w=layer: kernels.gemv(self.attended, w.o, self.x, residual=self.x, config=c,
                                                          pdl=self.pdl))
            sites["up"].append(lambda c, w=layer: kernels.gemv(
                self.x, w.up, self.hidden, norm=norm, norm_weight=w.norm_mlp, norm_bias=w.norm_mlp_bias,
                eps=spec.eps, act=act, config=c, pdl=self.pdl))
            sites["down"].append(lambda c, w=layer: kernels.gemv(self.hidden, w.down, self.x, residual=self.x,
                                                                 config=c, pdl=self.pdl))
        sites["head"] = [lambda c: kernels.gemv(self.x, self.weights.head_weight, self.logits, norm=norm,
                                                norm_weight=self.weights.final_norm,
                                                norm_bias=self.weights.final_bias, eps=spec.eps, config=c,
                                                pdl=self.pdl)]
        return sites

    def step(self) -> None:
        """One token: embed ``token`` at ``position``, run every layer, pick the argmax, advance."""
        kernels, spec, configs = self.kernels, self.spec, self.configs
        sites = self._sites if hasattr(self, "_sites") else self._gemv_sites()
        self._sites = sites
        torch.index_select(self.weights.embedding, 0, self.token, out=self.x.view(1, -1))
        for index in range(spec.n_layer):
            sites["qkv"][index](configs["qkv"])
            kernels.static_decode_attention(self.qkv, self.k_cache[index], self.v_cache[index], self.weights.cos,
                                            self.weights.sin, self.position, self.attended, self.partials,
                                            spec.n_head, spec.n_kv_head, spec.scale, pdl=self.pdl)
            sites["o"][index](configs["o"])
            sites["up"][index](configs["up"])
            sites["down"][index](configs["down"])
        sites["head"][0](configs["head"])
        self.token.copy_(torch.argmax(self.logits).view(1))
        self.position.add_(1)
        self.history.index_copy_(0, self.position, self.token)

    # -- tuning and capture --------------------------------------------------------------------
    def tune(self, measure: Callable[[Callable[[], Any]], float] | None = None,
             candidates: tuple | None = None) -> dict:
        """Pick each weight family's GEMV config by measuring all its layers' launches in turn."""
        measure = measure or _median_ms
        candidates = candidates or self.kernels.GEMV_CANDIDATES
        generator = torch.Generator(device=self.device).manual_seed(0)
        for buffer in (self.x, self.attended, self.hidden):  # never time on zeros
            buffer.copy_(torch.randn(buffer.shape, generator=generator, device=self.device))
        timings: dict[str, dict] = {}
        best: dict[str, float] = {}
        for name, launches in self._gemv_sites().items():
            timings[name] = {}
            for config in candidates:
                def run_all(config=config, launches=launches):
                    for launch in launches:
                        launch(config)
                key = "n{block_n}_k{block_k}_w{num_warps}".format(**config.to_json())
                try:
                    timings[name][key] = milliseconds = measure(run_all)
                except Exception as error:  # a config that does not build here is skipped
                    timings[name][key] = f"{type(error).__name__}: {error}"[:200]
                    continue
                if name not in best or milliseconds < best[name]:
                    self.configs[name], best[name] = config, milliseconds
        self.report["gemv_tuned_ms"] = best
        self.report["gemv_timings_ms"] = timings
        self.x.zero_()
        return timings

    def _capture(self) -> None:
        saved = (self.position.clone(), self.token.clone(), self.history.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and load every kernel outside the capture
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.position.copy_(saved[0])
        self.token.copy_(saved[1])
        self.history.copy_(saved[2])
        self._graph = graph

    def set_pdl(self, enabled: bool) -> None:
        """Switch programmatic dependent launch on or off (the step is captured again)."""
        self.pdl = enabled
        self._graph = None
        self.use_graph = self.device.type == "cuda"
        self.report["pdl"] = enabled

    def replay(self) -> None:
        """One decode step: the captured graph when there is one, the launches otherwise."""
        if self.use_graph and self._graph is None:
            try:
                self._capture()
            except Exception as error:  # the launches still work: say so and go on without a graph
                self.use_graph = False
                self.report["fallbacks"].append(f"CUDA graph capture failed, eager launches: "
                                                f"{type(error).__name__}: {error}"[:300])
        if self._graph is not None:
            self._graph.replay()
        else:
            self.step()

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1, P); fill the cache; returns the last position's logits (V,)."""
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise InputError(f"fused decode runs batch 1, got prompt shape {tuple(prompt.shape)}",
                             stage="generate", where="StaticDecoder.prefill",
                             hint="decode one sequence at a time, or use slimline.generate for batches")
        P = prompt.shape[1]
        if P >= self.max_length:
            raise InputError(f"prompt of {P} tokens leaves no slot in a cache of {self.max_length}",
                             stage="generate", where="StaticDecoder.prefill", hint="raise max_length")
        prompt = prompt.to(self.device)
        logits, keys, values = self.prefill_fn(prompt)  # (1, V), (L, 1, Hkv, P, D) x2
        self.k_cache[:, :, :P] = keys[:, 0]
        self.v_cache[:, :, :P] = values[:, 0]
        self.history[:P] = prompt[0]
        self.token.copy_(logits[0].argmax().view(1))
        self.position.fill_(P)
        self.history[P] = self.token[0]
        self.prompt_length = P
        return logits[0]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: (1, P) -> (1, P + max_new_tokens)."""
        P = prompt.shape[1]
        if P + max_new_tokens > self.max_length:
            raise InputError(f"prompt {P} + {max_new_tokens} new tokens exceed max_length {self.max_length}",
                             stage="generate", where="StaticDecoder.generate", hint="raise max_length")
        if max_new_tokens == 0:
            return prompt
        self.prefill(prompt)
        for _ in range(max_new_tokens - 1):
            self.replay()
        return self.history[: P + max_new_tokens].view(1, -1).clone()
