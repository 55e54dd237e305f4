"""Packing: round trips for every width, layout and awkward shape; the documented bit layout."""

import pytest
import torch

from slimline.errors import ConfigError
from slimline.quant.pack import (BITS, K_ALIGN, default_layout, pack, packed_bits_per_weight,
                                 packed_shape, unpack)

LAYOUTS_FOR = [(bits, layout) for bits in BITS for layout in ("bytes", "planes")
               if layout == "planes" or 8 % bits == 0]


@pytest.mark.parametrize("bits,layout", LAYOUTS_FOR)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 32), (4, 33), (2, 100), (7, 128), (3, 4097)])
def test_round_trip(bits, layout, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits, layout)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == packed_shape(*shape, bits, layout)
    assert torch.equal(unpack(packed, bits, shape[1], layout), codes.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_survive(bits):
    codes = torch.tensor([[0, (1 << bits) - 1] * 16, [(1 << bits) - 1, 0] * 16], dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, 32).to(torch.uint8), codes)


def test_default_layouts():
    assert [default_layout(b) for b in BITS] == ["bytes", "planes", "bytes", "planes", "planes", "bytes"]


def test_bytes_layout_is_low_nibble_first():
    # MatMulNBits' blob: element 2i in the low nibble, 2i + 1 in the high one
    codes = torch.tensor([[1, 2, 3, 4] + [0] * 28], dtype=torch.uint8)
    packed = pack(codes, 4, "bytes")
    assert packed[0, :2].tolist() == [0x21, 0x43]


def test_planes_layout_bit_i_of_plane_b():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 9] = 0b101  # bits 0 and 2 of code 9 -> byte 1, bit 1 of planes 0 and 2
    packed = pack(codes, 3, "planes")
    assert packed.shape == (3, 1, 4)
    assert packed[0, 0].tolist() == [0, 2, 0, 0] and packed[2, 0].tolist() == [0, 2, 0, 0]
    assert packed[1].sum() == 0


@pytest.mark.parametrize("bits", BITS)
def test_rows_are_whole_int32_words(bits):
    # kernels may view the packed bytes as little-endian int32 words
    packed = pack(torch.randint(0, 1 << bits, (3, 45), dtype=torch.uint8), bits)
    assert packed.shape[-1] % 4 == 0
    assert packed.contiguous().view(torch.int32).shape[-1] == packed.shape[-1] // 4


def test_storage_is_bits_per_weight_padding_included():
    assert packed_bits_per_weight(K_ALIGN * 4, 3) == 3
    assert packed_bits_per_weight(100, 3) == pytest.approx(3 * 128 / 100)


def test_refuses_bad_input():
    with pytest.raises(ConfigError, match="outside"):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ConfigError, match="do not fit a byte"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 3, "bytes")
    with pytest.raises(ConfigError, match="9-bit"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 9)
