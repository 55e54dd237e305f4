"""fuse_attention (ONNX): MatMul·Softmax·MatMul attention chains -> one ONNX Attention node."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from slimline.onnx import fuse_attention
from slimline.onnx.base import apply_rule
from tests.onnx.graphs import B, E, H, S, constant, copy, h, model, op_types, random_feed, run, tensor

QKV = [tensor(name, [B, H, S, E]) for name in ("q", "k", "v")]
OUT = [tensor("out", [B, H, S, E])]


def _apply(before):
    after = copy(before)
    return after, apply_rule(fuse_attention, after)


def _same_numbers(before, after, feed):
    np.testing.assert_allclose(run(after, feed)[0], run(before, feed)[0], rtol=1e-5, atol=1e-6)


def test_torch_sdpa_decomposition():
    # Before: what torch.onnx writes for scaled_dot_product_attention with a boolean mask
    root_scale = E ** -0.25
    nodes = [
        h.make_node("Reshape", ["k", "flat"], ["k_flat"]),                   # (B·H, S, E)
        h.make_node("Transpose", ["k_flat"], ["k_flat_t"], perm=[0, 2, 1]),
        h.make_node("Reshape", ["k_flat_t", "kt_shape"], ["kt"]),            # (B, H, E, S)
        h.make_node("Mul", ["q", "root_scale"], ["q_scaled"]),
        h.make_node("Mul", ["kt", "root_scale"], ["kt_scaled"]),
        h.make_node("Where", ["mask", "zero", "lowest"], ["bias"]),
        h.make_node("MatMul", ["q_scaled", "kt_scaled"], ["scores"]),
        h.make_node("Add", ["scores", "bias"], ["masked"]),
        h.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        h.make_node("IsNaN", ["probs"], ["nan"]),
        h.make_node("Where", ["nan", "zero", "probs"], ["probs_safe"]),
        h.make_node("MatMul", ["probs_safe", "v"], ["out"]),
    ]
    initializers = [constant("flat", np.array([-1, S, E], np.int64)),
                    constant("kt_shape", np.array([B, H, E, S], np.int64)),
                    constant("root_scale", np.float32(root_scale)), constant("zero", np.float32(0)),
                    constant("lowest", np.float32(np.finfo(np.float32).min))]
    before = model(nodes, QKV + [tensor("mask", [B, 1, S, S], TensorProto.BOOL)], OUT, initializers)
    after, result = _apply(before)
    # Expected: bias = Where(mask, 0, lowest); out = Attention(q, k, v, bias, scale=E**-0.5)
    assert result.rewrites == 1
    assert result.stats == {"fused_mask": 1, "nan_guard_dropped": 1}
    assert op_types(after) == ["Where", "Attention"]
    attention = after.graph.node(1)
    assert attention.attributes["scale"].value == pytest.approx(E ** -0.5)
    assert attention.metadata_props["slimline.pass"] == "fuse_attention"
    feed = random_feed(q=(B, H, S, E), k=(B, H, S, E), v=(B, H, S, E))
    mask = np.ones((B, 1, S, S), bool)
    mask[1, :, :, S - 3:] = False  # padded keys
    _same_numbers(before, after, dict(feed, mask=mask))


def test_eager_form_with_padding_mask_expanded():
    # Before: softmax(Q·Kᵀ / sqrt(E) + mask_B11S)·V, the key transposed by Transpose(0, 1, 3, 2)
    nodes = [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["q", "kt"], ["scores"]),
             h.make_node("Div", ["scores", "root"], ["scaled"]),
             h.make_node("Add", ["scaled", "mask"], ["masked"]),
             h.make_node("Softmax", ["masked"], ["probs"], axis=3),
             h.make_node("MatMul", ["probs", "v"], ["out"])]
    before = model(nodes, QKV + [tensor("mask", [B, 1, 1, S])], OUT,
                   [constant("root", np.float32(np.sqrt(E)))])
    after, result = _apply(before)
    # Expected: Attention(q, k, v, Expand(mask, (1, 1, S, 1))): ORT wants the query rows spelled out
    assert result.stats == {"fused_mask": 1}
    assert op_types(after)[-2:] == ["Expand", "Attention"] and "Softmax" not in op_types(after)
    feed = random_feed(q=(B, H, S, E), k=(B, H, S, E), v=(B, H, S, E))
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[0, ..., :2] = -1e9
    _same_numbers(before, after, dict(feed, mask=mask))


def test_key_in_sequence_first_layout_and_two_masks():
    # Before: key given as (B, S, H, E) and transposed straight to (B, H, E, S); two masks summed
    nodes = [h.make_node("Transpose", ["k_bshe"], ["kt"], perm=[0, 2, 3, 1]),
             h.make_node("MatMul", ["q", "kt"], ["scores"]),
             h.make_node("Mul", ["scores", "scale"], ["scaled"]),
             h.make_node("Add", ["scaled", "bias_a"], ["masked_a"]),
             h.make_node("Add", ["bias_b", "masked_a"], ["masked"]),
             h.make_node("Softmax", ["masked"], ["probs"]),
             h.make_node("MatMul", ["probs", "v"], ["out"])]
    inputs = [tensor("q", [B, H, S, E]), tensor("k_bshe", [B, S, H, E]), tensor("v", [B, H, S, E]),
              tensor("bias_a", [1, H, S, S]), tensor("bias_b", [B, 1, S, S])]
    before = model(nodes, inputs, OUT, [constant("scale", np.float32(0.3))])
    after, result = _apply(before)
    assert result.stats == {"fused_masks": 1}  # one site, two mask terms
    assert op_types(after) == ["Transpose", "Add", "Attention"]
    feed = random_feed(q=(B, H, S, E), k_bshe=(B, S, H, E), v=(B, H, S, E), bias_a=(1, H, S, S),
                       bias_b=(B, 1, S, S))
    _same_numbers(before, after, feed)


def test_infinite_mask_keeps_the_nan_guard():
    # a row whose keys are all masked with -inf: the original gives zeros, so must the rewrite
    nodes = [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["q", "kt"], ["scores"]),
             h.make_node("Add", ["scores", "mask"], ["masked"]),
             h.make_node("Softmax", ["masked"], ["probs"]),
             h.make_node("IsNaN", ["probs"], ["nan"]),
             h.make_node("Where", ["nan", "zero", "probs"], ["safe"]),
             h.make_node("MatMul", ["safe", "v"], ["out"])]
    before = model(nodes, QKV + [tensor("mask", [B, 1, S, S])], OUT, [constant("zero", np.float32(0))])
    after, result = _apply(before)
    assert result.stats == {"fused_mask": 1, "nan_guard_kept": 1}
    assert [op for op in op_types(after) if op != "Constant"] == ["Attention", "IsNaN", "Where"]
    feed = random_feed(q=(B, H, S, E), k=(B, H, S, E), v=(B, H, S, E))
    mask = np.zeros((B, 1, S, S), np.float32)
    mask[1, 0, 2, :] = -np.inf  # query row 2 of batch 1 sees nothing
    feed["mask"] = mask
    _same_numbers(before, after, feed)
    assert not run(after, feed)[0][1, :, 2].any()


@pytest.mark.parametrize("nodes, reason", [
    ([h.make_node("MatMul", ["q", "kt"], ["scores"]),
      h.make_node("Add", ["scores", "mask"], ["masked"]),
      h.make_node("Mul", ["masked", "scale"], ["scaled"]),
      h.make_node("Softmax", ["scaled"], ["probs"]),
      h.make_node("MatMul", ["probs", "v"], ["out"])], "mask is added before a scale"),
    ([h.make_node("MatMul", ["q", "kt"], ["scores"]),
      h.make_node("Mul", ["scores", "mask"], ["scaled"]),
      h.make_node("Softmax", ["scaled"], ["probs"]),
      h.make_node("MatMul", ["probs", "v"], ["out"])], "non-constant"),
    ([h.make_node("MatMul", ["q", "kt"], ["scores"]),
      h.make_node("Softmax", ["scores"], ["probs"], axis=2),
      h.make_node("MatMul", ["probs", "v"], ["out"])], "not over the last axis"),
    ([h.make_node("MatMul", ["q", "kt"], ["scores"]),
      h.make_node("Softmax", ["scores"], ["probs"]),
      h.make_node("MatMul", ["v", "probs"], ["out"])], "do not feed a MatMul with the values"),
], ids=["mask-scaled", "scale-not-constant", "softmax-axis", "probs-on-the-right"])
def test_near_misses_say_why(nodes, reason):
    nodes = [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])] + nodes
    before = model(nodes, QKV + [tensor("mask", [B, 1, S, S])], OUT,
                   [constant("scale", np.float32(0.5))])
    after, result = _apply(before)
    assert result.rewrites == 0 and reason in result.refusals[0][1]
    assert "Softmax" in op_types(after)


def test_skipped_below_opset_23():
    nodes = [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["q", "kt"], ["scores"]),
             h.make_node("Softmax", ["scores"], ["probs"]),
             h.make_node("MatMul", ["probs", "v"], ["out"])]
    before = model(nodes, QKV, OUT, opset=18)
    after, result = _apply(before)
    assert result.rewrites == 0 and "needs opset 23" in result.skipped
