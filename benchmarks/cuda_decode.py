"""GPU decode (batch 1) and prefill (8 x 512): slimline's CUDA decode against torch, side by side, one run.

Models: the ~1B Llama-shaped decoder of benchmarks/kv_prune_gpu.py (hidden 2048, 16 layers, 32
heads, MLP 5632, vocabulary 32000, random bf16 weights; built by its ``build_model``) and the
trained gpt-small (slimline's reference GPT, bf16). Decode: a 512-token prompt, then greedy steps;
each variant times the same number of steps in blocks (CUDA events around each block, ms/token =
block time / steps; median and spread over blocks):

    eager            the model's own forward on a static cache (transformers StaticCache /
                     GPTDecode), one step per call, torch eager
    compile          the same step under torch.compile(mode=--compile-mode, default
                     "max-autotune-no-cudagraphs")
    compile+graph    that compiled step captured as one CUDA graph (token and position advance inside)
    hf_generate      transformers' generate(cache_implementation="static"), greedy:
                     (time for 1 + N tokens − time for 1 token) / N (Llama only)
    slimline         slimline.backends.cuda.StaticDecoder: fused private weights, fused Triton
                     GEMV / attention kernels, one CUDA graph per token (exact rewrites only)
    slimline lowrank F   the same decoder with every layer matrix a truncated-SVD pair (StaticDecoder
                         rank_fraction=), all Linear parameters at F of dense (head dense); checked
                         against its own torch form on the same tokens (it is a different model)

The roofline is the weight bytes a step must read (every matrix once) over the copy bandwidth
measured here (device-to-device copy, bytes read + written). Prefill: eager, torch.compile and
slimline's fused prefill (torch ops over the fused weights, torch.compile'd with
--prefill-compile-mode), logits of the last position only for all three.

Self-checks (exit status 1 if one fails): slimline's prefill logits against the model's forward;
its decode logits against the model's forward on the same tokens (teacher-forced, every
position of a --check-tokens greedy generation); the greedy tokens against eager bf16 decoding
of the model (same tokens, or the first divergence at a near-tie: a top-2 gap of the reference
logits within twice the measured logit noise).

    PYTHONPATH=. python benchmarks/cuda_decode.py --out $OUT/cuda_decode.json
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/cuda_decode.py --smoke --out /tmp/smoke.json   # CPU, tiny

The JSON is rewritten after every stage; --budget-s skips the remaining optional stages (recorded):
transformers' generate, prefill, further models. The low-rank variant (--lowrank, the fraction of
all Linear parameters, head included; the head stays dense, so the layers' matrices go lower) and
compile+graph always run. Each slimline variant's step is also profiled per launch family.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_prune_gpu import build_model  # noqa: E402  (the ~1B Llama-shaped decoder, reused)

from slimline.backends.cuda.decoder import StaticDecoder, fuse_weights  # noqa: E402

RESULTS: dict = {}
STARTED = time.perf_counter()


def save(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(path).with_suffix(".tmp")
    temporary.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    temporary.replace(path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "n": len(ordered)}


def timed_blocks(step, steps: int, block: int, device: torch.device) -> dict:
    """Run ``steps`` calls of ``step`` in blocks of ``block``; ms per call per block, summarised."""
    per_call = []
    sync(device)
    for _ in range(max(1, steps // block)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(block):
                step()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / block)
        else:
            begin = time.perf_counter()
            for _ in range(block):
                step()
            per_call.append((time.perf_counter() - begin) * 1e3 / block)
    return spread(per_call)


def capture_graph(fn, device: torch.device, warmup: int = 2):
    """fn captured as a CUDA graph after ``warmup`` runs on a side stream; returns graph.replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device) -> dict:
    """Device-to-device copy, bytes read + written per second (the roofline's denominator)."""
    if device.type != "cuda":
        return {"bytes_per_s": None, "note": "no GPU"}
    n = 1 << 30
    source = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    times = timed_blocks(lambda: target.copy_(source), 20, 1, device)
    del source, target
    return {"bytes_per_s": 2 * n / (times["median"] / 1e3), "ms": times, "bytes_copied": n}


