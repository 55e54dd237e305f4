"""Monarch 4096→4096 on the GPU: slimline's fused Triton kernel vs dense cuBLAS vs the plain form.

    PYTHONPATH=. python3 benchmarks/monarch_gpu.py --out $OUT/monarch_gpu.json

One run, four cases (bf16, random Monarch factors, seeded): b=4 (half the dense parameters) at
M = 1, 16 and 4096 rows, and b=16 (1/8 of them) at M = 1. Per case, each a ratio measured in
this run:

* ``dense``     ``torch.nn.functional.linear(x, W)``, W the dense matrix the factors compute (cuBLAS);
* ``two_bmm``   slimline's plain form (reshape, bmm, permute, bmm, transpose), eager and under a
                CUDA graph;
* ``fused``     slimline's Triton kernel, the fastest correct config of a small local search over
                variants (rows / splitk / phased for decode, hybrid / stages for prefill), block
                sizes dividing the block dimensions, warps and stages: the local list of
                ``slimline.backends.cuda.monarch_kernel.candidate_configs`` (the autotuner's
                monarch_matmul lite space is that list too), cut to every ``rows`` config plus
                the likeliest older one (decode) or seven (prefill), to save device time.
                ``rows`` is two launches (h, then y) chained by programmatic dependent launch;
                its config without ``pdl`` shows what PDL is worth. Timed twice (``fused_again``);
* ``cublas_monarch`` (M = 4096) bmm, one permuting copy, bmm writing y through a strided view;
* ``cublas_strided`` (M = 4096) b bmm calls writing h permuted through strided views, one bmm for y.

PDL and the graph: every timed call of a ``rows`` config with ``pdl`` may start (and load its
weights) while the previous call drains, as it would after the layer before it in a model; the
dense and two-bmm calls run one after another, as cuBLAS launches them. Dense is timed again at
the end of each case (``dense_again``); the ratios use the faster of the two dense times.

Every variant is checked against the dense-from-Monarch reference (fp32 product of the same
factors) on fresh random inputs, its output poisoned with NaN first, *before* it is timed; a
variant that fails is reported and not timed. The fused kernel is checked again after timing.

Timing: where a call is short (M ≤ 16), a CUDA graph of many calls that cycle through enough
copies of the weights to spill the 60 MB L2 (≥ 256 MB in rotation), replayed; median and spread
of the per-call time over replays. M = 4096: CUDA events per call, median and spread.

Targets (issue 5): b=4 ≥ 1.8× over dense at M ∈ {1, 16}, ≥ 1.6× at M = 4096; b=16 ≥ 4× at
M = 1; fused ≥ 1.3× over two_bmm at M = 1 (judged against the CUDA-graph two_bmm, the stronger
baseline; the eager ratio is reported too).

``--smoke`` runs every code path at toy sizes on the CPU under ``TRITON_INTERPRET=1`` (no CUDA
graphs; times there mean nothing). Each case and variant is guarded: a failure is recorded and
the rest still run; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from slimline.monarch import monarch_forward, monarch_shape, random_factors

TARGETS = {("b4", 1): 1.8, ("b4", 16): 1.8, ("b4", 4096): 1.6, ("b16", 1): 4.0}
FUSED_OVER_TWO_BMM = 1.3
TOLERANCE = 2e-2          # ‖y − y_ref‖ / ‖y_ref‖ for bf16 outputs against the fp32 reference
ROTATION_BYTES = 256e6    # weights in rotation per timed variant: > 4× the H200's 60 MB L2
OLDER_DECODE_CONFIGS = 1  # splitk / phased configs beside the rows ones (compiling costs device time)
PREFILL_CONFIGS = 7


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_graph(calls: list, device: torch.device, replays: int = 12, min_calls: int = 128) -> dict:
    """Per-call µs of ``calls`` (closures), captured repeatedly into one CUDA graph and replayed."""
    for call in calls:  # warm-up: compile, allocate workspaces, outside the capture
        call()
    _sync(device)
    if device.type != "cuda":
        return time_eager(calls, device, reps=3)
    repeat = max(1, math.ceil(min_calls / len(calls)))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for call in calls:
                call()
    graph.replay()
    graph.replay()
    _sync(device)
    per_call = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (repeat * len(calls)))
    del graph
    return _summary(per_call, "cuda graph", repeat * len(calls))


def time_eager(calls: list, device: torch.device, reps: int = 30) -> dict:
    """Per-call µs, one call at a time (CUDA events on the GPU), cycling through ``calls``."""
    for call in calls:
        call()
    _sync(device)
    times = []
    for index in range(reps):
        call = calls[index % len(calls)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1e6)
    return _summary(times, "eager, events" if device.type == "cuda" else "eager, wall clock", 1)


def _summary(times_us: list, method: str, calls: int) -> dict:
    ordered = sorted(times_us)
    return {"median_us": statistics.median(ordered), "min_us": ordered[0], "max_us": ordered[-1],
            "samples": len(ordered), "calls_per_sample": calls, "method": method}


# ---------------------------------------------------------------------------------------------
# the variants


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    reference, actual = reference.double(), actual.double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    return float((actual - reference).norm() / reference.norm().clamp(min=1e-300))


def cublas_strided(x_MK, right_bPQ, left_bQS, shape, out_MN, hidden_MbbT):
    """No permuting copy: b bmm calls write h[m, l, k, j] through strided views, one bmm writes y."""
    b, T, P, S = shape.nblocks, shape.slab_rank, shape.block_in, shape.block_out
    M = x_MK.shape[0]
    x_bMP = x_MK.view(M, b, P).transpose(0, 1)
    for group in range(b):  # h_l[:, k·T + j] = x_k @ R_k[:, l·T + j]
        torch.bmm(x_bMP, right_bPQ[:, :, group * T:(group + 1) * T], out=hidden_MbbT[:, group].transpose(0, 1))
    torch.bmm(hidden_MbbT.view(M, b, b * T).transpose(0, 1), left_bQS,
              out=out_MN.view(M, b, S).transpose(0, 1))
    return out_MN


def cublas_monarch(x_MK, right_bPQ, left_bQS, shape, out_MN):
    """bmm on the strided input blocks, one permuting copy, bmm writing y through a strided view."""
    b, T, P, S = shape.nblocks, shape.slab_rank, shape.block_in, shape.block_out
    M = x_MK.shape[0]
    h_bMQ = torch.bmm(x_MK.view(M, b, P).transpose(0, 1), right_bPQ)
    h_bMQ = h_bMQ.view(b, M, b, T).permute(2, 1, 0, 3).reshape(b, M, b * T)
    torch.bmm(h_bMQ, left_bQS, out=out_MN.view(M, b, S).transpose(0, 1))
    return out_MN


class Case:
    """One (b, M) case: weights in rotation, the reference, and the variants' closures."""

    def __init__(self, name: str, size: int, nblocks: int, rows: int, device, dtype, seed: int):
        self.name, self.rows = name, rows
        self.shape = monarch_shape(size, size, nblocks)
        generator = torch.Generator().manual_seed(seed)
        factors = random_factors(self.shape, generator).to(device=device)    # float32
        self.right = factors.right_bPQ.to(dtype)
        self.left = factors.left_bQS.to(dtype)
        # the dense layer computes the same matrix (rounded once to bf16); the reference is the
        # fp32 product of the bf16 factors: what every Monarch variant should compute
        self.dense = factors.dense().to(dtype).contiguous()
        self.reference_weight = type(factors)(self.shape, self.right.float(), self.left.float()).dense()
        self.x = torch.randn(rows, size, generator=generator).to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        monarch_bytes = (self.right.numel() + self.left.numel()) * self.right.element_size()
        dense_bytes = self.dense.numel() * self.dense.element_size()
        self.copies_monarch = max(1, min(64, math.ceil(ROTATION_BYTES / monarch_bytes)))
        self.copies_dense = max(1, min(64, math.ceil(ROTATION_BYTES / dense_bytes)))
        if rows > 16 or device.type != "cuda":  # compute-bound (or a smoke run): no rotation
            self.copies_monarch = self.copies_dense = 1
        self.monarch_bytes, self.dense_bytes = monarch_bytes, dense_bytes

    def fresh_check_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn_like(self.x)
        return x, x.float() @ self.reference_weight.T


