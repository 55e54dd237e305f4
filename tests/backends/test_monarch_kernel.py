"""The fused Monarch kernels under ``TRITON_INTERPRET=1`` (fp32, CPU) against the plain form.

Every variant (splitk vector / tensor-core, phased with and without prefetch, stages, hybrid) on
shapes with padding, bias, a row count that is not a multiple of the tile, 3-D inputs; the
workspaces must be clean after each call (the kernels keep them zeroed, no memset launch); the
output is poisoned before each call, so an unwritten element fails. Also: the search space only
offers configs that can run, and the benchmark's helpers on the CPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
triton = pytest.importorskip("triton")

from slimline.backends.cuda.monarch_kernel import (KernelConfig, MonarchKernel, candidate_configs,  # noqa: E402
                                                   check_config, local_search, pack_weights,
                                                   relative_error)
from slimline.monarch import monarch_forward, monarch_shape, random_factors  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")
FP32_RTOL = 1e-5


def _layer(in_features, out_features, nblocks, slab_rank=None, uneven="pad", bias=True, seed=0):
    shape = monarch_shape(in_features, out_features, nblocks, slab_rank, uneven)
    generator = torch.Generator().manual_seed(seed)
    factors = random_factors(shape, generator)
    bias_N = torch.randn(out_features, generator=generator) if bias else None
    return shape, factors, bias_N


def _run(kernel, x, config):
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    return kernel(x, config, out=torch.full((rows, kernel.shape.out_features), float("nan")))


def _reference(x, factors, shape, bias):
    return monarch_forward(x.double(), factors.right_bPQ.double(), factors.left_bQS.double(), shape,
                           None if bias is None else bias.double())


def _clean(kernel):
    return all(float(w.abs().sum()) == 0.0 for key, w in kernel.workspaces.items()
               if key[0] in ("splitk_acc", "splitk_count", "phased_count"))


# K = 126 pads to 128 (P = 32), N = 128 (S = 32), T = 16, Q = 64
VECTOR_CONFIGS = [
    KernelConfig("splitk", 1, 16, 32, 32),                             # second stage prefetched
    KernelConfig("splitk", 1, 8, 16, 8),                               # loops in both stages
    KernelConfig("phased", 1, 16, 32, 16, 64, programs=8, prefetch=True),
    KernelConfig("phased", 1, 8, 16, 16, 32, programs=3),              # several tasks per program
    KernelConfig("stages", 1, 16, 32, 16, 64),
    KernelConfig("rows", 1, 16, 32, 16, 64),                           # whole row blocks at once
    KernelConfig("rows", 1, 8, 16, 8, 32, pdl=True, prefetch=True),    # K loops; PDL, L2 off here
]
TILE_CONFIGS = [
    KernelConfig("splitk", 16, 16, 32, 32),
    KernelConfig("phased", 16, 16, 32, 16, 64, programs=8, prefetch=True),
    KernelConfig("phased", 16, 16, 16, 32, 32, programs=3),
    KernelConfig("stages", 16, 16, 32, 16, 32),
    KernelConfig("hybrid", 16, 16, 32, 16),
    KernelConfig("rows", 16, 16, 32, 16, 64),
    KernelConfig("rows", 16, 16, 16, 32, 32, num_stages=3, pdl=True, prefetch=True),
    KernelConfig("rows", 16, 16, 32, 32, 64, split=2, pdl=True, prefetch=True),  # K across warps
]


@pytest.fixture(scope="module")
def padded_layer():
    shape, factors, bias = _layer(126, 128, 4, slab_rank=16)
    return shape, factors, bias, MonarchKernel.from_factors(factors.right_bPQ, factors.left_bQS, shape, bias)


@pytest.mark.parametrize("config", VECTOR_CONFIGS, ids=lambda c: c.label())
def test_vector_kernels_match_the_plain_form(padded_layer, config):
    shape, factors, bias, kernel = padded_layer
    x = torch.randn(1, shape.in_features)
    for _ in range(2):  # a second call finds the workspaces as the first left them
        y = _run(kernel, x, config)
        assert relative_error(_reference(x, factors, shape, bias), y) <= FP32_RTOL
        assert _clean(kernel)


@pytest.mark.parametrize("config", TILE_CONFIGS, ids=lambda c: c.label())
def test_tensor_core_kernels_match_the_plain_form(padded_layer, config):
    shape, factors, bias, kernel = padded_layer
    x = torch.randn(3, 7, shape.in_features)  # M = 21: two row tiles, the second partly masked
    y = _run(kernel, x, config)
    assert y.shape == (3, 7, shape.out_features)
    assert relative_error(_reference(x, factors, shape, bias), y) <= FP32_RTOL
    assert _clean(kernel)


def test_padded_outputs_and_no_bias():
    shape, factors, _ = _layer(128, 126, 4, slab_rank=16, uneven="pad", bias=False)  # S = 32 (126 → 128)
    assert shape.padded_out == 128 and shape.padded_in == 128
    kernel = MonarchKernel.from_factors(factors.right_bPQ, factors.left_bQS, shape)
    x = torch.randn(2, shape.in_features)
    for config in (KernelConfig("splitk", 1, 16, 32, 32), KernelConfig("hybrid", 16, 16, 32, 16)):
        assert relative_error(_reference(x, factors, shape, None), _run(kernel, x, config)) <= FP32_RTOL


def test_square_monarch_slab_rank_one():
    shape, factors, bias = _layer(64, 64, 8, bias=True, seed=3)  # the paper's case: b = √n, T = 1
    assert shape.slab_rank == 1
    kernel = MonarchKernel.from_factors(factors.right_bPQ, factors.left_bQS, shape, bias)
    x = torch.randn(1, 64)
    y = _run(kernel, x, KernelConfig("splitk", 1, 1, 8, 8))
    assert relative_error(_reference(x, factors, shape, bias), y) <= FP32_RTOL


def test_packed_layouts_are_the_same_matrix():
    shape, factors, _ = _layer(48, 96, 4, seed=1)
    factors = factors.to(torch.float64)
    b, T, P, S = shape.nblocks, shape.slab_rank, shape.block_in, shape.block_out
    packed = pack_weights(factors.right_bPQ, factors.left_bQS, shape)
    w1, w2 = packed["w1_bQP"], packed["w2_bQS"]
    assert w1.shape == (b, b * T, P) and w2.shape == (b, b * T, S)
    assert torch.equal(packed["w2_bSQ"], w2.transpose(1, 2))
    # group l: h_l = blockdiag(x) @ w1[l]ᵀ, y_l = h_l @ w2[l]
    x = torch.randn(5, shape.in_features, dtype=torch.float64)
    x_kP = x.view(5, b, P)
    y = torch.cat([torch.einsum("mkp,kjp->mkj", x_kP, w1[l].view(b, T, P)).reshape(5, b * T)
                   @ w2[l] for l in range(b)], dim=1)
    assert torch.allclose(y, x @ factors.dense().T, atol=1e-10)


def test_bad_configs_are_refused_with_reasons():
    shape = monarch_shape(128, 128, 4, 16)
    assert any("does not divide" in p for p in check_config(KernelConfig("splitk", 1, 3, 32, 32), shape))
    assert any("powers of two" in p for p in check_config(KernelConfig("stages", 16, 16, 32, 32, 48), shape))
    assert any("≥ 16" in p for p in check_config(KernelConfig("splitk", 16, 8, 32, 32), shape))
    assert any("split=4" in p for p in check_config(KernelConfig("rows", 16, 16, 16, 32, 64, split=4), shape))
    assert any("rows options" in p for p in check_config(KernelConfig("splitk", 1, 16, 32, 32, pdl=True), shape))
    factors = random_factors(shape)
    kernel = MonarchKernel.from_factors(factors.right_bPQ, factors.left_bQS, shape)
    with pytest.raises(ValueError, match="does not divide"):
        kernel(torch.randn(1, 128), KernelConfig("splitk", 1, 3, 32, 32))


@pytest.mark.parametrize("size,nblocks", [(4096, 4), (4096, 16), (768, 4)])
@pytest.mark.parametrize("rows", [1, 16, 4096])
def test_search_space_offers_only_configs_that_run(size, nblocks, rows):
    shape = monarch_shape(size, 4 * size if size == 768 else size, nblocks)
    configs = candidate_configs(shape, rows, multiprocessors=132)
    assert configs and len(configs) <= 10
    for config in configs:
        assert check_config(config, shape) == []
        if config.prefetch and config.variant == "phased":  # one program per output task, all resident
            tasks = nblocks * shape.block_out // config.block_s * -(-rows // config.block_m)
            assert tasks <= 132
    variants = {c.variant for c in configs}
    assert variants <= ({"splitk", "phased", "rows"} if rows <= 16 else {"stages", "hybrid"})
    if rows <= 16:  # the rows variant comes first, with and without PDL
        assert configs[0].variant == "rows"
        assert {c.pdl for c in configs if c.variant == "rows"} == {True, False}


def test_local_search_checks_before_timing_and_reports_failures():
    shape, factors, bias = _layer(64, 64, 4, bias=True, seed=2)               # P = S = 16, T = 4
    kernel = MonarchKernel.from_factors(factors.right_bPQ, factors.left_bQS, shape, bias)
    x = torch.randn(1, 64)
    reference = _reference(x, factors, shape, bias)
    good, faster = KernelConfig("splitk", 1, 4, 16, 16), KernelConfig("splitk", 1, 2, 16, 16)
    broken = KernelConfig("splitk", 1, 3, 16, 16)                              # 3 does not divide T
    times = {good: 2.0, faster: 1.0}
    rows = local_search(kernel, x, [broken, good, faster], reference, FP32_RTOL, times.__getitem__)
    assert [r["config"] for r in rows] == [faster.label(), good.label(), broken.label()]
    assert rows[0]["ok"] and rows[0]["kernel_config"] == faster and rows[0]["ms"] == 1.0
    assert not rows[2]["ok"] and "does not divide" in rows[2]["why"] and "ms" not in rows[2]
    late = local_search(kernel, x, [good, faster], reference, FP32_RTOL, times.__getitem__, deadline=0.0)
    assert late[0]["ok"] and late[1]["why"] == "not tried: search time budget spent"


_COMPILE = """
import json
from slimline.backends.cuda.monarch_kernel import KernelConfig, compile_for_target
from slimline.monarch import monarch_shape
shape = monarch_shape(512, 512, 4)
configs = [KernelConfig("splitk", 1, 16, 128, 128),
           KernelConfig("phased", 1, 16, 128, 16, 128, programs=32, prefetch=True),
           KernelConfig("rows", 1, 16, 128, 16, 128, pdl=True),
           KernelConfig("rows", 16, 16, 64, 16, 64, num_stages=3, pdl=True, prefetch=True),
           KernelConfig("rows", 16, 16, 128, 16, 128, num_warps=8, pdl=True, prefetch=True, split=8)]
