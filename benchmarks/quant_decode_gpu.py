"""Batch-1 decode of issue 7's ~1B Llama-shaped decoder with 8/4/3/2-bit weights, against bf16.

The model: transformers ``LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
intermediate_size=5632, vocab_size=32000)``, random bf16 weights (``kv_prune_gpu.build_model``).

Measured side by side in one run (rounds interleaved, medians and p10/p90 per step):

    anchor     the plain-torch decode step (Q/K/V and gate/up fused, a static cache of ``--context``
               slots attended under a mask) under ``torch.compile(mode="max-autotune-no-cudagraphs")``,
               the whole step captured as one CUDA graph: the issue's bf16 reference
    slimline bf16   ``StaticDecoder`` (fused Triton GEMVs, one CUDA graph a step)
    int8/int4/int3/int2   ``QuantStaticDecoder``: the same step, every GEMV the tiled dequant-GEMV
               (``quant_gemv.tiled_gemv``) on round-to-nearest codes: int8 per channel symmetric, the
               others in groups of 128, asymmetric; LM head int8 per channel; configs tuned per weight
               family over ``quant_gemv.TILED_CANDIDATES`` (a local list of five: rows per
               program, warps, K tiles per program)

The decoders are timed from a prompt of ``--position`` tokens, the position reset before every
round (their attention reads slots 0..position; the anchor reads all ``--context`` slots, masked).

Also: the dequant-GEMV alone per shape and width (2048x2048 o, 6144x2048 qkv, 2x5632x2048 gate/up,
2048x5632 down, 32000x2048 head), each family's launches over enough distinct copies of its weights
to stream past the 50 MB L2, as one CUDA graph; bandwidth counts the packed bytes (codes, scales,
zero points) and is compared with the copy bandwidth measured here (``x.copy_(y)`` of 1 GiB: read +
write bytes / time).

Self-checks (exit status 1 on failure): the plain bf16 step against the transformers model; every
kernel (each family, each width, layer 0) against the torch reference (dequantized weights @ x
with the same prologue/epilogue, relative error <= 2e-2); each decoder's prompt logits finite. The
greedy tokens of the int8 decoder against the bf16 StaticDecoder over 64 new tokens are recorded
(agreement fraction, first divergence), not judged: the weights are random, top-2 gaps are small.

Compiling: the tiled kernel is unrolled over its program's tiles (all its weight loads can be in
flight at once); a pool of processes builds every specialization into Triton's cache while the
anchor compiles (whole-K programs took 15-65 s each to build; split ones about 2 s, on this CPU).

    PYTHONPATH=. python benchmarks/quant_decode_gpu.py --out $OUT/quant_decode_gpu.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/quant_decode_gpu.py --smoke   # tiny, CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kv_prune_gpu import build_model, summary, synchronize, time_ms  # noqa: E402

from slimline.backends.cuda import quant_gemv as qg  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = {"int4": 0.35, "int8": 0.6}
BANDWIDTH_TARGET = 0.7
LINEARS = ("qkv", "o", "gate_up", "down")


def scheme_of(bits: int) -> tuple[int | None, bool]:
    """(group size, symmetric) per width: int8 per channel symmetric, the rest g128 asymmetric."""
    return (None, True) if bits == 8 else (128, False)


# ---- the bf16 anchor: a plain-torch decode step ----

def extract(model) -> dict:
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


def rms(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def rope(x, cos, sin):  # x (1, H, 1, D); rotate halves, as transformers' Llama does
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def make_layer(w: dict) -> Callable:
    n_head, n_kv, head_dim, eps = w["n_head"], w["n_kv"], w["head_dim"], w["eps"]
    inv_freq, rope_scale, ff = w["inv_freq"], w["rope_scale"], w["ff"]
    repeat = n_head // n_kv

    def layer(h, norm1, norm2, qkv, o, gate_up, down, k_cache, v_cache, position):
        # h (1, C); caches (1, Hkv, S, D); position (1,) long
        x = rms(h, norm1, eps)
        q, k, v = F.linear(x, qkv).split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
        angles = position.float()[:, None] * inv_freq.to(h.device)[None, :]  # (1, D/2)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos() * rope_scale, angles.sin() * rope_scale
        q = rope(q.view(1, n_head, 1, head_dim), cos, sin)
        k = rope(k.view(1, n_kv, 1, head_dim), cos, sin)
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v.view(1, n_kv, 1, head_dim))
        slots = torch.arange(k_cache.shape[2], device=h.device)
        mask = (slots <= position)[None, None, None, :]  # (1, 1, 1, S)
        keys, values = k_cache, v_cache
        if repeat > 1:
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (1, H, 1, D)
        h = h + F.linear(attended.reshape(1, n_head * head_dim), o)
        x = rms(h, norm2, eps)
        gate, up = F.linear(x, gate_up).split([ff, ff], -1)
        return h + F.linear(F.silu(gate) * up, down)

    return layer


class AnchorStep:
    """The bf16 step over its own caches; ``__call__(token, position) -> logits (1, V) float32``."""

    def __init__(self, w: dict, caches: list, compile_mode: str | None):
        self.w, self.caches = w, caches
        eps = w["eps"]

        def head(h, norm, lm_head):
            return F.linear(rms(h, norm, eps), lm_head).float()

        layer_fn = make_layer(w)
        if compile_mode:
            layer_fn = torch.compile(layer_fn, mode=compile_mode, dynamic=False)
            head = torch.compile(head, mode=compile_mode, dynamic=False)
        self.layer_fn, self.head_fn = layer_fn, head

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        h = self.w["embed"][token]  # (1, C)
        for layer, (k_cache, v_cache) in zip(self.w["layers"], self.caches):
            h = self.layer_fn(h, layer["norm1"], layer["norm2"], layer["qkv"], layer["o"], layer["gate_up"],
                              layer["down"], k_cache, v_cache, position)
        return self.head_fn(h, self.w["norm"], self.w["lm_head"])


def capture(fn: Callable, device) -> tuple[Callable, str, torch.Tensor]:
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
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (1, length), device=device, generator=torch.Generator(device=device).manual_seed(1))
    reference = model(idx).logits[0, -1].float()
    caches = [tuple(torch.zeros(1, w["n_kv"], length, w["head_dim"], device=device, dtype=w["embed"].dtype)
                    for _ in range(2)) for _ in w["layers"]]
    step = AnchorStep(w, caches, None)
    for t in range(length):
        logits = step(idx[:, t], torch.tensor([t], device=device))
    error = relative_error(logits[0], reference)
    return {"relative_error": error, "top1_agree": bool(logits[0].argmax() == reference.argmax()), "tokens": length,
            "passed": error < 0.05}


# ---- compiling the tiled kernels in a pool of processes ----

def family_shapes(config) -> dict[str, tuple[int, int, int, int]]:
    """family -> (N rows of the packed matrix, K, norm, act) as QuantStaticDecoder launches them."""
    C, F_, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, C // config.num_attention_heads
    return {"qkv": ((H + 2 * Hkv) * D, C, qg.NORM_RMS, qg.ACT_NONE), "o": (C, H * D, qg.NORM_NONE, qg.ACT_NONE),
            "up": (2 * F_, C, qg.NORM_RMS, qg.ACT_SILU_PAIR), "down": (C, F_, qg.NORM_NONE, qg.ACT_NONE),
            "head": (V, C, qg.NORM_RMS, qg.ACT_NONE)}


def random_tiled(n: int, k: int, bits: int, group: int | None, symmetric: bool, device) -> qg.TiledWeight:
    """A tiled weight of the right shapes and dtypes with random contents (what the kernel's
    specialization sees; for compiling and for bandwidth clones)."""
    kp = qg.tile_padded(k)
    g = k if group is None or group >= k else group
    groups = -(-k // g)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (bits, n, kp // 32), dtype=torch.int32, device=device)
    scales = torch.rand(n, groups, device=device) * 1e-3
    zeros = None if symmetric else torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, device=device)
    return qg.TiledWeight(words, scales, zeros, bits, g, k)


def compile_job(job: tuple) -> tuple[tuple, float, str]:
    """Build one specialization by launching it once (the pool's worker)."""
    bits, group, symmetric, n, k, norm, act, block_n, warps, tiles = job
    start = time.perf_counter()
    try:
        device = torch.device("cuda")
        weight = random_tiled(n, k, bits, group, symmetric, device)
        x = torch.randn(k, device=device, dtype=torch.bfloat16)
        rows_out = n // 2 if act == qg.ACT_SILU_PAIR else n
        out = torch.zeros(rows_out, device=device, dtype=torch.bfloat16)
        residual = out if norm == qg.NORM_NONE else None  # o and down add the residual
        qg.tiled_gemv(x, weight, out, norm=norm, eps=1e-5, act=act, residual=residual,
                      config=qg.TiledConfig(block_n, warps, tiles), pdl=True)
        torch.cuda.synchronize()
        return job, time.perf_counter() - start, "ok"
    except Exception as error:  # noqa: BLE001 - reported by the parent
        return job, time.perf_counter() - start, f"{type(error).__name__}: {error}"[:300]


def compile_jobs(config, bits_list: list[int], candidates) -> list[tuple]:
    shapes = family_shapes(config)
    jobs = []
    for bits in bits_list:
        group, symmetric = scheme_of(bits)
        for family, (n, k, norm, act) in shapes.items():
            if family == "head":
                continue
            for c in candidates:
                if c.tiles_per_program == 0 or qg.tile_count(k) % c.tiles_per_program == 0:
                    jobs.append((bits, group, symmetric, n, k, norm, act, c.block_n, c.num_warps, c.tiles_per_program))
    n, k, norm, act = shapes["head"]
    for bits in sorted(set(bits_list) | {8}):
        group, symmetric = scheme_of(bits)
        for c in candidates:
            if c.tiles_per_program == 0 or qg.tile_count(k) % c.tiles_per_program == 0:
                jobs.append((bits, group, symmetric, n, k, norm, act, c.block_n, c.num_warps, c.tiles_per_program))
    jobs.sort(key=lambda job: (-job[4], -job[0]))  # the long K first
    return jobs


# ---- measurements ----

def copy_bandwidth(device, gib: float = 1.0, reps: int = 10) -> dict:
    n = int(gib * 2 ** 30) // 2
    source = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    times = time_ms(lambda: target.copy_(source), device, reps, warmup=2)
    median = statistics.median(times)
    del source, target
    return {"bytes_moved": 4 * n, "ms": summary(times), "GBps": 4 * n / median / 1e6}


def graph_ms(fn: Callable, device, reps: int = 15) -> list[float]:
    """Per-replay ms of ``fn`` captured as one CUDA graph."""
    replay, _, _ = capture(lambda: (fn(), torch.zeros(1, device=device))[1], device)
    return time_ms(replay, device, reps, warmup=2)


def bandwidth_of(decoder, family: str, config, device, min_bytes: float = 256e6) -> dict:
    """A family's tiled GEMV alone: its launches over >= ``min_bytes`` of distinct weight copies."""
    weights = decoder.tiled_weights()[family]
    copies = max(1, int(-(-min_bytes // sum(w.nbytes() for w in weights))))
    pool = [qg.TiledWeight(w.words.clone(), w.scales.clone(), None if w.zeros is None else w.zeros.clone(), w.bits,
                           w.group, w.in_features, w.rowsum, w.bias) for _ in range(copies) for w in weights]
    spec = decoder.spec
    x_in = {"qkv": decoder.x, "o": decoder.attended, "up": decoder.x, "down": decoder.hidden, "head": decoder.x}[family]
    out = {"qkv": decoder.qkv, "o": decoder.x, "up": decoder.hidden, "down": decoder.x, "head": decoder.logits}[family]
    norm = qg.NORM_RMS if family in ("qkv", "up", "head") else qg.NORM_NONE
    act = qg.ACT_SILU_PAIR if family == "up" else qg.ACT_NONE
    residual = out if family in ("o", "down") else None
    x_in.copy_(torch.randn_like(x_in) * 0.1)

    def run():
        for w in pool:
            qg.tiled_gemv(x_in, w, out, norm=norm, eps=spec.eps, act=act, residual=residual, config=config,
                          pdl=decoder.pdl)

    times = graph_ms(run, device)
    median = statistics.median(times)
    moved = sum(w.nbytes() for w in pool)
    del pool
    return {"shape": f"{weights[0].out_features}x{weights[0].in_features}", "launches": len(weights) * copies,
            "bytes": moved, "ms_per_launch": median / (len(weights) * copies), "GBps": moved / median / 1e6,
            "config": config.label}


@torch.no_grad()
def check_kernels(decoder, device) -> dict:
    """Each family's layer-0 kernel against reference_gemv (dequantized weights @ x, same fusions)."""
    spec = decoder.spec
    generator = torch.Generator(device=device).manual_seed(5)
    results = {}
    for family, weights in decoder.tiled_weights().items():
        w = weights[0]
        n, k = w.out_features, w.in_features
        x = torch.randn(k, device=device, generator=generator).to(decoder.x.dtype)
        norm = qg.NORM_RMS if family in ("qkv", "up", "head") else qg.NORM_NONE
        act = qg.ACT_SILU_PAIR if family == "up" else qg.ACT_NONE
        rows = n // 2 if act == qg.ACT_SILU_PAIR else n
        residual = (torch.randn(rows, device=device, generator=generator).to(decoder.x.dtype)
                    if family in ("o", "down") else None)
        expected = qg.reference_gemv(x, w, norm=norm, eps=spec.eps, act=act, residual=residual)
        out = torch.empty(rows, device=device, dtype=decoder.x.dtype)
        qg.tiled_gemv(x, w, out, norm=norm, eps=spec.eps, act=act,
                      residual=residual.clone() if residual is not None else None,
                      config=decoder.configs[family], pdl=False)
        results[family] = relative_error(out, expected)
    return results


def greedy_agreement(reference_decoder, decoder, prompt: torch.Tensor, new_tokens: int) -> dict:
    ours = decoder.generate(prompt, new_tokens)[0, prompt.shape[1]:]
    theirs = reference_decoder.generate(prompt, new_tokens)[0, prompt.shape[1]:]
    same = (ours == theirs)
    first = int((~same).nonzero()[0, 0]) if not bool(same.all()) else new_tokens
    return {"tokens": new_tokens, "agreement": float(same.float().mean()), "first_divergence": first}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU or GPU), seconds")
    parser.add_argument("--context", type=int, default=512, help="cache slots (the anchor attends over all)")
    parser.add_argument("--position", type=int, default=384, help="decode position timed")
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=10, help="steps timed per variant per round")
    parser.add_argument("--workers", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--no-bandwidth", action="store_true")
    parser.add_argument("--build-wait-s", type=float, default=170.0, help="stop waiting for the pool after this")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip the optional parts after this")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.context, args.position = min(args.context, 64), min(args.position, 24)
        args.rounds, args.reps = min(args.rounds, 2), min(args.reps, 2)
    bits_list = [int(b) for b in args.bits.split(",") if b.strip()]
    compile_mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
    out = Path(args.out) if args.out else RESULTS / ("quant_decode_gpu_smoke.json" if args.smoke else
                                                     "quant_decode_gpu.json")
    result: dict = {"benchmark": "quant_decode_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
                    "versions": {"torch": torch.__version__, "python": platform.python_version()},
                    "anchor": f"plain-torch step, torch.compile({compile_mode}) + CUDA graph",
                    "context_slots": args.context, "position": args.position, "targets_vs_anchor": TARGETS,
                    "bandwidth_target": BANDWIDTH_TARGET, "candidates": [c.label for c in qg.TILED_CANDIDATES],
                    "variants": {}, "checks": {}, "failures": []}
    try:
        import transformers
        import triton
        result["versions"].update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(out)

    def mark(label: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {label}", flush=True)

    model, config, dtype = build_model(args, device)
    result["model"] = {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
                       "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                       "ff": config.intermediate_size, "vocab": config.vocab_size, "dtype": str(dtype),
                       "parameters": sum(p.numel() for p in model.parameters())}

    # 1. the tiled kernels build in a pool while the anchor compiles
    pool = futures = None
    if device.type == "cuda" and args.workers > 0:
        jobs = compile_jobs(config, bits_list, qg.TILED_CANDIDATES)
        pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(compile_job, job) for job in jobs]
        mark(f"{len(jobs)} kernel builds started in {args.workers} processes")

    w = extract(model)
    check = check_step_against_transformers(model, w, device, 8)
    result["checks"]["bf16 step vs transformers"] = check
    if not check["passed"]:
        result["failures"].append(f"bf16 step vs transformers: {check}")

    generator = torch.Generator(device=device).manual_seed(2)
    caches = [tuple(torch.randn(1, w["n_kv"], args.context, w["head_dim"], device=device, dtype=dtype,
                                generator=generator) for _ in range(2)) for _ in w["layers"]]
    token = torch.tensor([7], device=device)
    position = torch.tensor([args.position], device=device)
    replays: dict[str, Callable] = {}
    clock = time.perf_counter()
    try:
        anchor = AnchorStep(w, caches, compile_mode)
        replay, how, logits = capture(lambda: anchor(token, position), device)
        replays["anchor"] = replay
        result["variants"]["anchor"] = {"execution": how, "build_s": time.perf_counter() - clock,
                                        "weight_bytes": sum(t.numel() * t.element_size() for layer in w["layers"]
                                                            for name, t in layer.items() if name in LINEARS)
                                        + w["lm_head"].numel() * w["lm_head"].element_size()}
    except Exception as failure:  # noqa: BLE001
        result["failures"].append(f"anchor: {type(failure).__name__}: {failure}"[:400])
        result["variants"]["anchor"] = {"error": traceback.format_exc()[-1500:]}
    mark("anchor built")
    save()

    if futures is not None:
        concurrent.futures.wait(futures, timeout=max(1.0, args.build_wait_s - (time.perf_counter() - started)))
        builds = [f.result() for f in futures if f.done()]
        pool.shutdown(wait=False, cancel_futures=True)
        failed = [(job, status) for job, _, status in builds if status != "ok"]
        result["kernel_builds"] = {"count": len(builds), "of": len(futures), "wall_s": time.perf_counter() - started,
                                   "cpu_s": sum(s for _, s, _ in builds), "failed": [str(f) for f in failed][:10]}
        mark(f"kernel builds done: {len(builds)}, {len(failed)} failed")

    # 2. the decoders
    from slimline.backends.cuda.decoder import StaticDecoder
    from slimline.backends.cuda.quant_decoder import QuantStaticDecoder

    prompt = torch.randint(0, config.vocab_size, (1, args.position), device=device,
                           generator=torch.Generator(device=device).manual_seed(3))
    decoders = {}
    try:
        clock = time.perf_counter()
        dense = StaticDecoder(model, args.context, tune=False)  # default configs: a reference, its builds are not pooled
        dense.prefill(prompt)
        decoders["slimline bf16"] = dense
        result["variants"]["slimline bf16"] = {"build_s": time.perf_counter() - clock,
                                               "weight_bytes": dense.report["weight_bytes"],
                                               "gemv_configs": dense.report.get("gemv_configs")}
    except Exception:  # noqa: BLE001
        result["failures"].append("slimline bf16: " + traceback.format_exc()[-600:])
    mark("bf16 StaticDecoder built")
    for bits in bits_list:
        name = f"int{bits}"
        entry = result["variants"].setdefault(name, {})
        try:
            clock = time.perf_counter()
            group, symmetric = scheme_of(bits)
            decoder = QuantStaticDecoder(model, args.context, bits=bits, group_size=group, symmetric=symmetric,
                                         tune=device.type == "cuda")
            entry.update({"build_s": time.perf_counter() - clock, "weight_bytes": decoder.report["weight_bytes"],
                          "quantization": decoder.report["quantization"],
                          "gemv_configs": decoder.report["gemv_configs"],
                          "gemv_tuned_ms": decoder.report.get("gemv_tuned_ms")})
            errors = check_kernels(decoder, device)
            entry["kernel_rel_error_vs_reference"] = errors
            bad = {f: e for f, e in errors.items() if not e <= 2e-2}
            if bad:
                result["failures"].append(f"{name} kernels off the reference: {bad}")
            logits = decoder.prefill(prompt)
            if not bool(torch.isfinite(logits).all()):
                result["failures"].append(f"{name}: prompt logits not finite")
            decoders[name] = decoder
        except Exception:  # noqa: BLE001
            entry["error"] = traceback.format_exc()[-1500:]
            result["failures"].append(f"{name}: " + traceback.format_exc()[-400:])
        mark(f"{name} built")
        save()
    del model

    # 3. greedy agreement, int8 vs bf16 StaticDecoder
    if "int8" in decoders and "slimline bf16" in decoders:
        short = prompt[:, :32]
        try:
            result["checks"]["int8 greedy vs bf16 StaticDecoder"] = greedy_agreement(
                decoders["slimline bf16"], decoders["int8"], short, 64 if not args.smoke else 8)
        except Exception:  # noqa: BLE001
            result["failures"].append("greedy agreement: " + traceback.format_exc()[-400:])
        for name in ("slimline bf16", "int8"):
            decoders[name].prefill(prompt)

    # 4. paired timing rounds: the anchor, then every decoder, interleaved
    def decoder_run(decoder):
        def run():
            for _ in range(args.reps):
                decoder.replay()
        return run

    runs = {name: (lambda r=replay: [r() for _ in range(args.reps)]) for name, replay in replays.items()}
    for name, decoder in decoders.items():
        decoder.replay()  # capture outside the timed rounds
        runs[name] = decoder_run(decoder)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            if name in decoders:
                decoders[name].position.fill_(args.position)
            samples[name] += [t / args.reps for t in time_ms(run, device, 1, warmup=1)]
    anchor_ms = statistics.median(samples["anchor"]) if samples.get("anchor") else None
    for name, values in samples.items():
        entry = result["variants"].setdefault(name, {})
        entry["step_ms"] = summary(values)
        if anchor_ms:
            entry["ratio_vs_anchor"] = statistics.median(values) / anchor_ms
            entry["paired_ratio_vs_anchor"] = statistics.median(
                m / a for m, a in zip(values, samples["anchor"]))
        if "weight_bytes" in entry:
            entry["weight_GBps"] = entry["weight_bytes"] / statistics.median(values) / 1e6
    mark("timed")
    save()

    # 5. the GEMV alone, per shape and width, against the copy bandwidth
    if not args.no_bandwidth and device.type == "cuda":
        copy = result["copy_bandwidth"] = copy_bandwidth(device)
        table = result["gemv_bandwidth"] = {}
        for bits in bits_list:
            decoder = decoders.get(f"int{bits}")
            if decoder is None or time.perf_counter() - started > args.budget_s:
                continue
            for family in ("o", "qkv", "up", "down") + (("head",) if bits == 8 else ()):
                try:
                    row = bandwidth_of(decoder, family, decoder.configs[family], device)
                    row["fraction_of_copy"] = row["GBps"] / copy["GBps"]
                    table[f"int{bits} {family}"] = row
                except Exception:  # noqa: BLE001
                    table[f"int{bits} {family}"] = {"error": traceback.format_exc()[-600:]}
            save()
        # the head at 4/3/2 bits (the decoders keep it int8): each candidate, the best kept
        if "int8" in decoders and time.perf_counter() - started < args.budget_s:
            decoder = decoders["int8"]
            n, k = decoder.head_quant.out_features, decoder.head_quant.in_features
            saved = decoder.head_quant
            for bits in [b for b in bits_list if b != 8]:
                group, symmetric = scheme_of(bits)
                decoder.head_quant = random_tiled(n, k, bits, group, symmetric, device)
                best = None
                for config in [c for c in qg.TILED_CANDIDATES if qg.fits(decoder.head_quant, c)]:
                    try:
                        row = bandwidth_of(decoder, "head", config, device)
                    except Exception:  # noqa: BLE001
                        continue
                    if best is None or row["GBps"] > best["GBps"]:
                        best = row
                if best:
                    best["fraction_of_copy"] = best["GBps"] / copy["GBps"]
                    best["note"] = "random codes of this width; the decoders' head stays int8"
                    table[f"int{bits} head"] = best
            decoder.head_quant = saved
        mark("bandwidth measured")

    # 6. acceptance
    acceptance = result["acceptance"] = {}
    for width, target in TARGETS.items():
        entry = result["variants"].get(width, {})
        if "ratio_vs_anchor" in entry:
            acceptance[f"{width} <= {target}x anchor"] = {"ratio": entry["ratio_vs_anchor"],
                                                          "met": entry["ratio_vs_anchor"] <= target}
    if all("step_ms" in result["variants"].get(n, {}) for n in ("int3", "int4")):
        three, four = (result["variants"][n]["step_ms"]["median"] for n in ("int3", "int4"))
        acceptance["int3 faster than int4"] = {"int3_ms": three, "int4_ms": four, "met": three < four}
    if result.get("gemv_bandwidth"):
        fractions = {k: v["fraction_of_copy"] for k, v in result["gemv_bandwidth"].items() if "fraction_of_copy" in v}
        acceptance[f"dequant-GEMV >= {BANDWIDTH_TARGET:.0%} of copy"] = {
            "met_by": sorted(k for k, f in fractions.items() if f >= BANDWIDTH_TARGET),
            "not_met_by": sorted(k for k, f in fractions.items() if f < BANDWIDTH_TARGET)}
    result["seconds"] = time.perf_counter() - started
    save()

    print(f"{result['device']}; anchor: {result['anchor']}; position {args.position}, "
          f"{args.rounds} rounds x {args.reps} steps")
    print(f"{'variant':14} {'ms/token':>9} {'p10':>8} {'p90':>8} {'x anchor':>9} {'MB':>8}")
    for name, entry in result["variants"].items():
        if "step_ms" in entry:
            s = entry["step_ms"]
            print(f"{name:14} {s['median']:9.4f} {s['p10']:8.4f} {s['p90']:8.4f} "
                  f"{entry.get('ratio_vs_anchor', float('nan')):9.3f} {entry.get('weight_bytes', 0) / 1e6:8.1f}")
        else:
            print(f"{name:14} {str(entry.get('error', ''))[-200:]}")
    if result.get("gemv_bandwidth"):
        print(f"copy: {result['copy_bandwidth']['GBps']:.0f} GB/s")
        for key, row in result["gemv_bandwidth"].items():
            if "GBps" in row:
                print(f"  {key:12} {row['shape']:>11} {row['GBps']:7.0f} GB/s {row['fraction_of_copy']:6.1%} "
                      f"{row['ms_per_launch'] * 1e3:7.2f} us/launch {row['config']}")
    for key, value in acceptance.items():
        print(f"acceptance {key}: {value}")
    for key, value in result["checks"].items():
        print(f"check {key}: {value}")
    for failure in result["failures"]:
        print("FAILED:", failure)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
