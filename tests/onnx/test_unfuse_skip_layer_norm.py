"""unfuse_skip_layer_norm: com.microsoft::SkipLayerNormalization -> Add (+ bias Add) + LayerNormalization."""

from __future__ import annotations

import numpy as np

from slimline.onnx import unfuse_skip_layer_norm
from slimline.onnx.base import apply_rule
from tests.onnx.graphs import D, S, constant, copy, h, model, op_types, random_feed, run, tensor

GAMMA = np.linspace(0.5, 1.5, D).astype(np.float32)
BETA = np.linspace(-0.2, 0.2, D).astype(np.float32)
BIAS = np.linspace(-1, 1, D).astype(np.float32)


def skip_layer_norm(inputs, outputs, **kw):
    return h.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft",
                       epsilon=1e-5, **kw)


def test_with_bias_and_sum_output():
    # Before: out, _, _, sum = SkipLayerNormalization(x, skip, gamma, beta, bias); y = out + sum
    before = model([skip_layer_norm(["x", "skip", "gamma", "beta", "bias"], ["out", "", "", "sum"]),
                    h.make_node("Add", ["out", "sum"], ["y"])],
                   [tensor("x", [1, S, D]), tensor("skip", [1, S, D])], [tensor("y", [1, S, D])],
                   [constant("gamma", GAMMA), constant("beta", BETA), constant("bias", BIAS)])
    after = copy(before)
    result = apply_rule(unfuse_skip_layer_norm, after)
    # Expected: s = (x + skip) + bias; out = LayerNormalization(s); y = out + s
    assert result.rewrites == 1 and result.stats["unfused_with_bias"] == 1
    assert op_types(after) == ["Add", "Add", "LayerNormalization", "Add"]
    assert after.graph.node(2).metadata_props["slimline.pass"] == "unfuse_skip_layer_norm"
    feed = random_feed(x=(1, S, D), skip=(1, S, D))
    np.testing.assert_allclose(run(after, feed)[0], run(before, feed)[0], rtol=1e-5, atol=1e-5)


def test_without_beta_or_bias():
    before = model([skip_layer_norm(["x", "skip", "gamma"], ["y"])],
                   [tensor("x", [1, S, D]), tensor("skip", [1, S, D])], [tensor("y", [1, S, D])],
                   [constant("gamma", GAMMA)])
    after = copy(before)
    assert apply_rule(unfuse_skip_layer_norm, after).stats == {"unfused": 1}
    assert op_types(after) == ["Add", "LayerNormalization"]
    feed = random_feed(x=(1, S, D), skip=(1, S, D))
    np.testing.assert_allclose(run(after, feed)[0], run(before, feed)[0], rtol=1e-5, atol=1e-5)


def test_refuses_when_mean_is_read():
    before = model([skip_layer_norm(["x", "skip", "gamma"], ["y", "mean"])],
                   [tensor("x", [1, S, D]), tensor("skip", [1, S, D])],
                   [tensor("y", [1, S, D]), tensor("mean", None)], [constant("gamma", GAMMA)])
    result = apply_rule(unfuse_skip_layer_norm, before)
    assert result.rewrites == 0 and "mean" in result.refusals[0][1]
    assert op_types(before) == ["SkipLayerNormalization"]


def test_skipped_below_opset_17():
    before = model([skip_layer_norm(["x", "skip", "gamma"], ["y"])],
                   [tensor("x", [1, S, D]), tensor("skip", [1, S, D])], [tensor("y", [1, S, D])],
                   [constant("gamma", GAMMA)], opset=16)
    result = apply_rule(unfuse_skip_layer_norm, before)
    assert result.rewrites == 0 and "opset 17" in result.skipped
