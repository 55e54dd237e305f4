"""Low-bit weights: packing, group-wise scales, round-to-nearest and GPTQ (reference math in torch).

The quantize pass (:mod:`slimline.passes.quantize`) uses these; kernels and exporters read the
packed layouts documented in :mod:`slimline.quant.pack`.
"""

from slimline.quant.gptq import gptq_quantize
from slimline.quant.pack import BITS, LAYOUTS, default_layout, pack, unpack
from slimline.quant.scheme import (GROUP_SIZES, QuantizedWeight, QuantScheme, dequantize_codes,
                                   dequantize_packed, quantize_rtn)

__all__ = ["BITS", "LAYOUTS", "GROUP_SIZES", "QuantScheme", "QuantizedWeight", "pack", "unpack",
           "default_layout", "quantize_rtn", "gptq_quantize", "dequantize_codes",
           "dequantize_packed"]
