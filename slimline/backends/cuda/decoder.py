"""Static-cache decoding on the GPU: torch prefill, then one CUDA graph of fused Triton kernels per token.

    decoder = StaticDecoder(model, max_length=1024)           # a private, fused copy of the weights
    tokens = decoder.generate(prompt_1P, max_new_tokens=256)  # greedy, batch 1
    logits_BV, keys, values = decoder.weights(prompt_BT)      # the prefill alone (any batch), torch

Serves what :func:`slimline.kv.decoders.adapter_for` serves: slimline's reference GPT and the
transformers Llama family (Llama and Mistral; Qwen2's Q/K/V biases are refused for now, there is no
bias epilogue yet). The user's model is
read once and never touched: the decoder holds its own copies of the weights, fused by rows
(Q/K/V as one matrix, gate/up as one matrix), so each layer's decode step is five Triton launches:

    qkv        gemv, norm folded in as its prologue                      (ln_1 → W_qkv)
    attention  rotary + cache write + split-K softmax + combine          (static cache, position on device)
    o          gemv, residual added in its epilogue                      (x += W_o · attn)
    mlp up     gemv, norm prologue, SiLU(gate)·up (or GELU) epilogue     (ln_2 → W_gate_up)
    mlp down   gemv, residual epilogue                                   (x += W_down · h)

then the final norm folded into the head's GEMV, and one ``advance`` launch (argmax, position
advanced, the token's embedding row into x for the next step) — all on the device, so one CUDA
graph replays every step (no host work, no synchronisation per token); on Hopper the kernels are
programmatic dependent launches (see :mod:`.decode_kernels`). The prompt runs through
:class:`FusedDecoderWeights` (plain torch ops on the same fused weights, ``torch.compile``-able),
which also fills the cache.

Exact rewrites only by default (fusing matrices by rows, moving norms and residuals into the
products): the outputs differ from the model's by summation order and bf16 rounding, nothing else.
The low-rank mode (``rank_fraction=`` / ``ranks=``) is lossy: each fused matrix becomes a
truncated-SVD pair and each product two launches (see :class:`StaticDecoder`).

Shape legend: L layers, B batch, T tokens, C model width, H query heads, Hkv key/value heads,
D head size, F MLP width, S cache slots, V vocabulary.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimline.errors import BackendError, InputError

__all__ = ["StaticDecoder", "FusedDecoderWeights", "fuse_weights", "factorise", "truncated_svd",
           "MATRIX_FAMILIES"]

MATRIX_FAMILIES = ("qkv", "o", "up", "down")


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
    # low-rank mode: family -> (U (N, r), V (r, K)), W ≈ U·V; the dense matrix of that family is then None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def matrix_params(self, name: str) -> int:
        """Parameters one matrix family of this layer holds (both factors when factorised)."""
        if name in self.factors:
            return sum(t.numel() for t in self.factors[name])
        return getattr(self, name).numel()


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


@torch.no_grad()
def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation W ≈ U·V of weight (N, K): U (N, r), V (r, K), weight's dtype.

    Computed on weight's device through the eigenvectors of the smaller Gram matrix (K×K or N×N,
    fp32 on a GPU, fp64 elsewhere): the top singular subspace, as a truncated SVD gives it, at the cost
    of one symmetric eigendecomposition of min(N, K)² instead of an SVD of N×K. One factor is
    orthonormal, the other carries the singular values.
    """
    N, K = weight.shape
    rank = max(1, min(rank, N, K))
    w = weight.to(torch.float32 if weight.device.type == "cuda" else torch.float64)
    if K <= N:
        _, vectors = torch.linalg.eigh(w.T @ w)  # ascending eigenvalues
        top = vectors[:, -rank:].flip(-1)  # (K, r): right singular vectors
        u, v = w @ top, top.T
    else:
        _, vectors = torch.linalg.eigh(w @ w.T)
        top = vectors[:, -rank:].flip(-1)  # (N, r): left singular vectors
        u, v = top, top.T @ w
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


