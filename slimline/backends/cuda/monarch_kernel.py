"""Triton kernels for a Monarch layer ``y = x · (P·L·Pᵀ·R)ᵀ + bias``: both block-diagonal
products and the permutation in one launch, the intermediate kept on chip.

Shape letters as in :mod:`slimline.monarch.projection` (K in, N out, b blocks, P = K/b,
S = N/b, T slab rank, Q = b·T) plus M rows of ``x``. The one fact every kernel here rests on:
the right factor's rows that feed left block l — row (l, j) of every block k — feed *only* left
block l. Repacked group-major,

    w1_bQP[l, k·T + j, π]  = right_bPQ[k, π, l·T + j]     group l's first-stage rows, (Q, P) each
    w2_bQS[l, k·T + j, σ]  = left_bQS[l, k·T + j, σ]      group l's second stage, (Q, S)
    w2_bSQ[l, σ, k·T + j]  = left_bQS[l, k·T + j, σ]      the same, output-major

a layer is b independent chains ``h_l = blockdiag(x) @ w1[l]ᵀ`` (Q values from the b input
blocks) then ``y_l = h_l @ w2[l]`` (S outputs), and the permutation is only addressing.

Five variants; each is a straight line of tile functions:

``splitk`` (decode, M ≤ 16; one launch)
    program (m-tile, l, c) owns BLOCK_T of group l's intermediate values: it reads its BLOCK_T
    rows of ``w1[l]`` (one input block k), computes ``h`` for them in registers, multiplies by its
    BLOCK_T rows of ``w2[l]`` and adds the partial ``y_l`` into an fp32 workspace with atomics.
    Every weight byte is read once, by one program. The last program of a group (an acq_rel
    ticket) reads the sums back at L2, resets the workspace to zero, adds the bias and writes
    ``y``: the workspace stays clean between calls, so no memset launch is needed.
``phased`` (decode; one persistent launch, grid ≤ the number of SMs)
    phase 1 computes ``h`` tiles and stores them (fp32, a few KB); a per-group counter says when
    group l is complete; phase 2 computes output tiles ``y_l[σ…] = w2_bSQ[l, σ…] @ h_l``, with no
    reduction. Every program finishes its phase-1 work before it waits, and all programs are
    resident at once, so the wait cannot deadlock; the spin is bounded all the same (a result
    past the bound is wrong, and the benchmark's check says so). Under ``TRITON_INTERPRET`` the
    two phases run as two launches (the interpreter runs programs one after the other).
    ``prefetch`` (at most one phase-2 task per program): the phase-2 weight tile is loaded before
    phase 1 starts, so all of a program's weight bytes are in flight at once and only ``h``
    waits on the other programs.
``stages`` (prefill, large M; two launches)
    the same two tile functions as ``phased``, as two tensor-core GEMM launches; the intermediate
    goes through memory in the permuted layout, so neither launch moves data to permute it.
``hybrid`` (prefill; two launches)
    launch 1 of ``stages`` writes h group-major, (b, M, Q); launch 2 is one cuBLAS ``bmm``
    writing y through a strided view of the (M, N) output — again no permuting copy.

``rows`` (decode, M ≤ 16; two launches of one kernel, PDL-chained)
    launch 1 computes h, launch 2 y, each as a row-block GEMV/GEMM: a program owns BLOCK_R whole
    weight rows (w1_bQP rows for h, w2_bSQ rows for y) and reads the slice of x or h they need,
    found by addressing: ``slice = (row // SEG) % b``. The whole (BLOCK_R, row) tile is one load,
    issued before the program waits on its predecessor (programmatic dependent launch), so a
    launch has every weight byte in flight at once and launch 2 fetches its weights while launch
    1 drains; h (a few KB at M = 1) goes through L2. The looped form (K chunks, pipelined) can ask
    L2 for its tile before the wait instead (``prefetch``). Many rows per program, wide loads, no
    atomics, no spin: the one-launch variants' dependent chain (load, reduce, signal, wait,
    reload) is latency-bound. Measured on the H200 (benchmarks/results/monarch_gpu.md), 4096²
    bf16: b=4 M=1 6.3 µs (2.7 TB/s; 9.4 µs without PDL; phased 11.3), b=16 M=1 2.6–3.4 µs,
    b=4 M=16 8.8 µs (the plain single-shot tile; ``split`` and ``prefetch`` were slower there).

"The intermediate kept on chip" holds for ``splitk`` (h never leaves registers) and, up to a few
KB of h through L2, for ``phased``; at large M no tiling keeps a (BLOCK_M, Q) h and a
(BLOCK_M, S) accumulator on chip without recomputing h, so ``stages``/``hybrid`` pass h through
memory and rely on tensor-core GEMM speed instead.

Block sizes divide the block dimensions (BLOCK_T | T, BLOCK_P | P, BLOCK_S | S, BLOCK_Q | Q), so
no weight load is masked. :func:`candidate_configs` gives the lite search space (block sizes,
warps, stages) for a shape and M; :func:`local_search` measures it on the GPU. One config per
launch: no multi-config ``@triton.autotune`` (it breaks the interpreter).

Workspaces belong to one :class:`MonarchKernel` and are reused by every call (CUDA-graph safe);
calls on one kernel object must not run concurrently on two streams.

Dtypes: bf16 and fp16 on the GPU (tensor cores, fp32 accumulation), fp32 for tests (dot products
in IEEE fp32). Written for triton ≥ 3.6 (the GPU machine) and tested on 3.9's interpreter;
:func:`compile_for_target` compiles a config for sm_90 without a GPU (with 3.9 here: every config
of the 4096² search spaces compiles; the prefill GEMMs are software-pipelined onto wgmma).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from slimline.monarch.projection import MonarchShape

try:  # programmatic dependent launch (Hopper): a kernel starts while its predecessor drains
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:
    _gdc_launch_dependents = _gdc_wait = None

__all__ = ["KernelConfig", "MonarchKernel", "VARIANTS", "candidate_configs", "local_search",
           "autotune_timer", "cached_config", "check_config", "compile_for_target", "pack_weights", "relative_error", "interpreting",
           "SPIN_LIMIT"]

VARIANTS = ("splitk", "phased", "stages", "hybrid", "rows")
SPIN_LIMIT = 1 << 16  # polls of a counter before phased gives up (a wrong result)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# tile functions


@triton.jit
def _matmul_nt_tile(a_ptr, stride_am, a_col0, a_cols, M, m0, w_ptr, w_row0,
                    REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, CACHE: tl.constexpr):
    """acc = A[m0:m0+BLOCK_M, a_col0:a_col0+REDUCE] @ W[w_row0:w_row0+BLOCK_R, :REDUCE]ᵀ in fp32.

    W rows are REDUCE long and contiguous; A columns at or past ``a_cols`` read as zero (padding).
    BLOCK_M == 1 is the vector form (one row, no tensor cores): shape (BLOCK_R,).
    """
    offs_r = tl.arange(0, BLOCK_R)
    w_rows = w_row0 + offs_r
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, REDUCE, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cols = a_col0 + offs_k
            # masks are built full-size: the interpreter rejects block & scalar masks
            a = tl.load(a_ptr + m0.to(tl.int64) * stride_am + cols,
                        mask=(cols < a_cols) & (m0 + 0 * cols < M), other=0.0, cache_modifier=CACHE)
            w = tl.load(w_ptr + w_rows[:, None] * REDUCE + offs_k[None, :])
            acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    else:
        rows_m = m0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, REDUCE, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cols = a_col0 + offs_k
            a = tl.load(a_ptr + rows_m[:, None].to(tl.int64) * stride_am + cols[None, :],
                        mask=(rows_m[:, None] < M) & (cols[None, :] < a_cols), other=0.0,
                        cache_modifier=CACHE)
            w = tl.load(w_ptr + w_rows[:, None] * REDUCE + offs_k[None, :])
            acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _matmul_nt_loaded(a_ptr, stride_am, M, m0, w, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr,
                      PRECISION: tl.constexpr, CACHE: tl.constexpr):
    """acc = A[m0:m0+BLOCK_M, :REDUCE] @ wᵀ for a weight tile ``w`` (BLOCK_R, REDUCE) already loaded."""
    offs_k = tl.arange(0, REDUCE)
    if BLOCK_M == 1:
        a = tl.load(a_ptr + m0.to(tl.int64) * stride_am + offs_k, mask=m0 + 0 * offs_k < M,
                    other=0.0, cache_modifier=CACHE)
        acc = tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    else:
        rows_m = m0 + tl.arange(0, BLOCK_M)
        a = tl.load(a_ptr + rows_m[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                    mask=(rows_m[:, None] < M) & (offs_k[None, :] < REDUCE), other=0.0,
                    cache_modifier=CACHE)
        acc = tl.dot(a.to(w.dtype), tl.trans(w), input_precision=PRECISION)
    return acc


@triton.jit
def _store_tile(ptr, stride_m, M, m0, col0, cols_valid, tile, bias_ptr,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """ptr[m0…, col0…] = tile (+ bias[col…]) in ptr's dtype; rows ≥ M and cols ≥ cols_valid skipped."""
    cols = col0 + tl.arange(0, BLOCK_C)
    col_ok = cols < cols_valid
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if BLOCK_M == 1:
        if HAS_BIAS:
            tile = tile + bias
        tl.store(ptr + m0.to(tl.int64) * stride_m + cols, tile.to(ptr.dtype.element_ty),
                 mask=col_ok & (m0 + 0 * cols < M))
    else:
        if HAS_BIAS:
            tile = tile + bias[None, :]
        rows = m0 + tl.arange(0, BLOCK_M)
        tl.store(ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :],
                 tile.to(ptr.dtype.element_ty), mask=(rows[:, None] < M) & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# splitk: one launch, partial sums through fp32 atomics


