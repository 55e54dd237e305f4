"""attention_heads_3d: Reshape/Transpose head split and merge around Attention -> 3-D Attention."""

from __future__ import annotations

import numpy as np
import pytest

from slimline.onnx import attention_heads_3d
from slimline.onnx.base import apply_rule
from tests.onnx.graphs import B, D, E, H, S, constant, copy, h, model, op_types, random_feed, run, tensor

SHAPES = [constant("split", np.array([B, S, H, E], np.int64)), constant("zero", np.float32(0))]


def _split(name):
    return [h.make_node("Reshape", [name, "split"], [f"{name}_4d"]),
            h.make_node("Transpose", [f"{name}_4d"], [f"{name}_heads"], perm=[0, 2, 1, 3])]


def _graph(attention_inputs=("q_heads", "k_heads", "v_heads", "mask"), guard=False, extra=(),
           merge=(B, S, D)):
    nodes = _split("q") + _split("k") + _split("v")
    nodes.append(h.make_node("Attention", list(attention_inputs), ["att"], scale=0.4))
    merged_from = "att"
    if guard:
        nodes += [h.make_node("IsNaN", ["att"], ["nan"]),
                  h.make_node("Where", ["nan", "zero", "att"], ["att_safe"])]
        merged_from = "att_safe"
    nodes += [h.make_node("Transpose", [merged_from], ["att_t"], perm=[0, 2, 1, 3]),
              h.make_node("Reshape", ["att_t", "merge"], ["out"])] + list(extra)
    inputs = [tensor(name, [B, S, D]) for name in "qkv"] + [tensor("mask", [B, 1, S, S])]
    outputs = [tensor("out", None)] + [tensor(n.output[0], None) for n in extra]
    return model(nodes, inputs, outputs, SHAPES + [constant("merge", np.array(merge, np.int64))])


def _feed():
    return random_feed(q=(B, S, D), k=(B, S, D), v=(B, S, D), mask=(B, 1, S, S))


@pytest.mark.parametrize("guard", [False, True], ids=["plain", "nan-guard"])
def test_head_split_and_merge_removed(guard):
    before = _graph(guard=guard)
    after = copy(before)
    result = apply_rule(attention_heads_3d, after)
    # Expected: out_BSD = Attention(q_BSD, k_BSD, v_BSD, mask, q_num_heads=H, kv_num_heads=H)
    assert result.rewrites == 1 and result.stats == {"heads_3d": 1}
    ops = [op for op in op_types(after) if op != "Constant"]
    assert ops == (["Attention", "IsNaN", "Where"] if guard else ["Attention"])
    attention = next(node for node in after.graph if node.op_type == "Attention")
    assert attention.attributes["q_num_heads"].value == H
    assert attention.attributes["kv_num_heads"].value == H
    assert attention.attributes["scale"].value == pytest.approx(0.4)
    np.testing.assert_allclose(run(after, _feed())[0], run(before, _feed())[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guard", [False, True], ids=["plain", "nan-guard"])
def test_merge_straight_to_rows_keeps_its_reshape(guard):
    """GPT-2's dynamo export merges the heads straight to (B·S, D): the Reshape stays, on the
    3-D output (both layouts hold the elements in the same order)."""
    before = _graph(guard=guard, merge=(B * S, D))
    after = copy(before)
    result = apply_rule(attention_heads_3d, after)
    # Expected: out_T = Reshape(Attention(q_BSD, k_BSD, v_BSD, mask, ...), (B·S, D))
    assert result.rewrites == 1
    ops = [op for op in op_types(after) if op != "Constant"]
    assert ops == (["Attention", "IsNaN", "Where", "Reshape"] if guard else ["Attention", "Reshape"])
    attention = next(node for node in after.graph if node.op_type == "Attention")
    assert list(attention.outputs[0].shape) == [B, S, D]
    expected = run(before, _feed())[0]
    assert expected.shape == (B * S, D)
    np.testing.assert_allclose(run(after, _feed())[0], expected, rtol=1e-5, atol=1e-6)


def test_refused_when_the_merge_copies_a_head_dimension():
    before = _graph(merge=(B, S, 0, E))  # 0 copies H from (B, S, H, E): not from (B, S, H·E)
    result = apply_rule(attention_heads_3d, before)
    assert result.rewrites == 0 and "copies a head dimension" in result.refusals[0][1]


def test_refused_when_the_merged_heads_are_read_elsewhere():
    before = _graph(extra=[h.make_node("Identity", ["att_t"], ["heads_out"])])
    result = apply_rule(attention_heads_3d, before)
    assert result.rewrites == 0 and "not read once by a Reshape" in result.refusals[0][1]


def test_refused_when_the_query_is_not_a_head_split():
    before = _graph(attention_inputs=("q_4d", "k_heads", "v_heads", "mask"))  # (B, S, H, E): no transpose
    result = apply_rule(attention_heads_3d, before)
    assert result.rewrites == 0 and result.refusals[0][1].startswith("query:")