def over_budget(args, stage: str) -> bool:
    elapsed = time.perf_counter() - STARTED
    if elapsed > args.budget_s:
        RESULTS["skipped"].append(f"{stage} (at {elapsed:.0f} s, budget {args.budget_s} s)")
        return True
    return False


def record_error(where: dict, key: str, error: BaseException) -> None:
    where[key] = {"error": f"{type(error).__name__}: {error}"[:600]}
    print(f"[{key}] {traceback.format_exc()}", file=sys.stderr)


def versions() -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


# -- the model's own step (eager / compiled / graph) -----------------------------------------------------

class LlamaStep:
    """transformers' forward for one token on its StaticCache; token and position live on the device."""

    def __init__(self, model, prompt: torch.Tensor, max_length: int):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        parameters = inspect.signature(model.model.forward).parameters
        self.pass_cache_position = "cache_position" in parameters
        P = prompt.shape[1]
        positions = torch.arange(P, device=prompt.device)
        with torch.no_grad():
            logits = model(prompt, **self._kwargs(positions)).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        self.position = torch.full((1,), P, dtype=torch.int64, device=prompt.device)
        self.forward = model.forward
        self.logits = None

    def _kwargs(self, positions: torch.Tensor) -> dict:
        kwargs = {"past_key_values": self.cache, "position_ids": positions[None], "use_cache": True}
        if self.pass_cache_position:
            kwargs["cache_position"] = positions
        return kwargs

    @torch.no_grad()
    def __call__(self) -> None:
        logits = self.forward(self.token, **self._kwargs(self.position)).logits  # (1, 1, V)
        self.logits = logits[0, -1]
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)


class GPTStep:
    """slimline's GPTDecode (the cache passed in and out, out of place), written back each step."""

    def __init__(self, model, prompt: torch.Tensor, max_length: int):
        from slimline.models.gpt import GPTDecode, GPTPrefill

        k_cache, v_cache = model.new_kv_cache(1)
        with torch.no_grad():
            logits, k_cache, v_cache = GPTPrefill(model)(prompt, k_cache, v_cache)
        self.k_cache, self.v_cache = k_cache.contiguous(), v_cache.contiguous()
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        self.position = torch.full((1,), prompt.shape[1], dtype=torch.int64, device=prompt.device)
        self.forward = GPTDecode(model)
        self.logits = None

    @torch.no_grad()
    def __call__(self) -> None:
        logits, k_cache, v_cache = self.forward(self.token, self.position, self.k_cache, self.v_cache)
        self.k_cache.copy_(k_cache)
        self.v_cache.copy_(v_cache)
        self.logits = logits[0, -1]
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)


def make_step(family: str, model, prompt, max_length: int):
    return (LlamaStep if family == "llama" else GPTStep)(model, prompt, max_length)


# -- checks ------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_logits(family: str, model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own full forward over tokens (1, T): logits (T, V), fp32."""
    out = model(tokens)
    return (out.logits if family == "llama" else out)[0].float()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference).abs().max() / reference.abs().max())


