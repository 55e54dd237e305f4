"""Batch-1 decode of issue 7's ~1B Llama-shaped decoder with int8 / int4 / 3-bit weights vs bf16.

The model: transformers ``LlamaConfig(hidden_size=2048, num_hidden_layers=16,
num_attention_heads=32, intermediate_size=5632, vocab_size=32000)`` with random bf16 weights
(``kv_prune_gpu.build_model``), its weights taken into a plain-torch decode step: one token,
a static KV cache of ``--context`` slots (the step attends over all of them under a mask, so
every variant reads the same cache bytes), Q/K/V and gate/up each fused into one linear.

    layer:  x = x + o(attn(rope(qkv(rms(x))), cache));  x = x + down(silu(gate) * up)(rms(x))
    step:   embed -> 16 layers -> rms -> lm_head -> logits (1, vocab)

Each variant swaps the linears (the 16 x 4 layer linears and the LM head; the embedding stays
bf16, a one-row gather):

    bf16                 F.linear (cuBLAS or an Inductor template, whichever autotune picks)
    int8 / int4 / int3 gemv  slimline's reduction dequant-GEMV (``quant_gemv.quant_gemv``, no tl.dot)
    int8 / int4 / int3 triton  slimline's tl.dot dequant kernel (``quant_kernels.quant_matmul``, one
                         opaque custom op, the config per shape from ``quant_gpu.py``'s JSON or
                         measured here), RTN weights: int8 per channel symmetric, int4 and int3
                         in groups of 128, asymmetric
    ... torch form       ``slimline.quant.linear.quantized_linear`` (unpack, dequantize,
                         F.linear in plain torch): what Inductor makes of it
    int4 tinygemm        torch's own ``_weight_int4pack_mm`` on the same codes
    int8 int8pack        torch's own ``_weight_int8pack_mm`` on the same codes

Every variant: one layer function compiled with ``torch.compile(mode="max-autotune-no-cudagraphs")``
(one graph serves all 16 layers), the head compiled likewise, the whole step captured as one
CUDA graph (``kv_prune_gpu.as_graph``) and replayed; the bf16 anchor is timed in the same
rounds as every other variant (interleaved), ratio = variant median / bf16 median.

Self-checks (exit status 1 if one fails): the plain-torch bf16 step, run token by token over a
prompt, against the transformers model's own forward (top-1 and relative error); each variant's
graph-replayed logits against its own eager form (relative error ≤ 5e-2); every quantized
variant of one width against the others of that width (the same codes).

    PYTHONPATH=. python benchmarks/quant_decode_gpu.py [--configs-from quant_gpu.json] --out $OUT/x.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/quant_decode_gpu.py --smoke   # tiny, CPU

Variants after ``--budget-s`` seconds are skipped (and listed as skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kv_prune_gpu import build_model, summary, synchronize, time_ms  # noqa: E402

from slimline.backends.cuda.quant_gemv import GemvConfig, gemv_configs, quant_gemv  # noqa: E402
from slimline.backends.cuda.quant_kernels import (KernelConfig, candidate_configs, interpreting,  # noqa: E402
                                                  local_search, quant_matmul)
from slimline.quant.linear import quantized_linear  # noqa: E402
from slimline.quant.pack import default_layout  # noqa: E402
from slimline.quant.scheme import QuantScheme, quantize_rtn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = {"int4": 0.35, "int8": 0.6}
SCHEMES = {8: QuantScheme(8, None, True), 4: QuantScheme(4, 128, False), 3: QuantScheme(3, 128, False)}
LINEARS = ("qkv", "o", "gate_up", "down")


# ---- the Triton kernel as one opaque op (Inductor fuses around it, never into it) ----

@torch.library.custom_op("slimline_bench::quant_matmul", mutates_args=())
def triton_quant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                        zeros: Optional[torch.Tensor], bits: int, layout: str, group_size: int,
                        in_features: int, block_m: int, block_n: int, block_k: int, split_k: int,
                        num_warps: int, num_stages: int) -> torch.Tensor:
    config = KernelConfig(block_m, block_n, block_k, split_k, num_warps, num_stages)
    return quant_matmul(x, packed, scales, zeros, None, bits=bits, layout=layout, group_size=group_size,
                        in_features=in_features, config=config)


@torch.library.custom_op("slimline_bench::quant_gemv", mutates_args=())
def triton_quant_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                      zeros: Optional[torch.Tensor], bits: int, layout: str, group_size: int,
                      in_features: int, block_n: int, block_k: int, split_k: int, num_warps: int,
                      num_stages: int) -> torch.Tensor:
    config = GemvConfig(block_n, block_k, split_k, num_warps, num_stages)
    return quant_gemv(x, packed, scales, zeros, None, bits=bits, layout=layout, group_size=group_size,
                      in_features=in_features, config=config)


@triton_quant_gemv.register_fake
def _gemv_fake(x, packed, scales, zeros, bits, layout, group_size, in_features, block_n, block_k, split_k,
               num_warps, num_stages):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


@triton_quant_matmul.register_fake
def _(x, packed, scales, zeros, bits, layout, group_size, in_features, block_m, block_n, block_k,
      split_k, num_warps, num_stages):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


# ---- weights ----

def extract(model) -> dict:
    """The transformers model's weights, Q/K/V and gate/up concatenated (shared, not copied
    where they need no concatenation)."""
    layers = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        layers.append({
            "norm1": layer.input_layernorm.weight.detach(), "norm2": layer.post_attention_layernorm.weight.detach(),
            "qkv": torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach(),
            "o": attention.o_proj.weight.detach(),
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            "down": mlp.down_proj.weight.detach()})
    config = model.config
    return {"layers": layers, "embed": model.model.embed_tokens.weight.detach(),
            "norm": model.model.norm.weight.detach(), "lm_head": model.lm_head.weight.detach(),
            "inv_freq": model.model.rotary_emb.inv_freq.detach().float(),
            "rope_scale": float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)),
            "n_head": config.num_attention_heads, "n_kv": config.num_key_value_heads,
            "head_dim": config.hidden_size // config.num_attention_heads, "eps": config.rms_norm_eps,
            "ff": config.intermediate_size}


class Linear:
    """One way to run a linear layer: ``make(weight) -> tensors`` once, ``call(x, tensors)`` per step.

    ``call`` closes over everything static (bits, layout, kernel config), so one compiled graph
    serves every layer of the same shapes."""

    def __init__(self, name: str, bits: int | None, kind: str):
        self.name, self.bits, self.kind = name, bits, kind
        self.meta: dict[tuple, dict] = {}  # (N, K) -> static arguments

    def make(self, weight: torch.Tensor) -> tuple:
        if self.kind == "bf16":
            return (weight,)
        scheme = SCHEMES[self.bits]
        quantized = quantize_rtn(weight, scheme)
        layout = default_layout(self.bits)
        n, k = weight.shape
        meta = {"bits": self.bits, "layout": layout, "group_size": quantized.group_size, "in_features": k,
                "padded_features": quantized.codes.shape[1]}
        self.meta[(n, k)] = meta
        if self.kind == "tinygemm":
            codes = quantized.codes.to(torch.int32)  # (N, K) in 0..15; tinygemm: (q - 8) * s + zero
            packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
            scales = quantized.scales  # (N, G)
            zero_points = (8 - quantized.zeros.float()) * scales
            scale_zero = torch.stack([scales, zero_points], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            return (packed, scale_zero)  # (G, N, 2)
        if self.kind == "int8pack":
            codes = (quantized.codes.to(torch.int32) - 128).to(torch.int8)  # symmetric: zero 128
            return (codes, quantized.scales[:, 0].to(weight.dtype))
        packed = quantized.pack(layout)
        zeros = quantized.zeros
        return (packed, quantized.scales) + ((zeros,) if zeros is not None else ())

    def caller(self, n: int, k: int, configs: dict) -> Callable:
        if self.kind == "bf16":
            return lambda x, t: F.linear(x, t[0])
        meta = self.meta[(n, k)]
        if self.kind == "tinygemm":
            group = meta["group_size"]
            return lambda x, t: torch.ops.aten._weight_int4pack_mm(x, t[0], group, t[1])
        if self.kind == "int8pack":
            return lambda x, t: torch.ops.aten._weight_int8pack_mm(x, t[0], t[1])
        if self.kind == "torch_form":
            return lambda x, t: quantized_linear(x, t[0], t[1], t[2] if len(t) > 2 else None, None, **meta)
        if self.kind == "gemv":
            gconfig = configs[("gemv", n, k, self.bits)]
            gfields = (gconfig.block_n, gconfig.block_k, gconfig.split_k, gconfig.num_warps, gconfig.num_stages)

            def call_gemv(x, t):
                return triton_quant_gemv(x, t[0], t[1], t[2] if len(t) > 2 else None, meta["bits"],
                                         meta["layout"], meta["group_size"], meta["in_features"], *gfields)
            return call_gemv
        config = configs[(n, k, self.bits)]
        fields = (config.block_m, config.block_n, config.block_k, config.split_k, config.num_warps,
                  config.num_stages)

        def call(x, t):
            return triton_quant_matmul(x, t[0], t[1], t[2] if len(t) > 2 else None, meta["bits"], meta["layout"],
                                       meta["group_size"], meta["in_features"], *fields)
        return call


# ---- the decode step (plain torch) ----

def rms(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rope(x, cos, sin):  # x (1, H, 1, D); rotate halves, as transformers' Llama does
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def make_layer(w: dict, calls: dict) -> Callable:
    n_head, n_kv, head_dim, eps = w["n_head"], w["n_kv"], w["head_dim"], w["eps"]
    inv_freq, rope_scale, ff = w["inv_freq"], w["rope_scale"], w["ff"]
    repeat = n_head // n_kv

    def layer(h, norm1, norm2, qkv, o, gate_up, down, k_cache, v_cache, position):
        # h (1, C); caches (1, Hkv, L, D); position (1,) long
        x = rms(h, norm1, eps)
        q, k, v = calls["qkv"](x, qkv).split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
        angles = position.float()[:, None] * inv_freq.to(h.device)[None, :]  # (1, D/2)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos() * rope_scale, angles.sin() * rope_scale
        q = rope(q.view(1, n_head, 1, head_dim), cos, sin)
        k = rope(k.view(1, n_kv, 1, head_dim), cos, sin)
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v.view(1, n_kv, 1, head_dim))
        slots = torch.arange(k_cache.shape[2], device=h.device)
        mask = (slots <= position)[None, None, None, :]  # (1, 1, 1, L)
        keys, values = k_cache, v_cache
        if repeat > 1:
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (1, H, 1, D)
        h = h + calls["o"](attended.reshape(1, n_head * head_dim), o)
        x = rms(h, norm2, eps)
        gate, up = calls["gate_up"](x, gate_up).split([ff, ff], -1)
        return h + calls["down"](F.silu(gate) * up, down)

    return layer


def make_head(w: dict, call: Callable) -> Callable:
    eps = w["eps"]

    def head(h, norm, lm_head):
        return call(rms(h, norm, eps), lm_head).float()

    return head


class Step:
    """One variant's decode step over shared caches; ``__call__(token, position) -> logits``."""

    def __init__(self, w: dict, linear: Linear, configs: dict, caches: list, compile_mode: str | None,
                 tensors: tuple | None = None):
        self.w, self.caches = w, caches
        if tensors is None:  # quantize (once per variant; a compiled twin shares them)
            tensors = ([{name: linear.make(layer[name]) for name in LINEARS} for layer in w["layers"]],
                       linear.make(w["lm_head"]))
        self.tensors, self.head_tensors = tensors
        calls = {name: linear.caller(*w["layers"][0][name].shape, configs) for name in LINEARS}
        layer_fn = make_layer(w, calls)
        head_fn = make_head(w, linear.caller(*w["lm_head"].shape, configs))
        if compile_mode:
            layer_fn = torch.compile(layer_fn, mode=compile_mode, dynamic=False)
            head_fn = torch.compile(head_fn, mode=compile_mode, dynamic=False)
        self.layer_fn, self.head_fn = layer_fn, head_fn

    def weight_bytes(self) -> int:
        tensors = [t for layer in self.tensors for ts in layer.values() for t in ts] + list(self.head_tensors)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        h = self.w["embed"][token]  # (1, C)
        for layer, tensors, (k_cache, v_cache) in zip(self.w["layers"], self.tensors, self.caches):
            h = self.layer_fn(h, layer["norm1"], layer["norm2"], tensors["qkv"], tensors["o"],
                              tensors["gate_up"], tensors["down"], k_cache, v_cache, position)
        return self.head_fn(h, self.w["norm"], self.head_tensors)