def rank_for(shape: tuple[int, int], fraction: float) -> int:
    """The largest rank whose two factors hold at most ``fraction`` of an (N, K) matrix's parameters,
    rounded down to a multiple of 32 (of 8 below 256) so that factor rows stay aligned."""
    N, K = shape
    rank = int(fraction * N * K / (N + K))
    step = 32 if rank >= 256 else 8 if rank >= 16 else 1
    return max(1, min(N, K, rank // step * step))


@torch.no_grad()
def factorise(weights: "FusedDecoderWeights", rank_fraction: float | None = None,
              ranks: dict[str, int] | int | None = None) -> dict:
    """Replace each layer's fused matrices by truncated-SVD factor pairs, in place (a private copy).

    ``rank_fraction``: each factor pair holds at most that fraction of its matrix's parameters
    (:func:`rank_for`); ``ranks``: explicit ranks, one for all families or per family (capped at
    min(N, K), where the pair reproduces the matrix). Gate and up stay fused: one V shared by both,
    U = [U_gate; U_up], so the SiLU(gate)·up epilogue still sees both halves of a row in one program.
    Returns a report: per family, shape, rank, parameters before and after.
    """
    if (rank_fraction is None) == (ranks is None):
        raise InputError("give exactly one of rank_fraction and ranks", stage="backend", where="factorise",
                         hint="rank_fraction=0.5 keeps half of each matrix's parameters")
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise InputError(f"rank_fraction must be in (0, 1], got {rank_fraction}", stage="backend",
                         where="factorise", hint="rank_fraction=0.5 keeps half of each matrix's parameters")
    before = weights.linear_params()
    report: dict = {"families": {}}
    for name in MATRIX_FAMILIES:
        shape = tuple(getattr(weights.layers[0], name).shape)
        if rank_fraction is not None:
            rank = rank_for(shape, rank_fraction)
        else:
            rank = ranks if isinstance(ranks, int) else ranks.get(name)
            if rank is None:
                continue
            rank = max(1, min(int(rank), *shape))
        for layer in weights.layers:
            layer.factors[name] = truncated_svd(getattr(layer, name), rank)
            setattr(layer, name, None)  # the dense matrix is not read any more
        N, K = shape
        report["families"][name] = {"shape": [N, K], "rank": rank, "params_dense": N * K,
                                    "params_factors": rank * (N + K), "fraction": rank * (N + K) / (N * K)}
    after = weights.linear_params()
    report["linear_params_before"], report["linear_params_after"] = before, after
    report["fraction_layers"] = after["layers"] / before["layers"]
    report["fraction_with_head"] = after["total"] / before["total"]
    return report


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

    @property
    def mlp_width(self) -> int:
        layer = self.layers[0]
        return layer.factors["down"][1].shape[1] if "down" in layer.factors else layer.down.shape[1]

    def linear_params(self) -> dict:
        """Parameters of the products a step runs: the layers' matrices (factors where factorised), the head."""
        layers = sum(layer.matrix_params(name) for layer in self.layers for name in MATRIX_FAMILIES)
        return {"layers": layers, "head": self.head_weight.numel(), "total": layers + self.head_weight.numel()}

    def weight_bytes(self) -> int:
        """Bytes one decode step must read: every matrix (or both its factors) once, the head."""
        return self.linear_params()["total"] * self.embedding.element_size()

    def project(self, h: torch.Tensor, layer: LayerWeights, name: str) -> torch.Tensor:
        """h · W^T for one matrix family, through its two factors when it is factorised."""
        if name in layer.factors:
            u, v = layer.factors[name]
            return F.linear(F.linear(h, v), u)
        return F.linear(h, getattr(layer, name))

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
            qkv = self.project(h, layer, "qkv")  # (B, T, (H + 2Hkv)·D)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self._rotate(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = self._rotate(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale,
                                                      enable_gqa=H != Hkv)  # (B, H, T, D)
            x = x + self.project(attended.transpose(1, 2).reshape(B, T, H * D), layer, "o")
            h = self._norm(x, layer.norm_mlp, layer.norm_mlp_bias)
            up = self.project(h, layer, "up")
            if spec.activation == "silu_pair":
                gate, up = up.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(up)
            x = x + self.project(h, layer, "down")
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

    Low-rank mode (lossy): ``rank_fraction=f`` factorises every layer's fused matrices by truncated
    SVD (:func:`factorise`: each pair U·V holds at most f of the matrix's parameters; the head stays
    dense), or ``ranks=`` gives the ranks. Each product then runs as two GEMVs, t = V·norm(x) and
    y = U·t with the dense product's epilogue (weight families ``qkv.v``, ``qkv.u``, ... tuned
    separately; gate and up share one V). ``report["lowrank"]`` has the ranks and the parameter
    fraction reached.
    """

    def __init__(self, model: Any, max_length: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, graph: bool = True, tune: bool = True,
                 prefill: Callable | None = None, pdl: bool | None = None,
                 rank_fraction: float | None = None, ranks: dict[str, int] | int | None = None):
        from slimline.backends.cuda import decode_kernels as kernels

        if not kernels.AVAILABLE:
            raise BackendError("fused decode needs Triton, which is not installed", stage="backend",
                               where="StaticDecoder", hint="pip install triton, or use slimline.generate")
        self.kernels = kernels
        self.weights = fuse_weights(model, max_length, dtype, device)
        lowrank = None
        if rank_fraction is not None or ranks is not None:
            lowrank = factorise(self.weights, rank_fraction, ranks)
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
        self.x = torch.zeros(spec.width, dtype=dtype, device=device)  # the embedding of ``token`` between steps
        self.qkv = torch.zeros((H + 2 * Hkv) * D, dtype=dtype, device=device)
        self.attended = torch.zeros(H * D, dtype=dtype, device=device)
        self.hidden = torch.zeros(self.weights.mlp_width, dtype=dtype, device=device)
        self.logits = torch.zeros(spec.vocab, dtype=dtype, device=device)
        self.partials = kernels.attention_partials(H, max_length, D, device, layers=L)
        # the launches of one product in the step: its own family, or its two factors' families
        factored = self.weights.layers[0].factors
        self.stages = {name: [f"{name}.v", f"{name}.u"] if name in factored else [name] for name in MATRIX_FAMILIES}
        max_rank = max((u.shape[1] for u, _ in factored.values()), default=0)
        self.rank_scratch = torch.zeros(max_rank, dtype=dtype, device=device)  # t = V·x
        default = kernels.DEFAULT_GEMV
        self.configs = {family: default for name in MATRIX_FAMILIES for family in self.stages[name]}
        self.configs["head"] = default
        self.use_graph = graph and device.type == "cuda"
        # programmatic dependent launch: each kernel reads its weights while the previous one drains
        self.pdl = kernels.PDL_AVAILABLE and device.type == "cuda" if pdl is None else pdl
        self._graph: torch.cuda.CUDAGraph | None = None
        self.prompt_length = 0
        launches = sum(len(stage) for stage in self.stages.values()) + 1  # GEMVs and attention, per layer
        self.report: dict[str, Any] = {"pdl": self.pdl, "family": spec.family, "dtype": str(dtype),
                                       "max_length": max_length,
                                       "weight_bytes": self.weights.weight_bytes(), "fallbacks": [],
                                       # per layer its GEMVs and one attention; the head; advance
                                       "launches_per_step": launches * L + 2}
        if lowrank is not None:
            self.report["lowrank"] = lowrank
        if tune and device.type == "cuda":
            self.tune()
        self.report["gemv_configs"] = {name: config.to_json() for name, config in self.configs.items()}

    # -- the step ------------------------------------------------------------------------------
    def _gemv_sites(self) -> dict[str, list[Callable[[Any], Any]]]:
        """For each weight family, one launch per layer as a function of the config.

        Dense families: ``qkv``, ``o``, ``up``, ``down`` (per layer) and ``head`` (one); a factorised
        family ``f`` becomes ``f.v`` (t = V·prologue(x)) and ``f.u`` (epilogue(U·t)).
        """
        kernels, spec = self.kernels, self.spec
        norm = kernels.NORM_RMS if spec.norm == "rms" else kernels.NORM_LAYER
        act = kernels.ACT_SILU_PAIR if spec.activation == "silu_pair" else kernels.ACT_GELU
        sites: dict[str, list] = {family: [] for name in MATRIX_FAMILIES for family in self.stages[name]}

        def product(name: str, layer: LayerWeights, source: torch.Tensor, out: torch.Tensor, **epilogue):
            """The site's launch(es): ``epilogue`` has the prologue (norm...) and the epilogue (act, residual)."""
            prologue = {key: epilogue.pop(key) for key in ("norm", "norm_weight", "norm_bias", "eps")
                        if key in epilogue}
            if name not in layer.factors:
                sites[name].append(lambda c: kernels.gemv(source, getattr(layer, name), out, config=c, pdl=self.pdl,
                                                          **prologue, **epilogue))
                return
            u, v = layer.factors[name]
            t = self.rank_scratch[: v.shape[0]]
            sites[f"{name}.v"].append(lambda c: kernels.gemv(source, v, t, config=c, pdl=self.pdl, **prologue))
            sites[f"{name}.u"].append(lambda c: kernels.gemv(t, u, out, config=c, pdl=self.pdl, **epilogue))

        for layer in self.weights.layers:
            product("qkv", layer, self.x, self.qkv, norm=norm, norm_weight=layer.norm_attention,
                    norm_bias=layer.norm_attention_bias, eps=spec.eps)
            product("o", layer, self.attended, self.x, residual=self.x)
            product("up", layer, self.x, self.hidden, norm=norm, norm_weight=layer.norm_mlp,
                    norm_bias=layer.norm_mlp_bias, eps=spec.eps, act=act)
            product("down", layer, self.hidden, self.x, residual=self.x)
        sites["head"] = [lambda c: kernels.gemv(self.x, self.weights.head_weight, self.logits, norm=norm,
                                                norm_weight=self.weights.final_norm,
                                                norm_bias=self.weights.final_bias, eps=spec.eps, config=c,
                                                pdl=self.pdl)]
        return sites

    def _attention(self, index: int) -> None:
        spec, (m, l, acc, counters) = self.spec, self.partials
        self.kernels.static_decode_attention(self.qkv, self.k_cache[index], self.v_cache[index], self.weights.cos,
                                             self.weights.sin, self.position, self.attended,
                                             (m, l, acc, counters[index]), spec.n_head, spec.n_kv_head, spec.scale,
                                             pdl=self.pdl)

    def _advance(self) -> None:
        self.kernels.advance(self.logits, self.weights.embedding, self.x, self.token, self.position, self.history,
                             pdl=self.pdl)

    def step(self) -> None:
        """One token: x (the embedding of ``token``) at ``position`` through every layer and the head;
        then ``advance``: the argmax into ``token`` and the history, position + 1, its embedding into x."""
        configs, stages = self.configs, self.stages
        sites = self._sites if getattr(self, "_sites", None) is not None else self._gemv_sites()
        self._sites = sites
        for index in range(self.spec.n_layer):
            for family in stages["qkv"]:
                sites[family][index](configs[family])
            self._attention(index)
            for name in ("o", "up", "down"):
                for family in stages[name]:
                    sites[family][index](configs[family])
        sites["head"][0](configs["head"])
        self._advance()

    # -- tuning and capture --------------------------------------------------------------------
    def tune(self, measure: Callable[[Callable[[], Any]], float] | None = None,
             candidates: tuple | None = None) -> dict:
        """Pick each weight family's GEMV config by measuring all its layers' launches in turn
        (low-rank factor families choose among ``GEMV_CANDIDATES_THIN`` unless ``candidates`` is given)."""
        measure = measure or _median_ms
        generator = torch.Generator(device=self.device).manual_seed(0)
        for buffer in (self.x, self.attended, self.hidden, self.rank_scratch):  # never time on zeros
            buffer.copy_(torch.randn(buffer.shape, generator=generator, device=self.device))
        timings: dict[str, dict] = {}
        best: dict[str, float] = {}
        for name, launches in self._gemv_sites().items():
            timings[name] = {}
            for config in self._tune_candidates(name, candidates):
                def run_all(config=config, launches=launches):
                    for launch in launches:
                        launch(config)
                key = self._config_key(config)
                try:
                    timings[name][key] = milliseconds = measure(run_all)
                except Exception as error:  # a config that does not build here is skipped
                    timings[name][key] = f"{type(error).__name__}: {error}"[:200]
                    continue
                if name not in best or milliseconds < best[name]:
                    self.configs[name], best[name] = config, milliseconds
        self.report["gemv_tuned_ms"] = best
        self.report["gemv_timings_ms"] = timings
        self.report["gemv_configs"] = {name: config.to_json() for name, config in self.configs.items()}
        self.x.zero_()
        return timings

    def _tune_candidates(self, family: str, candidates: tuple | None) -> tuple:
        """The configs ``tune`` measures for one weight family."""
        return candidates or (self.kernels.GEMV_CANDIDATES_THIN if "." in family else self.kernels.GEMV_CANDIDATES)

    @staticmethod
    def _config_key(config: Any) -> str:
        return "n{block_n}_k{block_k}_w{num_warps}".format(**config.to_json())

    @torch.no_grad()
    def profile(self, measure: Callable[[Callable[[], Any]], float] | None = None) -> dict:
        """Milliseconds per launch family over one step (each family's launches replayed together, as
        one graph where possible), with the chosen configs; the state of the decode is kept."""
        measure = measure or _median_ms
        saved = [t.clone() for t in (self.position, self.token, self.history, self.x, self.k_cache, self.v_cache)]
        sites = self._gemv_sites()
        result: dict[str, float] = {}
        for name, launches in sites.items():
            result[name] = measure(lambda launches=launches, name=name: [launch(self.configs[name])
                                                                         for launch in launches])
        result["attention"] = measure(lambda: [self._attention(index) for index in range(self.spec.n_layer)])
        result["advance"] = measure(self._advance)
        for target, value in zip((self.position, self.token, self.history, self.x, self.k_cache, self.v_cache), saved):
            target.copy_(value)
        result["sum"] = sum(result.values())
        self.report["profile_ms"] = result
        return result

    def _capture(self) -> None:
        saved = (self.position.clone(), self.token.clone(), self.history.clone(), self.x.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and load every kernel outside the capture
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        for target, value in zip((self.position, self.token, self.history, self.x), saved):
            target.copy_(value)
        self._graph = graph

    def set_pdl(self, enabled: bool) -> None:
        """Switch programmatic dependent launch on or off (the step is captured again)."""
        self.pdl = enabled
        self._graph = None
        self._sites = None
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
        torch.index_select(self.weights.embedding, 0, self.token, out=self.x.view(1, -1))  # the first step's input
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
