"""The torch form of int8 activations follows ONNX DynamicQuantizeLinear exactly."""

import numpy as np
import torch

from slimline.quant.linear import fake_quantize_dynamic_uint8


def _onnx_dynamic_quantize_linear(x: np.ndarray) -> np.ndarray:
    """The ONNX spec's reference: uint8, range widened to hold 0, round half to even."""
    low = np.minimum(x.min(), np.float32(0))
    high = np.maximum(x.max(), np.float32(0))
    scale = (high - low) / np.float32(255)  # float32 throughout, as ORT computes it
    zero = np.clip(np.round(-low / scale), 0, 255)
    codes = np.clip(np.round(x / scale) + zero, 0, 255)
    return ((codes - zero) * scale).astype(np.float32)


def test_matches_the_onnx_reference():
    torch.manual_seed(0)
    for x in (torch.randn(4, 7, 16), torch.rand(5, 9) + 0.5, -torch.rand(3, 3), torch.randn(64) * 40):
        expected = _onnx_dynamic_quantize_linear(x.numpy())
        np.testing.assert_array_equal(fake_quantize_dynamic_uint8(x).numpy(), expected)


def test_all_zero_input_stays_zero():
    assert torch.equal(fake_quantize_dynamic_uint8(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_error_is_at_most_half_a_step():
    x = torch.randn(100, 30) * 3
    step = (x.max() - x.min()) / 255
    assert float((fake_quantize_dynamic_uint8(x) - x).abs().max()) <= float(step) / 2 + 1e-6