def _check(name: str, run, case: Case, rows: list) -> bool:
    """Run ``run(x, out)`` on fresh input into a NaN-poisoned ``out``; record the error."""
    x, reference = case.fresh_check_input()
    out = torch.full((case.rows, case.shape.out_features), float("nan"), device=case.device,
                     dtype=case.dtype)
    result = run(x, out)
    if result is not None and result is not out:
        out.copy_(result)
    _sync(case.device)
    error = relative_error(reference, out)
    ok = error <= TOLERANCE
    rows.append({"variant": name, "check_rel_error": error, "check_ok": ok})
    return ok


def run_case(case: Case, sms: int, budget_end: float, log) -> dict:
    from slimline.backends.cuda.monarch_kernel import MonarchKernel, candidate_configs, local_search

    result: dict = {"case": case.name, "nblocks": case.shape.nblocks, "rows": case.rows,
                    "in": case.shape.in_features, "out": case.shape.out_features,
                    "slab_rank": case.shape.slab_rank, "monarch_params": case.shape.params,
                    "dense_params": case.shape.dense_params, "monarch_bytes": case.monarch_bytes,
                    "dense_bytes": case.dense_bytes, "copies_in_rotation": {
                        "monarch": case.copies_monarch, "dense": case.copies_dense},
                    "checks": [], "variants": {}, "search": []}
    device, shape = case.device, case.shape
    small = case.rows <= 16
    timer = (lambda calls: time_graph(calls, device)) if small else (lambda calls: time_eager(calls, device))
    dense_copies = [case.dense] + [case.dense.clone() for _ in range(case.copies_dense - 1)]
    right_copies = [case.right] + [case.right.clone() for _ in range(case.copies_monarch - 1)]
    left_copies = [case.left] + [case.left.clone() for _ in range(case.copies_monarch - 1)]
    x = case.x

    def guarded(name: str, body) -> None:
        try:
            body()
        except Exception as error:  # one variant's failure must not take the rest down
            result["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            log(f"  {case.name} {name}: FAILED {type(error).__name__}: {str(error)[:200]}")

    # dense cuBLAS
    dense_calls = []

    def dense_variant():
        if _check("dense", lambda xi, out: torch.nn.functional.linear(xi, case.dense), case, result["checks"]):
            dense_calls.extend(lambda w=w: F.linear(x, w) for w in dense_copies)
            result["variants"]["dense"] = timer(dense_calls)
    guarded("dense", dense_variant)

    # plain two-bmm form, eager and (small M) under a CUDA graph
    def two_bmm_variant():
        if _check("two_bmm", lambda xi, out: monarch_forward(xi, case.right, case.left, shape), case,
                  result["checks"]):
            calls = [lambda r=r, l=l: monarch_forward(x, r, l, shape) for r, l in zip(right_copies, left_copies)]
            result["variants"]["two_bmm_eager"] = time_eager(calls, device)
            if small:
                result["variants"]["two_bmm_graph"] = time_graph(calls, device)
    guarded("two_bmm", two_bmm_variant)

    if not small:
        def cublas_variant():
            if _check("cublas_monarch", lambda xi, out: cublas_monarch(xi, case.right, case.left, shape, out),
                      case, result["checks"]):
                out = torch.empty(case.rows, shape.out_features, device=device, dtype=case.dtype)
                calls = [lambda r=r, l=l: cublas_monarch(x, r, l, shape, out)
                         for r, l in zip(right_copies, left_copies)]
                result["variants"]["cublas_monarch"] = timer(calls)
        guarded("cublas_monarch", cublas_variant)

        def cublas_strided_variant():
            b, T = shape.nblocks, shape.slab_rank
            hidden = torch.empty(case.rows, b, b, T, device=device, dtype=case.dtype)
            if _check("cublas_strided", lambda xi, out: cublas_strided(xi, case.right, case.left, shape, out, hidden),
                      case, result["checks"]):
                out = torch.empty(case.rows, shape.out_features, device=device, dtype=case.dtype)
                calls = [lambda r=r, l=l: cublas_strided(x, r, l, shape, out, hidden)
                         for r, l in zip(right_copies, left_copies)]
                result["variants"]["cublas_strided"] = timer(calls)
        guarded("cublas_strided", cublas_strided_variant)

    # fused Triton kernel: local search (checked, then timed), the winner timed like the others
    def fused_variant():
        kernels = [MonarchKernel.from_factors(r, l, shape) for r, l in zip(right_copies, left_copies)]
        configs = candidate_configs(shape, case.rows, sms, limit=10)
        if small:   # every rows config (the new design), the two likeliest of the older ones
            configs = [c for c in configs if c.variant == "rows"] + \
                      [c for c in configs if c.variant != "rows"][:OLDER_DECODE_CONFIGS]
        else:       # hybrid tilings first (the fastest kind so far), two all-Triton
            configs = [c for c in configs if c.variant == "hybrid"][:PREFILL_CONFIGS - 2] + \
                      [c for c in configs if c.variant == "stages"][:2]
        x_check, reference = case.fresh_check_input()

        outs = [torch.empty(case.rows, shape.out_features, device=device, dtype=case.dtype) for _ in kernels]

        def search_timer(config):
            """The config over every weight copy in rotation, as the winner is timed below."""
            calls = [lambda k=k, o=o: k(x, config, out=o) for k, o in zip(kernels, outs)]
            return timer(calls)["median_us"] / 1e3

        rows = local_search(kernels[0], x_check, configs, reference, TOLERANCE, search_timer,
                            deadline=budget_end)
        for row in rows:
            config = row.pop("kernel_config", None)
            row["us"] = row.pop("ms") * 1e3 if "ms" in row else None
            row["_config"] = config
        result["search"] = [{k: v for k, v in row.items() if k != "_config"} for row in rows]
        winner = next((row["_config"] for row in rows if row["ok"]), None)
        if winner is None:
            raise RuntimeError("no kernel config passed its check: " +
                               "; ".join(f"{r['config']}: {r.get('why')}" for r in rows[:4]))
        result["fused_config"] = winner.label()
        _check("fused", lambda xi, out: kernels[0](xi, winner, out=out), case, result["checks"])
        calls = [lambda k=k, o=o: k(x, winner, out=o) for k, o in zip(kernels, outs)]
        result["variants"]["fused"] = timer(calls)
        result["variants"]["fused_again"] = timer(calls)   # the same version twice: the spread
        if winner.variant in ("hybrid", "stages"):        # launch 1 alone: where the time goes
            stage1 = [lambda k=k: k._hidden(x, winner, group_major=winner.variant == "hybrid") for k in kernels]
            result["variants"]["fused_launch1_only"] = timer(stage1)
        # again after timing: the workspaces must still be clean, the counters reset
        if not _check("fused_after_timing", lambda xi, out: kernels[0](xi, winner, out=out), case,
                      result["checks"]):
            result["variants"]["fused"]["error"] = "wrong after timing (workspace or counter state)"
    guarded("fused", fused_variant)
    if dense_calls:  # dense again, last: drift over the case (clocks, heat) shows here
        guarded("dense_again", lambda: result["variants"].__setitem__("dense_again", timer(dense_calls)))

    _ratios(case, result)
    return result


def _ratios(case: Case, result: dict) -> None:
    variants = result["variants"]

    def median(name):
        found = variants.get(name, {})
        if "error" in found:
            return None
        return found.get("median_us")

    # dense is timed at the start and the end of the case: the ratios use the faster of the two
    dense_times = [t for t in (median("dense"), median("dense_again")) if t]
    dense, fused = (min(dense_times) if dense_times else None), median("fused")
    monarchs = {n: median(n) for n in ("fused", "cublas_monarch", "cublas_strided", "two_bmm_graph",
                                        "two_bmm_eager")
                if median(n) is not None}
    best_name = min(monarchs, key=monarchs.get) if monarchs else None
    ratios = {}
    if dense and best_name:
        ratios["dense_us_used"] = dense
        ratios["best_monarch"] = best_name
        ratios["best_over_dense"] = dense / monarchs[best_name]
    if dense and fused:
        ratios["fused_over_dense"] = dense / fused
    for baseline in ("two_bmm_graph", "two_bmm_eager"):
        if fused and median(baseline):
            ratios[f"fused_over_{baseline}"] = median(baseline) / fused
    target = TARGETS.get((f"b{case.shape.nblocks}", case.rows))
    if target is not None:
        ratios["target_over_dense"] = target
        ratios["met_over_dense"] = bool(ratios.get("best_over_dense", 0) >= target)
    if case.rows == 1:
        ratios["target_fused_over_two_bmm"] = FUSED_OVER_TWO_BMM
        ratios["met_fused_over_two_bmm"] = bool(ratios.get("fused_over_two_bmm_graph", 0) >= FUSED_OVER_TWO_BMM)
    for name, entry in variants.items():
        us = entry.get("median_us")
        if us:
            weight = case.dense_bytes if name == "dense" else case.monarch_bytes
            moved = weight + (case.x.numel() * 2) * case.x.element_size()
            flops = 2 * case.rows * (case.shape.dense_params if name == "dense" else case.shape.params)
            entry["gb_per_s"] = moved / (us * 1e-6) / 1e9
            entry["tflop_per_s"] = flops / (us * 1e-6) / 1e12
    result["ratios"] = ratios


# ---------------------------------------------------------------------------------------------
# main


def _environment(device: torch.device) -> dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "device": str(device),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda)
        info["l2_mb"] = round(getattr(props, "L2_cache_size", 0) / 1e6, 1)
    return info


