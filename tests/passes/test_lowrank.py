"""lowrank: Before (one aten.linear per layer) → Expected (two thinner aten.linear per factorised
layer), exactness at full rank, reasons for dense layers, the budget, recovery, ONNX in ORT."""

import math

import pytest
import torch
from torch import nn

import slimline
from slimline.budget import Budget
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.passes import canonicalize_linear, lowrank
from slimline.passes.base import PassContext

aten = torch.ops.aten


class Stack(nn.Module):
    """x_BTD → up (D→4D) → gelu → down (4D→D) → head (D→10); ``embed`` (4→D) saves nothing."""

    def __init__(self, d=64):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10, bias=False)

    def forward(self, x):                                    # (B, T, 4)
        h = self.embed(x)                                    # (B, T, D)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h)                                  # (B, T, 10)


class TiedLM(nn.Module):
    """A GPT-style head that shares its weight with the token embedding."""

    def __init__(self, vocab=32, d=64):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 4 * d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, idx):                                  # (B, T)
        h = self.embedding(idx)                              # (B, T, D)
        return self.head(h + self.up(h)[..., :h.shape[-1]])  # (B, T, V)


def _correlated_inputs(count, batch=4, tokens=16, seed=0):
    """Inputs whose features are strongly correlated (a low-dimensional signal plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(2, 4, generator=generator)
    return [torch.randn(batch, tokens, 2, generator=generator) @ mixing
            + 0.05 * torch.randn(batch, tokens, 4, generator=generator) for _ in range(count)]


def _prepared(model, inputs):
    graph = capture(model.eval(), (inputs[0],))
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(),
                                    PassContext("cpu", "balanced")).graph
    samples = [((x,), {}) for x in inputs]
    with torch.no_grad():
        references = [model(x) for x in inputs]
    return graph, samples, references


def _context(samples, references, budget=None, share=1.0):
    return PassContext("cpu", "balanced", calibration=samples, budget_share=share,
                       reference_outputs=references, extra={"budget": budget} if budget else {})


def _linears(graph):
    return [n for n in graph.fx.nodes if n.op == "call_function" and n.target == aten.linear.default]


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_rewrite_counts_shapes_and_provenance():
    model, inputs = Stack(), _correlated_inputs(3)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", allocation="uniform", method="svd", param_reduction=0.5)
    result = lowrank.run(graph.copy(), config, _context(samples, references))

    assert result.changed and result.stats["factorised"] == 2          # up, down
    linears = _linears(result.graph)
    assert len(linears) == 2 * 2 + 2                                   # embed, head stay dense
    factors = [n for n in linears if n.meta.get(lowrank.FACTOR_META)]
    assert [n.meta[lowrank.FACTOR_META] for n in factors] == ["A", "B", "A", "B"]
    assert all(n.meta[PROVENANCE_PASS] == "lowrank" for n in factors)
    assert [module_path(n) for n in factors] == ["up", "up", "down", "down"]
    for first, second, (n, k) in ((factors[0], factors[1], (256, 64)), (factors[2], factors[3], (64, 256))):
        a, b = (result.graph.attribute(f.args[1]) for f in (first, second))
        rank = a.shape[0]
        assert a.shape == (rank, k) and b.shape == (n, rank) and rank % 8 == 0
        assert rank * (n + k) <= 0.5 * n * k + 8 * (n + k)              # about half the weights
        assert second.args[0] is first and len(second.args) == 3        # bias on the second half
        assert tuple(second.meta["val"].shape) == (4, 16, n)
    decisions = {d.module_path: d for d in result.decisions}
    assert decisions["up"].decision.startswith("factorised r=") and decisions["up"].rank == rank
    assert decisions["up"].params_after < decisions["up"].params_before
    assert decisions["up"].flops_after != decisions["up"].flops_before
    assert 0 < result.stats["linear_param_reduction"] < 0.6
    assert _cosine(result.graph.run((inputs[0],), {}), references[0]) > 0.9


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_reproduces_the_layer_exactly(method):
    model, inputs = Stack(), _correlated_inputs(2)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", method=method, ranks={"up": 64, "down": 64},
                            keep_unprofitable=True, param_reduction=0.0)
    result = lowrank.run(graph.copy(), config, _context(samples, references))
    assert result.stats["factorised"] == 2
    out = result.graph.run((inputs[1],), {})
    relative = float((out - references[1]).abs().max() / references[1].abs().max())
    assert relative <= 1e-5


def test_spectrum_errors_match_the_measured_output_error():
    """e[R] from one SVD equals ‖(W − B·A)·xᵀ‖² / ‖W·xᵀ‖² measured directly, for both methods."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16, dtype=torch.float64)
    x = torch.randn(200, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64) \
        + 0.1 * torch.randn(200, 16, dtype=torch.float64)
    covariance = x.T @ x / len(x)
    for method in ("svd", "whitened"):
        fitted = lowrank.spectrum(weight, method, covariance, damping=1e-3)
        errors = fitted.relative_errors(weight, covariance)
        for rank in (2, 5, 12):
            measured = ((weight - fitted.reconstruction(rank, torch.float64)) @ x.T).pow(2).sum() \
                / (weight @ x.T).pow(2).sum()
            assert math.isclose(float(errors[rank]), float(measured), rel_tol=1e-9, abs_tol=1e-12)
    plain = lowrank.spectrum(weight, "svd").relative_errors(weight, covariance)
    whitened = lowrank.spectrum(weight, "whitened", covariance, 1e-3).relative_errors(weight, covariance)
    assert whitened[3] < 0.5 * plain[3]                                 # data-aware wins on its data


