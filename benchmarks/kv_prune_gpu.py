"""KV-cache pruning on the GPU: a ~1B Llama-shaped decoder at context 8192, 50% budget vs full cache.

The model: transformers ``LlamaConfig(hidden_size=2048, num_hidden_layers=16,
num_attention_heads=32, intermediate_size=5632, vocab_size=32000)`` with random weights in bf16
(1.1B parameters), batch 1. The prompt fills the context but for the generated tokens
(8192 - 128 prompt tokens, then 128 greedy tokens), decoded by slimline's loop
(``slimline.kv.session.DecodeSession``, the engine of ``slimline.generate``) with

    full        every token kept: a static cache of 8192 slots
    keyformer   50% budget (Keyformer: Gumbel-softmax scores, window 30%)
    h2o         50% budget, accumulated attention
    streaming   50% budget, 4 sinks + recent (no scoring: the cache effect alone)

Measured, in one run:

* attention time per token: the decode attention of all 16 layers for one token over 8192 cached
  keys (full, at the end of the context) and over the pruned cache's 4097 slots, each replayed as
  one CUDA graph (launch overhead out), median of repeats, for the kernels that keep the logits
  the policy needs — slimline's split-K Triton kernel (what the loop runs on CUDA) and the torch
  matmul-softmax-matmul form (its fallback) — and, as a reference, PyTorch's fused
  ``scaled_dot_product_attention`` (no logits);
* the policy's own cost per token (scoring + eviction), timed apart;
* KV memory: the cache buffers' bytes and the CUDA memory held while decoding;
* end-to-end, twice: (a) the eager loop (``DecodeSession.step``: policy driven from Python, one
  launch per op — host-bound at batch 1), and (b) ``slimline.kv.graphed.FixedSizeDecoder``: the
  whole step (model, attention, scoring, eviction, greedy argmax) one CUDA graph replay; prefill
  time, decode ms per token (CUDA events per step), decode tokens/s and tokens/s including the
  prefill.

Budget: the paper's — k = budget x prompt tokens (4032 of 8064 at 50%), fixed while generating,
one eviction per step (an int budget in ``kv_prune``), so every step has the same shapes.

Self-checks (reported, and the exit status is 1 if one fails): the loop's prefill logits against
the transformers model's own forward; the Triton kernel against an fp32 torch reference; a 100%
budget generating exactly the full cache's tokens; the graphed full / H2O / StreamingLLM runs
generating the eager loop's tokens; KV bytes at 50% ≤ 0.51 of full; attention per token (the
loop's kernel) ≥ 1.8× faster at 50%.

    PYTHONPATH=. python3 benchmarks/kv_prune_gpu.py --out $OUT/kv_prune_gpu.json
    PYTHONPATH=. python3 benchmarks/kv_prune_gpu.py --smoke      # tiny model, CPU or GPU, seconds
    TRITON_INTERPRET=1 PYTHONPATH=. python3 benchmarks/kv_prune_gpu.py --smoke --reps 2   # + the Triton paths on CPU

Each variant runs in its own try/except; the JSON is rewritten after each; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from slimline.kv import DecodeSession
from slimline.kv.attention import KERNEL_COUNTS, decode_attention_torch
from slimline.kv.triton_attention import interpreting

RESULTS: dict = {}


def save(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "n": len(ordered)}


def time_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> list[float]:
    """Per-call milliseconds: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def as_graph(fn, device: torch.device):
    """fn replayed as one CUDA graph (no launch overhead); fn itself on a CPU or if capture fails."""
    if device.type != "cuda":
        return fn, "eager"
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "cuda graph"
    except Exception as error:  # noqa: BLE001 - fall back, and say so
        return fn, f"eager (graph capture failed: {type(error).__name__})"


def build_model(args, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.smoke:
        config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=256, vocab_size=512, max_position_embeddings=args.context)
    else:
        config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                             intermediate_size=5632, vocab_size=32000, max_position_embeddings=args.context)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config, dtype


