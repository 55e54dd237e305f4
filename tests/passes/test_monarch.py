"""monarch: the projection (exact on Monarch matrices, optimal per slab, better than a random
Monarch, rectangular and non-divisible shapes) and the pass — Before (one aten.linear per layer) →
Expected (reshape, bmm, permute, bmm, transpose; no linear for a converted layer), the gate's
reasons (SVD at equal parameters, the budget share, refusals), dynamic shapes, recovery, the
pipeline, and ONNX (Reshape/Transpose/MatMul) checked in onnxruntime."""

import math

import pytest
import torch
from torch import nn

import slimline
from slimline.budget import Budget
from slimline.errors import ConfigError, SlimlineError
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.monarch import (dense_from_factors, monarch_forward, monarch_shape, project,
                              random_factors, relative_errors, slab_singular_values)
from slimline.passes import canonicalize_linear, monarch
from slimline.passes.base import PassContext

aten = torch.ops.aten
FP32_RTOL = 1e-5
FP64_ATOL = 1e-10


# ---------------------------------------------------------------------------------------------
# projection


@pytest.mark.parametrize("in_features,out_features,nblocks,slab_rank,uneven", [
    (64, 64, 8, 1, "divisor"),      # the paper's square case: b = √n, rank-1 slabs
    (64, 64, 4, None, "divisor"),   # T = min(P, S) // b = 4: half the dense weights
    (48, 96, 4, None, "divisor"),   # rectangular
    (96, 40, 4, 2, "divisor"),      # rectangular, taller than wide
    (30, 50, 4, None, "divisor"),   # b = 4 divides neither: b = 5, a divisor of gcd 10
    (30, 50, 4, None, "pad"),       # ... or kept, with padding 30→32, 50→52
    (7, 13, 2, 1, "divisor"),       # coprime sizes: no divisor ≥ 2, so padded
])
def test_projection_is_exact_on_monarch_matrices(in_features, out_features, nblocks, slab_rank, uneven):
    shape = monarch_shape(in_features, out_features, nblocks, slab_rank, uneven)
    factors = random_factors(shape, torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = factors.dense()
    assert weight.shape == (out_features, in_features)
    projected = project(weight, shape)
    assert (projected.dense() - weight).abs().max() <= FP64_ATOL
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    y = monarch_forward(x, projected.right_bPQ, projected.left_bQS, shape)
    assert (y - x @ weight.T).abs().max() <= FP64_ATOL * 10


def test_shapes_say_how_they_were_cut():
    assert monarch_shape(768, 3072, 4).how == "b=4 divides 768 and 3072"
    assert monarch_shape(768, 3072, 4).slab_rank == 48               # Q = min(P, S) = 192
    divisor = monarch_shape(30, 50, 4)
    assert divisor.nblocks == 5 and "nearest divisor" in divisor.how and not divisor.padded
    padded = monarch_shape(30, 50, 4, uneven="pad")
    assert padded.nblocks == 4 and padded.how == "b=4, padded in 30→32, out 50→52"
    assert monarch_shape(4096, 4096, 4).params * 2 == 4096 * 4096    # b=4: half the weights
    assert monarch_shape(4096, 4096, 16).params * 8 == 4096 * 4096
    half = monarch_shape(384, 1536, 4, param_fraction=0.5)            # a 1:4 MLP layer at 50 %
    assert half.slab_rank == 38 and 0.45 < half.params / half.dense_params <= 0.5
    with pytest.raises(ConfigError, match="uneven"):
        monarch_shape(8, 8, 2, uneven="crop")


def test_projection_error_is_the_slab_tails_and_beats_random_monarch():
    torch.manual_seed(1)
    weight = torch.randn(96, 64, dtype=torch.float64)
    shape = monarch_shape(64, 96, 4)
    projected = project(weight, shape)
    error = (weight - projected.dense()).pow(2).sum()
    tails = slab_singular_values(weight, shape)[..., shape.slab_rank:].pow(2).sum()
    assert math.isclose(float(error), float(tails), rel_tol=1e-9)    # Eckart–Young, slab by slab
    for seed in range(5):
        other = random_factors(shape, torch.Generator().manual_seed(seed), dtype=torch.float64).dense()
        scale = float((other * weight).sum() / other.pow(2).sum())    # the best multiple of it
        assert error < (weight - scale * other).pow(2).sum()
    # a small move of the factors only makes it worse (a minimum, not just a stationary point)
    nudged = dense_from_factors(shape, projected.right_bPQ + 1e-3 * torch.randn_like(projected.right_bPQ),
                                projected.left_bQS)
    assert error < (weight - nudged).pow(2).sum()


def test_output_error_uses_the_input_covariance():
    weight = torch.randn(8, 4, dtype=torch.float64)
    approximation = weight.clone()
    approximation[:, 0] = 0.0                          # wrong only on input feature 0
    covariance = torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert relative_errors(weight, approximation, covariance) == 0.0   # feature 0 never occurs
    assert relative_errors(weight, approximation) > 0.0


# ---------------------------------------------------------------------------------------------
# the pass


class MonarchMLP(nn.Module):
    """up (64→128) and down (128→64) hold Monarch matrices; ``side`` (64→96) is low-rank."""

    def __init__(self, side_rank=2):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.side = nn.Linear(64, 96, bias=False)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.up, self.down):
                shape = monarch_shape(layer.in_features, layer.out_features, 4)
                layer.weight.copy_(random_factors(shape, generator).dense())
            self.side.weight.copy_(torch.randn(96, side_rank, generator=generator)
                                   @ torch.randn(side_rank, 64, generator=generator) / 8)

    def forward(self, x):                                  # (B, T, 64)
        h = self.down(torch.relu(self.up(x)))              # (B, T, 64)
        return h + self.side(x).sum(-1, keepdim=True)      # (B, T, 64)


