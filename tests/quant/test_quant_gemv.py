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