@triton.jit
def _splitk_kernel(x_ptr, w1_ptr, w2_ptr, bias_ptr, y_ptr, acc_ptr, count_ptr,
                   M, K, N, stride_xm, stride_ym,
                   NB: tl.constexpr, P: tl.constexpr, S: tl.constexpr, T: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr):
    Q: tl.constexpr = NB * T
    CHUNKS: tl.constexpr = Q // BLOCK_T
    WIDTH: tl.constexpr = NB * S                       # workspace row length
    pid_m = tl.program_id(0)
    group = tl.program_id(1)                           # l
    chunk = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    q0 = chunk * BLOCK_T                               # first intermediate (k, j) of the chunk
    offs_t = tl.arange(0, BLOCK_T)
    w2_rows = group * Q + q0 + offs_t
    if BLOCK_S == S:  # issue the second stage's weight load now: it waits on nothing
        w2_all = tl.load(w2_ptr + w2_rows[:, None] * S + tl.arange(0, S)[None, :])
    # stage 1: h = x[:, k·P…] @ w1[l, q0…]ᵀ, kept in registers (k = q0 // T: one input block)
    hidden = _matmul_nt_tile(x_ptr, stride_xm, (q0 // T) * P, K, M, m0, w1_ptr, group * Q + q0,
                             P, BLOCK_M, BLOCK_T, BLOCK_P, PRECISION, "")
    # stage 2: this chunk's share of y_l = h @ w2[l, q0…, :], summed across chunks with atomics
    for s0 in tl.static_range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        if BLOCK_S == S:
            w2 = w2_all
        else:
            w2 = tl.load(w2_ptr + w2_rows[:, None] * S + offs_s[None, :])
        cols = group * S + offs_s
        if BLOCK_M == 1:
            part = tl.sum(hidden[:, None] * w2.to(tl.float32), axis=0)
            tl.atomic_add(acc_ptr + m0 * WIDTH + cols, part, mask=m0 + 0 * cols < M, sem="relaxed")
        else:
            part = tl.dot(hidden.to(w2.dtype), w2, input_precision=PRECISION)
            rows = m0 + tl.arange(0, BLOCK_M)
            tl.atomic_add(acc_ptr + rows[:, None] * WIDTH + cols[None, :], part,
                          mask=rows[:, None] < M, sem="relaxed")
    # the last program of (m-tile, l) finishes the group: read the sums at L2, re-zero, write y
    tl.debug_barrier()
    counter = count_ptr + pid_m * NB + group
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == CHUNKS - 1:
        tl.debug_barrier()
        for s0 in tl.static_range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            cols = group * S + offs_s
            if BLOCK_M == 1:
                ptrs = acc_ptr + m0 * WIDTH + cols
                zero = tl.zeros((BLOCK_S,), dtype=tl.float32)
                total = tl.atomic_add(ptrs, zero, mask=m0 + 0 * cols < M, sem="relaxed")
                tl.store(ptrs, zero, mask=m0 + 0 * cols < M)
            else:
                rows = m0 + tl.arange(0, BLOCK_M)
                ptrs = acc_ptr + rows[:, None] * WIDTH + cols[None, :]
                zero = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
                total = tl.atomic_add(ptrs, zero, mask=rows[:, None] < M, sem="relaxed")
                tl.store(ptrs, zero, mask=rows[:, None] < M)
            _store_tile(y_ptr, stride_ym, M, m0, group * S + s0, N, total, bias_ptr,
                        HAS_BIAS, BLOCK_M, BLOCK_S)
        tl.atomic_xchg(counter, 0)


# ---------------------------------------------------------------------------------------------
# phased and stages: stage-1 tiles, then output tiles; h through memory in the permuted layout


@triton.jit
def _hidden_task(x_ptr, w1_ptr, h_ptr, count_ptr, M, K, stride_xm, h_stride_m, h_stride_l, task,
                 NB: tl.constexpr, P: tl.constexpr, T: tl.constexpr, SIGNAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Stage-1 task (m-tile, l, c): h[m…, l, c·BLOCK_T…] = x[m…, k·P…] @ w1[l, c·BLOCK_T…]ᵀ."""
    Q: tl.constexpr = NB * T
    CHUNKS: tl.constexpr = Q // BLOCK_T
    pid_m = task // (NB * CHUNKS)
    group = (task // CHUNKS) % NB
    q0 = (task % CHUNKS) * BLOCK_T
    m0 = pid_m * BLOCK_M
    hidden = _matmul_nt_tile(x_ptr, stride_xm, (q0 // T) * P, K, M, m0, w1_ptr, group * Q + q0,
                             P, BLOCK_M, BLOCK_T, BLOCK_P, PRECISION, "")
    _store_tile(h_ptr + group * h_stride_l, h_stride_m, M, m0, q0, Q, hidden, h_ptr, False,
                BLOCK_M, BLOCK_T)
    if SIGNAL:
        tl.debug_barrier()
        tl.atomic_add(count_ptr + pid_m * NB + group, 1, sem="release")


@triton.jit
def _output_task(h_ptr, w2_ptr, bias_ptr, y_ptr, count_ptr, M, N, stride_ym, h_stride_m,
                 h_stride_l, task, spin_limit, w2_loaded,
                 NB: tl.constexpr, S: tl.constexpr, T: tl.constexpr, HAS_BIAS: tl.constexpr,
                 WAIT: tl.constexpr, LOADED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Stage-2 task (m-tile, l, σ-tile): y[m…, l·S + σ…] = h[m…, l, :] @ w2_bSQ[l, σ…]ᵀ + bias.

    ``LOADED``: ``w2_loaded`` is this task's (BLOCK_S, Q) weight tile, loaded before the wait.
    """
    Q: tl.constexpr = NB * T
    CHUNKS: tl.constexpr = Q // BLOCK_T
    TILES: tl.constexpr = S // BLOCK_S
    pid_m = task // (NB * TILES)
    group = (task // TILES) % NB
    s0 = (task % TILES) * BLOCK_S
    m0 = pid_m * BLOCK_M
    if WAIT:  # group l's h complete? (phase 1 of every program runs before any phase 2)
        counter = count_ptr + pid_m * NB + group
        spins = 0
        while (tl.atomic_add(counter, 0, sem="acquire") < CHUNKS) & (spins < spin_limit):
            spins += 1
        tl.debug_barrier()
    if LOADED:
        out = _matmul_nt_loaded(h_ptr + group * h_stride_l, h_stride_m, M, m0, w2_loaded, Q,
                                BLOCK_M, PRECISION, ".cg")
    else:
        out = _matmul_nt_tile(h_ptr + group * h_stride_l, h_stride_m, 0, Q, M, m0, w2_ptr,
                              group * S + s0, Q, BLOCK_M, BLOCK_S, BLOCK_Q, PRECISION, ".cg")
    _store_tile(y_ptr, stride_ym, M, m0, group * S + s0, N, out, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_S)
    if WAIT:  # the last reader of group l resets both counters for the next call
        tl.debug_barrier()
        done = count_ptr + tl.cdiv(M, BLOCK_M) * NB + pid_m * NB + group
        if tl.atomic_add(done, 1, sem="acq_rel") == TILES - 1:
            tl.atomic_xchg(count_ptr + pid_m * NB + group, 0)
            tl.atomic_xchg(done, 0)


@triton.jit
def _phased_kernel(x_ptr, w1_ptr, w2_ptr, bias_ptr, y_ptr, h_ptr, count_ptr,
                   M, K, N, stride_xm, stride_ym, spin_limit,
                   NB: tl.constexpr, P: tl.constexpr, S: tl.constexpr, T: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PHASES: tl.constexpr, PREFETCH: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """Persistent: this program's stage-1 tasks, then its stage-2 tasks (PHASES 1, 2 or 3 = both).

    ``PREFETCH`` (at most one stage-2 task per program): that task's weight tile is loaded first,
    so both stages' weights stream from memory at once and only h waits on the other programs.
    """
    Q: tl.constexpr = NB * T
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    output_tasks = m_tiles * NB * (S // BLOCK_S)
    w2_loaded = w2_ptr
    if PREFETCH:
        if PHASES >= 2:
            group = (pid // (S // BLOCK_S)) % NB
            rows = group * S + (pid % (S // BLOCK_S)) * BLOCK_S + tl.arange(0, BLOCK_S)
            offs_q = tl.arange(0, Q)
            w2_loaded = tl.load(w2_ptr + rows[:, None] * Q + offs_q[None, :],
                                mask=(pid + 0 * rows[:, None] < output_tasks) & (offs_q[None, :] < Q),
                                other=0.0)
    if PHASES % 2 == 1:
        for task in range(pid, m_tiles * NB * (Q // BLOCK_T), programs):
            _hidden_task(x_ptr, w1_ptr, h_ptr, count_ptr, M, K, stride_xm, NB * Q, Q, task, NB, P,
                         T, PHASES == 3, BLOCK_M, BLOCK_T, BLOCK_P, PRECISION)
    if PHASES >= 2:
        if PREFETCH:
            if pid < output_tasks:
                _output_task(h_ptr, w2_ptr, bias_ptr, y_ptr, count_ptr, M, N, stride_ym, NB * Q, Q,
                             pid, spin_limit, w2_loaded, NB, S, T, HAS_BIAS, PHASES == 3, True,
                             BLOCK_M, BLOCK_T, BLOCK_S, BLOCK_Q, PRECISION)
        else:
            for task in range(pid, output_tasks, programs):
                _output_task(h_ptr, w2_ptr, bias_ptr, y_ptr, count_ptr, M, N, stride_ym, NB * Q, Q,
                             task, spin_limit, w2_ptr, NB, S, T, HAS_BIAS, PHASES == 3, False,
                             BLOCK_M, BLOCK_T, BLOCK_S, BLOCK_Q, PRECISION)


@triton.jit
def _stage_hidden_kernel(x_ptr, w1_ptr, h_ptr, M, K, stride_xm, h_stride_m, h_stride_l,
                         NB: tl.constexpr, P: tl.constexpr, T: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Launch 1 of ``stages`` and ``hybrid``: grid (tasks,), one stage-1 tile each; h in x's dtype."""
    _hidden_task(x_ptr, w1_ptr, h_ptr, h_ptr, M, K, stride_xm, h_stride_m, h_stride_l,
                 tl.program_id(0), NB, P, T, False, BLOCK_M, BLOCK_T, BLOCK_P, PRECISION)


@triton.jit
def _stage_output_kernel(h_ptr, w2_ptr, bias_ptr, y_ptr, M, N, stride_ym,
                         NB: tl.constexpr, S: tl.constexpr, T: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """Launch 2 of ``stages``: grid (tasks,), one output tile each."""
    Q: tl.constexpr = NB * T
    _output_task(h_ptr, w2_ptr, bias_ptr, y_ptr, h_ptr, M, N, stride_ym, NB * Q, Q,
                 tl.program_id(0), 0, w2_ptr, NB, S, T, HAS_BIAS, False, False, BLOCK_M, BLOCK_T,
                 BLOCK_S, BLOCK_Q, PRECISION)


# ---------------------------------------------------------------------------------------------
# rows: two launches of one row-block kernel, the permutation folded into addressing


@triton.jit
def _prefetch_rows_to_l2(w_ptr, row0, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr):
    """Ask L2 for rows row0… of w (one ``prefetch.global.L2`` per 128-byte line); nothing waits."""
    LINE: tl.constexpr = 128 // w_ptr.dtype.element_ty.primitive_bitwidth * 8
    lines = tl.arange(0, BLOCK_R * WIDTH // LINE) * LINE   # the caller checks BLOCK_R·WIDTH ≥ LINE
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                              [w_ptr + row0.to(tl.int64) * WIDTH + lines], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _rows_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, M, a_cols, out_cols, stride_am, stride_om,
                 NB: tl.constexpr, SEG: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
                 SPLIT: tl.constexpr):
    """out[m, r] = Σ_c a[m, g(r)·WIDTH + c] · w[r, c] (+ bias[r]) for this program's BLOCK_R rows r.

    ``g(r) = (r // SEG) % NB`` picks the slice of ``a`` a weight row reads: launch 1 (w1_bQP rows
    (l, k, j), SEG = T, WIDTH = P) reads input block k of x and writes h[m, l·Q + k·T + j]; launch 2
    (w2_bSQ rows (l, σ), SEG = S, WIDTH = Q) reads h[m, l·Q…] and writes y. BLOCK_R divides SEG,
    so one program reads one slice. ``BLOCK_K == WIDTH``: the whole weight tile is loaded in one
    go, before waiting on the previous kernel (``USE_PDL``), so every byte is in flight at once.
    ``SPLIT`` > 1 (tensor-core tiles, BLOCK_K == WIDTH): the reduction is cut into SPLIT chunks
    that the warps reduce side by side (a batched dot, then a sum), where one plain dot gives every
    warp the whole K of ``a`` (a (BLOCK_M, WIDTH) tile per warp: ~200 registers, 2 programs an SM).
    Otherwise ``BLOCK_K < WIDTH`` loops over K chunks after the wait; ``PREFETCH`` first asks L2 for the
    whole weight tile, so the wait hides DRAM latency there too.
    """
    pid_r = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if USE_PDL:
        _gdc_launch_dependents()
    row0 = pid_r * BLOCK_R
    a_col0 = ((row0 // SEG) % NB) * WIDTH
    if BLOCK_K == WIDTH and SPLIT == 1:
        offs_c = tl.arange(0, WIDTH)
        rows = row0 + tl.arange(0, BLOCK_R)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * WIDTH + offs_c[None, :])
        if USE_PDL:
            _gdc_wait()  # a (x or h) comes from the previous kernel
        cols = a_col0 + offs_c
        if BLOCK_M == 1:
            a = tl.load(a_ptr + m0.to(tl.int64) * stride_am + cols,
                        mask=(cols < a_cols) & (m0 + 0 * cols < M), other=0.0)
            acc = tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        else:
            rows_m = m0 + tl.arange(0, BLOCK_M)
            a = tl.load(a_ptr + rows_m[:, None].to(tl.int64) * stride_am + cols[None, :],
                        mask=(rows_m[:, None] < M) & (cols[None, :] < a_cols), other=0.0)
            acc = tl.dot(a.to(w.dtype), tl.trans(w), input_precision=PRECISION)
    elif SPLIT > 1:
        # K split across warps: a batched dot over SPLIT chunks of WIDTH // SPLIT, summed after
        CHUNK: tl.constexpr = WIDTH // SPLIT
        if PREFETCH:  # the tile goes to smem a few loads at a time: ask L2 for all of it first
            _prefetch_rows_to_l2(w_ptr, row0, WIDTH, BLOCK_R)
        rows = row0 + tl.arange(0, BLOCK_R)
        parts = tl.arange(0, SPLIT)
        offs_k = tl.arange(0, CHUNK)
        w3 = tl.load(w_ptr + rows[None, None, :].to(tl.int64) * WIDTH + parts[:, None, None] * CHUNK
                     + offs_k[None, :, None])                                 # (SPLIT, CHUNK, BLOCK_R)
        if USE_PDL:
            _gdc_wait()
        rows_m = m0 + tl.arange(0, BLOCK_M)
        cols = a_col0 + parts[:, None, None] * CHUNK + offs_k[None, None, :]
        a3 = tl.load(a_ptr + rows_m[None, :, None].to(tl.int64) * stride_am + cols,
                     mask=(rows_m[None, :, None] < M) & (cols < a_cols), other=0.0)  # (SPLIT, BLOCK_M, CHUNK)
        acc = tl.sum(tl.dot(a3.to(w3.dtype), w3, input_precision=PRECISION), axis=0)
    else:
        if PREFETCH:
            _prefetch_rows_to_l2(w_ptr, row0, WIDTH, BLOCK_R)
        if USE_PDL:
            _gdc_wait()
        acc = _matmul_nt_tile(a_ptr, stride_am, a_col0, a_cols, M, m0, w_ptr, row0, WIDTH,
                              BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, "")
    _store_tile(out_ptr, stride_om, M, m0, row0, out_cols, acc, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_R)


# ---------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class KernelConfig:
    """One point of the search space: the kernel and its tile sizes, warps and stages."""

    variant: str                 # one of VARIANTS
    block_m: int                 # rows per tile (1: the vector form)
    block_t: int                 # intermediate values per stage-1 tile; divides T
    block_p: int                 # stage-1 reduction chunk; divides P
    block_s: int                 # outputs per stage-2 tile (splitk: per atomic chunk); divides S
    block_q: int = 0             # stage-2 reduction chunk; divides Q (phased, stages)
    num_warps: int = 4
    num_stages: int = 2
    programs: int = 0            # phased: persistent grid size (0: one per SM)
    prefetch: bool = False       # phased: load the stage-2 weight tile first (one stage-2 task each);
                                 # rows: ask L2 for the weight tile before the wait (looped form)
    pdl: bool = False            # rows: programmatic dependent launch (weights load before the wait)
    split: int = 0               # rows, tiles: the K of a whole-row tile split across warps (0: not)

    def label(self) -> str:
        tiles = f"m{self.block_m} t{self.block_t} p{self.block_p}"
        if self.variant != "hybrid":
            tiles += f" s{self.block_s}"
        if self.variant in ("phased", "stages"):
            tiles += f" q{self.block_q}"
        if self.variant == "phased":
            tiles += f" g{self.programs}" + (" pre" if self.prefetch else "")
        if self.variant == "rows":  # stage-1 rows × K chunk, stage-2 rows × K chunk
            tiles = f"m{self.block_m} r{self.block_t}x{self.block_p} r{self.block_s}x{self.block_q}"
            tiles += (" pdl" if self.pdl else "") + (" l2" if self.prefetch else "")
            tiles += f" split{self.split}" if self.split > 1 else ""
        return f"{self.variant}[{tiles} w{self.num_warps} st{self.num_stages}]"


def pack_weights(right_bPQ: torch.Tensor, left_bQS: torch.Tensor, shape: MonarchShape
                 ) -> dict[str, torch.Tensor]:
    """Group-major copies of the factors (module doc): w1_bQP, w2_bQS, w2_bSQ."""
    b, T, P = shape.nblocks, shape.slab_rank, shape.block_in
    w1 = right_bPQ.reshape(b, P, b, T).permute(2, 0, 3, 1).reshape(b, b * T, P)
    return {"w1_bQP": w1.contiguous(), "w2_bQS": left_bQS.contiguous(),
            "w2_bSQ": left_bQS.transpose(1, 2).contiguous()}


def _precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None  # 16-bit: tensor cores, fp32 accumulation


def _power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


def check_config(config: KernelConfig, shape: MonarchShape) -> list[str]:
    """Why ``config`` cannot run ``shape`` (empty when it can)."""
    T, P, S, Q = shape.slab_rank, shape.block_in, shape.block_out, shape.block_hidden
    problems = [f"{name}={value} does not divide {what}={size}"
                for name, value, what, size in (("block_t", config.block_t, "T", T),
                                                ("block_p", config.block_p, "P", P),
                                                ("block_s", config.block_s, "S", S))
                if value < 1 or size % value]
    uses_q = config.variant in ("phased", "stages", "rows")
    if uses_q and (config.block_q < 1 or Q % config.block_q):
        problems.append(f"block_q={config.block_q} does not divide Q={Q}")
    if config.variant not in VARIANTS:
        problems.append(f"unknown variant {config.variant!r}")
    sizes = [config.block_m, config.block_t, config.block_p, config.block_s]
    sizes += [config.block_q] if uses_q else []
    if not all(_power_of_two(v) for v in sizes):
        problems.append("block sizes must be powers of two")
    if config.block_m > 1 and min(config.block_m, config.block_t, config.block_p, config.block_s) < 16:
        problems.append("tensor-core tiles need every block ≥ 16")
    if config.prefetch and config.variant == "phased" and not _power_of_two(Q):
        problems.append(f"prefetch loads whole rows of Q={Q}: Q must be a power of two")
    if config.variant == "rows" and config.block_m > 1 and min(config.block_t, config.block_s) < 16:
        problems.append("tensor-core tiles need every block ≥ 16")
    if (config.pdl or config.split) and config.variant != "rows":
        problems.append("pdl and split are rows options")
    if config.split > 1 and (config.block_m == 1 or not _power_of_two(config.split)
                             or config.block_p != P or config.block_q != Q
                             or min(P, Q) // config.split < 16 or min(P, Q) % config.split):
        problems.append(f"split={config.split}: tensor-core tiles of whole rows (block_p = P, "
                        f"block_q = Q), a power of two leaving chunks of ≥ 16")
    return problems


@dataclass
class MonarchKernel:
    """One Monarch layer on the GPU (or under the Triton interpreter): packed weights, workspaces.

    ``kernel(x, config)`` computes ``x @ dense.T + bias`` for x of shape (..., K), contiguous in
    its last dimension, in x's dtype (the weights' dtype).
    """

    shape: MonarchShape
    weights: dict[str, torch.Tensor]
    bias: torch.Tensor | None = None
    workspaces: dict = field(default_factory=dict)

    @classmethod
    def from_factors(cls, right_bPQ: torch.Tensor, left_bQS: torch.Tensor, shape: MonarchShape,
                     bias: torch.Tensor | None = None) -> "MonarchKernel":
        return cls(shape, pack_weights(right_bPQ, left_bQS, shape),
                   None if bias is None else bias.contiguous())

    def _workspace(self, name: str, size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A zero-filled buffer kept across calls (the kernels leave it zeroed)."""
        key = (name, str(device))
        found = self.workspaces.get(key)
        if found is None or found.numel() < size:
            found = torch.zeros(size, dtype=dtype, device=device)
            self.workspaces[key] = found
        return found

    def __call__(self, x: torch.Tensor, config: KernelConfig, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """y = x @ dense.T + bias; ``out`` (M, N) contiguous, if given, receives y."""
        shape = self.shape
        problems = check_config(config, shape)
        if problems:
            raise ValueError(f"Monarch kernel config {config.label()} cannot run {shape.how}: "
                             + "; ".join(problems))
        lead = x.shape[:-1]
        x_MK = x.reshape(-1, shape.in_features)
        if x_MK.stride(-1) != 1:
            x_MK = x_MK.contiguous()
        M = x_MK.shape[0]
        y_MN = out if out is not None else torch.empty(M, shape.out_features, dtype=x.dtype,
                                                       device=x.device)
        if y_MN.shape != (M, shape.out_features) or not y_MN.is_contiguous():
            raise ValueError(f"out must be a contiguous ({M}, {shape.out_features}) tensor")
        if M > 0:
            launch = {"splitk": self._splitk, "phased": self._phased, "stages": self._stages,
                      "hybrid": self._hybrid, "rows": self._rows}[config.variant]
            launch(x_MK, y_MN, config)
        return y_MN.reshape(*lead, shape.out_features)

    # -- launches ---------------------------------------------------------------------------------
    def _bias(self, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return (self.bias, True) if self.bias is not None else (y, False)

    def _splitk(self, x_MK: torch.Tensor, y_MN: torch.Tensor, config: KernelConfig) -> None:
        s, M = self.shape, x_MK.shape[0]
        m_tiles = triton.cdiv(M, config.block_m)
        acc = self._workspace("splitk_acc", m_tiles * config.block_m * s.padded_out, torch.float32,
                              x_MK.device)
        count = self._workspace("splitk_count", m_tiles * s.nblocks, torch.int32, x_MK.device)
        bias, has_bias = self._bias(y_MN)
        grid = (m_tiles, s.nblocks, s.block_hidden // config.block_t)
        _splitk_kernel[grid](x_MK, self.weights["w1_bQP"], self.weights["w2_bQS"], bias, y_MN, acc,
                             count, M, s.in_features, s.out_features, x_MK.stride(0), y_MN.stride(0),
                             **_constants(_splitk_kernel, s, config, x_MK.dtype, has_bias))

    def _phased(self, x_MK: torch.Tensor, y_MN: torch.Tensor, config: KernelConfig) -> None:
        s, M = self.shape, x_MK.shape[0]
        m_tiles = triton.cdiv(M, config.block_m)
        hidden = self._workspace("phased_h", M * s.nblocks * s.block_hidden, torch.float32, x_MK.device)
        count = self._workspace("phased_count", 2 * m_tiles * s.nblocks, torch.int32, x_MK.device)
        bias, has_bias = self._bias(y_MN)
        output_tasks = m_tiles * s.nblocks * (s.block_out // config.block_s)
        programs = config.programs or _multiprocessors(x_MK.device)
        if config.prefetch:
            programs = max(programs, output_tasks)  # one stage-2 task per program
        args = (x_MK, self.weights["w1_bQP"], self.weights["w2_bSQ"], bias, y_MN, hidden, count,
                M, s.in_features, s.out_features, x_MK.stride(0), y_MN.stride(0), SPIN_LIMIT)
        if interpreting() or x_MK.device.type != "cuda":
            for phase in (1, 2):  # programs run one after another here: no waiting across them
                _phased_kernel[(programs,)](*args, **_constants(_phased_kernel, s, config, x_MK.dtype,
                                                                has_bias, phases=phase))
        else:
            _phased_kernel[(programs,)](*args, **_constants(_phased_kernel, s, config, x_MK.dtype, has_bias))

    def _rows(self, x_MK: torch.Tensor, y_MN: torch.Tensor, config: KernelConfig) -> None:
        """Two launches of ``_rows_kernel``: h (M, b·Q) in fp32 for vectors, x's dtype for tiles."""
        s, M = self.shape, x_MK.shape[0]
        Q = s.block_hidden
        hidden_dtype = torch.float32 if config.block_m == 1 else x_MK.dtype
        hidden = self._workspace(f"rows_h_{hidden_dtype}", M * s.nblocks * Q, hidden_dtype, x_MK.device)
        bias, has_bias = self._bias(y_MN)
        m_tiles = triton.cdiv(M, config.block_m)
        pdl = config.pdl and _pdl_usable(x_MK.device)
        compiled = x_MK.device.type == "cuda" and not interpreting()
        options = {"launch_pdl": True} if pdl else {}
        _rows_kernel[(s.nblocks * Q // config.block_t, m_tiles)](
            x_MK, self.weights["w1_bQP"], hidden, hidden, M, s.in_features, s.nblocks * Q,
            x_MK.stride(0), s.nblocks * Q,
            **_rows_constants(s, config, x_MK.dtype, 1, False, pdl, compiled), **options)
        _rows_kernel[(s.nblocks * s.block_out // config.block_s, m_tiles)](
            hidden, self.weights["w2_bSQ"], bias, y_MN, M, s.nblocks * Q, s.out_features,
            s.nblocks * Q, y_MN.stride(0),
            **_rows_constants(s, config, x_MK.dtype, 2, has_bias, pdl, compiled), **options)

    def _hidden(self, x_MK: torch.Tensor, config: KernelConfig, group_major: bool) -> torch.Tensor:
        """Launch 1: h in x's dtype, (M, b·Q) (``stages``) or (b, M, Q) (``hybrid``, for bmm)."""
        s, M = self.shape, x_MK.shape[0]
        Q = s.block_hidden
        if group_major:
            hidden = torch.empty(s.nblocks, M, Q, dtype=x_MK.dtype, device=x_MK.device)
            strides = (Q, M * Q)
        else:
            hidden = torch.empty(M, s.nblocks * Q, dtype=x_MK.dtype, device=x_MK.device)
            strides = (s.nblocks * Q, Q)
        tasks = triton.cdiv(M, config.block_m) * s.nblocks * (Q // config.block_t)
        _stage_hidden_kernel[(tasks,)](x_MK, self.weights["w1_bQP"], hidden, M, s.in_features,
                                       x_MK.stride(0), *strides,
                                       **_constants(_stage_hidden_kernel, s, config, x_MK.dtype, False))
        return hidden

    def _stages(self, x_MK: torch.Tensor, y_MN: torch.Tensor, config: KernelConfig) -> None:
        s, M = self.shape, x_MK.shape[0]
        hidden = self._hidden(x_MK, config, group_major=False)
        bias, has_bias = self._bias(y_MN)
        tasks = triton.cdiv(M, config.block_m) * s.nblocks * (s.block_out // config.block_s)
        _stage_output_kernel[(tasks,)](hidden, self.weights["w2_bSQ"], bias, y_MN, M, s.out_features,
                                       y_MN.stride(0),
                                       **_constants(_stage_output_kernel, s, config, x_MK.dtype, has_bias))

    def _hybrid(self, x_MK: torch.Tensor, y_MN: torch.Tensor, config: KernelConfig) -> None:
        """Launch 1 in Triton, launch 2 as one cuBLAS bmm writing y through a strided view."""
        s, M = self.shape, x_MK.shape[0]
        hidden_bMQ = self._hidden(x_MK, config, group_major=True)
        if s.padded_out == s.out_features:
            torch.bmm(hidden_bMQ, self.weights["w2_bQS"],
                      out=y_MN.view(M, s.nblocks, s.block_out).transpose(0, 1))
        else:
            y_bMS = torch.bmm(hidden_bMQ, self.weights["w2_bQS"])
            y_MN.copy_(y_bMS.transpose(0, 1).reshape(M, s.padded_out)[:, : s.out_features])
        if self.bias is not None:
            y_MN.add_(self.bias)


def _constants(kernel, shape: MonarchShape, config: KernelConfig, dtype: torch.dtype, has_bias: bool,
               phases: int = 3) -> dict:
    """The compile-time arguments of ``kernel`` for a layer and config (and its warps/stages)."""
    every = dict(NB=shape.nblocks, P=shape.block_in, S=shape.block_out, T=shape.slab_rank,
                 HAS_BIAS=has_bias, PHASES=phases, PREFETCH=config.prefetch, BLOCK_M=config.block_m,
                 BLOCK_T=config.block_t, BLOCK_P=config.block_p, BLOCK_S=config.block_s,
                 BLOCK_Q=config.block_q, PRECISION=_precision(dtype))
    chosen = {name: value for name, value in every.items() if name in kernel.arg_names}
    return dict(chosen, num_warps=config.num_warps, num_stages=config.num_stages)


def _rows_constants(shape: MonarchShape, config: KernelConfig, dtype: torch.dtype, stage: int,
                    has_bias: bool, pdl: bool, compiled: bool = True) -> dict:
    """Compile-time arguments of launch ``stage`` (1: x → h, 2: h → y) of the rows variant
    (``compiled``: not under the interpreter, which has no inline PTX)."""
    if stage == 1:
        seg, width, block_r, block_k = shape.slab_rank, shape.block_in, config.block_t, config.block_p
    else:
        seg, width, block_r, block_k = shape.block_out, shape.block_hidden, config.block_s, config.block_q
    return dict(NB=shape.nblocks, SEG=seg, WIDTH=width, HAS_BIAS=has_bias, BLOCK_M=config.block_m,
                BLOCK_R=block_r, BLOCK_K=block_k, PRECISION=_precision(dtype), USE_PDL=pdl,
                PREFETCH=(config.prefetch and (block_k < width or config.split > 1) and compiled
                          and block_r * width * _BYTES[dtype] >= 128),
                SPLIT=max(1, config.split),
                num_warps=config.num_warps, num_stages=config.num_stages)


_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _pdl_usable(device: torch.device) -> bool:
    """PDL needs Hopper or newer and a compiled launch (the interpreter has no grid control)."""
    return (_gdc_wait is not None and device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


_LAUNCHES = {"splitk": ("_splitk_kernel",), "phased": ("_phased_kernel",),
             "stages": ("_stage_hidden_kernel", "_stage_output_kernel"),
             "hybrid": ("_stage_hidden_kernel",), "rows": ("_rows_kernel", "_rows_kernel")}
_FIXED_POINTERS = {"acc_ptr": "fp32", "count_ptr": "i32"}
_ALIGNED_INTS = {"K", "N", "stride_xm", "stride_ym", "h_stride_m", "h_stride_l", "a_cols", "out_cols",
                 "stride_am", "stride_om"}


def compile_for_target(shape: MonarchShape, config: KernelConfig, dtype: torch.dtype = torch.bfloat16,
                       rows: int = 1, arch: int = 90, has_bias: bool = False) -> list[dict]:
    """Compile ``config``'s launches for ``sm_{arch}`` without a GPU; resource use per launch.

    Pointers and the sizes a real launch passes are marked 16-divisible, as Triton's launcher
    specialises them, so what comes out is what would run (software pipelining included). Needs
    Triton's NVIDIA backend (its bundled ptxas); not under ``TRITON_INTERPRET``. Returns, per
    launch: ``registers``, ``spill_bytes`` (stack frame), ``shared_bytes``, ``async_copies`` (the
    pipelined loads) and ``wgmma`` (Hopper tensor-core ops) counted in the TTGIR.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for stage, name in enumerate(_LAUNCHES[config.variant], start=1):
        kernel = globals()[name]
        if config.variant == "rows":
            constants = _rows_constants(shape, config, dtype, stage, has_bias and stage == 2, config.pdl)
        else:
            constants = _constants(kernel, shape, config, dtype, has_bias)
        options = {"num_warps": constants.pop("num_warps"), "num_stages": constants.pop("num_stages")}
        signature, attrs = {}, {}
        for index, arg in enumerate(kernel.arg_names):
            if arg in constants:
                signature[arg] = "constexpr"
                continue
            if arg.endswith("_ptr"):
                hidden_fp32 = (arg == "h_ptr" and config.variant == "phased") or (
                    config.variant == "rows" and config.block_m == 1
                    and ((stage == 1 and arg in ("out_ptr", "bias_ptr")) or (stage == 2 and arg == "a_ptr")))
                pointee = _FIXED_POINTERS.get(arg, "fp32" if hidden_fp32 else element)
                signature[arg] = "*" + pointee
            else:
                signature[arg] = "i32"
            if arg.endswith("_ptr") or arg in _ALIGNED_INTS or (arg == "M" and rows % 16 == 0):
                attrs[(index,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "kernel.cubin")
            with open(path, "wb") as handle:
                handle.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                                   text=True, check=False).stdout
        registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
        ttgir = compiled.asm["ttgir"]
        results.append({"kernel": name, "registers": int(registers.group(1)) if registers else None,
                        "spill_bytes": int(stack.group(1)) if stack else None,
                        "shared_bytes": compiled.metadata.shared,
                        "async_copies": ttgir.count("async_copy_global_to_local"),
                        "wgmma": ttgir.count("warp_group_dot ")})
    return results


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ---------------------------------------------------------------------------------------------
# the lite search space and a small local search (until the autotuner lands)


def _powers_of_two_dividing(n: int, low: int, high: int) -> list[int]:
    return [v for v in (1 << e for e in range(0, 15)) if low <= v <= high and n % v == 0]


def _largest(n: int, low: int, high: int) -> int:
    return max(_powers_of_two_dividing(n, low, max(low, high)) or [0])


def candidate_configs(shape: MonarchShape, rows: int, multiprocessors: int = 132,
                      limit: int = 10) -> list[KernelConfig]:
    """About ``limit`` configs for ``rows`` (M) rows, derived from the shape and the SM count.

    Decode (M ≤ 16): ``rows`` first (:func:`_rows_configs`), then ``splitk`` and ``phased`` with
    vector tiles (M = 1) or 16-row tensor-core tiles; about 1–8 programs per SM; a weight tile
    holds ≤ 8K elements per loop step (registers).
    ``phased`` with prefetch runs one program per stage-2 task, at most one per SM (every program
    must be resident while it waits). Prefill: ``stages`` and ``hybrid`` with the usual
    tensor-core GEMM tiles. Every block size is a power of two dividing its block dimension.
    """
    T, P, S, Q = shape.slab_rank, shape.block_in, shape.block_out, shape.block_hidden
    b, sms = shape.nblocks, multiprocessors
    found: list[KernelConfig] = []
    if rows <= 16:
        block_m = 1 if rows == 1 else 16
        low = 1 if block_m == 1 else 16
        m_tiles = triton.cdiv(rows, block_m)
        for block_t in _powers_of_two_dividing(T, low, 64):
            programs = b * Q // block_t * m_tiles
            if not sms // 2 <= programs <= 8 * sms:
                continue
            block_p, block_s = _largest(P, low, 8192 // block_t), _largest(S, low, 8192 // block_t)
            if _power_of_two(S) and block_t * S <= 32768:
                block_s = S  # the whole second-stage tile, loaded before the first stage runs
            if block_p and block_s:
                for warps in (4, 8):
                    found.append(KernelConfig("splitk", block_m, block_t, block_p, block_s,
                                              num_warps=warps, num_stages=1 if block_m == 1 else 2))
        for block_s in _powers_of_two_dividing(S, low, 64):
            output_tasks = b * S // block_s * m_tiles
            prefetch = _power_of_two(Q) and output_tasks <= sms and block_s * Q <= 32768
            if not sms // 4 <= output_tasks <= 4 * sms:
                continue
            # stage-1 tiles: about one per program (fewer programs idle in phase 1)
            tiles = [t for t in _powers_of_two_dividing(T, low, 64)]
            if not tiles:
                continue
            block_t = min(tiles, key=lambda t: (abs(math.log2(b * Q // t * m_tiles / min(sms, output_tasks))), -t))
            block_p, block_q = _largest(P, low, 8192 // block_t), _largest(Q, low, 8192 // block_s)
            if not (block_p and block_q):
                continue
            programs = output_tasks if prefetch else min(sms, max(output_tasks, b * Q // block_t * m_tiles))
            found.append(KernelConfig("phased", block_m, block_t, block_p, block_s, block_q,
                                      num_warps=8, num_stages=1 if block_m == 1 else 2,
                                      programs=min(programs, sms), prefetch=prefetch))
    else:
        for block_m, block_n, block_k, warps, stages in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3),
                                                         (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                                         (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                                         (128, 64, 64, 4, 4)):
            block_t, block_s = _largest(T, 16, block_n), _largest(S, 16, block_n)
            block_p, block_q = _largest(P, 16, block_k), _largest(Q, 16, block_k)
            if min(block_t, block_s, block_p, block_q) < 16:
                continue
            found.append(KernelConfig("stages", block_m, block_t, block_p, block_s, block_q,
                                      num_warps=warps, num_stages=stages))
            found.append(KernelConfig("hybrid", block_m, block_t, block_p, block_s,
                                      num_warps=warps, num_stages=stages))
    unique = [c for c in dict.fromkeys(found) if not check_config(c, shape)]
    first = _rows_configs(shape, rows, limit, multiprocessors) if rows <= 16 else []
    chosen = _spread(unique, max(0, limit - len(first)))
    if rows <= 16:  # likeliest first, in case a search must stop early
        def likelihood(config: KernelConfig) -> float:
            if config.variant == "phased":
                return 0.0 if config.prefetch else 2.0
            programs = b * Q // config.block_t * triton.cdiv(rows, config.block_m)
            return abs(math.log2(programs / (2 * sms)))
        chosen.sort(key=likelihood)
    return first + chosen


def _rows_configs(shape: MonarchShape, rows: int, limit: int, sms: int) -> list[KernelConfig]:
    """Decode configs of the two-launch ``rows`` variant, likeliest first (at most ``limit - 3``).

    Each program owns BLOCK_R whole weight rows: 8–32K elements (16–64 KB in bf16), loaded in one
    go where the row length is a power of two, so a launch has all its weight bytes in flight at
    once (bandwidth, not latency); PDL on, so launch 2 loads its weights while launch 1 drains.
    One config without PDL shows what PDL is worth. Tensor-core tiles (M > 1) split K across the
    warps (``split``) or not, and may ask L2 for their tile first (``prefetch``).
    """
    T, P, S, Q = shape.slab_rank, shape.block_in, shape.block_out, shape.block_hidden
    block_m = 1 if rows == 1 else 16
    low = 1 if block_m == 1 else 16

    def tile(segment: int, width: int, total: int, elements: int, spread: bool) -> tuple[int, int]:
        block_r = _largest(segment, low, max(low, elements // width))
        if spread:  # at least about one program per SM
            block_r = min(block_r, _largest(segment, low, max(low, total // sms)))
        if block_r and _power_of_two(width) and block_r * width <= 2 * elements:
            return block_r, width                                  # the whole row block at once
        return block_r, _largest(width, max(low, 16), max(16, elements // max(1, block_r)))

    if block_m == 1:  # (elements per program, warps, stages, PDL, L2 prefetch, K split)
        plans = ((16384, 4, 1, True, False, 0), (16384, 4, 1, False, False, 0), (8192, 4, 1, True, False, 0),
                 (16384, 8, 1, True, False, 0), (32768, 8, 1, True, False, 0))
    else:
        plans = ((16384, 8, 1, True, False, 8), (16384, 4, 1, False, False, 0), (16384, 4, 1, True, False, 0),
                 (16384, 8, 1, True, True, 8), (16384, 4, 1, True, False, 4), (32768, 8, 1, True, False, 8),
                 (8192, 4, 4, True, True, 0))
    found = []
    for elements, warps, stages, pdl, prefetch, split in plans:
        spread = elements < 32768  # the largest plan: one program per SM at most, 64 KB each
        (block_t, block_p), (block_s, block_q) = (tile(T, P, shape.nblocks * Q, elements, spread),
                                                  tile(S, Q, shape.nblocks * S, elements, spread))
        if min(block_t, block_p, block_s, block_q) < 1:
            continue
        if stages > 1:  # the looped form: a K chunk per step, software-pipelined
            block_p, block_q = _largest(P, low, 256), _largest(Q, low, 256)
        found.append(KernelConfig("rows", block_m, block_t, block_p, block_s, block_q,
                                  num_warps=warps, num_stages=stages, pdl=pdl, prefetch=prefetch,
                                  split=split))
    unique = [c for c in dict.fromkeys(found) if not check_config(c, shape)]
    return unique[: max(1, limit - 3)]


def _spread(configs: list[KernelConfig], limit: int) -> list[KernelConfig]:
    """At most ``limit`` configs, every variant kept, an even spread of tile sizes within each."""
    if len(configs) <= limit:
        return configs
    by_variant: dict[str, list[KernelConfig]] = {}
    for config in configs:
        by_variant.setdefault(config.variant, []).append(config)
    share = max(1, limit // len(by_variant))
    kept = []
    for group in by_variant.values():
        if len(group) <= share:
            kept.extend(group)
        else:
            kept.extend(group[int(i * len(group) / share)] for i in range(share))
    return kept[:limit]


def local_search(kernel: MonarchKernel, x: torch.Tensor, configs: list[KernelConfig],
                 reference: torch.Tensor, tolerance: float,
                 timer: Callable[[KernelConfig], float] | None = None,
                 deadline: float | None = None) -> list[dict]:
    """Check then time each config; returns one row per config, fastest correct first.

    ``timer(config)`` returns a time in ms (the benchmark times the config over rotating weight
    copies in a CUDA graph); without one, :func:`autotune_timer` times it with the autotuner's
    protocol (L2 flushed, CUDA graph, median). A config that fails to compile, to launch or its check is reported
    with the reason, and never timed. The output is poisoned (NaN) before the check, so an
    unwritten element fails it. Past ``deadline`` (``time.time()``), once one config has passed,
    the rest are not tried (compiling is what takes the time).
    """
    import time

    if timer is None:
        timer = autotune_timer(kernel, x)
    rows = []
    for config in configs:
        row: dict = {"config": config.label(), "variant": config.variant, "ok": False}
        if deadline is not None and time.time() > deadline and any(r["ok"] for r in rows):
            row["why"] = "not tried: search time budget spent"
            rows.append(row)
            continue
        try:
            out = torch.full((x.reshape(-1, x.shape[-1]).shape[0], kernel.shape.out_features),
                             float("nan"), dtype=x.dtype, device=x.device)
            out = kernel(x, config, out=out)
            error = relative_error(reference, out)
            row["rel_error"] = error
            if not math.isfinite(error) or error > tolerance:
                row["why"] = f"wrong: relative error {error:.3g} > {tolerance}"
            else:
                row["ms"] = timer(config)
                row["ok"] = True
                row["kernel_config"] = config
        except Exception as error:  # one config's compile or launch failure must not stop the rest
            text = str(error).strip().splitlines()
            row["why"] = f"{type(error).__name__}: {text[0][:200] if text else ''}"
        rows.append(row)
    rows.sort(key=lambda r: (not r["ok"], r.get("ms", math.inf)))
    return rows


def autotune_timer(kernel: MonarchKernel, x: torch.Tensor, samples: int = 20) -> Callable[[KernelConfig], float]:
    """``timer(config)`` in ms by the autotuner's protocol (:mod:`slimline.autotune.measure`):
    CUDA events after an L2 flush, CUDA graphs for short calls, the median; one wall-clock call
    under the interpreter (it checks a search, not speed)."""
    from slimline.autotune.measure import CpuTimer, CudaTimer, Protocol, summarize

    gpu = x.device.type == "cuda" and not interpreting()
    if gpu:
        from slimline.autotune.space import DeviceLimits
        measurer = CudaTimer(DeviceLimits.from_torch(x.device).l2_bytes, Protocol(), x.device)
    else:
        measurer, samples = CpuTimer(), 1
    out = torch.empty(x.reshape(-1, x.shape[-1]).shape[0], kernel.shape.out_features, dtype=x.dtype,
                      device=x.device)

    def timer(config: KernelConfig) -> float:
        call = lambda: kernel(x, config, out=out)  # noqa: E731
        measurer.prepare(call)
        try:
            return summarize(measurer.samples_round([call], samples)[0])[0]
        finally:
            measurer.release(call)

    return timer


def cached_config(shape: MonarchShape, rows: int, dtype: str = "bf16", mode: str = "cache") -> KernelConfig | None:
    """The autotuner's pick for this layer and row count, or None when the plain torch form
    (two bmm) is the pick. ``mode="cache"``: its cache, the shipped defaults, else its model's
    pick; never measures, no GPU needed. (A shape whose slab rank is not the automatic one is
    looked up with that rank.)"""
    from slimline.autotune import KernelInstance, Problem, tune

    problem = Problem.make("monarch_matmul", M=rows, K=shape.in_features, N=shape.out_features,
                           nblocks=shape.nblocks, slab_rank=shape.slab_rank, dtype=dtype)
    record = tune([KernelInstance("monarch", problem)], mode)[0]
    if record.config.get("impl") != "triton":
        return None
    return KernelConfig(**{k: v for k, v in record.config.items() if k != "impl"})


def relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """‖actual − reference‖ / ‖reference‖ in float64 (NaN or inf anywhere counts as a failure)."""
    reference, actual = reference.double(), actual.double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    return float((actual - reference).norm() / reference.norm().clamp(min=1e-300))
