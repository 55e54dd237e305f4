"""Search spaces: device limits, kernel families, and candidates derived from both.

A *family* is one kind of kernel problem with several implementations: a dense matmul (cuBLAS
through torch, or slimline's Triton tiles), a Monarch block-diagonal matmul (the plain torch form,
or the fused Triton variants), a low-bit dequant GEMV/GEMM (torch dequantize-then-matmul, or the
Triton kernel), and on the CPU the linear implementations torch offers. For one problem a family
gives:

- ``incumbent``: the pick a user gets without slimline (the library path); it is always measured,
  and kept unless a challenger beats it by more than the measured noise;
- ``candidates(mode)``: the incumbent first, then configs derived from the device's limits and
  pruned by bounds: shared memory fits, registers per thread fit, enough tiles to fill the SMs,
  tiles no taller than the rows, K split only when the output tiles cannot fill the SMs. A small
  performance model ranks what survives; ``lite`` keeps about ten, ``max`` about three times more;
- ``perf_model_pick``: the pick when no time is left to measure;
- ``cost``: FLOPs and bytes, which the tuner turns into the time the model spends there;
- ``workload(device)``: tensors of the problem's shape, the reference output, one callable per
  candidate (used only when measuring; never in ``tune="cache"``).

Configs are plain JSON dicts (the cache stores them); the family turns them back into kernel
configs. :data:`H200` is a fixed description of the H200 (read off one with
``torch.cuda.get_device_properties``), used without a GPU by tests and by ``tune="cache"``.

Shape letters: M rows, N out features, K in features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from slimline.autotune.cache import DeviceFingerprint, source_hash

__all__ = ["DeviceLimits", "H200", "CPU_HOST", "Problem", "Candidate", "Workload", "KernelFamily",
           "DenseMatmul", "MonarchMatmul", "QuantMatmul", "CpuLinear", "FAMILIES", "family",
           "row_bucket", "MODES"]

MODES = ("lite", "max")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class DeviceLimits:
    """What bounds a kernel config on one device, and two ceilings for the time model."""

    name: str
    capability: str                 # "9.0"; "cpu"
    multiprocessors: int            # SMs (cores on the CPU)
    shared_per_block: int           # bytes a block may opt in to
    registers_per_sm: int
    l2_bytes: int
    memory_bytes: int
    peak_tflops: float              # 16-bit dense matmul, measured where known
    bandwidth_gbps: float           # device memory, read + write, measured where known
    kind: str = "cuda"

    @property
    def fingerprint(self) -> DeviceFingerprint:
        return DeviceFingerprint(self.name, self.capability, self.multiprocessors,
                                 int(round(self.memory_bytes / 2 ** 30)))

    @classmethod
    def from_torch(cls, device: torch.device | str | int | None = None) -> "DeviceLimits":
        """The limits of a CUDA device as torch reports them (ceilings: H200's if it is one)."""
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        capability = f"{props.major}.{props.minor}"
        shared = int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)
        registers = int(getattr(props, "regs_per_multiprocessor", 0) or 65536)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)
        if "H200" in props.name:
            tflops, bandwidth = H200.peak_tflops, H200.bandwidth_gbps
        else:  # a rough guess from the SM count: the ratio is what the tuner uses
            tflops, bandwidth = 6.0 * props.multi_processor_count, 25.0 * props.multi_processor_count
        return cls(props.name, capability, props.multi_processor_count, shared, registers, l2,
                   int(props.total_memory), tflops, bandwidth)

    @classmethod
    def host(cls) -> "DeviceLimits":
        import os
        return replace(CPU_HOST, multiprocessors=os.cpu_count() or 1)


# Read on the GPU machine with torch.cuda.get_device_properties (2026-11-29); ceilings measured
# there (DESIGN.md): bf16 GEMM 790 TFLOP/s, device copy 4.19 TB/s.
H200 = DeviceLimits("NVIDIA H200", "9.0", 132, 232448, 65536, 62914560, 150_109_880_320, 790.0, 4190.0)
CPU_HOST = DeviceLimits("cpu", "cpu", 1, 0, 0, 32 * 2 ** 20, 0, 1.0, 20.0, kind="cpu")


