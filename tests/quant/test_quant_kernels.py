"""The Triton dequant kernels under ``TRITON_INTERPRET=1`` (fp32, CPU) against the torch form.

Every width and layout, symmetric and asymmetric, grouped and per-channel, a K that is not a
multiple of anything, bias or not, GEMV rows (M ≤ 16, with and without split-K) and GEMM rows.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
triton = pytest.importorskip("triton")

from slimline.backends.cuda.quant_kernels import (KernelConfig, candidate_configs,  # noqa: E402
                                                  quant_matmul)
from slimline.quant.linear import quantized_linear  # noqa: E402
from slimline.quant.pack import default_layout  # noqa: E402
from slimline.quant.scheme import QuantScheme, quantize_rtn  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(bits, group, symmetric, out_features=40, in_features=200, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    quantized = quantize_rtn(weight, QuantScheme(bits, group, symmetric))
    layout = default_layout(bits)
    tensors = {"packed": quantized.pack(layout), "scales": quantized.scales, "zeros": quantized.zeros,
               "bias": torch.randn(out_features, generator=generator) if bias else None}
    tensors = {k: (v.to(DEVICE) if v is not None else None) for k, v in tensors.items()}
    options = {"bits": bits, "layout": layout, "group_size": quantized.group_size,
               "padded_features": quantized.codes.shape[1], "in_features": in_features}
    return tensors, options


def _check(x, tensors, options, config):
    t = tensors
    expected = quantized_linear(x, t["packed"], t["scales"], t["zeros"], t["bias"], **options)
    got = quant_matmul(x, t["packed"], t["scales"], t["zeros"], t["bias"], config=config, **options)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,symmetric", [(32, False), (None, True), (64, True)])
def test_gemv_matches_the_torch_form(bits, group, symmetric):
    tensors, options = _layer(bits, group, symmetric, bias=group != 64)
    x = torch.randn(3, options["in_features"], device=DEVICE)
    _check(x, tensors, options, KernelConfig(16, 16, 64, 1))


@pytest.mark.parametrize("block_k", [32, 64, 128])
def test_group_tiles_of_every_alignment(block_k):
    # groups of 48: neither a multiple of the tile nor dividing it (one load per element);
    # groups of 32 within larger tiles (fanned out); per channel (one load per row)
    for group, symmetric in ((48, False), (32, False), (None, False)):
        tensors, options = _layer(4, group, symmetric, in_features=200)
        x = torch.randn(2, 200, device=DEVICE)
        _check(x, tensors, options, KernelConfig(16, 16, block_k, 1))


@pytest.mark.parametrize("bits", [3, 4])
def test_split_k_gemv(bits):
    tensors, options = _layer(bits, 32, False)
    x = torch.randn(1, options["in_features"], device=DEVICE)
    _check(x, tensors, options, KernelConfig(16, 32, 64, 3))


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_gemm_rows_and_3d_inputs(bits):
    tensors, options = _layer(bits, 64, False, out_features=72, in_features=96)
    x = torch.randn(2, 19, options["in_features"], device=DEVICE)  # 38 rows: not a tile multiple
    _check(x, tensors, options, KernelConfig(32, 32, 32, 1))


def test_candidate_configs_are_small_and_runnable():
    gemv = candidate_configs(1, 4096, 4096, 4)
    assert 1 <= len(gemv) <= 10 and all(c.block_m == 16 for c in gemv)
    gemm = candidate_configs(512, 4096, 4096, 4)
    assert 1 <= len(gemm) <= 10 and all(c.split_k == 1 for c in gemm)
    tensors, options = _layer(4, 32, False, out_features=32, in_features=64)
    x = torch.randn(2, 64, device=DEVICE)
    for config in candidate_configs(2, 32, 64, 4)[:2]:
        _check(x, tensors, options, config)


_COMPILE = """
import json
from slimline.backends.cuda.quant_kernels import KernelConfig, compile_for_target
print(json.dumps([compile_for_target(3, "planes", 128, 2048, KernelConfig(16, 32, 256, 2)),
                  compile_for_target(4, "bytes", 128, 2048, KernelConfig(64, 128, 64, 1, 4, 3))]))
"""


def test_kernels_compile_for_sm90():
    """The real compiler is stricter than the interpreter (power-of-2 ranges, pruned branches)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    assert [c["config"] for c in compiled] == ["m16n32k256s2w4p2", "m64n128k64s1w4p3"]
    assert all(c["shared_bytes"] < 228 * 1024 for c in compiled)