class Trained(nn.Module):
    """Dense Gaussian weights: neither Monarch nor low-rank; Monarch costs something."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _prepared(model, inputs, dynamic_shapes=None):
    graph = capture(model.eval(), (inputs[0],), dynamic_shapes=dynamic_shapes)
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(),
                                    PassContext("cpu", "balanced")).graph
    samples = [((x,), {}) for x in inputs]
    with torch.no_grad():
        references = [model(x) for x in inputs]
    return graph, samples, references


def _context(samples, references, budget=None, share=1.0):
    return PassContext("cpu", "balanced", calibration=samples, budget_share=share,
                       reference_outputs=references, extra={"budget": budget} if budget else {})


def _calls(graph, *targets):
    return [n for n in graph.fx.nodes if n.op == "call_function" and (not targets or n.target in targets)]


def _inputs(count=2, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, width, generator=generator) for _ in range(count)]


def _relative_error(expected, actual):
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _decision(result, path):
    return next(d for d in result.decisions if d.module_path == path)


def test_monarch_layers_become_two_bmm_and_low_rank_layers_stay_dense():
    model, inputs = MonarchMLP(), _inputs()
    graph, samples, references = _prepared(model, inputs)
    before = _calls(graph, aten.linear.default)
    result = monarch.run(graph.copy(), monarch.Config(), _context(samples, references))
    after = result.graph
    # Before: three linears. Expected: up and down as bmm·permute·bmm; side still a linear.
    assert len(before) == 3
    assert [module_path(n) for n in _calls(after, aten.linear.default)] == ["side"]
    bmms = _calls(after, aten.bmm.default)
    assert [n.meta[monarch.FACTOR_META] for n in bmms] == ["R", "L", "R", "L"]
    assert all(n.meta[PROVENANCE_PASS] == "monarch" for n in _calls(after) if n.target in
               (aten.bmm.default, aten.permute.default, aten.transpose.int, aten.reshape.default))
    assert len(_calls(after, aten.permute.default)) == 2
    assert result.stats["converted"] == 2 and result.stats["kept_by_gate"] == 1
    for x, reference in zip(inputs, references):
        assert _relative_error(reference, after.run((x,), {})) <= FP32_RTOL
    up = _decision(result, "up")
    assert up.decision == "converted b=4 T=4" and up.error <= 1e-6 < up.svd_error
    assert up.params_before == 64 * 128 + 128 and up.params_after == 4 * 4 * (64 + 128) + 128
    side = _decision(result, "side")
    assert side.decision == "kept" and side.why_not.startswith("kept dense: Monarch error ")
    assert "> SVD error 0.00 at equal params (rank" in side.why_not
    # the dense weights of converted layers are no longer read
    assert after.parameter_count() < graph.parameter_count()


def test_gate_ratio_and_gate_off():
    model, inputs = MonarchMLP(), _inputs()
    graph, samples, references = _prepared(model, inputs)
    loose = monarch.run(graph.copy(), monarch.Config(gate="none"), _context(samples, references))
    assert loose.stats["converted"] == 3 and _decision(loose, "side").why_not is None
    strict = monarch.run(graph.copy(), monarch.Config(gate="svd", max_error_ratio=0.01),
                         _context(samples, references))
    assert strict.stats["converted"] == 2  # the exact Monarch layers still pass
    assert "> 0.01 × SVD error" in _decision(strict, "side").why_not


def test_budget_share_keeps_the_worst_layers_dense():
    model, inputs = Trained(), _inputs(3)
    graph, samples, references = _prepared(model, inputs)
    tight = monarch.run(graph.copy(), monarch.Config(gate="budget"),
                        _context(samples, references, Budget("cosine", 1e-4)))
    assert not tight.changed and tight.stats["kept_by_budget"] == 2
    assert all("budget share (output cosine ≥ 0.99991" in d.why_not for d in tight.decisions)
    assert tight.stats["budget_loss"] == 0.0
    roomy = monarch.run(graph.copy(), monarch.Config(gate="budget"),
                        _context(samples, references, Budget("cosine", 0.9)))
    assert roomy.stats["converted"] == 2 and roomy.stats["budget_loss"] <= roomy.stats["budget_limit"]


def test_refusals_say_why():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(16, 64)
            self.tiny = nn.Linear(64, 8)
            self.head = nn.Linear(64, 16, bias=False)
            self.head.weight = self.embedding.weight           # tied
            self.skip = nn.Linear(64, 64)

        def forward(self, idx):
            h = self.embedding(idx)
            return self.head(self.skip(h)), self.tiny(h)

    model = Mixed().eval()
    idx = torch.randint(0, 16, (2, 8))
    graph = capture(model, (idx,))
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(),
                                    PassContext("cpu", "balanced")).graph
    config = monarch.Config(gate="none", min_params=1000, exclude=("skip",))
    result = monarch.run(graph.copy(), config, PassContext("cpu", "balanced"))
    reasons = {d.module_path: d.why_not for d in result.decisions}
    assert reasons["head"].startswith("tied weight: also read by")
    assert reasons["tiny"].startswith("too small: 512 weights")
    assert reasons["skip"] == "excluded by Config.exclude"
    assert not result.changed
    assert (result.stats["kept_tied"], result.stats["kept_too_small"], result.stats["kept_excluded"]) == (1, 1, 1)
    with pytest.raises(SlimlineError, match="unknown monarch gate"):
        monarch.run(graph.copy(), monarch.Config(gate="maybe"), PassContext("cpu", "balanced"))


def test_padded_and_divisor_layers_and_the_report_says_which():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(60, 90)

        def forward(self, x):
            return self.fc(x)

    model, inputs = Odd().eval(), _inputs(2, width=60)
    graph, samples, references = _prepared(model, inputs)
    for uneven, how in (("divisor", "b=5 instead of 4: the nearest divisor of gcd(60, 90)=30"),
                        ("pad", "b=4, padded out 90→92")):
        result = monarch.run(graph.copy(), monarch.Config(gate="none", uneven=uneven, nblocks=4),
                             _context(samples, references))
        decision = _decision(result, "fc")
        assert decision.how == how and decision.decision.startswith("converted")
        # the rewrite computes exactly the projection it reports
        shape = monarch_shape(60, 90, 4, uneven=uneven)
        factors = project(model.fc.weight.detach().double(), shape)
        expected = inputs[1].double() @ factors.dense().T + model.fc.bias.detach().double()
        assert _relative_error(expected, result.graph.run((inputs[1],), {})) <= FP32_RTOL
    padded = _calls(result.graph, aten.slice.Tensor)
    assert len(padded) == 1 and padded[0].args[1:] == (1, 0, 90)


def test_dynamic_batch_and_sequence():
    model = MonarchMLP()
    inputs = _inputs(2)
    dims = {"x": {0: "batch", 1: "seq"}}
    graph, samples, references = _prepared(model, inputs, dynamic_shapes=dims)
    result = monarch.run(graph.copy(), monarch.Config(), _context(samples, references))
    assert result.stats["converted"] == 2
    sizes = _calls(result.graph, aten.sym_size.int)
    assert len(sizes) == 4  # batch and seq, for each converted layer's output
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        assert _relative_error(model(x), result.graph.run((x,), {})) <= FP32_RTOL


def test_already_factorised_layers_are_left_alone():
    model, inputs = MonarchMLP(), _inputs()
    graph, samples, references = _prepared(model, inputs)
    for node in _calls(graph, aten.linear.default):
        if module_path(node) == "up":
            node.meta[PROVENANCE_PASS] = "lowrank"
    result = monarch.run(graph.copy(), monarch.Config(gate="none"), _context(samples, references))
    assert _decision(result, "up").why_not == "already rewritten by lowrank"


def test_recovery_reduces_feature_loss():
    model, inputs = Trained(), _inputs(2)
    graph, samples, references = _prepared(model, inputs)
    config = monarch.Config(gate="none", recover=20, recover_lr=3e-3)
    result = monarch.run(graph.copy(), config, _context(samples, references))
    stats = result.stats
    assert stats["recover_reverted"] == 0
    assert stats["recover_feature_loss_after"] < 0.9 * stats["recover_feature_loss_before"]
    assert not any(t.requires_grad for t in result.graph.module.buffers())
    plain = monarch.run(graph.copy(), monarch.Config(gate="none"), _context(samples, references))

    def loss(g):
        return sum(_relative_error(r, g.run((x,), {})) for x, r in zip(inputs, references))
    assert loss(result.graph) < loss(plain.graph)


def test_pipeline_runs_monarch_in_balanced_mode_with_reasons():
    model, inputs = MonarchMLP(), _inputs(3)
    optimized = slimline.optimize(model, (inputs[0],), mode="balanced",
                                  calibration=[(x,) for x in inputs[1:]],
                                  passes={"monarch": {}})
    record = next(p for p in optimized.report.passes if p.name == "monarch")
    assert record.status == "applied"
    layers = {d.module_path: d for d in optimized.report.layers if d.pass_name == "monarch"}
    assert layers["up"].decision.startswith("converted") and "SVD error" in layers["side"].why_not
    with torch.no_grad():
        assert _relative_error(model(inputs[0]), optimized(inputs[0])) <= FP32_RTOL


def test_bf16_weights_keep_their_dtype():
    model = MonarchMLP().to(torch.bfloat16)
    inputs = [x.to(torch.bfloat16) for x in _inputs(2)]
    graph, samples, references = _prepared(model, inputs)
    result = monarch.run(graph.copy(), monarch.Config(gate="none"), _context(samples, references))
    factors = [t for name, t in result.graph.module.named_buffers() if "monarch" in name]
    assert factors and all(t.dtype == torch.bfloat16 for t in factors)
    out = result.graph.run((inputs[0],), {})
    assert out.dtype == torch.bfloat16 and _relative_error(references[0], out) <= 5e-2


def test_onnx_export_is_reshape_transpose_matmul_and_matches_in_onnxruntime(tmp_path):
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    model, inputs = MonarchMLP(), _inputs(2)
    graph, samples, references = _prepared(model, inputs)
    result = monarch.run(graph.copy(), monarch.Config(), _context(samples, references))
    info = onnx_export.export_onnx_model(result.graph.module, (inputs[0],), {}, tmp_path / "monarch.onnx")
    histogram = info.op_histogram
    assert histogram.get("MatMul", 0) + histogram.get("Gemm", 0) == 5   # 2 × 2 bmm + side
    assert histogram.get("Transpose", 0) >= 4 and histogram.get("Reshape", 0) >= 4
    assert info.max_rel_error <= 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[1].numpy()})
    expected = result.graph.run((inputs[1],), {})
    assert _relative_error(expected, torch.from_numpy(out)) <= 1e-4
