"""A dequant-GEMV for decode (a few rows of x): a reduction, no ``tl.dot``, no reshapes.

The kernel of :mod:`slimline.backends.cuda.quant_kernels` feeds ``tl.dot`` with a
``(BLOCK_N, BLOCK_K)`` weight tile rebuilt from packed words by a 3-D fan-out and a reshape; on
the H200 (``benchmarks/results/quant_gpu.json``, 2026-11-29) that reached only 5-28% of the
copy bandwidth at M = 1, slower than bf16 cuBLAS on 2-4x the bytes. This kernel keeps the
fan-out 3-D and never reshapes: it loads x in the same ``(words, codes per word)`` order as the
codes and reduces, so no register shuffles or shared-memory layout conversions are needed.
Per tile, for output row n (one program: BLOCK_N rows, one row m of x, one K split)::

    codes  (BLOCK_N, W, P)   P = 32 // bits codes per word (bytes layout), 32 (bit-planes)
    x      (W, P)            x[k0 + w·P + p], float32
    qx     (BLOCK_N, W)      = Σ_p codes · x
    acc   += Σ_w scale[n, group(w)] · (qx − zero[n, group(w)] · Σ_p x)

which is ``Σ_k (q − zero) · scale · x`` with one scale multiply per word, not per code. Each
word lies in one group: the group size must be a multiple of P (or cover all of K).

Same storage as the quantize pass (:mod:`slimline.quant.pack`, :mod:`slimline.quant.scheme`);
same call signature as :func:`~slimline.backends.cuda.quant_kernels.quant_matmul`. Tested under
``TRITON_INTERPRET=1`` against the torch form (``tests/quant/test_quant_gemv.py``); measured on
the GPU by ``benchmarks/quant_gpu.py`` (the ``gemv`` rows).

Shape legend:  M rows of x,  N out_features,  K in_features,  W words per tile,  P codes per word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimline.errors import ConfigError

__all__ = ["GemvConfig", "quant_gemv", "gemv_configs", "supports", "GEMV_MAX_ROWS",
           # the tiled decode kernel
           "TiledConfig", "TiledWeight", "TILED_CANDIDATES", "DEFAULT_TILED", "TILE_CODES", "TILE_BITS",
           "pack_tiles", "unpack_tiles", "tile_weight", "tiled_gemv", "fits", "splits_for", "tile_count", "reference_gemv", "NORM_NONE", "NORM_RMS",
           "NORM_LAYER", "ACT_NONE", "ACT_SILU_PAIR", "ACT_GELU"]

GEMV_MAX_ROWS = 16  # each row of x re-reads the weights (from L2 when rows run together)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        return f"gemv n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}"


def codes_per_word(bits: int, layout: str) -> int:
    return 32 if layout == "planes" else 32 // bits


def supports(bits: int, layout: str, group_size: int, in_features: int, rows: int) -> str | None:
    """None if the kernel serves this layer, else the reason it does not."""
    if rows > GEMV_MAX_ROWS:
        return f"{rows} rows > {GEMV_MAX_ROWS}: use the GEMM kernel"
    if group_size < in_features and group_size % codes_per_word(bits, layout):
        return f"groups of {group_size} split {codes_per_word(bits, layout)}-code words"
    return None


@triton.jit
def _gemv_kernel(x_ptr, words_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
                 N, K, words_per_row, groups_per_row, stride_xm, stride_plane, stride_wn,
                 stride_sn, stride_zn, stride_os, stride_om,
                 BITS: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, P: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row = tl.program_id(2)
    W: tl.constexpr = BLOCK_K // P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, W)
    offs_p = tl.arange(0, P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_span
    for k0 in range(k_begin, tl.minimum(k_begin + k_span, K), BLOCK_K):
        word = k0 // P + offs_w  # (W,)
        mask_w = mask_n[:, None] & (word < words_per_row)[None, :]  # (BLOCK_N, W)
        if PLANES:
            codes = tl.zeros((BLOCK_N, W, P), dtype=tl.int32)
            for b in tl.static_range(BITS):
                words = tl.load(words_ptr + b * stride_plane + offs_n[:, None] * stride_wn + word[None, :],
                                mask=mask_w, other=0)
                codes |= ((words[:, :, None] >> offs_p[None, None, :]) & 1) << b
        else:
            words = tl.load(words_ptr + offs_n[:, None] * stride_wn + word[None, :], mask=mask_w, other=0)
            codes = (words[:, :, None] >> (offs_p * BITS)[None, None, :]) & ((1 << BITS) - 1)
        k_index = k0 + offs_w[:, None] * P + offs_p[None, :]  # (W, P)
        x = tl.load(x_ptr + row * stride_xm + k_index, mask=k_index < K, other=0.0).to(tl.float32)
        qx = tl.sum(codes.to(tl.float32) * x[None, :, :], axis=2)  # (BLOCK_N, W)
        group = (k0 + offs_w * P) // GROUP  # (W,)
        mask_g = mask_w & (group < groups_per_row)[None, :]
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask_g, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + group[None, :], mask=mask_g,
                           other=0).to(tl.float32)
        else:
            zero = (1 << (BITS - 1)) * 1.0
        acc += tl.sum(scale * (qx - zero * tl.sum(x, axis=1)[None, :]), axis=1)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty),
             mask=mask_n)


def gemv_configs(n: int, k: int, bits: int, layout: str, group_size: int) -> list[GemvConfig]:
    """The candidates for one shape: tiles whose words line up with the groups, from few long
    programs to many short ones (an H200 has 132 multiprocessors)."""
    per_word = codes_per_word(bits, layout)
    configs = []
    for block_n in (4, 8, 16, 32):
        for block_k in (256, 512, 1024):
            if block_k < per_word or block_k > max(k, per_word) * 2:
                continue
            for split_k in (1, 2, 4):
                if block_k * split_k > max(k, block_k) or (split_k > 1 and -(-n // block_n) >= 264):
                    continue
                if block_n * block_k > 16384:  # registers: the (BLOCK_N, W, P) code tile
                    continue
                configs.append(GemvConfig(block_n, block_k, split_k, 4 if block_n * block_k <= 8192 else 8))
    # programs closest to two waves first
    configs.sort(key=lambda c: (abs(-(-n // c.block_n) * c.split_k - 264), -c.block_k))
    return configs[:12] or [GemvConfig()]


def quant_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
               group_size: int, in_features: int, config: GemvConfig | None = None,
               padded_features: int | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)``: :func:`slimline.quant.linear.quantized_linear`'s numbers up to
    the order of the sums, for at most :data:`GEMV_MAX_ROWS` rows of x."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    reason = supports(bits, layout, group_size, in_features, m)
    if reason:
        raise ConfigError(f"dequant-GEMV cannot run this layer: {reason}", stage="backend",
                          where="quant_gemv", hint="use quant_kernels.quant_matmul")
    planes = layout == "planes"
    words = packed.contiguous().view(torch.int32)  # (N, Kp·bits/32) or (bits, N, Kp/32)
    n = words.shape[1] if planes else words.shape[0]
    config = config or gemv_configs(n, in_features, bits, layout, group_size)[0]
    split = config.split_k
    out = torch.empty((split, m, n) if split > 1 else (m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(n, config.block_n), split, m)
    _gemv_kernel[grid](
        x2, words, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        out, n, in_features, words.shape[-1], scales.shape[1], x2.stride(0),
        words.stride(0) if planes else 0, words.stride(1) if planes else words.stride(0),
        scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        out.stride(0) if split > 1 else 0, out.stride(-2),
        BITS=bits, PLANES=planes, GROUP=group_size, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, P=codes_per_word(bits, layout), BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.reshape(*lead, n)


# =====================================================================================================
# The tiled decode GEMV: a layout made for loading, codes turned into floats without a conversion
# instruction, and the decode step's neighbours (norm, SiLU·up / GELU, residual) fused in.
# =====================================================================================================
#
# Layout ("tiles", :func:`pack_tiles`).  K is cut into tiles of TILE codes (TILE = 32·C).  Inside a
# tile, code ``r = m·C + w`` (m = 0..31, w = 0..C-1) belongs to *column* w, *slot* m.  A column's
# 32 codes are held in ``bits`` int32 words, and word i of every column of the row sits in plane i:
#
#     words[i, n, t·C + w]          (bits, N, Kp/32) int32: exactly ``bits`` bits per code
#     bits 2, 4, 8:  word i holds slots m = i·P + j at bits [j·bits, (j+1)·bits),  P = 32 / bits
#     bits 3:        word i holds slots m = 10·i + j at bits [3j, 3j + 3), j < 10; slot 30 sits in
#                    bits 30-31 of word 0 (its bits 0-1) and bit 30 of word 1 (bit 2); slot 31 in
#                    bit 31 of word 1 (bit 0) and bits 30-31 of word 2 (bits 1-2)
#
# so a program loads, per plane, a (BLOCK_N, C) block of whole words (C contiguous words per row),
# and the x values that meet slot m of those words, ``x[t·TILE + m·C + w]``, are C contiguous
# elements: one vector load serves every row of the block.
#
# Codes to floats.  Moved to bits [23 - bits, 23) of a word whose exponent bits hold 1.0
# (``(w << s) & mask | 0x3F800000``: a shift and one LOP3), a code q reads as the fp32 number
# 1 + q / 2**bits; no int-to-float instruction (a quarter-rate one on the GPU) is ever issued.
# Per group g (of GROUP codes) and row n, with x summed over the group as S_g:
#
#     Σ (q - z)·s·x  =  a·Σ (1 + q/2^b)·x  -  c·S_g,     a = s·2^b,  c = s·(2^b + z)
#
# The first sum runs per (row, column) in fp32 FMAs; a·(...) is one FMA per group; the c·S_g terms
# of all groups are one small product per program, before the main loop.
#
# Parallelism.  A program reduces BLOCK_N rows over ``tiles_per_program`` tiles (0: all of K). With a
# split, every program loads all its words (and its groups' scales and zeros) before PDL's wait, adds
# its fp32 partial sums into the weight's scratch row with atomics, and counts itself in; the last of a
# row block to arrive reads the sums, zeroes the scratch and applies the epilogue. (Whole-K programs
# ran at 6-43% of copy bandwidth on the H200: one two-warp program per SM keeps too little in flight.)
#
# Norms are folded: the decoder quantizes W·diag(g) (g the norm's weight), so the kernel reads x
# raw and applies RMSNorm as ``rstd · (Q x)`` and LayerNorm as ``rstd · (Q x - mean · rowsum(Q)) +
# bias`` (bias = Q·diag(1/g)·b, precomputed).  Rounding: the product is rounded to x's dtype where
# torch rounds a projection's output, then SiLU·up / GELU and the residual as in decode_kernels.

TILE_CODES = 512  # codes per tile (16 columns of 32 codes); K is padded to a whole number of tiles
TILE_BITS = (2, 3, 4, 8)
NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ACT_NONE, ACT_SILU_PAIR, ACT_GELU = 0, 1, 2

try:  # programmatic dependent launch (Hopper)
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:
    _gdc_launch_dependents = _gdc_wait = None
PDL_AVAILABLE = _gdc_wait is not None


@dataclass(frozen=True)
class TiledConfig:
    """One launch shape of the tiled kernel: rows per program and warps."""

    block_n: int = 16
    num_warps: int = 2
    tiles_per_program: int = 0  # K tiles a program reduces; 0: all of K (no split, no atomics)

    @property
    def label(self) -> str:
        return f"tiled n{self.block_n}w{self.num_warps}t{self.tiles_per_program}"

    def to_json(self) -> dict:
        return {"block_n": self.block_n, "num_warps": self.num_warps, "tiles_per_program": self.tiles_per_program}


# The local candidate list (measured per weight family by QuantStaticDecoder.tune). The H200 probe of
# 2026-11-29 (benchmarks/results/quant_gemv_tiled_probe.json) saw whole-K programs (t0) reach only
# 6-43% of copy bandwidth: one 2-warp program per SM cannot keep enough loads in flight. Split-K
# (one or two 512-code tiles a program, all its words loaded before PDL's wait) multiplies the
# programs by the tiles and builds in a fraction of the time (a tile of code, not all of K, unrolled).
TILED_CANDIDATES = (TiledConfig(16, 2, 1), TiledConfig(8, 1, 1), TiledConfig(32, 2, 1), TiledConfig(16, 4, 1),
                    TiledConfig(16, 2, 2))
DEFAULT_TILED = TiledConfig(16, 2, 1)


def tile_padded(in_features: int, tile: int = TILE_CODES) -> int:
    return -(-in_features // tile) * tile


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding 0..2^32-1 -> the int32 with the same bits."""
    return (values - ((values >> 31) & 1) * (1 << 32)).to(torch.int32)