# ---------------------------------------------------------------------------------------------
# problems and candidates


def row_bucket(rows: int) -> int:
    """Rows are bucketed: 1 (a vector), ≤ 16 (one tensor-core tile), then powers of two."""
    if rows <= 1:
        return 1
    if rows <= 16:
        return 16
    return 1 << math.ceil(math.log2(rows))


@dataclass(frozen=True)
class Problem:
    """One kernel problem: a family name and its parameters (sorted ``(name, value)`` pairs)."""

    family: str
    params: tuple = ()

    @classmethod
    def make(cls, family: str, **params: Any) -> "Problem":
        return cls(family, tuple(sorted(params.items())))

    def __getitem__(self, name: str) -> Any:
        return dict(self.params)[name]

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class Candidate:
    """One implementation choice: a label for reports and a JSON config for the cache."""

    label: str
    config: tuple = ()          # sorted (name, value) pairs: hashable; ``as_dict`` for JSON

    @classmethod
    def make(cls, label: str, **config: Any) -> "Candidate":
        return cls(label, tuple(sorted(config.items())))

    def as_dict(self) -> dict:
        return dict(self.config)


@dataclass
class Workload:
    """Tensors for one problem: ``run(candidate)`` returns a no-argument callable giving y."""

    reference: torch.Tensor
    run: Callable[[Candidate], Callable[[], torch.Tensor]]
    tolerance: float
    keep: list = field(default_factory=list)    # tensors that must outlive the callables


def _relative_error(reference: torch.Tensor, actual: torch.Tensor) -> float:
    if actual.shape != reference.shape:
        return math.inf
    reference, actual = reference.double(), actual.double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    return float((actual - reference).norm() / reference.norm().clamp(min=1e-300))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


class KernelFamily:
    """The interface every family implements (see the module doc)."""

    name = "family"
    device_kind = "cuda"           # where it runs: "cuda" or "cpu"

    def kernel_hash(self) -> str:
        raise NotImplementedError

    def problem_key(self, problem: Problem) -> str:
        raise NotImplementedError

    def incumbent(self, problem: Problem, limits: DeviceLimits) -> Candidate:
        raise NotImplementedError

    def candidates(self, problem: Problem, limits: DeviceLimits, mode: str = "lite") -> list[Candidate]:
        raise NotImplementedError

    def perf_model_pick(self, problem: Problem, limits: DeviceLimits) -> Candidate:
        return self.incumbent(problem, limits)

    def cost(self, problem: Problem) -> tuple[float, float]:
        """(FLOPs, bytes) of one call."""
        raise NotImplementedError

    def workload(self, problem: Problem, device: torch.device, seed: int = 0) -> Workload:
        raise NotImplementedError

    def compile_workload(self, problem: Problem, device: torch.device) -> Workload:
        """Stand-in tensors of the problem's shape, enough to compile every candidate (fast to make)."""
        return self.workload(problem, device)

    def from_config(self, config: dict) -> Candidate:
        """A cached config back into a candidate (labels are rebuilt from the config)."""
        return Candidate.make(config.get("label", "?"), **config)

    def estimated_ms(self, problem: Problem, limits: DeviceLimits) -> float:
        flops, moved = self.cost(problem)
        return max(flops / (limits.peak_tflops * 1e9), moved / (limits.bandwidth_gbps * 1e6))


def _powers(low: int, high: int) -> list[int]:
    return [1 << e for e in range(int(math.log2(low)), int(math.log2(high)) + 1)] if low <= high else []