@torch.no_grad()
def check_decoder(family: str, model, decoder: StaticDecoder, prompt: torch.Tensor, check_tokens: int,
                  device: torch.device) -> dict:
    """Prefill logits, teacher-forced decode logits, greedy tokens against eager bf16 decoding."""
    result: dict = {}
    P = prompt.shape[1]
    logits = decoder.prefill(prompt)
    reference = reference_logits(family, model, prompt)[-1]
    noise = float((logits.float() - reference).abs().max())
    result["prefill_logits_relative_error"] = relative_error(logits, reference)
    result["prefill_logits_max_abs_difference"] = noise
    # greedy generation, keeping every step's logits (the graph's logits buffer, copied after each replay)
    step_logits = []
    for _ in range(check_tokens - 1):
        decoder.replay()
        step_logits.append(decoder.logits.float().clone())
    ours = decoder.history[: P + check_tokens].clone()
    full = reference_logits(family, model, ours[None, :-1])  # (P + N - 1, V): the model on slimline's tokens
    teacher = full[P:]  # positions P .. P+N-2: the logits that chose tokens P+1 ..
    ours_logits = torch.stack(step_logits)
    result["decode_logits_relative_error"] = relative_error(ours_logits, teacher)
    result["decode_logits_max_abs_difference"] = float((ours_logits - teacher).abs().max())
    chosen = ours[P + 1:]
    agree = teacher.argmax(-1) == chosen
    gaps = teacher.max(-1).values - teacher.gather(-1, chosen[:, None])[:, 0]  # 0 where they agree
    noise_floor = max(noise, result["decode_logits_max_abs_difference"])
    result["teacher_forced_agreement"] = float(agree.float().mean())
    result["teacher_forced_largest_gap"] = float(gaps.max())
    result["noise_floor"] = noise_floor
    # free-running eager decoding of the model itself, bf16, static cache
    eager = make_step(family, model, prompt, decoder.max_length)
    eager_tokens = [int(eager.token)]
    eager_logits = []
    for _ in range(check_tokens - 1):
        eager()
        eager_logits.append(eager.logits.float())
        eager_tokens.append(int(eager.token))
    mismatch = [i for i, (a, b) in enumerate(zip(ours[P:].tolist(), eager_tokens)) if a != b]
    result["tokens"] = check_tokens
    result["same_tokens_as_eager"] = not mismatch
    if mismatch:
        first = mismatch[0]
        result["first_divergence"] = first
        reference_step = eager_logits[first - 1] if first > 0 else reference
        top2 = reference_step.topk(2).values
        result["divergence_top2_gap"] = float(top2[0] - top2[1])
        result["divergence_is_near_tie"] = result["divergence_top2_gap"] <= 2 * noise_floor
    result["passed"] = bool(result["prefill_logits_relative_error"] < 3e-2
                            and result["decode_logits_relative_error"] < 3e-2
                            and float(gaps.max()) <= 2 * noise_floor
                            and (not mismatch or result["divergence_is_near_tie"]))
    return result