def pack_tiles(codes: torch.Tensor, bits: int, tile: int = TILE_CODES) -> torch.Tensor:
    """Codes ``(N, K)`` (0..2^bits-1) -> words ``(bits, N, Kp/32)`` int32 in the tiled layout."""
    if bits not in TILE_BITS:
        raise ConfigError(f"the tiled decode layout holds {TILE_BITS}-bit codes, not {bits}", stage="backend",
                          where="pack_tiles", hint="quantize to 2, 3, 4 or 8 bits")
    if tile % 32 or tile < 32:
        raise ConfigError(f"tile {tile} is not a multiple of 32", stage="backend", where="pack_tiles")
    n, k = codes.shape
    padded = torch.zeros(n, tile_padded(k, tile), dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    columns = tile // 32
    # (N, T, 32 slots m, C columns w) -> (N, T, C, 32): one column's 32 codes in slot order
    slots = padded.view(n, -1, 32, columns).transpose(2, 3)
    if bits == 3:
        words = []
        for i in range(3):
            fields = slots[..., 10 * i:10 * i + 10]
            shifts = torch.arange(10, device=codes.device) * 3
            words.append((fields << shifts).sum(-1))
        s30, s31 = slots[..., 30], slots[..., 31]
        words[0] = words[0] | ((s30 & 3) << 30)
        words[1] = words[1] | (((s30 >> 2) & 1) << 30) | ((s31 & 1) << 31)
        words[2] = words[2] | (((s31 >> 1) & 3) << 30)
    else:
        per = 32 // bits
        shifts = torch.arange(per, device=codes.device) * bits
        words = [(slots[..., i * per:(i + 1) * per] << shifts).sum(-1) for i in range(bits)]
    return torch.stack([_wrap_int32(w.flatten(1)) for w in words])  # (bits, N, T·C)


def unpack_tiles(words: torch.Tensor, bits: int, in_features: int, tile: int = TILE_CODES) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: codes ``(N, in_features)`` int64."""
    planes, n, count = words.shape
    columns = tile // 32
    w = words.to(torch.int64) & 0xFFFFFFFF  # (bits, N, T·C) unsigned
    w = w.view(planes, n, -1, columns)  # (bits, N, T, C)
    if bits == 3:
        shifts = torch.arange(10, device=words.device) * 3
        fields = [(w[i][..., None] >> shifts) & 7 for i in range(3)]  # 3 x (N, T, C, 10)
        s30 = ((w[0] >> 30) & 3) | (((w[1] >> 30) & 1) << 2)
        s31 = ((w[1] >> 31) & 1) | (((w[2] >> 30) & 3) << 1)
        slots = torch.cat(fields + [s30[..., None], s31[..., None]], dim=-1)  # (N, T, C, 32)
    else:
        per = 32 // bits
        shifts = torch.arange(per, device=words.device) * bits
        slots = torch.cat([(w[i][..., None] >> shifts) & ((1 << bits) - 1) for i in range(bits)], dim=-1)
    return slots.transpose(2, 3).reshape(n, -1)[:, :in_features]


@dataclass
class TiledWeight:
    """A quantized ``(N, K)`` matrix in the tiled layout, with what the kernel's epilogues need.

    ``scales (N, G)`` float32, ``zeros (N, G)`` uint8 or None (symmetric: 2^(bits-1)), ``group``
    the codes per group (K for one group per row). ``rowsum``/``bias`` (N,) float32: LayerNorm's
    mean term and the folded norm bias, or None.
    """

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group: int
    in_features: int
    rowsum: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    _partial: torch.Tensor | None = None  # split-K scratch: fp32 sums (N,), arrival counts (row blocks,)
    _count: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.words.shape[1]

    def scratch(self, row_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed split-K scratch (kept zero by the kernel). Made on the first split launch, which
        must come before a CUDA graph capture (the decoder's tuning and warm-up steps do)."""
        if self._partial is None or self._count.numel() < row_blocks:
            device = self.words.device
            self._partial = torch.zeros(self.out_features, dtype=torch.float32, device=device)
            self._count = torch.zeros(max(row_blocks, self.out_features // 8 + 1), dtype=torch.int32, device=device)
        return self._partial, self._count

    def nbytes(self) -> int:
        """Bytes one product reads from memory: the words, the scales and the zero points."""
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zeros) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(N, K)`` these words, scales and zeros stand for (the reference)."""
        codes = unpack_tiles(self.words, self.bits, self.in_features).float()  # (N, K)
        n, k = codes.shape
        groups = -(-k // self.group)
        padded = torch.zeros(n, groups * self.group, device=codes.device)
        padded[:, :k] = codes
        zeros = (self.zeros.float() if self.zeros is not None
                 else torch.full_like(self.scales, float(1 << (self.bits - 1))))
        weight = (padded.view(n, groups, self.group) - zeros[..., None]) * self.scales[..., None]
        return weight.flatten(1)[:, :k]


def tile_weight(quantized, *, rowsum: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> TiledWeight:
    """A :class:`slimline.quant.scheme.QuantizedWeight` in the tiled layout."""
    group = quantized.group_size
    k = quantized.in_features
    if group < k and (group % 32 or TILE_CODES % group):
        raise ConfigError(f"groups of {group} codes do not line up with {TILE_CODES}-code tiles", stage="backend",
                          where="tile_weight", hint="use groups of 32, 64, 128, 256 or 512, or one group per row")
    words = pack_tiles(quantized.codes[:, :k], quantized.scheme.bits)
    zeros = quantized.zeros.contiguous() if quantized.zeros is not None else None
    return TiledWeight(words, quantized.scales.float().contiguous(), zeros, quantized.scheme.bits, group, k,
                       rowsum, bias)


@triton.jit
def _plane(words_ptr, offs_nc, mask_nc, i: tl.constexpr, t: tl.constexpr, plane_stride,
           C: tl.constexpr, EVEN_N: tl.constexpr):
    """Words (BLOCK_N, C) of plane ``i``, tile ``t``."""
    pointers = words_ptr + i * plane_stride + t * C + offs_nc
    if EVEN_N:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask_nc, other=0)


@triton.jit
def _slot_value(w, j: tl.constexpr, BITS: tl.constexpr):
    """1 + q / 2^BITS as fp32, q the code at bits [j·BITS, (j+1)·BITS) of ``w``: shift, mask, or."""
    if j * BITS <= 23 - BITS:
        v = w << (23 - BITS - j * BITS)
    else:
        v = w >> (j * BITS - (23 - BITS))
    v = (v & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _slot3_tail(w0, w1, w2, which: tl.constexpr):
    """Slots 30 (which=0) and 31 (which=1) of the 3-bit layout, as 1 + q/8."""
    if which == 0:
        v = ((w0 >> 10) & (3 << 20)) | ((w1 >> 8) & (1 << 22))
    else:
        v = ((w1 >> 11) & (1 << 20)) | ((w2 >> 9) & (3 << 21))
    return (v | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    if i == 0:
        r = p0
    elif i == 1:
        r = p1
    elif i == 2:
        r = p2
    elif i == 3:
        r = p3
    elif i == 4:
        r = p4
    elif i == 5:
        r = p5
    elif i == 6:
        r = p6
    else:
        r = p7
    return r


@triton.jit
def _x_slot(x_ptr, t, m: tl.constexpr, offs_c, K: tl.constexpr, TILE: tl.constexpr, C: tl.constexpr,
            EVEN_K: tl.constexpr):
    """x at the codes of slot ``m`` of tile ``t``: C contiguous values, fp32 (0 past K)."""
    start = t * TILE + m * C
    if EVEN_K:
        xm = tl.load(x_ptr + start + offs_c)
    else:
        xm = tl.load(x_ptr + start + offs_c, mask=start + offs_c < K, other=0.0)
    return xm.to(tl.float32)


@triton.jit
def _group_end(acc, part, scales_ptr, offs_n, mask_n, t, m: tl.constexpr, G,
               TILE: tl.constexpr, C: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr):
    """After slot m: if it closes a group (groups of at most a tile), acc += a·part (a = scale·2^BITS)
    and part restarts. One group a row (GROUP > TILE) closes after the loop instead."""
    if GROUP <= TILE:
        if ((m + 1) * C) % GROUP == 0:
            g = t * (TILE // GROUP) + (m * C) // GROUP
            a = tl.load(scales_ptr + offs_n * G + g, mask=mask_n & (offs_n * 0 + g < G), other=0.0) * (1 << BITS)
            acc += a[:, None] * part
            part = tl.zeros_like(part)
    return acc, part


@triton.jit
def _epilogue(y, x_ptr, out_ptr, res_ptr, rowsum_ptr, bias_ptr, offs_n, mask_n, pid, N, eps,
              K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = Q x (BLOCK_N,) -> the norm's scaling, bias, rounding, SiLU·up / GELU, residual, store."""
    if NORM != 0:  # x's statistics over all of K
        total = tl.zeros((1024,), tl.float32)
        squares = tl.zeros((1024,), tl.float32)
        for k0 in tl.static_range(0, K, 1024):
            offs_k = k0 + tl.arange(0, 1024)
            xk = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            total += xk
            squares += xk * xk
        sum_x = tl.sum(total, axis=0)
        sum_squares = tl.sum(squares, axis=0)
        if NORM == 1:
            y = y / tl.sqrt(sum_squares / K + eps)
        else:
            mean = sum_x / K
            rstd = 1.0 / tl.sqrt(tl.maximum(sum_squares / K - mean * mean, 0.0) + eps)
            rowsum = tl.load(rowsum_ptr + offs_n, mask=mask_n, other=0.0)
            y = (y - mean * rowsum) * rstd
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the projection, rounded as torch rounds it
    if ACT == 1:  # rows interleaved [gate_0, up_0, gate_1, up_1, ...]: out = silu(gate) · up
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        gate = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
        y_out = gate * up
        offs_out = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        mask_out = offs_out < N // 2
    else:
        y_out = y
        if ACT == 2:  # exact (erf) GELU
            y_out = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        offs_out = offs_n
        mask_out = mask_n
    if RESIDUAL:
        y_out = y_out.to(out_ptr.dtype.element_ty).to(tl.float32)
        y_out += tl.load(res_ptr + offs_out, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_out, y_out.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _tiled_gemv_kernel(x_ptr, words_ptr, scales_ptr, zeros_ptr, out_ptr, res_ptr, rowsum_ptr, bias_ptr,
                       partial_ptr, count_ptr, N, G, plane_stride, eps,
                       K: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                       TILE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)  # which K split: tiles pid_s·TPS .. pid_s·TPS + TPS - 1
    if USE_PDL:
        _gdc_launch_dependents()
    C: tl.constexpr = TILE // 32
    TPS: tl.constexpr = KP // TILE // SPLIT  # tiles per split
    PLANES: tl.constexpr = BITS
    P: tl.constexpr = 10 if BITS == 3 else 32 // BITS  # regular slots per word
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_c = tl.arange(0, C)
    offs_nc = offs_n[:, None].to(tl.int64) * (KP // 32) + offs_c[None, :]  # (BLOCK_N, C)
    mask_nc = mask_n[:, None] & (offs_c < C)[None, :]
    t0 = pid_s * TPS
    # before the wait: the split's first tile of words, its groups' scales and zeros (none depend on x)
    p0 = _plane(words_ptr, offs_nc, mask_nc, 0, t0, plane_stride, C, EVEN_N)
    p1 = p0
    p2 = p0
    p3 = p0
    p4 = p0
    p5 = p0
    p6 = p0
    p7 = p0
    if PLANES > 1:
        p1 = _plane(words_ptr, offs_nc, mask_nc, 1, t0, plane_stride, C, EVEN_N)
    if PLANES > 2:
        p2 = _plane(words_ptr, offs_nc, mask_nc, 2, t0, plane_stride, C, EVEN_N)
    if PLANES > 3:
        p3 = _plane(words_ptr, offs_nc, mask_nc, 3, t0, plane_stride, C, EVEN_N)
    if PLANES > 4:
        p4 = _plane(words_ptr, offs_nc, mask_nc, 4, t0, plane_stride, C, EVEN_N)
        p5 = _plane(words_ptr, offs_nc, mask_nc, 5, t0, plane_stride, C, EVEN_N)
        p6 = _plane(words_ptr, offs_nc, mask_nc, 6, t0, plane_stride, C, EVEN_N)
        p7 = _plane(words_ptr, offs_nc, mask_nc, 7, t0, plane_stride, C, EVEN_N)
    offs_g = tl.arange(0, BLOCK_G)
    if GROUP <= TILE:  # the split's groups: g0 .. g0 + GPS - 1
        GPS: tl.constexpr = TPS * (TILE // GROUP)
        g_index = t0 * (TILE // GROUP) + offs_g
        valid_g = (offs_g < GPS) & (g_index < G)
    else:  # one group a row
        g_index = offs_g
        valid_g = offs_g < 1
    mask_ng = mask_n[:, None] & valid_g[None, :]
    scales = tl.load(scales_ptr + offs_n[:, None] * G + g_index[None, :], mask=mask_ng, other=0.0)
    if HAS_ZEROS:
        zeros = tl.load(zeros_ptr + offs_n[:, None] * G + g_index[None, :], mask=mask_ng, other=0).to(tl.float32)
    else:
        zeros = tl.full((BLOCK_N, BLOCK_G), 1 << (BITS - 1), tl.float32)
    if USE_PDL:
        _gdc_wait()  # x (and the residual) come from the previous kernel
    # x summed per group of the split, S (BLOCK_G,)
    if GROUP <= TILE:
        offs_in = tl.arange(0, GROUP)
        index = g_index[:, None] * GROUP + offs_in[None, :]  # (BLOCK_G, GROUP)
        xg = tl.load(x_ptr + index, mask=valid_g[:, None] & (index < K), other=0.0).to(tl.float32)
        group_sums = tl.sum(xg, axis=1)
    else:
        total = tl.zeros((TILE,), tl.float32)
        for tt in tl.static_range(TPS):
            offs_k = (t0 + tt) * TILE + tl.arange(0, TILE)
            total += tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        group_sums = tl.where(offs_g == 0, tl.sum(total, axis=0), 0.0)
    # Σ_g c·S_g, c = s·(2^b + z)
    correction = tl.sum(scales * ((1 << BITS) + zeros) * group_sums[None, :], axis=1)  # (BLOCK_N,)
    acc = tl.zeros((BLOCK_N, C), tl.float32)
    part = tl.zeros((BLOCK_N, C), tl.float32)
    for tt in tl.static_range(TPS):
        t = t0 + tt
        for i in tl.static_range(PLANES):
            if tt == 0:
                w = _pick(i, p0, p1, p2, p3, p4, p5, p6, p7)
            else:
                w = _plane(words_ptr, offs_nc, mask_nc, i, t, plane_stride, C, EVEN_N)
            for j in tl.static_range(P):
                xm = _x_slot(x_ptr, t, i * P + j, offs_c, K, TILE, C, EVEN_K)
                part += _slot_value(w, j, BITS) * xm[None, :]
                acc, part = _group_end(acc, part, scales_ptr, offs_n, mask_n, t, i * P + j, G, TILE, C, GROUP, BITS)
        if BITS == 3:
            if tt == 0:
                w0 = p0
                w1 = p1
                w2 = p2
            else:
                w0 = _plane(words_ptr, offs_nc, mask_nc, 0, t, plane_stride, C, EVEN_N)
                w1 = _plane(words_ptr, offs_nc, mask_nc, 1, t, plane_stride, C, EVEN_N)
                w2 = _plane(words_ptr, offs_nc, mask_nc, 2, t, plane_stride, C, EVEN_N)
            for which in tl.static_range(2):
                xm = _x_slot(x_ptr, t, 30 + which, offs_c, K, TILE, C, EVEN_K)
                part += _slot3_tail(w0, w1, w2, which) * xm[None, :]
                acc, part = _group_end(acc, part, scales_ptr, offs_n, mask_n, t, 30 + which, G, TILE, C, GROUP,
                                       BITS)
    if GROUP > TILE:  # the row's one group closes here
        a = tl.load(scales_ptr + offs_n * G, mask=mask_n, other=0.0) * (1 << BITS)
        acc += a[:, None] * part
    y = tl.sum(acc, axis=1) - correction  # (BLOCK_N,) this split's share of Q x
    if SPLIT == 1:
        _epilogue(y, x_ptr, out_ptr, res_ptr, rowsum_ptr, bias_ptr, offs_n, mask_n, pid, N, eps,
                  K, NORM, ACT, RESIDUAL, HAS_BIAS, BLOCK_N)
    else:  # fp32 atomics into a scratch row; the last split to arrive finishes (and zeroes the scratch)
        tl.atomic_add(partial_ptr + offs_n, y, mask=mask_n)
        tl.debug_barrier()  # every thread's sums are in before the count (released by its acq_rel atomic)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total_y = tl.atomic_add(partial_ptr + offs_n, tl.zeros_like(y), mask=mask_n)  # read at L2
            tl.store(partial_ptr + offs_n, tl.zeros_like(y), mask=mask_n)  # the only program left on these rows
            tl.store(count_ptr + pid, 0)
            _epilogue(total_y, x_ptr, out_ptr, res_ptr, rowsum_ptr, bias_ptr, offs_n, mask_n, pid, N, eps,
                      K, NORM, ACT, RESIDUAL, HAS_BIAS, BLOCK_N)


def _use_pdl(pdl: bool) -> bool:
    import os

    return pdl and PDL_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def tile_count(in_features: int) -> int:
    return tile_padded(in_features) // TILE_CODES


def splits_for(weight: "TiledWeight", config: TiledConfig) -> int:
    """K splits of one launch: tiles / config.tiles_per_program (1 when that does not divide)."""
    tiles = tile_count(weight.in_features)
    per = config.tiles_per_program
    return tiles // per if per and tiles % per == 0 else 1


def fits(weight: "TiledWeight", config: TiledConfig) -> bool:
    """Whether ``config`` splits this weight's K as it says (its tiles per program divide the tiles)."""
    per = config.tiles_per_program
    return per == 0 or tile_count(weight.in_features) % per == 0


def tiled_gemv(x: torch.Tensor, weight: TiledWeight, out: torch.Tensor, *, norm: int = NORM_NONE,
               eps: float = 1e-6, act: int = ACT_NONE, residual: torch.Tensor | None = None,
               config: TiledConfig = DEFAULT_TILED, pdl: bool = False) -> torch.Tensor:
    """out (N or N/2,) = epilogue(norm-scaled (Q · x (K,))) [+ residual]; returns out.

    ``act=ACT_SILU_PAIR``: the weight's rows are interleaved [gate_0, up_0, gate_1, ...] and out is
    silu(gate)·up (N/2,). ``norm``: RMS or Layer, with the norm's weight already folded into Q (and
    for LayerNorm ``weight.rowsum`` and ``weight.bias`` set). ``out`` may be ``residual``. With
    ``config.tiles_per_program`` set, K is split over programs that add fp32 partials atomically
    (the order of those additions is not fixed: the last bits may differ from run to run).
    """
    n, k = weight.out_features, weight.in_features
    if x.shape != (k,) or not x.is_contiguous():
        raise ConfigError(f"tiled_gemv takes one contiguous row x of {k}, got {tuple(x.shape)}", stage="backend",
                          where="tiled_gemv", hint="flatten x to (K,)")
    if norm == NORM_LAYER and weight.rowsum is None:
        raise ConfigError("LayerNorm prologue needs the weight's row sums", stage="backend", where="tiled_gemv",
                          hint="set TiledWeight.rowsum (the dequantized weight summed over K)")
    if act == ACT_SILU_PAIR and config.block_n % 2:
        raise ConfigError(f"SiLU pairs need an even block_n, got {config.block_n}", stage="backend",
                          where="tiled_gemv")
    kp = weight.words.shape[2] * 32
    group = weight.group if weight.group < k else kp
    groups = weight.scales.shape[1]
    split = splits_for(weight, config)
    tiles_per_split = kp // TILE_CODES // split
    if group <= TILE_CODES:
        block_g = max(2, triton.next_power_of_2(tiles_per_split * (TILE_CODES // group)))
    else:
        block_g = 2
    rows = triton.cdiv(n, config.block_n)
    partial, count = weight.scratch(rows) if split > 1 else (weight.scales, weight.scales)
    pdl = _use_pdl(pdl)
    scales = weight.scales
    _tiled_gemv_kernel[(rows, split)](
        x, weight.words, scales, weight.zeros if weight.zeros is not None else scales, out,
        residual if residual is not None else out,
        weight.rowsum if weight.rowsum is not None else scales, weight.bias if weight.bias is not None else scales,
        partial, count, n, groups, weight.words.stride(0), float(eps),
        K=k, KP=kp, BITS=weight.bits, GROUP=group, TILE=TILE_CODES, SPLIT=split, BLOCK_G=block_g,
        HAS_ZEROS=weight.zeros is not None, NORM=norm, ACT=act, RESIDUAL=residual is not None,
        HAS_BIAS=weight.bias is not None, EVEN_N=n % config.block_n == 0, EVEN_K=k % TILE_CODES == 0,
        BLOCK_N=config.block_n, USE_PDL=pdl, num_warps=config.num_warps, **({"launch_pdl": True} if pdl else {}))
    return out


def reference_gemv(x: torch.Tensor, weight: TiledWeight, *, norm: int = NORM_NONE, eps: float = 1e-6,
                   act: int = ACT_NONE, residual: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`tiled_gemv` computes, in float32 torch from the dequantized weight (for checks)."""
    xf = x.float()
    y = weight.dequantize() @ xf  # (N,)
    if norm == NORM_RMS:
        y = y * torch.rsqrt(xf.pow(2).mean() + eps)
    elif norm == NORM_LAYER:
        mean = xf.mean()
        y = (y - mean * weight.rowsum) * torch.rsqrt(xf.var(unbiased=False) + eps)
    if weight.bias is not None:
        y = y + weight.bias
    if act == ACT_SILU_PAIR:
        gate, up = y[0::2], y[1::2]
        y = torch.nn.functional.silu(gate) * up
    elif act == ACT_GELU:
        y = torch.nn.functional.gelu(y)
    if residual is not None:
        y = y + residual.float()
    return y


def compile_tiled_for_target(bits: int, in_features: int, group: int | None, config: TiledConfig, *,
                             norm: int = NORM_RMS, act: int = ACT_NONE, residual: bool = False,
                             symmetric: bool = False, arch: int = 90) -> dict:
    """Compile one specialization of the tiled kernel for ``sm_{arch}`` without a GPU (not under
    ``TRITON_INTERPRET``): the real compiler is stricter than the interpreter. Pointers and the
    integer arguments are marked 16-divisible, as Triton's launcher specialises them on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kp = tile_padded(in_features)
    group_codes = kp if group is None or group >= in_features else group
    tiles = kp // TILE_CODES
    split = tiles // config.tiles_per_program if config.tiles_per_program and tiles % config.tiles_per_program == 0 else 1
    per_split = tiles // split
    block_g = max(2, triton.next_power_of_2(per_split * TILE_CODES // group_codes)) if group_codes <= TILE_CODES else 2
    constants = {"K": in_features, "KP": kp, "BITS": bits, "GROUP": group_codes, "TILE": TILE_CODES, "SPLIT": split,
                 "BLOCK_G": block_g, "HAS_ZEROS": not symmetric, "NORM": norm, "ACT": act, "RESIDUAL": residual,
                 "HAS_BIAS": False, "EVEN_N": True, "EVEN_K": in_features % TILE_CODES == 0,
                 "BLOCK_N": config.block_n, "USE_PDL": PDL_AVAILABLE}
    pointers = {"x_ptr": "bf16", "words_ptr": "i32", "scales_ptr": "fp32", "zeros_ptr": "u8", "out_ptr": "bf16",
                "res_ptr": "bf16", "rowsum_ptr": "fp32", "bias_ptr": "fp32", "partial_ptr": "fp32", "count_ptr": "i32"}
    signature, attrs = {}, {}
    for index, name in enumerate(_tiled_gemv_kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(_tiled_gemv_kernel, signature, constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
    ptx = compiled.asm["ptx"]
    return {"config": config.label, "split": split, "shared_bytes": compiled.metadata.shared,
            "wide_loads": ptx.count("ld.global.v4"), "atomics": ptx.count("atom.global")}
