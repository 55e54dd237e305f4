"""The ONNX rules, in the order they run, one line each; and the sweep that applies them.

Every rule is exact. After the sweep the caller checks the rewritten model in onnxruntime
against its reference (torch for an export, the original file for ONNX in) before it is written.
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