def _rank_and_cut(scored: list[tuple[float, Candidate]], count: int, diverse: Callable[[Candidate], Any]
                  ) -> list[Candidate]:
    """The ``count`` best by model score, the best of each ``diverse`` key taken first."""
    scored = sorted(scored, key=lambda pair: pair[0])
    chosen, seen = [], set()
    for _, candidate in scored:
        key = diverse(candidate)
        if key not in seen:
            seen.add(key)
            chosen.append(candidate)
    for _, candidate in scored:
        if candidate not in chosen:
            chosen.append(candidate)
    return sorted(chosen[:count], key=lambda c: [s for s, cand in scored if cand == c][0])


def _size_of(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


# ---------------------------------------------------------------------------------------------
# dense matmul: cuBLAS (torch) against Triton tiles


class DenseMatmul(KernelFamily):
    """``y = x · wᵀ``; problem ``M, N, K, dtype``. Incumbent: ``torch.nn.functional.linear``."""

    name = "dense_matmul"
    LITE, MAX = 10, 32

    def kernel_hash(self) -> str:
        from slimline.autotune import dense_kernel
        return source_hash(*dense_kernel.KERNELS, dense_kernel.dense_matmul)

    def problem_key(self, problem: Problem) -> str:
        return (f"M{row_bucket(problem['M'])}-N{problem['N']}-K{problem['K']}-{problem['dtype']}"
                f"-{problem.get('layout', 'x_MK.w_NK')}")

    def incumbent(self, problem, limits):
        return Candidate.make("torch.linear (cuBLAS)", impl="torch")

    def cost(self, problem):
        M, N, K, size = problem["M"], problem["N"], problem["K"], _size_of(problem["dtype"])
        return 2.0 * M * N * K, float(size * (M * K + N * K + M * N))

    def legal(self, problem: Problem, limits: DeviceLimits) -> list[tuple[float, Candidate]]:
        """Every config inside the bounds, with its model time (ms)."""
        M, N, K, size = problem["M"], problem["N"], problem["K"], _size_of(problem["dtype"])
        sms = limits.multiprocessors
        decode = M <= 16
        tallest = max(16, 1 << math.ceil(math.log2(max(M, 1))))
        found = []
        for block_m in _powers(16, min(256, tallest)):                 # no taller than the rows
            for block_n in _powers(16, 256):
                for block_k in _powers(32, 512):
                    if block_k > max(32, 1 << math.ceil(math.log2(K))):
                        continue
                    for warps in (4, 8):
                        # registers: the fp32 accumulator plus one stage of operands per thread
                        per_thread = (block_m * block_n + (block_m + block_n) * block_k * size // 4) / (warps * 32)
                        if per_thread > 160:
                            continue
                        if block_m * block_n < 64 * warps:               # too little work per warp
                            continue
                        tiles = math.ceil(M / block_m) * math.ceil(N / block_n)
                        for stages in (2, 3, 4, 5):
                            shared = stages * (block_m + block_n) * block_k * size
                            if shared > limits.shared_per_block:
                                continue
                            splits = (1, 2, 4, 8) if decode else (1,)
                            for split in splits:
                                if split > 1 and (tiles >= sms or K // split < 2 * block_k):
                                    continue                              # split only to fill SMs
                                if tiles * split < sms // 2 and split * 2 in splits and K // (2 * split) >= 2 * block_k:
                                    continue                              # a larger split fills better
                                candidate = Candidate.make(
                                    DenseMatmulLabel(block_m, block_n, block_k, split, warps, stages),
                                    impl="triton", block_m=block_m, block_n=block_n, block_k=block_k,
                                    group_m=8, split_k=split, num_warps=warps, num_stages=stages)
                                found.append((self._model_ms(problem, limits, block_m, block_n, block_k,
                                                             split, warps, stages, shared), candidate))
        return found

    @staticmethod
    def _model_ms(problem, limits, block_m, block_n, block_k, split, warps, stages, shared) -> float:
        """A roofline with tile efficiency and wave quantisation: ranks configs, never picks alone."""
        M, N, K, size = problem["M"], problem["N"], problem["K"], _size_of(problem["dtype"])
        tiles = math.ceil(M / block_m) * math.ceil(N / block_n) * split
        resident = max(1, min(8, limits.shared_per_block // max(shared, 1), 64 // (warps * 2)))
        slots = limits.multiprocessors * resident
        waves = math.ceil(tiles / slots)
        fill = tiles / (waves * slots)
        efficiency = (min(1.0, block_m / 128) ** 0.5 * min(1.0, block_n / 128) ** 0.5 * min(1.0, stages / 3)
                      * min(1.0, block_k / 64) ** 0.5)
        flops = 2.0 * M * N * K
        compute = flops / (limits.peak_tflops * 1e9 * efficiency * max(fill, 0.05))
        # bytes through L2 (x re-read per column of tiles, w per row of tiles), DRAM once
        l2_bytes = size * (M * K * math.ceil(N / block_n) + N * K * math.ceil(M / block_m))
        dram = size * (M * K + N * K) + 4 * M * N * split
        memory = max(dram / (limits.bandwidth_gbps * 1e6), l2_bytes / (3 * limits.bandwidth_gbps * 1e6))
        memory /= min(1.0, max(fill, 0.05) * 2)        # a half-empty GPU cannot pull full bandwidth
        steps = math.ceil(K / (split * block_k)) * waves        # serial K steps per program: latency
        return max(compute, memory) + steps * 0.0004 + 0.003 * (split > 1)  # + the split's reduction

    def candidates(self, problem, limits, mode="lite"):
        count = self.LITE - 1 if mode == "lite" else self.MAX - 1
        chosen = _rank_and_cut(self.legal(problem, limits), count,
                               lambda c: (c.as_dict()["block_m"], c.as_dict()["block_n"], c.as_dict()["split_k"]))
        return [self.incumbent(problem, limits)] + chosen

    def compile_workload(self, problem, device):
        """Random tensors made on the device, no reference: enough to compile every config."""
        M, N, K, dtype = problem["M"], problem["N"], problem["K"], _DTYPES[problem["dtype"]]
        x, w = torch.randn(M, K, device=device, dtype=dtype), torch.randn(N, K, device=device, dtype=dtype)
        full = self.workload(problem, device, tensors=(x, w))
        return full

    def workload(self, problem, device, seed=0, tensors=None):
        from slimline.autotune.dense_kernel import DenseConfig, dense_matmul

        M, N, K, dtype = problem["M"], problem["N"], problem["K"], _DTYPES[problem["dtype"]]
        if tensors is not None:                     # compiling only: no reference needed
            x, w = tensors
            reference = x
        else:
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(M, K, generator=generator).to(device, dtype)
            w = (torch.randn(N, K, generator=generator) / math.sqrt(K)).to(device, dtype)
            reference = (x.double() @ w.double().t()) if device.type == "cpu" else (x.float() @ w.float().t())

        def run(candidate: Candidate):
            config = candidate.as_dict()
            if config["impl"] == "torch":
                return lambda: torch.nn.functional.linear(x, w)
            tiles = DenseConfig(config["block_m"], config["block_n"], config["block_k"], config["group_m"],
                                config["split_k"], config["num_warps"], config["num_stages"])
            return lambda: dense_matmul(x, w, tiles)

        return Workload(reference, run, _tolerance(dtype), keep=[x, w])


def DenseMatmulLabel(block_m, block_n, block_k, split, warps, stages) -> str:  # noqa: N802 (a label maker)
    return f"triton[m{block_m} n{block_n} k{block_k} s{split} w{warps} st{stages}]"


# ---------------------------------------------------------------------------------------------
# Monarch block-diagonal matmul: the plain torch form against the fused Triton variants


class MonarchMatmul(KernelFamily):
    """Problem ``M, K, N, nblocks, slab_rank (0: auto), dtype``. Incumbent: the plain form (two bmm)."""

    name = "monarch_matmul"
    LITE, MAX = 10, 32

    def _shape(self, problem):
        from slimline.monarch import monarch_shape
        return monarch_shape(problem["K"], problem["N"], problem["nblocks"], problem.get("slab_rank") or None,
                             uneven="pad")

    def kernel_hash(self) -> str:
        from slimline.backends.cuda import monarch_kernel as mk
        # the whole module: its variants (split-K, phased, staged, rows) and their jit helpers
        # change together, and a kernel left out of a list would keep stale picks alive
        return source_hash(mk)

    def problem_key(self, problem):
        s = self._shape(problem)
        return (f"M{row_bucket(problem['M'])}-K{s.in_features}-N{s.out_features}-b{s.nblocks}-T{s.slab_rank}"
                f"-{problem['dtype']}")

    def incumbent(self, problem, limits):
        return Candidate.make("torch bmm form", impl="torch")

    def cost(self, problem):
        s, M, size = self._shape(problem), problem["M"], _size_of(problem["dtype"])
        return 2.0 * M * s.params, float(size * (s.params + M * (s.in_features + s.out_features)))

    @staticmethod
    def _candidate(config) -> Candidate:
        return Candidate.make(config.label(), impl="triton", **asdict(config))

    def _configs(self, problem, limits, mode):
        from slimline.backends.cuda.monarch_kernel import candidate_configs, check_config

        shape, rows = self._shape(problem), problem["M"]
        if mode == "lite":
            return candidate_configs(shape, rows, limits.multiprocessors, limit=self.LITE - 1)
        wide = candidate_configs(shape, rows, limits.multiprocessors, limit=10 ** 6)
        more = list(wide)
        for config in wide:  # max also varies warps and pipeline stages around each tiling
            for warps in (4, 8):
                for stages in ((1, 2) if rows <= 16 else (2, 3, 4)):
                    variant = replace(config, num_warps=warps, num_stages=stages)
                    if variant not in more and not check_config(variant, shape):
                        more.append(variant)
        lite = candidate_configs(shape, rows, limits.multiprocessors, limit=self.LITE - 1)
        rest = [c for c in more if c not in lite]
        step = max(1, len(rest) // max(1, self.MAX - 1 - len(lite)))
        return lite + rest[::step][: self.MAX - 1 - len(lite)]

    def candidates(self, problem, limits, mode="lite"):
        return [self.incumbent(problem, limits)] + [self._candidate(c) for c in self._configs(problem, limits, mode)]

    def perf_model_pick(self, problem, limits):
        lite = self._configs(problem, limits, "lite")       # likeliest first for decode
        if problem["M"] <= 16 and lite:
            return self._candidate(lite[0])
        return self.incumbent(problem, limits)

    def workload(self, problem, device, seed=0):
        from slimline.backends.cuda.monarch_kernel import KernelConfig, MonarchKernel
        from slimline.monarch import monarch_forward, random_factors

        shape, M, dtype = self._shape(problem), problem["M"], _DTYPES[problem["dtype"]]
        generator = torch.Generator().manual_seed(seed)
        factors = random_factors(shape, generator)
        right, left = factors.right_bPQ.to(device, dtype), factors.left_bQS.to(device, dtype)
        x = torch.randn(M, shape.in_features, generator=generator).to(device, dtype)
        kernel = MonarchKernel.from_factors(right, left, shape)
        reference = monarch_forward(x.double() if device.type == "cpu" else x.float(),
                                    right.to(x.double().dtype if device.type == "cpu" else torch.float32),
                                    left.to(torch.float64 if device.type == "cpu" else torch.float32), shape)
        out = torch.empty(M, shape.out_features, dtype=dtype, device=device)

        def run(candidate: Candidate):
            config = candidate.as_dict()
            if config["impl"] == "torch":
                return lambda: monarch_forward(x, right, left, shape)
            fields = {k: v for k, v in config.items() if k != "impl"}
            tiles = KernelConfig(**fields)
            return lambda: kernel(x, tiles, out=out)

        return Workload(reference, run, _tolerance(dtype), keep=[x, right, left, kernel, out])


# ---------------------------------------------------------------------------------------------
# low-bit dequant GEMV / GEMM: torch dequantize-then-matmul against the Triton kernel


class QuantMatmul(KernelFamily):
    """Problem ``M, N, K, bits, group (0: per channel), dtype``. Incumbent: dequantize + linear."""

    name = "quant_matmul"
    LITE, MAX = 10, 32

    def __init__(self):
        self._memo: dict = {}

    def kernel_hash(self) -> str:
        from slimline.backends.cuda import quant_kernels as qk
        return source_hash(qk._quant_matmul_kernel, qk._codes_tile, qk._group_tile, qk.quant_matmul)

    def problem_key(self, problem):
        from slimline.quant.pack import default_layout
        return (f"M{row_bucket(problem['M'])}-N{problem['N']}-K{problem['K']}-int{problem['bits']}"
                f"-g{problem.get('group', 0)}-{default_layout(problem['bits'])}-{problem['dtype']}")

    def incumbent(self, problem, limits):
        return Candidate.make("torch dequantize + linear", impl="torch")

    def cost(self, problem):
        M, N, K, bits, size = problem["M"], problem["N"], problem["K"], problem["bits"], _size_of(problem["dtype"])
        group = problem.get("group") or K
        weight = N * K * bits / 8 + N * math.ceil(K / group) * 5
        return 2.0 * M * N * K, float(weight + size * (M * K + M * N))

    def legal(self, problem, limits):
        M, N, K, bits, size = problem["M"], problem["N"], problem["K"], problem["bits"], _size_of(problem["dtype"])
        sms = limits.multiprocessors
        found = []
        if M <= 16:
            for block_n in (16, 32, 64, 128):
                for block_k in (64, 128, 256, 512, 1024):
                    if block_k > max(64, 1 << math.ceil(math.log2(K))):
                        continue
                    for warps in (2, 4, 8):
                        # unpacked codes, scales and the dequantized tile live in registers
                        if block_n * block_k / (warps * 32) > 128 or block_n * block_k < 32 * warps * 16:
                            continue
                        tiles = math.ceil(N / block_n)
                        for split in (1, 2, 4, 8):
                            if split > 1 and (tiles >= 2 * sms or K // split < block_k):
                                continue
                            programs = tiles * split
                            if programs < sms // 2 and split < 8 and K // (2 * split) >= block_k:
                                continue        # a larger split fills the SMs better
                            found.append((self._model_ms(problem, limits, 16, block_n, block_k, split, warps),
                                          Candidate.make(f"triton[m16 n{block_n} k{block_k} s{split} w{warps} st3]",
                                                         impl="triton", block_m=16, block_n=block_n, block_k=block_k,
                                                         split_k=split, num_warps=warps, num_stages=3)))
            return found
        tallest = max(16, 1 << math.ceil(math.log2(M)))
        for block_m in _powers(32, min(256, tallest)):
            for block_n in (64, 128, 256):
                for block_k in (32, 64, 128):
                    for warps in (4, 8):
                        if block_m * block_n / (warps * 32) > 128 or block_n * block_k / (warps * 32) > 128:
                            continue
                        for stages in (2, 3, 4):
                            shared = stages * (block_m * block_k * size + block_n * block_k * bits // 8)
                            if shared > limits.shared_per_block:
                                continue
                            found.append((self._model_ms(problem, limits, block_m, block_n, block_k, 1, warps, stages),
                                          Candidate.make(f"triton[m{block_m} n{block_n} k{block_k} s1 w{warps} st{stages}]",
                                                         impl="triton", block_m=block_m, block_n=block_n,
                                                         block_k=block_k, split_k=1, num_warps=warps,
                                                         num_stages=stages)))
        return found

    def _model_ms(self, problem, limits, block_m, block_n, block_k, split, warps, stages=3) -> float:
        M, N, K = problem["M"], problem["N"], problem["K"]
        flops, moved = self.cost(problem)
        tiles = math.ceil(M / block_m) * math.ceil(N / block_n) * split
        slots = limits.multiprocessors * max(1, 16 // warps)
        waves = math.ceil(tiles / slots)
        fill = max(tiles / (waves * slots), 0.05)
        # dequantising costs ALU per weight element and tile: small tiles re-dequantise per M tile
        efficiency = min(1.0, block_m / 128) ** 0.5 * min(1.0, block_n / 128) ** 0.5 * 0.6
        per_thread = block_n * block_k / (warps * 32)      # codes unpacked in registers
        efficiency *= min(1.0, 64 / per_thread) ** 0.5 * min(1.0, stages / 3)
        compute = flops / (limits.peak_tflops * 1e9 * efficiency * fill)
        memory = (moved + 4 * M * N * (split - 1)) / (limits.bandwidth_gbps * 1e6 * min(1.0, 2 * fill))
        steps = math.ceil(K / (split * block_k))            # serial K steps per program: latency
        # too many codes per thread spill or stall on the unpacking; too few leave loads narrow
        spill = max(1.0, per_thread / 64) if M <= 16 else 1.0
        return max(compute, memory) * spill + steps * 0.0004 + 0.003 * (split > 1)

    def candidates(self, problem, limits, mode="lite"):
        count = self.LITE - 1 if mode == "lite" else self.MAX - 1
        chosen = _rank_and_cut(self.legal(problem, limits), count,
                               lambda c: (c.as_dict()["block_n"], c.as_dict()["split_k"], c.as_dict()["block_m"],
                                          c.as_dict()["block_k"]))
        return [self.incumbent(problem, limits)] + chosen

    def perf_model_pick(self, problem, limits):
        ranked = sorted(self.legal(problem, limits), key=lambda pair: pair[0])
        return ranked[0][1] if ranked else self.incumbent(problem, limits)

    def compile_workload(self, problem, device):
        """Random packed bytes and unit scales of the right shapes: no quantization to wait for."""
        from slimline.backends.cuda.quant_kernels import KernelConfig, quant_matmul
        from slimline.quant.pack import default_layout, packed_shape
        from slimline.quant.scheme import QuantScheme

        M, N, K, bits, dtype = problem["M"], problem["N"], problem["K"], problem["bits"], _DTYPES[problem["dtype"]]
        group = problem.get("group") or None
        scheme = QuantScheme(bits, group, group is None)
        layout, group_size = default_layout(bits), scheme.group(K)
        groups = scheme.padded(K) // group_size
        packed = torch.randint(0, 256, packed_shape(N, K, bits, layout), dtype=torch.uint8, device=device)
        scales = torch.ones(N, groups, device=device)
        zeros = None if scheme.symmetric else torch.zeros(N, groups, dtype=torch.uint8, device=device)
        x = torch.randn(M, K, device=device, dtype=dtype)

        def run(candidate: Candidate):
            config = candidate.as_dict()
            if config["impl"] == "torch":
                return lambda: None
            tiles = KernelConfig(config["block_m"], config["block_n"], config["block_k"], config["split_k"],
                                 config["num_warps"], config["num_stages"])
            return lambda: quant_matmul(x, packed, scales, zeros, None, bits=bits, layout=layout,
                                        group_size=group_size, in_features=K, config=tiles)

        return Workload(x, run, 0.0, keep=[packed, scales, zeros])

    def workload(self, problem, device, seed=0):
        from slimline.backends.cuda.quant_kernels import KernelConfig, quant_matmul
        from slimline.quant.linear import quantized_linear
        from slimline.quant.pack import default_layout
        from slimline.quant.scheme import QuantScheme, quantize_rtn

        M, N, K, bits, dtype = problem["M"], problem["N"], problem["K"], problem["bits"], _DTYPES[problem["dtype"]]
        group = problem.get("group") or None
        generator = torch.Generator().manual_seed(seed)
        memo_key = (N, K, bits, group, str(device), seed)
        if memo_key not in self._memo:        # decode and prefill share one quantized weight
            weight = torch.randn(N, K, generator=generator) / math.sqrt(K)
            quantized = quantize_rtn(weight.to(device), QuantScheme(bits, group, group is None))
            layout = default_layout(bits)
            self._memo.clear()
            self._memo[memo_key] = (quantized.pack(layout).to(device), quantized.scales.to(device),
                                    quantized.zeros.to(device) if quantized.zeros is not None else None,
                                    quantized.group_size, quantized.codes.shape[1], layout)
        packed, scales, zeros, group_size, padded, layout = self._memo[memo_key]
        options = {"bits": bits, "layout": layout, "group_size": group_size, "in_features": K}
        x = torch.randn(M, K, generator=generator).to(device, dtype)
        reference = quantized_linear(x.double() if device.type == "cpu" else x.float(), packed, scales, zeros,
                                     None, padded_features=padded, **options)

        def run(candidate: Candidate):
            config = candidate.as_dict()
            if config["impl"] == "torch":
                return lambda: quantized_linear(x, packed, scales, zeros, None, padded_features=padded, **options)
            tiles = KernelConfig(config["block_m"], config["block_n"], config["block_k"], config["split_k"],
                                 config["num_warps"], config["num_stages"])
            return lambda: quant_matmul(x, packed, scales, zeros, None, config=tiles, **options)

        return Workload(reference, run, _tolerance(dtype), keep=[x, packed, scales, zeros])


# ---------------------------------------------------------------------------------------------
# the CPU: the linear implementations torch offers


class CpuLinear(KernelFamily):
    """``y = x · wᵀ`` on the CPU: ``F.linear`` (incumbent), x @ a pre-transposed w, oneDNN packed."""

    name = "cpu_linear"
    device_kind = "cpu"

    def kernel_hash(self) -> str:
        return source_hash(CpuLinear.workload, torch.__version__)

    def problem_key(self, problem):
        return f"M{row_bucket(problem['M'])}-N{problem['N']}-K{problem['K']}-{problem['dtype']}"

    def incumbent(self, problem, limits):
        return Candidate.make("torch.nn.functional.linear", impl="linear")

    def candidates(self, problem, limits, mode="lite"):
        found = [self.incumbent(problem, limits), Candidate.make("matmul, w pre-transposed", impl="matmul_t")]
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            found.append(Candidate.make("oneDNN packed weight", impl="mkldnn"))
        return found

    def cost(self, problem):
        M, N, K, size = problem["M"], problem["N"], problem["K"], _size_of(problem["dtype"])
        return 2.0 * M * N * K, float(size * (M * K + N * K + M * N))

    def workload(self, problem, device, seed=0):
        M, N, K, dtype = problem["M"], problem["N"], problem["K"], _DTYPES[problem["dtype"]]
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(M, K, generator=generator).to(dtype)
        w = (torch.randn(N, K, generator=generator) / math.sqrt(K)).to(dtype)
        w_t = w.t().contiguous()
        reference = x.double() @ w.double().t()

        def run(candidate: Candidate):
            impl = candidate.as_dict()["impl"]
            if impl == "linear":
                return lambda: torch.nn.functional.linear(x, w)
            if impl == "matmul_t":
                return lambda: x @ w_t
            packed = torch.ops.mkldnn._reorder_linear_weight(w, M)
            return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

        return Workload(reference, run, _tolerance(dtype), keep=[x, w, w_t])


FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (DenseMatmul(), MonarchMatmul(), QuantMatmul(), CpuLinear())}


def family(name: str) -> KernelFamily:
    from slimline.errors import ConfigError

    if name not in FAMILIES:
        raise ConfigError(f"unknown kernel family {name!r}", stage="tune", where="autotune.family",
                          hint=f"use one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]