def capture(fn: Callable, device) -> tuple[Callable, str, torch.Tensor]:
    """``fn`` warmed up on a side stream and captured as one CUDA graph: (replay, how, the
    output of one replay). On a CPU: (fn, "eager", fn())."""
    if device.type != "cuda":
        return fn, "eager", fn()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    synchronize(device)
    return graph.replay, "cuda graph", out.clone()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@torch.no_grad()
def check_step_against_transformers(model, w: dict, device, length: int) -> dict:
    """The plain bf16 step, token by token from an empty cache, against model(idx).logits[-1]."""
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (1, length), device=device, generator=torch.Generator(device=device).manual_seed(1))
    reference = model(idx).logits[0, -1].float()
    caches = [(torch.zeros(1, w["n_kv"], length, w["head_dim"], device=device, dtype=w["embed"].dtype),
               torch.zeros(1, w["n_kv"], length, w["head_dim"], device=device, dtype=w["embed"].dtype))
              for _ in w["layers"]]
    step = Step(w, Linear("bf16", None, "bf16"), {}, caches, None)
    for t in range(length):
        logits = step(idx[:, t], torch.tensor([t], device=device))
    ours = logits[0]
    error = relative_error(ours, reference)
    return {"relative_error": error, "top1_agree": bool(ours.argmax() == reference.argmax()), "tokens": length,
            "passed": error < 0.05}  # top-1 on random weights can flip on a near tie: recorded, not judged