@torch.no_grad()
def check_against_transformers(model, device, vocab: int, length: int) -> dict:
    """The loop's prefill logits against the transformers model's own forward (same weights)."""
    idx = torch.randint(0, vocab, (1, length), device=device, generator=torch.Generator(device=device).manual_seed(1))
    reference = model(idx).logits.float()  # (1, T, V)
    session = DecodeSession(model, None, steps=0)
    ours = session.adapter.prefill(idx, all_logits=True)[0].float()
    relative = float((ours - reference).abs().max() / reference.abs().max())
    agreement = float((ours.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"max_relative_error": relative, "top1_agreement": agreement, "tokens": length,
            "passed": relative < 0.05}


@torch.no_grad()
def run_variant(model, prompt: torch.Tensor, steps: int, kv_prune, device: torch.device) -> dict:
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    session = DecodeSession(model, kv_prune, steps=steps)
    start = time.perf_counter()
    logits = session.prefill(prompt)
    token = logits.argmax(-1, keepdim=True)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
    tokens, step_ms = [token], []
    decode_start = time.perf_counter()
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            token = session.step(token).argmax(-1, keepdim=True)
            end.record()
            step_ms.append((begin, end))
        else:
            begin = time.perf_counter()
            token = session.step(token).argmax(-1, keepdim=True)
            step_ms.append((time.perf_counter() - begin) * 1e3)
        tokens.append(token)
    synchronize(device)
    decode_s = time.perf_counter() - decode_start
    if device.type == "cuda":
        step_ms = [begin.elapsed_time(end) for begin, end in step_ms]
    stats = dict(session.stats)
    result = {
        "prefill_s": prefill_s, "decode_s": decode_s, "decode_ms_per_token": summary(step_ms),
        "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None,
        "end_to_end_tokens_per_s": (steps + 1) / (prefill_s + decode_s),
        "kv_cache_bytes": stats["kv_cache_bytes"], "full_kv_cache_bytes": stats["full_kv_cache_bytes"],
        "bookkeeping_bytes": stats["bookkeeping_bytes"], "cuda_bytes_held_while_decoding": held,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None,
        "cache_slots": stats["cache_slots"], "kept_after_prompt": stats["kept_after_prompt"],
        "attention_key_reads_ratio": stats["attention_key_reads"] / max(1, stats["full_attention_key_reads"]),
        "evictions": stats["evictions"],
    }
    return result, torch.cat(tokens, dim=1), session


@torch.no_grad()
def run_graphed_variant(model, prompt: torch.Tensor, steps: int, kv_prune, device: torch.device) -> tuple:
    """The same generation on :class:`slimline.kv.graphed.FixedSizeDecoder`: each step (model, attention,
    scoring, eviction, argmax) one CUDA graph replay, no host work in between."""
    from slimline.kv.graphed import FixedSizeDecoder

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    session = DecodeSession(model, kv_prune, steps=steps)
    start = time.perf_counter()
    first = session.prefill(prompt).argmax(-1, keepdim=True)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    decoder = FixedSizeDecoder(session)
    start = time.perf_counter()
    decoder.prepare()
    synchronize(device)
    capture_s = time.perf_counter() - start
    held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
    step_ms = []
    decode_start = time.perf_counter()
    decoder.token.copy_(first)
    for _ in range(steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            decoder.greedy(None, 1)
            end.record()
            step_ms.append((begin, end))
        else:
            begin = time.perf_counter()
            decoder.greedy(None, 1)
            step_ms.append((time.perf_counter() - begin) * 1e3)
    synchronize(device)
    decode_s = time.perf_counter() - decode_start
    if device.type == "cuda":
        step_ms = [begin.elapsed_time(end) for begin, end in step_ms]
    stats = session.stats
    tokens = torch.cat([first, decoder.history[:, :steps]], dim=1)
    row = {
        "how": "cuda graph" if decoder.graph is not None else f"eager ({decoder.graph_error or 'no CUDA'})",
        "prefill_s": prefill_s, "capture_s": capture_s, "decode_s": decode_s,
        "decode_ms_per_token": summary(step_ms),
        "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None,
        "end_to_end_tokens_per_s": (steps + 1) / (prefill_s + decode_s),
        "kv_cache_bytes": stats["kv_cache_bytes"], "full_kv_cache_bytes": stats["full_kv_cache_bytes"],
        "bookkeeping_bytes": stats["bookkeeping_bytes"], "cuda_bytes_held_while_decoding": held,
        "cache_slots": stats["cache_slots"], "kept_after_prompt": stats["kept_after_prompt"],
        "attention_key_reads_ratio": stats["attention_key_reads"] / max(1, stats["full_attention_key_reads"]),
        "evictions": stats["evictions"],
    }
    return row, tokens


@torch.no_grad()
def attention_per_token(n_layer: int, n_head: int, n_kv_head: int, head_size: int, slots: int, dtype,
                        device: torch.device, reps: int, batch: int = 1) -> dict:
    """Decode attention of every layer for one token over ``slots`` cached keys, as the loop runs it."""
    generator = torch.Generator(device=device).manual_seed(2)
    keys = torch.randn(n_layer, batch, n_kv_head, slots, head_size, device=device, dtype=dtype, generator=generator)
    values = torch.randn_like(keys)
    query = torch.randn(batch, n_head, 1, head_size, device=device, dtype=dtype, generator=generator)
    scale = head_size ** -0.5

    def torch_form():
        for layer in range(n_layer):
            decode_attention_torch(query, keys[layer], values[layer], scale)

    def triton_form():
        from slimline.kv.triton_attention import decode_attention_triton

        for layer in range(n_layer):
            decode_attention_triton(query, keys[layer], values[layer], scale)

    def fused():
        for layer in range(n_layer):
            F.scaled_dot_product_attention(query, keys[layer], values[layer], scale=scale,
                                           enable_gqa=n_head != n_kv_head)

    result = {"slots": slots, "batch": batch, "kv_bytes_read": keys.numel() * keys.element_size() * 2}
    kernels = [("torch", torch_form), ("sdpa", fused)]
    if device.type == "cuda" or interpreting():
        kernels.insert(1, ("triton", triton_form))
    for name, fn in kernels:
        try:
            runner, how = as_graph(fn, device)
            result[name] = summary(time_ms(runner, device, reps))
        except Exception as error:  # noqa: BLE001
            result[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        result[name]["how"] = how
        median_s = result[name]["median"] / 1e3
        result[name]["effective_TBps"] = result["kv_bytes_read"] / median_s / 1e12 if median_s > 0 else None
    del keys, values
    return result


@torch.no_grad()
def policy_cost(session: DecodeSession, device: torch.device, reps: int) -> dict:
    """One step's scoring + eviction on the pruned cache as it stands (the loop's own code path)."""
    from slimline.kv.cache import protected_slots

    cache, plan, policy = session.cache, session.plan, session.policy
    L, B, H, S = cache.positions[..., : cache.filled].shape
    G = session.adapter.n_head // session.adapter.n_kv_head
    logits = torch.randn(L, B, H, G, S, device=device, dtype=session.adapter.dtype)
    saved = (cache.scores.clone(), cache.positions.clone(), cache.free_slot)
    position, size = session.seen - 1, plan.size(session.seen)

    def one_step():
        if policy.needs_attention:
            cache.accumulate(policy.weights(logits, 1).sum(dim=3))
        positions = cache.positions[..., : cache.filled]
        rank = policy.rank(cache.scores[..., : cache.filled], positions)
        victim = rank.masked_fill(protected_slots(positions, position, plan.window(size), plan.sinks),
                                  float("inf")).argmin(dim=-1)
        return victim

    times = time_ms(one_step, device, reps)
    cache.scores.copy_(saved[0])
    cache.positions.copy_(saved[1])
    cache.free_slot = saved[2]
    return summary(times)


def table(results: dict) -> str:
    lines = []
    for key, batch in (("attention_per_token", 1), ("attention_per_token_wide_batch", None)):
        attention = results.get(key, {})
        if "full" not in attention or "pruned" not in attention:
            continue
        full, pruned = attention["full"], attention["pruned"]
        batch = full.get("batch", batch)
        loop = f"(loop runs: {attention['loop_kernel']})" if "loop_kernel" in attention else "(information)"
        lines.append(f"attention per token, all layers, batch {batch}, ms    full       50%    ratio   {loop}")
        for kind, label in (("torch", "torch matmul-softmax-matmul"), ("triton", "triton split-K + logits"),
                            ("sdpa", "fused SDPA, no logits (reference)")):
            if "median" in full.get(kind, {}) and "median" in pruned.get(kind, {}):
                lines.append(f"  {label:<36} {full[kind]['median']:9.4f} {pruned[kind]['median']:9.4f} "
                             f"{attention.get('ratio_' + kind, float('nan')):7.2f}x   "
                             f"({full[kind].get('effective_TBps') or 0:.2f} / {pruned[kind].get('effective_TBps') or 0:.2f} TB/s)")
        lines += [f"  {'slots':<36} {full['slots']:9d} {pruned['slots']:9d}", ""]
    for key, title in (("variants", "eager loop (DecodeSession.step)"),
                       ("graphed", "fixed-size decoder, one CUDA graph a step")):
        variants = results.get(key, {})
        if not variants:
            continue
        lines.append(title)
        lines.append(f"{'variant':<11} {'KV MB':>9} {'KV ratio':>8} {'held MB':>9} {'prefill s':>9} "
                     f"{'ms/token':>9} {'tok/s':>8} {'e2e tok/s':>9} {'policy ms':>9} {'same tokens':>11}")
        for name, row in variants.items():
            if "error" in row:
                lines.append(f"{name:<11} ERROR {row['error'][:90]}")
                continue
            held = row.get("cuda_bytes_held_while_decoding")
            policy = row.get("policy_ms_per_token", {}).get("median")
            lines.append(
                f"{name:<11} {row['kv_cache_bytes'] / 1e6:9.1f} {row['kv_cache_bytes'] / row['full_kv_cache_bytes']:8.3f} "
                f"{(held or 0) / 1e6:9.1f} {row['prefill_s']:9.3f} {row['decode_ms_per_token']['median']:9.3f} "
                f"{row['decode_tokens_per_s']:8.1f} {row['end_to_end_tokens_per_s']:9.1f} "
                f"{policy if policy is not None else float('nan'):9.4f} {row.get('token_agreement_with_full', float('nan')):11.3f}")
        lines.append("")
    for name, check in results.get("checks", {}).items():
        lines.append(f"{'PASS' if check.get('passed') else 'FAIL'}  {name}: "
                     + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in check.items() if k != "passed"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kv_prune_gpu.json")
    parser.add_argument("--context", type=int, default=None, help="default 8192 (smoke: 256)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (smoke: 16)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--variants", default="full,keyformer,h2o,streaming")
    parser.add_argument("--wide-batch", type=int, default=8, help="also time attention at this batch (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama: check the script end to end")
    args = parser.parse_args()
    args.context = args.context or (256 if args.smoke else 8192)
    args.new_tokens = args.new_tokens or (16 if args.smoke else 128)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    import transformers

    RESULTS.update({
        "benchmark": "kv_prune_gpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "settings": {"context": args.context, "prompt": args.context - args.new_tokens,
                     "new_tokens": args.new_tokens, "budget": args.budget, "batch": 1, "smoke": args.smoke,
                     "greedy": True},
        "variants": {}, "graphed": {}, "checks": {}, "errors": [],
    })
    try:
        model, config, dtype = build_model(args, device)
        RESULTS["model"] = {"config": {k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings")},
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)}
    except Exception as error:  # noqa: BLE001
        RESULTS["errors"].append(f"model: {type(error).__name__}: {error}")
        save(args.out)
        print(traceback.format_exc(), file=sys.stderr)
        print(table(RESULTS))
        return 1
    save(args.out)
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv_head = config.num_key_value_heads or n_head
    head_size = config.hidden_size // n_head

    try:  # self-check 1: the loop computes what transformers computes
        RESULTS["checks"]["prefill logits vs transformers forward"] = check_against_transformers(
            model, device, config.vocab_size, min(512, args.context))
    except Exception as error:  # noqa: BLE001
        RESULTS["checks"]["prefill logits vs transformers forward"] = {"passed": False, "error": repr(error)[:300]}
    save(args.out)

    try:  # self-check: slimline.generate on this device, the reference GPT, greedy and sampled
        from slimline.generate import generate
        from slimline.models.quality import trained_model

        tiny_cpu = trained_model("gpt-tiny")
        tiny = trained_model("gpt-tiny").to(device)
        text = torch.tensor([list(b"import os\nimport sys\n\ndef main(argv):\n    ")] * 2)
        on_device = generate(tiny, text.to(device), 48).cpu()
        sampled = [generate(tiny, text.to(device), 48, greedy=False, temperature=0.8, top_k=20,
                            generator=torch.Generator(device=device).manual_seed(7)).cpu() for _ in range(2)]
        pruned, stats = generate(tiny, text.to(device), 48, kv_prune=0.5, return_stats=True)
        RESULTS["checks"]["slimline.generate on this device (gpt-tiny)"] = {
            "passed": bool(torch.equal(on_device, generate(tiny_cpu, text, 48))
                           and torch.equal(sampled[0], sampled[1]) and pruned.shape == on_device.shape),
            "greedy_equals_cpu": bool(torch.equal(on_device, generate(tiny_cpu, text, 48))),
            "sampled_reproducible": bool(torch.equal(sampled[0], sampled[1])),
            "pruned_kv_ratio": stats["kv_cache_bytes"] / stats["full_kv_cache_bytes"]}
        del tiny, tiny_cpu
    except Exception as error:  # noqa: BLE001
        RESULTS["checks"]["slimline.generate on this device (gpt-tiny)"] = {
            "passed": False, "error": f"{type(error).__name__}: {error}"[:300]}
    save(args.out)

    prompt_length = args.context - args.new_tokens
    prompt = torch.randint(0, config.vocab_size, (1, prompt_length), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    steps = args.new_tokens - 1
    # the paper's budget: k = budget x prompt tokens, fixed while generating (one eviction per step)
    kept = max(1, round(args.budget * prompt_length))
    RESULTS["settings"]["kept_tokens"] = kept
    budgets = {"full": None, "keyformer": {"policy": "keyformer", "budget": kept},
               "h2o": {"policy": "h2o", "budget": kept},
               "streaming": {"policy": "streaming", "budget": kept}}
    full_tokens, eager_tokens = None, {}
    for name in args.variants.split(","):
        try:
            row, tokens, session = run_variant(model, prompt, steps, budgets[name], device)
            eager_tokens[name] = tokens
            if name == "full":
                full_tokens = tokens
            if full_tokens is not None:
                row["token_agreement_with_full"] = float((tokens == full_tokens).float().mean())
            if session.plan is not None:
                row["policy_ms_per_token"] = policy_cost(session, device, args.reps)
            RESULTS["variants"][name] = row
            del session
        except Exception as error:  # noqa: BLE001
            RESULTS["variants"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(traceback.format_exc(), file=sys.stderr)
        save(args.out)

    graphed_tokens = {}
    for name in args.variants.split(","):
        try:
            row, tokens = run_graphed_variant(model, prompt, steps, budgets[name], device)
            graphed_tokens[name] = tokens
            eager = RESULTS["variants"].get(name, {})
            if "decode_ms_per_token" in eager:
                row["speedup_vs_eager_loop"] = eager["decode_ms_per_token"]["median"] / row["decode_ms_per_token"]["median"]
            if "full" in graphed_tokens:
                row["token_agreement_with_full"] = float((tokens == graphed_tokens["full"]).float().mean())
            RESULTS["graphed"][name] = row
        except Exception as error:  # noqa: BLE001
            RESULTS["graphed"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print(traceback.format_exc(), file=sys.stderr)
        save(args.out)
    graphed = RESULTS["graphed"]
    if "full" in graphed and "decode_ms_per_token" in graphed["full"]:
        for name, row in graphed.items():
            if "decode_ms_per_token" in row:
                row["decode_speedup_vs_full"] = graphed["full"]["decode_ms_per_token"]["median"] / \
                    row["decode_ms_per_token"]["median"]
    for name in ("full", "h2o", "streaming"):  # deterministic: one CUDA graph a step = the eager loop
        if name in graphed_tokens and name in eager_tokens:
            RESULTS["checks"][f"graphed {name} generates the eager loop's tokens"] = {
                "passed": bool(torch.equal(graphed_tokens[name], eager_tokens[name])),
                "agreement": float((graphed_tokens[name] == eager_tokens[name]).float().mean())}
    save(args.out)

    try:  # self-check 2: a 100% budget is the full cache, token for token (short generation)
        short = prompt[:, : min(prompt_length, 1024)]
        _, full_short, _ = run_variant(model, short, 16, None, device)
        _, kept_all, _ = run_variant(model, short, 16, {"policy": "keyformer", "budget": 1.0}, device)
        RESULTS["checks"]["100% budget reproduces the full cache"] = {
            "passed": bool(torch.equal(full_short, kept_all)), "tokens": full_short.shape[1]}
    except Exception as error:  # noqa: BLE001
        RESULTS["checks"]["100% budget reproduces the full cache"] = {"passed": False, "error": repr(error)[:300]}
    save(args.out)

    if device.type == "cuda" or interpreting():
        try:  # self-check: the Triton decode kernel against the torch form, bf16, a strided GQA-free view
            from slimline.kv.triton_attention import decode_attention_triton

            generator = torch.Generator(device=device).manual_seed(3)
            buffer = torch.randn(2, 1, n_kv_head, 4200, head_size, device=device, dtype=dtype, generator=generator)
            query = torch.randn(1, n_head, 1, head_size, device=device, dtype=dtype, generator=generator)
            k_view, v_view = buffer[0, :, :, :4097], buffer[1, :, :, :4097]
            expected, expected_logits = decode_attention_torch(query.float(), k_view.float(), v_view.float(),
                                                               head_size ** -0.5)
            out, logits = decode_attention_triton(query, k_view, v_view, head_size ** -0.5)
            error = float((out.float() - expected).abs().max() / expected.abs().max())
            logit_error = float((logits - expected_logits).abs().max() / expected_logits.abs().max())
            RESULTS["checks"]["triton decode kernel vs torch (fp32 reference)"] = {
                "passed": error < 2e-2 and logit_error < 2e-2, "output_relative_error": error,
                "logits_relative_error": logit_error}
        except Exception as error:  # noqa: BLE001
            RESULTS["checks"]["triton decode kernel vs torch (fp32 reference)"] = {
                "passed": False, "error": f"{type(error).__name__}: {error}"[:300]}
        save(args.out)

    try:  # attention per token: full context vs the pruned cache's capacity
        pruned_slots = RESULTS["variants"].get("keyformer", {}).get("cache_slots") or \
            int(args.budget * args.context) + 1
        attention = {"full": attention_per_token(n_layer, n_head, n_kv_head, head_size, args.context, dtype,
                                                 device, args.reps),
                     "pruned": attention_per_token(n_layer, n_head, n_kv_head, head_size, pruned_slots, dtype,
                                                   device, args.reps)}
        for kind in ("torch", "triton", "sdpa"):
            if "median" in attention["full"].get(kind, {}) and "median" in attention["pruned"].get(kind, {}):
                attention[f"ratio_{kind}"] = attention["full"][kind]["median"] / attention["pruned"][kind]["median"]
        triton_ok = RESULTS["checks"].get("triton decode kernel vs torch (fp32 reference)", {}).get("passed")
        loop_kernel = "triton" if triton_ok and "ratio_triton" in attention and \
            KERNEL_COUNTS.get("triton_failed") is None else "torch"
        attention["loop_kernel"] = loop_kernel
        RESULTS["attention_per_token"] = attention
        RESULTS["checks"]["attention per token >= 1.8x lower at 50%"] = {
            "passed": attention[f"ratio_{loop_kernel}"] >= 1.8, "kernel": loop_kernel,
            "ratio": attention[f"ratio_{loop_kernel}"],
            **{f"ratio_{kind}": attention[f"ratio_{kind}"] for kind in ("torch", "triton", "sdpa")
               if f"ratio_{kind}" in attention}}
    except Exception as error:  # noqa: BLE001
        RESULTS["errors"].append(f"attention per token: {type(error).__name__}: {error}"[:500])
        print(traceback.format_exc(), file=sys.stderr)
    save(args.out)

    if args.wide_batch > 1:
        try:  # information: at a larger batch attention is a larger share of bandwidth, overheads smaller
            wide = {"full": attention_per_token(n_layer, n_head, n_kv_head, head_size, args.context, dtype,
                                                device, args.reps, args.wide_batch),
                    "pruned": attention_per_token(n_layer, n_head, n_kv_head, head_size, pruned_slots, dtype,
                                                  device, args.reps, args.wide_batch)}
            for kind in ("torch", "triton", "sdpa"):
                if "median" in wide["full"].get(kind, {}) and "median" in wide["pruned"].get(kind, {}):
                    wide[f"ratio_{kind}"] = wide["full"][kind]["median"] / wide["pruned"][kind]["median"]
            RESULTS["attention_per_token_wide_batch"] = wide
        except Exception as error:  # noqa: BLE001
            RESULTS["errors"].append(f"attention per token, batch {args.wide_batch}: {type(error).__name__}: "
                                     f"{error}"[:500])
        save(args.out)

    keyformer = RESULTS["variants"].get("keyformer", {})
    if "kv_cache_bytes" in keyformer:
        ratio = keyformer["kv_cache_bytes"] / keyformer["full_kv_cache_bytes"]
        RESULTS["checks"]["KV memory halved at 50%"] = {"passed": ratio <= 0.51, "ratio": ratio}
    RESULTS["decode_kernel_counts"] = dict(KERNEL_COUNTS)
    RESULTS["seconds"] = time.perf_counter() - started
    save(args.out)
    print(table(RESULTS))
    failed = [name for name, check in RESULTS["checks"].items() if not check.get("passed")]
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