def _copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy, bytes read + written per second (GB/s): the memory ceiling."""
    if device.type != "cuda":
        return None
    source = torch.empty(1 << 29, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    timing = time_eager([lambda: target.copy_(source)], device, reps=20)
    return 2 * source.numel() / (timing["median_us"] * 1e-6) / 1e9


def _table(results: list, environment: dict) -> str:
    size = next((r["in"] for r in results if "in" in r), "?")
    lines = [f"Monarch {size}→{size}, "
             f"{environment.get('gpu', environment['device'])}, torch {environment['torch']}, "
             f"triton {environment['triton']} (µs per call, median)"]
    header = f"{'case':<10}{'dense':>9}{'dense2':>8}{'2bmm eag':>10}{'2bmm grf':>10}{'cublasM':>9}{'cublasS':>9}" \
             f"{'fused':>10}{'fused2':>10}" \
             f"{'best/dense':>12}{'target':>8}{'fused/2bmm':>12}  fused config"
    lines += [header, "-" * len(header)]
    for result in results:
        variants = result.get("variants", {})

        def cell(name):
            entry = variants.get(name)
            if entry is None:
                return "—"
            if "error" in entry and "median_us" not in entry:
                return "FAIL"
            value = f"{entry['median_us']:.1f}"
            return value + ("!" if "error" in entry else "")

        ratios = result.get("ratios", {})
        best = ratios.get("best_over_dense")
        target = ratios.get("target_over_dense")
        mark = "" if target is None else (" ok" if ratios.get("met_over_dense") else " MISS")
        fused_two = ratios.get("fused_over_two_bmm_graph")
        fused_mark = ""
        if "met_fused_over_two_bmm" in ratios:
            fused_mark = " ok" if ratios["met_fused_over_two_bmm"] else " MISS"
        lines.append(f"{result['case']:<10}{cell('dense'):>9}{cell('dense_again'):>8}{cell('two_bmm_eager'):>10}"
                     f"{cell('two_bmm_graph'):>10}{cell('cublas_monarch'):>9}{cell('cublas_strided'):>9}"
                     f"{cell('fused'):>10}{cell('fused_again'):>10}"
                     f"{(f'{best:.2f}x' if best else '—') + mark:>12}"
                     f"{(f'{target}x' if target else '—'):>8}"
                     f"{(f'{fused_two:.2f}x' if fused_two else '—') + fused_mark:>12}  "
                     f"{result.get('fused_config', result.get('error', ''))[:60]}")
    lines.append("best/dense: the fastest correct Monarch implementation over dense cuBLAS; "
                 "fused/2bmm: slimline's Triton kernel over the CUDA-graph two-bmm form; dense2, fused2: "
                 "the same version timed again (spread)")
    return "\n".join(lines)


PLAN = [("b4 M=1", 4, 1), ("b4 M=16", 4, 16), ("b4 M=4096", 4, 4096), ("b16 M=1", 16, 1)]
SMOKE_ROWS = {4096: 64}


def run_one(index: int, args, device: torch.device, budget_s: float) -> dict:
    """One case of PLAN, in this process."""
    name, nblocks, rows = PLAN[index]
    size = 256 if args.smoke else 4096
    rows = SMOKE_ROWS.get(rows, rows) if args.smoke else rows
    dtype = torch.float32 if args.smoke else torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    case = Case(name, size, nblocks, rows, device, dtype, seed=index)
    return run_case(case, sms, time.time() + budget_s, print)


def _child(args, device: torch.device) -> int:
    """``--case I``: run one case and write its result (the parent merges them)."""
    try:
        result = run_one(args.case, args, device, args.budget_s)
    except Exception as error:
        name = PLAN[args.case][0]
        result = {"case": name, "error": f"{type(error).__name__}: {error}"[:400],
                  "traceback": traceback.format_exc()[-2000:]}
        print(f"{name}: FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _run_cases(args, device: torch.device, started: float) -> list[dict]:
    """Each case in its own process: a kernel fault or a hang loses that case, not the run."""
    import subprocess
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, _nblocks, _rows) in enumerate(PLAN):
            remaining = len(PLAN) - index
            share = max(15.0, (args.budget_s - (time.time() - started)) / remaining)
            path = Path(scratch) / f"case{index}.json"
            command = [sys.executable, __file__, "--case", str(index), "--out", str(path),
                       "--budget-s", f"{share:.0f}"] + (["--smoke"] if args.smoke else [])
            print(f"{name}: started at {time.time() - started:.0f} s, search budget {share:.0f} s", flush=True)
            try:
                completed = subprocess.run(command, timeout=share + 90, env=dict(os.environ))
                if path.exists():
                    results.append(json.loads(path.read_text()))
                else:
                    results.append({"case": name, "error": f"case process exited {completed.returncode} "
                                                           "without a result"})
            except subprocess.TimeoutExpired:
                results.append({"case": name, "error": f"case process killed after {share + 90:.0f} s"})
            except Exception as error:
                results.append({"case": name, "error": f"{type(error).__name__}: {error}"[:400]})
            if "error" in results[-1]:
                print(f"{name}: {results[-1]['error']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("monarch_gpu.json"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=100.0,
                        help="seconds for all the kernel-config searches together")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--in-process", action="store_true",
                        help="run the cases in this process (no isolation; for debugging)")
    args = parser.parse_args(argv)
    started = time.time()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no GPU: running the smoke sizes on the CPU under TRITON_INTERPRET", file=sys.stderr)
        args.smoke = True
        os.environ["TRITON_INTERPRET"] = "1"
    if args.case is not None:
        return _child(args, device)

    environment = {"device": str(device)}
    try:
        environment = _environment(device)
        environment["copy_gb_per_s"] = _copy_bandwidth(device)
    except Exception as error:
        environment["error"] = repr(error)
    if args.in_process:
        results = []
        for index in range(len(PLAN)):
            try:
                results.append(run_one(index, args, device, args.budget_s / len(PLAN)))
            except Exception as error:
                results.append({"case": PLAN[index][0], "error": f"{type(error).__name__}: {error}"[:400]})
    else:
        results = _run_cases(args, device, started)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    report = {"benchmark": "monarch_gpu", "command": "PYTHONPATH=. python3 benchmarks/monarch_gpu.py "
                                                     "--out $OUT/monarch_gpu.json",
              "environment": environment, "smoke": args.smoke, "dtype": str(dtype),
              "tolerance": TOLERANCE, "targets": {
                  "over_dense": {f"{k[0]} M={k[1]}": v for k, v in TARGETS.items()},
                  "fused_over_two_bmm_at_M1": FUSED_OVER_TWO_BMM},
              "cases": results, "seconds": time.time() - started}
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    except Exception as error:
        print(f"could not write {args.out}: {error}", file=sys.stderr)
    print()
    for result in results:
        for row in result.get("search", []):
            state = f"{row['us']:.1f} µs" if row.get("us") else row.get("why", "")
            print(f"  search {result['case']:<10} {row['config']:<52} {state}")
    print()
    print(_table(results, environment))
    print(f"({time.time() - started:.0f} s; JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
