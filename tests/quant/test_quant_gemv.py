"""The reduction dequant-GEMV (``quant_gemv``) under ``TRITON_INTERPRET=1`` against the torch form.

Every width and its default layout, symmetric and asymmetric, grouped and per channel, a K that
is not a multiple of the tile, bias or not, one and several rows, split-K; and the refusals.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
triton = pytest.importorskip("triton")

from slimline.backends.cuda.quant_gemv import GemvConfig, gemv_configs, quant_gemv, supports  # noqa: E402
from slimline.errors import SlimlineError  # noqa: E402
from slimline.quant.linear import quantized_linear  # noqa: E402
from slimline.quant.pack import default_layout  # noqa: E402
from slimline.quant.scheme import QuantScheme, quantize_rtn  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(bits, group, symmetric, out_features=24, in_features=200, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    quantized = quantize_rtn(weight, QuantScheme(bits, group, symmetric))
    layout = default_layout(bits)
    tensors = [quantized.pack(layout), quantized.scales, quantized.zeros,
               torch.randn(out_features, generator=generator) if bias else None]
    tensors = [t.to(DEVICE) if t is not None else None for t in tensors]
    options = {"bits": bits, "layout": layout, "group_size": quantized.group_size,
               "padded_features": quantized.codes.shape[1], "in_features": in_features}
    return tensors, options


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group,symmetric,rows,config", [
    (32, False, 1, GemvConfig(8, 256, 1)),       # 8 words a group (4-bit), one tile past K
    (None, True, 3, GemvConfig(16, 128, 2)),     # per channel, split-K, several rows
    (64, True, 2, GemvConfig(4, 512, 1)),        # one tile wider than K
])
def test_gemv_matches_the_torch_form(bits, group, symmetric, rows, config):
    if bits in (3, 5, 6) and config.block_k < 32:
        pytest.skip("bit-plane words hold 32 codes")
    tensors, options = _layer(bits, group, symmetric, bias=rows != 2)
    if supports(bits, options["layout"], options["group_size"], options["in_features"], rows):
        pytest.skip("not served (groups split words)")
    x = torch.randn(rows, options["in_features"], device=DEVICE)
    expected = quantized_linear(x, *tensors, **options)
    got = quant_gemv(x, *tensors, config=config, **options)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_wrong_code_is_seen():
    tensors, options = _layer(4, 32, False)
    x = torch.randn(1, options["in_features"], device=DEVICE)
    expected = quantized_linear(x, *tensors, **options)
    tensors[0] = tensors[0] ^ 1  # flip one bit in every byte: different codes
    got = quant_gemv(x, *tensors, **options)
    assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_refuses_groups_that_split_words_and_too_many_rows():
    assert supports(3, "planes", 16, 200, 1)  # 16-code groups, 32-code plane words
    assert supports(4, "bytes", 128, 2048, 17)
    assert supports(4, "bytes", 128, 2048, 1) is None
    tensors, options = _layer(4, 32, False)
    with pytest.raises(SlimlineError, match="GEMM"):
        quant_gemv(torch.randn(17, options["in_features"], device=DEVICE), *tensors, **options)


def test_candidates_fit_the_shape():
    configs = gemv_configs(2048, 5632, 4, "bytes", 128)
    assert configs and len(configs) <= 12
    assert all(c.block_k * c.split_k <= 5632 and c.block_n * c.block_k <= 16384 for c in configs)


# -- the tiled decode kernel (tiled_gemv) -------------------------------------------------------------

from slimline.backends.cuda import quant_gemv as qg  # noqa: E402


def _tiled(bits, group, symmetric, out_features=32, in_features=600, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    quantized = quantize_rtn(weight, QuantScheme(bits, group, symmetric))
    tiled = qg.tile_weight(quantized)
    moved = qg.TiledWeight(tiled.words.to(DEVICE), tiled.scales.to(DEVICE),
                           None if tiled.zeros is None else tiled.zeros.to(DEVICE), bits, tiled.group, in_features)
    return quantized, moved


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tiled_layout_round_trips_and_keeps_bits_per_code(bits):
    codes = torch.randint(0, 1 << bits, (5, 600), generator=torch.Generator().manual_seed(bits))
    words = qg.pack_tiles(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (bits, 5, qg.tile_padded(600) // 32)
    assert torch.equal(qg.unpack_tiles(words, bits, 600), codes)
    # slot m of column w of a tile is code m·C + w: column 0 of tile 0 holds codes 0, C, 2C, ...
    columns = qg.TILE_CODES // 32
    single = torch.zeros(1, 600, dtype=torch.int64)
    single[0, columns] = 1  # code C: slot 1 of column 0
    words = qg.pack_tiles(single, bits)
    expected = 1 << (3 if bits == 3 else bits)  # slot 1 sits right after slot 0 in word 0
    assert int(words[0, 0, 0]) == expected and int(words.abs().sum()) == expected


@pytest.mark.parametrize("bits,group,symmetric,config", [
    (4, 128, False, qg.TiledConfig(16, 2, 1)),  # K split in 2 (one tile a program), fp32 atomics
    (3, 128, False, qg.TiledConfig(8, 1, 1)),
    (2, 64, True, qg.TiledConfig(32, 2, 0)),    # the whole K in one program
    (8, None, True, qg.TiledConfig(16, 2, 1)),  # one group a row, split
    (4, 32, True, qg.TiledConfig(64, 4, 2)),    # one program larger than N: masked rows; 2 tiles a program
])
def test_tiled_gemv_matches_the_dequantized_product(bits, group, symmetric, config):
    quantized, weight = _tiled(bits, group, symmetric)
    x = torch.randn(600, device=DEVICE)
    out = torch.full((32,), float("nan"), device=DEVICE)
    qg.tiled_gemv(x, weight, out, config=config)
    expected = quantized.dequantize().to(DEVICE) @ x  # the scheme's own dequantization
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if qg.splits_for(weight, config) > 1:  # the scratch is left zeroed for the next launch
        assert not weight._partial.any() and not weight._count.any()
        qg.tiled_gemv(x, weight, out, config=config)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_tiled_gemv_sees_a_wrong_code():
    quantized, weight = _tiled(4, 128, False)
    weight.words[1, 3, 2] ^= 1 << 5  # one bit of one code of row 3
    x = torch.randn(600, device=DEVICE)
    out = torch.empty(32, device=DEVICE)
    qg.tiled_gemv(x, weight, out)
    error = (out - quantized.dequantize().to(DEVICE) @ x).abs()
    assert error[3] > 1e-4 and torch.all(error[torch.arange(32) != 3] < 1e-4)


@pytest.mark.parametrize("norm,act,residual,tiles", [
    (qg.NORM_RMS, qg.ACT_SILU_PAIR, False, 1),
    (qg.NORM_LAYER, qg.ACT_GELU, False, 0),
    (qg.NORM_NONE, qg.ACT_NONE, True, 1),
])
def test_tiled_gemv_fusions_match_the_reference(norm, act, residual, tiles):
    _, weight = _tiled(4, 128, False, out_features=24)
    generator = torch.Generator().manual_seed(1)
    if norm == qg.NORM_LAYER:
        weight.rowsum = weight.dequantize().sum(1).contiguous()
        weight.bias = torch.randn(24, generator=generator).to(DEVICE)
    x = (torch.randn(600, generator=generator) + 0.5).to(DEVICE)
    rows = 12 if act == qg.ACT_SILU_PAIR else 24
    r = torch.randn(rows, generator=generator).to(DEVICE) if residual else None
    expected = qg.reference_gemv(x, weight, norm=norm, eps=1e-5, act=act, residual=r)
    out = r if residual else torch.full((rows,), float("nan"), device=DEVICE)  # the residual updated in place
    qg.tiled_gemv(x, weight, out, norm=norm, eps=1e-5, act=act, residual=r, config=qg.TiledConfig(8, 1, tiles))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_tiled_refusals():
    with pytest.raises(SlimlineError, match="2, 3, 4 or 8"):
        qg.pack_tiles(torch.zeros(2, 64, dtype=torch.int64), 5)
    quantized = quantize_rtn(torch.randn(8, 600), QuantScheme(4, 48, False))
    with pytest.raises(SlimlineError, match="line up"):
        qg.tile_weight(quantized)
    _, weight = _tiled(4, 128, False, out_features=8)
    with pytest.raises(SlimlineError, match="even block_n"):
        qg.tiled_gemv(torch.randn(600, device=DEVICE), weight, torch.empty(4, device=DEVICE),
                      act=qg.ACT_SILU_PAIR, config=qg.TiledConfig(7, 1))
    with pytest.raises(SlimlineError, match="row sums"):
        qg.tiled_gemv(torch.randn(600, device=DEVICE), weight, torch.empty(8, device=DEVICE), norm=qg.NORM_LAYER)


_COMPILE_TILED = """
import json
from slimline.backends.cuda.quant_gemv import TiledConfig, compile_tiled_for_target, ACT_SILU_PAIR
print(json.dumps([compile_tiled_for_target(3, 2048, 128, TiledConfig(16, 2, 1), act=ACT_SILU_PAIR),
                  compile_tiled_for_target(8, 512, None, TiledConfig(8, 1, 0), symmetric=True)]))
"""


def test_tiled_kernel_compiles_for_sm90():
    """The split (atomics, PDL) and whole-K forms build for Hopper; the words load 16 bytes wide."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_TILED], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    split, whole = json.loads(done.stdout.strip().splitlines()[-1])
    assert split["split"] == 4 and split["atomics"] >= 2 and whole["split"] == 1 and whole["atomics"] == 0
    assert split["wide_loads"] >= 3 and whole["wide_loads"] >= 8  # a 16-byte load per plane of a tile at least
