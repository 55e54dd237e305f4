"""Group-wise scales and zero points, round-to-nearest, dequantization, GPTQ."""

import pytest
import torch

from slimline.errors import ConfigError
from slimline.quant.gptq import gptq_quantize
from slimline.quant.pack import BITS
from slimline.quant.scheme import (QuantScheme, dequantize_codes, dequantize_packed,
                                   group_parameters, quantize_rtn)

GROUPS = (None, 32, 64, 128)


def _relative_error(weight, quantized):
    return float((quantized.dequantize() - weight).norm() / weight.norm())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_scales_and_dequantization(bits, group, symmetric):
    weight = torch.randn(12, 200) * 0.1  # K = 200: not a multiple of any group
    scheme = QuantScheme(bits, group, symmetric)
    quantized = quantize_rtn(weight, scheme)
    groups = -(-200 // scheme.group(200))
    assert quantized.codes.shape == (12, scheme.padded(200)) and quantized.codes.dtype == torch.uint8
    assert quantized.scales.shape == (12, groups)
    assert (quantized.zeros is None) == symmetric
    assert int(quantized.codes.max()) <= (1 << bits) - 1
    dequantized = quantized.dequantize()
    assert dequantized.shape == weight.shape
    # round-to-nearest: no weight further than half a step from its value (inside the range)
    scale_per_weight = quantized.scales.repeat_interleave(scheme.group(200), 1)[:, :200]
    assert bool(((dequantized - weight).abs() <= scale_per_weight / 2 + 1e-6).all())


def test_error_shrinks_with_bits_and_smaller_groups():
    weight = torch.randn(64, 256)
    errors = [_relative_error(weight, quantize_rtn(weight, QuantScheme(b, 128, False))) for b in BITS]
    assert errors == sorted(errors, reverse=True)
    by_group = [_relative_error(weight, quantize_rtn(weight, QuantScheme(4, g, False)))
                for g in (None, 128, 64, 32)]
    assert by_group == sorted(by_group, reverse=True)


def test_symmetric_zero_point_and_asymmetric_range():
    groups = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 2])
    scales, zeros = group_parameters(groups, QuantScheme(4, 8, True))
    assert zeros.item() == 8 and scales.item() == pytest.approx(1 / 7)
    scales, zeros = group_parameters(groups, QuantScheme(4, 8, False))
    assert scales.item() == pytest.approx(1.5 / 15) and zeros.item() == 10


def test_zero_weights_and_padding_dequantize_to_exact_zero():
    weight = torch.zeros(3, 40)
    weight[1, 3] = 0.7
    for symmetric in (True, False):
        dequantized = quantize_rtn(weight, QuantScheme(4, 32, symmetric)).dequantize()
        assert torch.equal(dequantized[0], torch.zeros(40))
        assert dequantized[1, 3] == pytest.approx(0.7, rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_packed_dequantization_equals_reference(bits):
    weight = torch.randn(6, 70)
    quantized = quantize_rtn(weight, QuantScheme(bits, 32, bits != 8))
    reference = dequantize_codes(quantized.codes, quantized.scales, quantized.zero_values,
                                 quantized.group_size, 70)
    assert torch.equal(quantized.dequantize(), reference)
    unpacked = dequantize_packed(quantized.pack(), quantized.scales, quantized.zero_values,
                                 bits=bits, layout="planes" if 8 % bits else "bytes",
                                 group_size=32, padded_features=quantized.codes.shape[1],
                                 in_features=70)
    assert torch.equal(unpacked, reference)


def test_dequantize_in_low_precision():
    quantized = quantize_rtn(torch.randn(4, 64).bfloat16(), QuantScheme(4, 32, False))
    assert quantized.dequantize().dtype == torch.bfloat16


def test_bad_schemes_are_refused():
    with pytest.raises(ConfigError, match="bits"):
        QuantScheme(7, 128)
    with pytest.raises(ConfigError, match="group size"):
        QuantScheme(4, 100)


def _output_error(weight, quantized, inputs):
    return float((inputs @ (quantized.dequantize() - weight).T).norm() / (inputs @ weight.T).norm())


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (8, None), (2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, group, act_order):
    torch.manual_seed(1)
    mixing = torch.randn(96, 96) * 0.3 + torch.eye(96)
    inputs = torch.randn(1024, 96) @ mixing * torch.linspace(0.2, 3, 96)  # uneven, correlated
    weight = torch.randn(48, 96) * 0.1
    scheme = QuantScheme(bits, group, bits == 8)
    hessian = inputs.double().T @ inputs.double()
    rtn = _output_error(weight, quantize_rtn(weight, scheme), inputs)
    gptq_weight = gptq_quantize(weight, hessian, scheme, act_order=act_order)
    assert gptq_weight.codes.shape == quantize_rtn(weight, scheme).codes.shape
    assert _output_error(weight, gptq_weight, inputs) < (0.8 if act_order else 0.92) * rtn


def test_gptq_unseen_inputs_get_zero_weight_and_odd_widths_work():
    inputs = torch.randn(256, 50)
    inputs[:, 7] = 0  # never active
    hessian = inputs.double().T @ inputs.double()
    quantized = gptq_quantize(torch.randn(5, 50), hessian, QuantScheme(4, 32, False))
    assert quantized.dequantize().shape == (5, 50)
    assert torch.equal(quantized.dequantize()[:, 7], torch.zeros(5))