def tuned_gemv_configs(w: dict, bits_list: list, configs_from: str | None, device, dtype) -> tuple[dict, dict]:
    """("gemv", N, K, bits) -> GemvConfig at M = 1: from quant_gpu.py's JSON, else the fastest
    correct candidate measured here (under the interpreter: the first candidate)."""
    from triton.testing import do_bench

    chosen = json.loads(Path(configs_from).read_text()).get("chosen", {}) if configs_from and \
        Path(configs_from).exists() else {}
    shapes = {tuple(w["layers"][0][name].shape) for name in LINEARS} | {tuple(w["lm_head"].shape)}
    configs, source = {}, {}
    for bits in bits_list:
        for n, k in sorted(shapes):
            key = f"gemv/{n}x{k}/{bits}/1"
            layout, group = default_layout(bits), SCHEMES[bits].group(k)
            candidates = gemv_configs(n, k, bits, layout, group)
            if interpreting() or key in chosen:
                configs[("gemv", n, k, bits)] = GemvConfig(*chosen[key]) if key in chosen else candidates[0]
                source[key] = "quant_gpu.json" if key in chosen else "first candidate (interpreter)"
                continue
            quantized = quantize_rtn(torch.randn(n, k, device=device) / k ** 0.5, SCHEMES[bits])
            tensors = (quantized.pack(layout), quantized.scales, quantized.zeros)
            x = torch.randn(1, k, device=device, dtype=dtype)
            reference = quantized_linear(x, *tensors, None, bits=bits, layout=layout, group_size=group,
                                         in_features=k, padded_features=quantized.codes.shape[1]).float()
            best = None
            for config in candidates:
                call = lambda c=config: quant_gemv(x, *tensors, None, bits=bits, layout=layout,  # noqa: E731
                                                   group_size=group, in_features=k, config=c)
                try:
                    error = float((call().float() - reference).abs().max() / reference.abs().max())
                    milliseconds = do_bench(call, warmup=5, rep=20)
                except Exception:  # noqa: BLE001 - a config that does not compile
                    continue
                if error <= 2e-2 and (best is None or milliseconds < best[0]):
                    best = (milliseconds, config)
            configs[("gemv", n, k, bits)] = best[1] if best else candidates[0]
            source[key] = "measured here"
    return configs, source