def test_layers_that_stay_dense_say_why():
    model, inputs = Stack(), _correlated_inputs(2)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", allocation="uniform", exclude=("down",))
    result = lowrank.run(graph.copy(), config, _context(samples, references))
    why = {d.module_path: d.why_not for d in result.decisions if d.decision == lowrank.KEPT}
    assert why["embed"].startswith("saves nothing: break-even rank 3.8")
    assert why["down"] == "excluded by Config.exclude"
    assert why["head"].startswith("too small: 640 weights")
    assert "up" not in why
    assert result.stats["kept_no_saving"] == result.stats["kept_excluded"] == result.stats["kept_small"] == 1


def test_a_tied_head_stays_dense():
    model = TiedLM().eval()
    inputs = [torch.randint(0, 32, (2, 8)) for _ in range(2)]
    graph, samples, references = _prepared(model, inputs)
    result = lowrank.run(graph.copy(), lowrank.Config(rank="param_reduction", allocation="uniform"),
                         _context(samples, references))
    why = {d.module_path: d.why_not for d in result.decisions if d.decision == lowrank.KEPT}
    assert why["head"].startswith("tied weight: also read by embedding")
    assert result.stats["kept_tied"] == 1 and result.stats["factorised"] == 1


def test_best_method_reports_both_and_data_aware_wins_on_correlated_inputs():
    model, inputs = Stack(), _correlated_inputs(4)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", allocation="uniform", method="best")
    result = lowrank.run(graph.copy(), config, _context(samples, references))
    up = next(d for d in result.decisions if d.module_path == "up")
    assert set(up.method_errors) == {"svd", "whitened"}
    assert up.method == "whitened" and up.method_errors["whitened"] < up.method_errors["svd"]


def test_budget_driven_ranks_stay_inside_the_budget():
    model, inputs = Stack(), _correlated_inputs(3)
    graph, samples, references = _prepared(model, inputs)

    def run_with(max_loss):
        config = lowrank.Config(rank="budget", param_reduction=0.6)
        return lowrank.run(graph.copy(), config, _context(samples, references, Budget("cosine", max_loss), 0.5))

    loose, tight = run_with(0.05), run_with(1e-12)
    assert loose.changed and loose.stats["factorised"] >= 1
    for (args, kwargs), reference in zip(samples, references):
        assert _cosine(loose.graph.run(args, kwargs), reference) >= 1 - 0.05 * 0.5
    assert loose.stats["budget_loss"] <= loose.stats["budget_limit"]
    assert not tight.changed and tight.stats["factorised"] == 0
    reasons = [d.why_not for d in tight.decisions if d.module_path in ("up", "down")]
    assert all("budget share" in r for r in reasons)