@torch.no_grad()
def decode_trace(decoder: StaticDecoder, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and every step's logits of a greedy run (the decoder's own loop)."""
    decoder.prefill(prompt)
    logits = []
    for _ in range(steps):
        decoder.replay()
        logits.append(decoder.logits.clone())
    P = prompt.shape[1]
    return decoder.history[: P + steps + 1].clone(), torch.stack(logits)


# -- one model ----------------------------------------------------------------------------------------------

def load_model(name: str, args, device: torch.device):
    if name == "llama-1b":
        model, config, dtype = build_model(SimpleNamespace(smoke=args.smoke, context=args.max_length), device)
        return "llama", model, config.vocab_size
    from slimline.models.quality import trained_model

    model = trained_model("gpt-tiny" if args.smoke else "gpt-small")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return "gpt", model.to(device=device, dtype=dtype).eval(), model.config.vocab_size


def prompt_for(family: str, vocab: int, length: int, device: torch.device) -> torch.Tensor:
    if family == "gpt":  # real text for the trained byte model: this repository's own source
        text = b"".join(path.read_bytes() for path in sorted(Path("slimline").glob("*.py")))[:length]
        return torch.tensor([list(text)], dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, vocab, (1, length), device=device, generator=generator)


def run_model(name: str, args, device: torch.device, bandwidth: float | None) -> None:
    row: dict = {"decode": {}, "prefill": {}, "checks": {}}
    RESULTS["models"][name] = row
    family, model, vocab = load_model(name, args, device)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    prompt = prompt_for(family, vocab, args.context, device)
    steps, block = args.new_tokens, args.block

    # slimline: build (tunes its GEMVs on the device), check, time
    decoder = None
    for pdl in (None, False):  # default (PDL where Triton has it); without, if that fails to run
        try:
            started = time.perf_counter()
            decoder = StaticDecoder(model, args.max_length, tune=device.type == "cuda", pdl=pdl)
            decoder.prefill(prompt)
            decoder.replay()
            break
        except Exception as error:  # noqa: BLE001
            record_error(row["decode"], "slimline build" + (" (PDL)" if pdl is None else ""), error)
    try:
        row["slimline_build_s"] = time.perf_counter() - started
        row["weight_bytes"] = decoder.weights.weight_bytes()
        if bandwidth:
            row["roofline_ms_per_token"] = row["weight_bytes"] / bandwidth * 1e3
        decoder.prefill(prompt)
        decoder.replay()  # captured before timing
        row["decode"]["slimline"] = timed_blocks(decoder.replay, steps, block, device)
        row["slimline_report"] = dict(decoder.report)
        save(args.out)
        row["checks"]["slimline vs the model"] = check_decoder(family, model, decoder, prompt, args.check_tokens,
                                                               device)
    except Exception as error:  # noqa: BLE001
        record_error(row["decode"], "slimline", error)
    save(args.out)
    if "median" in row["decode"].get("slimline", {}) and decoder.pdl and args.pdl_ablation:
        try:  # the same kernels without programmatic dependent launch: same numbers, and its time
            with_pdl = decode_trace(decoder, prompt, 32)
            decoder.set_pdl(False)
            without = decode_trace(decoder, prompt, 32)
            row["checks"]["PDL launches compute what plain launches compute"] = {
                "passed": bool(torch.equal(with_pdl[0], without[0]) and torch.equal(with_pdl[1], without[1])),
                "steps": 32, "max_abs_logit_difference": float((with_pdl[1] - without[1]).abs().max())}
            decoder.prefill(prompt)
            decoder.replay()
            row["decode"]["slimline (no PDL)"] = timed_blocks(decoder.replay, steps, block, device)
            decoder.set_pdl(True)
        except Exception as error:  # noqa: BLE001
            record_error(row["decode"], "slimline (no PDL)", error)
        save(args.out)

    if "median" in row["decode"].get("slimline", {}):
        try:  # where one step's time goes: each launch family replayed alone, the chosen configs
            decoder.prefill(prompt)
            row["profile_ms"] = {"slimline": decoder.profile() if device.type == "cuda" else None}
            trace_steps = min(32, args.check_tokens)
            first, second = decode_trace(decoder, prompt, trace_steps), decode_trace(decoder, prompt, trace_steps)
            row["checks"]["two replays of the same steps are bit-identical"] = {
                "passed": bool(torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])),
                "steps": trace_steps}
        except Exception as error:  # noqa: BLE001
            record_error(row, "profile", error)
        save(args.out)

    del decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()


    if args.lowrank:  # not subject to --budget-s: a measured variant of the acceptance, like compile+graph
        run_lowrank(name, model, prompt, args, device, row)
        ratios(row)
        save(args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.compile_mode != "off":  # the anchor: never skipped for time
        try:
            compiled = make_step(family, model, prompt, args.max_length)
            compiled.forward = torch.compile(compiled.forward, mode=args.compile_mode, dynamic=False)
            started = time.perf_counter()
            for _ in range(3):
                compiled()
            sync(device)
            row["compile_s"] = time.perf_counter() - started
            row["decode"]["compile"] = timed_blocks(compiled, min(steps, 32), min(block, 8), device)
            if device.type == "cuda":
                replay = capture_graph(compiled, device)
                row["decode"]["compile+graph"] = timed_blocks(replay, steps, block, device)
            ratios(row)
            del compiled
        except Exception as error:  # noqa: BLE001
            record_error(row["decode"], "compile+graph", error)
        save(args.out)

    try:
        eager = make_step(family, model, prompt, args.max_length)
        row["decode"]["eager"] = timed_blocks(eager, min(steps, 32), min(block, 8), device)
        del eager
    except Exception as error:  # noqa: BLE001
        record_error(row["decode"], "eager", error)
    save(args.out)

    if family == "llama" and args.hf_generate and not over_budget(args, f"{name} hf_generate"):
        try:
            row["decode"]["hf_generate"] = hf_generate(model, prompt, steps, device, args)
        except Exception as error:  # noqa: BLE001
            record_error(row["decode"], "hf_generate", error)
        save(args.out)

    if not over_budget(args, f"{name} prefill"):
        run_prefill(family, model, fuse_weights(model, args.max_length)
                    if "median" in row["decode"].get("slimline", {}) else None, vocab, args, device, row)
    ratios(row)
    save(args.out)
    del model


def lowrank_fraction(model_parameters: dict, target: float) -> float:
    """The per-matrix fraction for the layers so that all Linear parameters (the dense head included)
    come to ``target`` of the dense count."""
    layers, head = model_parameters["layers"], model_parameters["head"]
    return (target * (layers + head) - head) / layers


@torch.no_grad()
def run_lowrank(name: str, model, prompt: torch.Tensor, args, device: torch.device, row: dict) -> None:
    """slimline's decoder in low-rank mode at --lowrank of the Linear parameters: built, checked against its
    own torch form (the same factors, teacher-forced), timed beside the dense decoder."""
    label = f"slimline lowrank {args.lowrank:.0%}"
    try:
        dense_params = fuse_weights(model, args.max_length).linear_params()
        fraction = lowrank_fraction(dense_params, args.lowrank)
        started = time.perf_counter()
        decoder = StaticDecoder(model, args.max_length, tune=device.type == "cuda", rank_fraction=fraction)
        row["lowrank_build_s"] = time.perf_counter() - started
        report = decoder.report["lowrank"]
        row["lowrank"] = {"target_linear_fraction": args.lowrank, "per_matrix_fraction_asked": fraction,
                          "linear_fraction_reached": report["fraction_with_head"],
                          "layers_fraction_reached": report["fraction_layers"], "families": report["families"],
                          "linear_params_dense": report["linear_params_before"],
                          "linear_params_lowrank": report["linear_params_after"],
                          "weight_bytes": decoder.weights.weight_bytes(), "build_s": row["lowrank_build_s"]}
        if row.get("roofline_ms_per_token") and row.get("weight_bytes"):
            row["lowrank"]["roofline_ms_per_token"] = (row["roofline_ms_per_token"] * decoder.weights.weight_bytes()
                                                       / row["weight_bytes"])
        # its decode against its own prefill form on the same tokens (the factors are the model here)
        P, steps = prompt.shape[1], args.lowrank_check_tokens
        decoder.prefill(prompt)
        ours, reference = [], []
        for _ in range(steps):
            decoder.replay()
            ours.append(decoder.logits.float().clone())
        tokens = decoder.history[: P + steps + 1].clone()
        for i in range(steps):
            reference.append(decoder.weights(tokens[None, : P + i + 1])[0][0].float())
        ours, reference = torch.stack(ours), torch.stack(reference)
        chosen = tokens[P + 1: P + steps + 1]
        gaps = reference.max(-1).values - reference.gather(-1, chosen[:, None])[:, 0]
        noise = float((ours - reference).abs().max())
        row["checks"][f"{label} decode vs its torch form"] = {
            "passed": bool(relative_error(ours, reference) < 3e-2 and float(gaps.max()) <= 2 * noise + 1e-6),
            "steps": steps, "logits_relative_error": relative_error(ours, reference), "max_abs_difference": noise,
            "argmax_agreement": float((reference.argmax(-1) == chosen).float().mean()),
            "largest_gap_where_they_differ": float(gaps.max())}
        decoder.prefill(prompt)
        decoder.replay()
        row["decode"][label] = timed_blocks(decoder.replay, args.new_tokens, args.block, device)
    except Exception as error:  # noqa: BLE001
        record_error(row["decode"], label, error)
        return
    try:
        decoder.prefill(prompt)
        if device.type == "cuda":
            row.setdefault("profile_ms", {})[label] = decoder.profile()
    except Exception as error:  # noqa: BLE001
        record_error(row, f"profile {label}", error)
    row["lowrank"]["report"] = {k: v for k, v in decoder.report.items() if k != "lowrank"}


@torch.no_grad()
def hf_generate(model, prompt, steps: int, device, args) -> dict:
    def run(new_tokens: int) -> float:
        sync(device)
        begin = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
        sync(device)
        return (time.perf_counter() - begin) * 1e3

    started = time.perf_counter()
    run(steps + 1)  # warm-up (and whatever generate compiles)
    warmup_s = time.perf_counter() - started
    totals = [(run(steps + 1) - run(1)) / steps for _ in range(3)]
    return {**spread(totals), "warmup_s": warmup_s,
            "how": "(generate 1+N tokens - generate 1 token) / N, host clock, transformers defaults"}


@torch.no_grad()
def run_prefill(family, model, weights, vocab, args, device, row) -> None:
    generator = torch.Generator(device=device).manual_seed(5)
    batch = torch.randint(0, vocab, (args.prefill_batch, args.prefill_length), device=device, generator=generator)
    if family == "llama":
        def model_prefill(idx, forward=model.forward):
            return forward(idx, logits_to_keep=1).logits[:, -1]
    else:
        def model_prefill(idx, forward=model.forward):
            return forward(idx)[:, -1]
    variants = {"eager": model_prefill}
    reference = model_prefill(batch).float()
    if args.prefill_compile_mode != "off":
        variants["compile"] = torch.compile(model_prefill, mode=args.prefill_compile_mode, dynamic=False)
    if weights is not None:
        slim = torch.compile(weights, mode=args.prefill_compile_mode, dynamic=False) \
            if args.prefill_compile_mode != "off" else weights
        variants["slimline"] = lambda idx: slim(idx)[0]
    for name, fn in variants.items():
        try:
            started = time.perf_counter()
            out = fn(batch)
            sync(device)
            first_s = time.perf_counter() - started
            row["prefill"][name] = timed_blocks(lambda: fn(batch), args.prefill_reps, 1, device)
            row["prefill"][name]["first_call_s"] = first_s
            row["prefill"][name]["logits_relative_error_vs_eager"] = relative_error(out, reference)
        except Exception as error:  # noqa: BLE001
            record_error(row["prefill"], name, error)
        save(args.out)


def ratios(row: dict) -> None:
    decode = row["decode"]
    slim = decode.get("slimline", {}).get("median")
    roofline = row.get("roofline_ms_per_token")
    row["ratios"] = {}
    for name, timing in decode.items():
        if "median" in timing:
            if roofline:
                timing["fraction_of_roofline"] = roofline / timing["median"]
            if slim and name != "slimline":
                row["ratios"][f"slimline / {name}"] = slim / timing["median"]
    for name, timing in decode.items():
        if name.startswith("slimline lowrank") and "median" in timing and slim:
            row["ratios"][f"speedup {name} over dense slimline"] = slim / timing["median"]
    prefill = row["prefill"]
    if "median" in prefill.get("slimline", {}):
        for name in ("eager", "compile"):
            if "median" in prefill.get(name, {}):
                row["ratios"][f"prefill slimline / {name}"] = prefill["slimline"]["median"] / prefill[name]["median"]


def table() -> str:
    lines = [f"device {RESULTS['device']}, copy {RESULTS['copy_bandwidth'].get('bytes_per_s') or 0:.3e} B/s"]
    for name, row in RESULTS["models"].items():
        roofline = row.get("roofline_ms_per_token")
        lines.append(f"\n{name}: {row.get('parameters', 0) / 1e6:.0f}M params, weight bytes "
                     f"{row.get('weight_bytes', 0) / 1e9:.3f} GB, roofline {roofline or float('nan'):.3f} ms/token")
        lines.append(f"  {'decode variant':<16} {'ms/token':>9} {'p10':>8} {'p90':>8} {'roofline':>9} {'slim/x':>7}")
        for variant, timing in row["decode"].items():
            if "median" not in timing:
                lines.append(f"  {variant:<16} ERROR {timing.get('error', '')[:100]}")
                continue
            ratio = row.get("ratios", {}).get(f"slimline / {variant}")
            lines.append(f"  {variant:<16} {timing['median']:9.3f} {timing['p10']:8.3f} {timing['p90']:8.3f} "
                         f"{timing.get('fraction_of_roofline', float('nan')):8.1%} "
                         f"{ratio if ratio is not None else float('nan'):7.3f}")
        for variant, timing in row["prefill"].items():
            if "median" not in timing:
                lines.append(f"  prefill {variant:<8} ERROR {timing.get('error', '')[:100]}")
                continue
            lines.append(f"  prefill {variant:<8} {timing['median']:9.3f} ms (rel. err. vs eager "
                         f"{timing.get('logits_relative_error_vs_eager', float('nan')):.2e})")
        if "lowrank" in row:
            low = row["lowrank"]
            lines.append(f"  lowrank: Linear params {low['linear_fraction_reached']:.1%} of dense (head included; "
                         f"layers {low['layers_fraction_reached']:.1%}), ranks "
                         + ", ".join(f"{k} {v['rank']}" for k, v in low["families"].items())
                         + f"; speedup over dense {row['ratios'].get(next((k for k in row['ratios'] if k.startswith('speedup')), ''), float('nan')):.3f}")
        for variant, profile in (row.get("profile_ms") or {}).items():
            if profile:
                lines.append(f"  profile {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()))
        for label, check in row["checks"].items():
            lines.append(f"  {'PASS' if check.get('passed') else 'FAIL'} {label}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items() if k != "passed"))
    if RESULTS["skipped"]:
        lines.append("skipped: " + "; ".join(RESULTS["skipped"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cuda_decode.json")
    parser.add_argument("--models", default="llama-1b,gpt-small")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per variant")
    parser.add_argument("--block", type=int, default=16, help="steps per timed block")
    parser.add_argument("--check-tokens", type=int, default=256, help="greedy tokens compared with eager")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--prefill-compile-mode", default="default")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-length", type=int, default=512)
    parser.add_argument("--prefill-reps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420, help="skip optional stages after this")
    parser.add_argument("--lowrank", type=float, default=0.5,
                        help="Linear-parameter fraction of the low-rank variant (head included; 0: none)")
    parser.add_argument("--lowrank-check-tokens", type=int, default=24)
    parser.add_argument("--pdl-ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="also time slimline without programmatic dependent launch")
    parser.add_argument("--hf-generate", action=argparse.BooleanOptionalAction, default=True,
                        help="time transformers' static-cache generate (Llama)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds, CPU or GPU")
    args = parser.parse_args()
    if args.smoke:
        args.context, args.new_tokens, args.block, args.check_tokens = 16, 4, 2, 6
        args.lowrank_check_tokens = 3
        args.prefill_batch, args.prefill_length, args.prefill_reps = 2, 16, 2
        if not torch.cuda.is_available():
            args.compile_mode = args.prefill_compile_mode = "off"
    args.max_length = args.context + max(args.new_tokens, args.check_tokens) + 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    RESULTS.update({
        "benchmark": "cuda_decode", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "versions": versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "models": {}, "skipped": [], "errors": []})
    RESULTS["copy_bandwidth"] = copy_bandwidth(device)
    save(args.out)
    for name in args.models.split(","):
        if name != args.models.split(",")[0] and over_budget(args, name):
            continue
        try:
            run_model(name, args, device, RESULTS["copy_bandwidth"].get("bytes_per_s"))
        except Exception as error:  # noqa: BLE001
            RESULTS["errors"].append(f"{name}: {type(error).__name__}: {error}"[:600])
            print(traceback.format_exc(), file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)
    RESULTS["seconds"] = time.perf_counter() - STARTED
    save(args.out)
    print(table())
    failed = [f"{m}: {c}" for m, row in RESULTS["models"].items() for c, check in row["checks"].items()
              if not check.get("passed")]
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
