"""residual_into_gemm: x·W + b + r -> Gemm(x, W, C=r), the bias moved into the norm that made r."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimline.onnx import residual_into_gemm
from slimline.onnx.base import apply_rule
from tests.onnx.graphs import B, S, constant, copy, h, model, op_types, random_feed, run, tensor

K, N = 6, 5
_rng = np.random.default_rng(1)
WEIGHTS = [constant("W", _rng.standard_normal((K, N)).astype(np.float32)),
           constant("b", _rng.standard_normal(N).astype(np.float32)),
           constant("gamma", _rng.standard_normal(N).astype(np.float32)),
           constant("beta", _rng.standard_normal(N).astype(np.float32)),
           constant("V", _rng.standard_normal((N, 3)).astype(np.float32)),
           constant("c", _rng.standard_normal(3).astype(np.float32))]


def _post_norm_block(bias=True, next_reader="MatMul"):
    """Before: r = LN(z); out = x·W [+ b] + r; the next projection reads r too (r·V + c)."""
    nodes = [h.make_node("LayerNormalization", ["z", "gamma", "beta"], ["r"], axis=-1),
             h.make_node("MatMul", ["x", "W"], ["xw"])]
    projected = "xw"
    if bias:
        nodes.append(h.make_node("Add", ["xw", "b"], ["xwb"]))
        projected = "xwb"
    nodes.append(h.make_node("Add", [projected, "r"], ["out"]))
    if next_reader == "MatMul":
        nodes += [h.make_node("MatMul", ["r", "V"], ["rv"]), h.make_node("Add", ["rv", "c"], ["next"])]
    else:  # a reader that cannot absorb the moved bias
        nodes += [h.make_node("Relu", ["r"], ["rv"]), h.make_node("Identity", ["rv"], ["next"])]
    inputs = [tensor("x", [B, S, K]), tensor("z", [B, S, N])]
    return model(nodes, inputs, [tensor("out", [B, S, N]), tensor("next", None)], WEIGHTS)


def _feed():
    return random_feed(x=(B, S, K), z=(B, S, N))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_residual_and_bias_fold_into_gemm(bias):
    before = _post_norm_block(bias=bias)
    after = copy(before)
    result = apply_rule(residual_into_gemm, after)
    # Expected: out = Reshape(Gemm(Reshape(x), W, Reshape(r)), Shape(r)); with a bias the norm's
    # shift is beta + b and the next projection's bias c - b·V
    assert result.rewrites == 1
    assert result.stats == {"folded_bias" if bias else "folded": 1}
    ops = [op for op in op_types(after) if op != "Constant"]
    assert ops.count("Gemm") == 1 and ops.count("Add") == 1  # only the next projection's bias
    assert "MatMul" in ops  # the next projection's, untouched
    norm = next(node for node in after.graph if node.op_type == "LayerNormalization")
    shift = norm.inputs[2].const_value.numpy()
    np.testing.assert_allclose(shift, _array("beta") + (_array("b") if bias else 0), rtol=1e-6)
    for got, want in zip(run(after, _feed()), run(before, _feed())):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _array(name):
    return onnx.numpy_helper.to_array(next(t for t in WEIGHTS if t.name == name))


def test_bias_refused_when_the_residual_has_another_reader():
    before = _post_norm_block(next_reader="Relu")
    result = apply_rule(residual_into_gemm, before)
    assert result.rewrites == 0 and "cannot absorb the moved bias" in result.refusals[0][1]


def test_refused_when_the_residual_is_broadcast():
    nodes = [h.make_node("MatMul", ["x", "W"], ["xw"]), h.make_node("Add", ["xw", "row"], ["out"])]
    before = model(nodes, [tensor("x", [B, S, K]), tensor("row", [1, 1, N])],
                   [tensor("out", [B, S, N])], WEIGHTS[:1])
    result = apply_rule(residual_into_gemm, before)
    assert result.rewrites == 0 and "broadcast" in result.refusals[0][1]


def test_dynamic_shapes_share_one_shape_node():
    """Two post-norm blocks over symbolic (batch, sequence): one Shape serves both sites."""
    nodes = []
    for index in (0, 1):
        source, tag = ("z" if index == 0 else "out0"), str(index)
        nodes += [h.make_node("LayerNormalization", [source, "gamma", "beta"], ["r" + tag], axis=-1),
                  h.make_node("MatMul", ["x", "W"], ["xw" + tag]),
                  h.make_node("Add", ["xw" + tag, "b"], ["xwb" + tag]),
                  h.make_node("Add", ["xwb" + tag, "r" + tag], ["out" + tag])]
    inputs = [tensor("x", ["batch", "sequence", K]), tensor("z", ["batch", "sequence", N])]
    before = model(nodes, inputs, [tensor("out1", ["batch", "sequence", N])], WEIGHTS[:4])
    after = copy(before)
    result = apply_rule(residual_into_gemm, after)
    assert result.rewrites == 2 and op_types(after).count("Shape") == 1
    feed = random_feed(x=(3, 7, K), z=(3, 7, N))
    np.testing.assert_allclose(run(after, feed)[0], run(before, feed)[0], rtol=1e-5, atol=1e-5)