def test_a_pass_that_breaks_the_budget_is_rolled_back_with_its_reason():
    model, inputs = Stack(), _correlated_inputs(2)
    optimized = slimline.optimize(model, (inputs[0],), mode="balanced", budget=Budget("cosine", 1e-6),
                                  calibration=[(x,) for x in inputs[1:]], passes={
                                      "lowrank": {"rank": "param_reduction", "param_reduction": 0.5}})
    record = next(p for p in optimized.report.passes if p.name == "lowrank")
    assert record.status == "rolled back" and "broke its check" in record.reason
    assert optimized.report.all_exact


def test_recovery_reduces_feature_mse():
    model, inputs = Stack(), _correlated_inputs(4)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", allocation="uniform", method="svd", param_reduction=0.6,
                            recover=30)
    result = lowrank.run(graph.copy(), config, _context(samples, references))
    stats = result.stats
    assert stats["recover_reverted"] == 0
    assert stats["recover_feature_loss_after"] < 0.9 * stats["recover_feature_loss_before"]
    assert not any(t.requires_grad for t in result.graph.module.buffers())


@pytest.mark.parametrize("loss", ["output", "both"])
def test_recovery_on_the_model_output_brings_the_output_closer(loss):
    model, inputs = Stack(), _correlated_inputs(4)
    graph, samples, references = _prepared(model, inputs)

    def output_error(recover):
        config = lowrank.Config(rank="param_reduction", allocation="uniform", method="svd",
                                param_reduction=0.6, recover=recover, recover_loss=loss, recover_lr=0.1)
        result = lowrank.run(graph.copy(), config, _context(samples, references))
        with torch.no_grad():
            errors = [float((result.graph.run(args, kwargs) - reference).pow(2).mean() / reference.pow(2).mean())
                      for (args, kwargs), reference in zip(samples, references)]
        return sum(errors) / len(errors), result

    untrained, _ = output_error(0)
    trained, result = output_error(30)
    stats = result.stats
    assert stats["recover_reverted"] == 0
    assert stats["recover_output_loss_before"] == pytest.approx(untrained, rel=1e-3)
    assert stats["recover_output_loss_after"] == pytest.approx(trained, rel=1e-3)
    assert trained < 0.8 * untrained
    assert (stats["recover_layer_loss_before"] > 0) == (loss == "both")
    assert not any(t.requires_grad for t in result.graph.module.buffers())


def test_factorised_model_exports_two_matmuls_and_matches_in_onnxruntime(tmp_path):
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    model, inputs = Stack(), _correlated_inputs(2)
    graph, samples, references = _prepared(model, inputs)
    config = lowrank.Config(rank="param_reduction", allocation="uniform", method="whitened")
    result = lowrank.run(graph.copy(), config, _context(samples, references))
    info = onnx_export.export_onnx_model(result.graph.module, (inputs[0],), {}, tmp_path / "lowrank.onnx")
    products = info.op_histogram.get("MatMul", 0) + info.op_histogram.get("Gemm", 0)
    assert products == len(_linears(result.graph)) == 6
    assert info.max_rel_error <= 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[1].numpy()})
    expected = result.graph.run((inputs[1],), {})
    assert float((torch.from_numpy(out) - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_bad_config_is_refused_with_a_hint():
    model, inputs = Stack(), _correlated_inputs(1)
    graph, samples, references = _prepared(model, inputs)
    with pytest.raises(slimline.SlimlineError, match="unknown lowrank method"):
        lowrank.run(graph.copy(), lowrank.Config(method="qr"), _context(samples, references))
    with pytest.raises(slimline.SlimlineError, match="unknown lowrank recover_loss"):
        lowrank.run(graph.copy(), lowrank.Config(recover_loss="kl"), _context(samples, references))