def tuned_configs(w: dict, bits_list: list, configs_from: str | None, device, dtype) -> tuple[dict, dict]:
    """(N, K, bits) -> KernelConfig at M = 1: from quant_gpu.py's JSON where it has the shape,
    else measured here by ``local_search`` (under the interpreter: the first candidate that runs)."""
    chosen = {}
    if configs_from and Path(configs_from).exists():
        chosen = json.loads(Path(configs_from).read_text()).get("chosen", {})
    shapes = {tuple(w["layers"][0][name].shape) for name in LINEARS} | {tuple(w["lm_head"].shape)}
    configs, source = {}, {}
    for bits in bits_list:
        for n, k in sorted(shapes):
            key = f"{n}x{k}/{bits}/1"
            if interpreting():  # a check of the plumbing, not a search
                configs[(n, k, bits)] = candidate_configs(1, n, k, bits)[0]
                source[key] = "first candidate (interpreter)"
                continue
            if key in chosen:
                configs[(n, k, bits)] = KernelConfig(*chosen[key])
                source[key] = "quant_gpu.json"
                continue
            weight = torch.randn(n, k, device=device) / k ** 0.5
            quantized = quantize_rtn(weight, SCHEMES[bits])
            layout = default_layout(bits)
            packed, scales, zeros = quantized.pack(layout), quantized.scales, quantized.zeros
            x = torch.randn(1, k, device=device, dtype=dtype)
            reference = quantized_linear(x, packed, scales, zeros, None, bits=bits, layout=layout,
                                         group_size=quantized.group_size, in_features=k,
                                         padded_features=quantized.codes.shape[1])
            config, _ = local_search(x, packed, scales, zeros, None, bits=bits, layout=layout,
                                     group_size=quantized.group_size, in_features=k, reference=reference)
            configs[(n, k, bits)] = config
            source[key] = "measured here"
    return configs, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU or GPU), seconds")
    parser.add_argument("--context", type=int, default=512, help="KV cache slots")
    parser.add_argument("--position", type=int, default=384, help="decode position timed")
    parser.add_argument("--variants", default="bf16,int4 gemv,int8 gemv,int3 gemv,int4 tinygemm,int8 torch form,"
                                              "int4 triton,int8 triton,int3 triton,int4 torch form,"
                                              "int8 int8pack,int3 torch form")
    parser.add_argument("--configs-from", default=None, help="quant_gpu.py's JSON (its 'chosen' configs)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=10, help="graph replays timed per variant per round")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip variants started after this")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cpu-compile-mode", default=None, help="compile on a CPU too (checks the script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.context, args.position = min(args.context, 64), min(args.position, 40)
        args.rounds, args.reps = min(args.rounds, 2), min(args.reps, 2)
    compile_mode = None if args.no_compile else (
        "max-autotune-no-cudagraphs" if device.type == "cuda" else args.cpu_compile_mode)

    out = Path(args.out) if args.out else RESULTS / ("quant_decode_gpu_smoke.json" if args.smoke else
                                                     "quant_decode_gpu.json")
    result: dict = {"benchmark": "quant_decode_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
                    "versions": {"torch": torch.__version__, "python": platform.python_version()},
                    "compile_mode": compile_mode or "eager", "context_slots": args.context,
                    "position": args.position, "targets_vs_bf16": TARGETS, "variants": {}, "failures": []}
    try:
        import transformers
        import triton
        result["versions"].update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    args.smoke = bool(args.smoke)
    model, config, dtype = build_model(args, device)
    w = extract(model)
    result["model"] = {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
                       "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                       "ff": config.intermediate_size, "vocab": config.vocab_size, "dtype": str(dtype),
                       "parameters": sum(p.numel() for p in model.parameters())}
    check = check_step_against_transformers(model, w, device, 8)
    result["check_vs_transformers"] = check
    if not check["passed"]:
        result["failures"].append(f"bf16 step vs transformers: {check}")
    del model

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bits_for_triton = sorted({int(v[3]) for v in variants if v.endswith("triton")})
    configs, source = tuned_configs(w, bits_for_triton, args.configs_from, device, dtype)
    result["kernel_configs"] = {f"{n}x{k}/{b}": {"config": c.label, "from": source[f"{n}x{k}/{b}/1"]}
                                for (n, k, b), c in configs.items()}
    bits_for_gemv = sorted({int(v[3]) for v in variants if v.endswith("gemv")})
    gemv, gemv_source = tuned_gemv_configs(w, bits_for_gemv, args.configs_from, device, dtype)
    configs.update(gemv)
    result["kernel_configs"].update({f"gemv/{n}x{k}/{b}": {"config": c.label, "from": gemv_source[f"gemv/{n}x{k}/{b}/1"]}
                                     for (_, n, k, b), c in gemv.items()})
    save()

    generator = torch.Generator(device=device).manual_seed(2)
    caches = [tuple(torch.randn(1, w["n_kv"], args.context, w["head_dim"], device=device, dtype=dtype,
                                generator=generator) for _ in range(2)) for _ in w["layers"]]
    token = torch.tensor([7], device=device)
    position = torch.tensor([args.position], device=device)

    replays, references = {}, {}
    for name in variants:
        if time.perf_counter() - started > args.budget_s:
            result["variants"][name] = {"skipped": f"time budget {args.budget_s:.0f} s spent"}
            continue
        entry = result["variants"].setdefault(name, {})
        clock = time.perf_counter()
        try:
            width, kind = (None, "bf16") if name == "bf16" else (int(name[3]), name.split(" ", 1)[1].replace(" ", "_"))
            linear = Linear(name, width, kind)
            eager = Step(w, linear, configs, caches, None)
            reference = eager(token, position)
            step = eager
            if compile_mode:
                step = Step(w, linear, configs, caches, compile_mode, (eager.tensors, eager.head_tensors))
            replay, how, logits = capture(lambda s=step: s(token, position), device)
            error = relative_error(logits, reference)
            entry.update({"execution": how, "build_s": time.perf_counter() - clock,
                          "weight_bytes": eager.weight_bytes(), "rel_error_vs_own_eager": error})
            if error > 5e-2 or not torch.isfinite(logits).all():
                result["failures"].append(f"{name}: compiled/graph logits differ from eager by {error:.2e}")
                entry["excluded"] = "wrong result"
                continue
            references[name] = reference
            replays[name] = replay
            # paired rounds against the bf16 anchor, right away (a later crash keeps these)
            anchor = replays.get("bf16", replay)
            mine, theirs = [], []
            for _ in range(args.rounds):
                for target, replay_fn in ((theirs, anchor), (mine, replay)):
                    def run(r=replay_fn):
                        for _ in range(args.reps):
                            r()
                    target += [t / args.reps for t in time_ms(run, device, 1, warmup=1)]
            entry["step_ms"] = summary(mine)
            entry["bf16_step_ms_same_rounds"] = summary(theirs)
            entry["ratio_vs_bf16"] = statistics.median(mine) / statistics.median(theirs)
            entry["paired_ratio_vs_bf16"] = statistics.median(m / t for m, t in zip(mine, theirs))
            entry["weight_GBps"] = entry["weight_bytes"] / statistics.median(mine) / 1e6
        except Exception as failure:  # noqa: BLE001 - record, go on
            entry.update({"error": f"{type(failure).__name__}: {failure}"[:400],
                          "traceback": traceback.format_exc()[-1500:]})
        print(f"{name}: built in {entry.get('build_s', time.perf_counter() - clock):.1f} s, "
              f"{entry.get('error', 'ok')[:100]}, x{entry.get('ratio_vs_bf16', float('nan')):.3f}", flush=True)
        save()

    # the same codes through different kernels agree
    for bits in (8, 4, 3):
        same = [n for n in references if n.startswith(f"int{bits} ")]
        for other in same[1:]:
            error = relative_error(references[other], references[same[0]])
            result["variants"][other][f"rel_error_vs_{same[0]}"] = error
            if error > 5e-2:
                result["failures"].append(f"{other} vs {same[0]}: {error:.2e}")
        for name in same:
            if "bf16" in references:
                cosine = F.cosine_similarity(references[name].flatten(), references["bf16"].flatten(), dim=0)
                result["variants"][name]["logit_cosine_vs_bf16"] = float(cosine)

    timed = {n: e for n, e in result["variants"].items() if "ratio_vs_bf16" in e}
    acceptance = result["acceptance"] = {}
    for width, target in TARGETS.items():
        candidates = [(e["ratio_vs_bf16"], n) for n, e in timed.items() if n.startswith(width + " ")]
        best = min(candidates) if candidates else None
        acceptance[f"{width} <= {target}x bf16"] = (
            {"best": best[1], "ratio": best[0], "met": best[0] <= target} if best else "not measured")
    fastest = {b: min((e["step_ms"]["median"], n) for n, e in timed.items() if n.startswith(f"int{b} "))
               for b in (3, 4) if any(n.startswith(f"int{b} ") for n in timed)}
    if len(fastest) == 2:
        acceptance["3-bit faster than 4-bit"] = {"int3": fastest[3], "int4": fastest[4],
                                                 "met": fastest[3][0] < fastest[4][0]}
    result["seconds"] = time.perf_counter() - started
    save()

    print(f"{result['device']}, {result['compile_mode']} + CUDA graph, context {args.context}, "
          f"{args.rounds} rounds x {args.reps} replays")
    print(f"{'variant':18} {'ms/token':>9} {'p10':>8} {'p90':>8} {'x bf16':>7} {'MB':>8} {'err':>8}")
    for name, entry in result["variants"].items():
        if "step_ms" in entry:
            s = entry["step_ms"]
            print(f"{name:18} {s['median']:9.4f} {s['p10']:8.4f} {s['p90']:8.4f} "
                  f"{entry.get('ratio_vs_bf16', float('nan')):7.3f} {entry['weight_bytes'] / 1e6:8.1f} "
                  f"{entry['rel_error_vs_own_eager']:8.1e}")
        else:
            print(f"{name:18} {entry.get('skipped') or entry.get('excluded') or entry.get('error', '')[:90]}")
    for key, value in result.get("acceptance", {}).items():
        print(f"acceptance {key}: {value}")
    print(f"check vs transformers: {check}")
    for failure in result["failures"]:
        print("FAILED:", failure)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