print(json.dumps([compile_for_target(shape, c) for c in configs]))
"""


def test_the_gpu_only_paths_compile_for_sm90():
    """Atomics, the ticket, the bounded spin, the prefetch, PDL and the L2 prefetch (inline PTX):
    code the interpreter runs (or skips) but never compiles."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    launches = [launch for config in json.loads(done.stdout.strip().splitlines()[-1]) for launch in config]
    assert [launch["kernel"] for launch in launches] == ["_splitk_kernel", "_phased_kernel"] + ["_rows_kernel"] * 6
    assert all(launch["registers"] <= 255 and launch["spill_bytes"] == 0 for launch in launches)


def _benchmark_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "monarch_gpu.py"
    spec = importlib.util.spec_from_file_location("monarch_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_helpers_on_cpu():
    bench = _benchmark_module()
    shape, factors, _ = _layer(64, 64, 4, bias=False)
    x = torch.randn(5, 64)
    out = torch.full((5, 64), float("nan"))
    bench.cublas_monarch(x, factors.right_bPQ, factors.left_bQS, shape, out)
    assert relative_error(x.double() @ factors.dense().double().T, out) <= FP32_RTOL
    fake = [{"case": "b4 M=1", "in": 4096, "out": 4096, "fused_config": "splitk[…]",
             "variants": {"dense": {"median_us": 12.0}, "fused": {"median_us": 5.0},
                          "two_bmm_graph": {"median_us": 9.0}, "two_bmm_eager": {"error": "boom"}},
             "ratios": {"best_over_dense": 2.4, "target_over_dense": 1.8, "met_over_dense": True,
                        "fused_over_two_bmm_graph": 1.8, "met_fused_over_two_bmm": True}},
            {"case": "b16 M=1", "error": "RuntimeError: no GPU"}]
    table = bench._table(fake, {"device": "cpu", "torch": "x", "triton": "y"})
    assert "2.40x ok" in table and "FAIL" in table and "b16 M=1" in table
