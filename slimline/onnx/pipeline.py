"""The ONNX rules, in the order they run, one line each; and the sweep that applies them.

Every rule is exact. After the sweep the caller checks the rewritten model in onnxruntime
against its reference (torch for an export, the original file for ONNX in) before it is written.

Measured and left out (onnxruntime 1.32 CPU, MiniLM at sequence 128, whole model, the sum over
nodes of each node's median kernel time on one thread, 30-60 interleaved runs on this
project's 2-core machine at load ~5; slimline's file with the rules above: 25.2 ms):

- ``com.microsoft::Attention`` taking the layer input and the packed Q/K/V weight (projection
  inside the kernel): 29.2 ms; ``MultiHeadAttention`` on the split Q, K, V: 28.1 ms (the ONNX
  ``Attention`` kernel, 0.43 ms a layer, beats it at 0.60). ``MultiHeadAttention`` with packed
  Q/K/V (B, S, H, 3, E) is not implemented on the CPU provider;
- ``BiasGelu`` (bias add folded into the activation): 25.9 ms, its kernel 0.26 ms a call
  against 0.17 for the ONNX ``Gelu`` after a biased Gemm;
- ``SkipLayerNormalization``: 28.0 ms, 0.25 ms a call against 0.06 for Add + LayerNormalization
  (see :mod:`slimline.onnx.unfuse_skip_layer_norm`);
- a float additive mask computed once for every layer instead of the boolean one: no change;
- session entries ``session.set_denormal_as_zero`` and ``session.dynamic_block_base``: no
  change in process CPU time or paired wall time (2 threads, 60 rounds).

The matrix products are ~80% of the time and run near this CPU's single-core float32 peak
(~145 GFLOP/s per core, measured with torch's GEMM at these shapes), so exact rewrites can only
shave the remaining ~20% and the thread hand-offs between kernels.
"""

from __future__ import annotations

from types import ModuleType

import onnx_ir as ir

from slimline.onnx import (attention_heads_3d, fuse_attention, residual_into_gemm,
                           unfuse_skip_layer_norm)
from slimline.onnx.base import RuleResult, apply_rule, consumers, producer

__all__ = ["RULES", "RULE_NAMES", "run_rules", "count_candidates", "add_feeds_layer_norm"]

RULES: list[ModuleType] = [
    fuse_attention,          # MatMul·Softmax·MatMul chains -> one ONNX Attention (opset 23+)
    attention_heads_3d,      # Reshape/Transpose head split and merge around Attention -> 3-D Attention
    unfuse_skip_layer_norm,  # ORT's SkipLayerNormalization (slow on CPU) -> Add + LayerNormalization
    residual_into_gemm,      # x·W + b + r -> Gemm(x, W, C=r), b moved into the norm that made r
]
RULE_NAMES = tuple(rule.NAME for rule in RULES)


def run_rules(model: ir.Model, names: tuple[str, ...] | list[str] | None = None) -> list[RuleResult]:
    """Apply the rules (all, or those named) to ``model`` in place, in pipeline order."""
    return [apply_rule(rule, model) for rule in RULES if names is None or rule.NAME in names]


def count_candidates(rule: ModuleType, model: ir.Model) -> int:
    """How many anchors of ``rule`` match its pattern (near misses left out), without rewriting."""
    return sum(1 for node in model.graph if isinstance(rule.pattern(node), dict))


def add_feeds_layer_norm(model: ir.Model) -> bool:
    """True when an Add read only by a LayerNormalization exists: ORT's SkipLayerNormFusion
    could fire, so whether to let it is worth measuring."""
    for node in model.graph:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            add = producer(node.inputs[0], "Add")
            if add is not None and len(consumers(add.outputs[0])) == 1 \
                    and not add.outputs[0].is_graph_output():
                return True
    return False
