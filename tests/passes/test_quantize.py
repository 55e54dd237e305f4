"""The quantize pass: rewrite counts and op types, numbers against the reference math,
refusals with reasons, sensitivity, and the budget it must stay inside."""

import dataclasses

import pytest
import torch
from torch import nn

import slimline
from slimline.errors import ConfigError
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.passes import canonicalize_linear, quantize
from slimline.passes.base import PassContext
from slimline.quant.linear import quantized_linear
from slimline.quant.scheme import QuantScheme, quantize_rtn
from slimline.verify import compare_outputs

aten = torch.ops.aten


class Tower(nn.Module):
    """Three dense layers (one without bias) and a head tied to an embedding."""

    def __init__(self, width=64, hidden=128, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width, bias=False)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):                       # (B, T)
        x = self.embed(tokens)                       # (B, T, C)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(self.mix(x))                # (B, T, V)


def _graph(model, *inputs):
    graph = capture(model.eval(), inputs)
    return canonicalize_linear.run(graph, canonicalize_linear.Config(), PassContext("cpu", "balanced")).graph


def _run(graph, config, samples=None, target="cpu", mode="balanced", **extra):
    samples = samples or [(graph.example_args, graph.example_kwargs)]
    context = PassContext(target, mode, calibration=samples, budget_share=1.0, extra=extra)
    return quantize.run(graph.copy(), dataclasses.replace(config, allow_slower=True), context)


def _ops(graph):
    return [node.target for node in graph.fx.nodes if node.op == "call_function"]


def test_every_eligible_linear_is_rewritten_and_stamped():
    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (2, 8))
    graph = _graph(Tower(), tokens)
    assert _ops(graph).count(aten.linear.default) == 4
    result = _run(graph, quantize.Config(bits=4, group_size=32, fit_budget=False))
    ops = _ops(result.graph)
    assert ops.count(quantized_linear) == 3
    assert ops.count(aten.linear.default) == 1  # the tied head
    assert result.stats["quantized"] == 3 and result.stats["refused"] == 1
    for node in result.graph.fx.nodes:
        if node.target is quantized_linear:
            assert node.meta[PROVENANCE_PASS] == "quantize"
            assert module_path(node) in {"up", "down", "mix"}
            assert node.kwargs["bits"] == 4 and node.kwargs["group_size"] == 32
    by_path = {d.module_path: d for d in result.decisions}
    assert "tied" in by_path["head"].why_not
    assert by_path["up"].decision.startswith("quantized: int4 g32 asym (gptq), SQNR")
    assert 0 < by_path["up"].error < 0.2
    assert result.stats["weight_bytes_after"] < result.stats["weight_bytes_before"] / 5


def test_rewritten_graph_computes_the_reference_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24)).eval()
    x = torch.randn(3, 48)
    graph = _graph(model, x)
    config = quantize.Config(bits=4, group_size=32, symmetric=False, method="rtn", fit_budget=False)
    result = _run(graph, config)
    scheme = QuantScheme(4, 32, False)
    w0 = quantize_rtn(model[0].weight, scheme).dequantize()
    w2 = quantize_rtn(model[2].weight, scheme).dequantize()
    expected = nn.functional.linear(nn.functional.gelu(nn.functional.linear(x, w0, model[0].bias)),
                                    w2, model[2].bias)
    torch.testing.assert_close(result.graph.run((x,), {}), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,min_cosine", [(8, 0.9999), (4, 0.99), (3, 0.97), (2, 0.8)])
def test_quantized_outputs_stay_close(bits, min_cosine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(16, 64)
    graph = _graph(model, x)
    result = _run(graph, quantize.Config(bits=bits, fit_budget=False))
    comparison = compare_outputs(model(x), result.graph.run((x,), {}), exact=False, min_cosine=min_cosine)
    assert comparison.passed, comparison.verdict


def test_skip_patterns_keep_layers_dense_with_a_reason():
    graph = _graph(Tower(), torch.randint(0, 32, (2, 8)))
    result = _run(graph, quantize.Config(bits=8, skip=("mix", "u*"), fit_budget=False))
    kept = {d.module_path: d.why_not for d in result.decisions if d.decision == "kept"}
    assert set(kept) == {"mix", "up", "head"}
    assert "matches 'mix'" in kept["mix"] and "matches 'u*'" in kept["up"]
    assert _ops(result.graph).count(quantized_linear) == 1


def test_shared_weights_quantized_on_request():
    graph = _graph(Tower(), torch.randint(0, 32, (2, 8)))
    result = _run(graph, quantize.Config(bits=8, quantize_shared_weights=True, fit_budget=False))
    assert _ops(result.graph).count(quantized_linear) == 4


class Fragile(nn.Module):
    """One layer whose inputs are wildly uneven: 2 bits there wrecks the output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight[:, :4] *= 40  # outlier input channels: coarse 2-bit groups

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_budget_keeps_the_most_sensitive_layers_dense():
    torch.manual_seed(0)
    model = Fragile().eval()
    x = torch.randn(64, 64)
    graph = _graph(model, x)
    config = quantize.Config(bits=2, method="rtn")
    unbounded = _run(graph, quantize.Config(bits=2, method="rtn", fit_budget=False))
    loose = compare_outputs(model(x), unbounded.graph.run((x,), {}), exact=False)
    budget = slimline.Budget("cosine", 1 - (loose.min_cosine + 1) / 2)  # tighter than all-2-bit
    result = _run(graph, config, budget=budget)
    target = budget.min_cosine(1.0)
    assert result.stats["target_cosine"] == pytest.approx(target)
    assert result.stats["cosine_all_quantized"] < target
    assert 1 <= result.stats["kept_for_budget"] <= 2
    assert result.stats["budget_evaluations"] >= 2
    kept = [d for d in result.decisions if d.decision == "kept"]
    assert all("budget" in d.why_not for d in kept)
    # the layers kept are the least SQNR ones
    quantized_errors = [d.error for d in result.decisions if d.decision.startswith("quantized")]
    assert min(d.error for d in kept) >= max(quantized_errors)
    comparison = compare_outputs(model(x), result.graph.run((x,), {}), exact=False, min_cosine=target)
    assert comparison.passed, comparison.verdict


def test_no_budget_left_means_no_rewrite():
    model = Fragile().eval()
    x = torch.randn(8, 64)
    result = _run(_graph(model, x), quantize.Config(bits=4), budget=slimline.Budget("cosine", 0.0))
    assert not result.changed and result.stats["kept_for_budget"] == 3


def test_auto_settings_and_refused_combinations():
    resolved = quantize.resolve(quantize.Config(), "onnxruntime")
    assert (resolved.scheme, resolved.method, resolved.activations) == \
        (QuantScheme(8, None, True), "rtn", "none")
    resolved = quantize.resolve(quantize.Config(bits=4), "cpu")
    assert (resolved.scheme, resolved.method, resolved.activations) == \
        (QuantScheme(4, 128, False), "gptq", "none")
    with pytest.raises(ConfigError, match="int8 activations"):
        quantize.resolve(quantize.Config(bits=4, activations="dynamic_int8"), "cpu")
    with pytest.raises(ConfigError, match="method"):
        quantize.resolve(quantize.Config(method="awq"), "cpu")


def test_int8_activation_sensitivity_is_measured_with_rounded_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    x = torch.randn(64, 32)
    x[0, 0] = 300.0  # one outlier makes the per-tensor int8 grid coarse
    graph = _graph(model, x)
    weight_only = _run(graph, quantize.Config(bits=8, fit_budget=False))
    with_inputs = _run(graph, quantize.Config(bits=8, activations="dynamic_int8", fit_budget=False))
    assert with_inputs.decisions[0].error > 10 * weight_only.decisions[0].error


def test_through_optimize_the_report_lists_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    opt = slimline.optimize(model, (x,), mode="balanced",
                            passes={"quantize": {"bits": 4, "allow_slower": True}},
                            calibration=[(torch.randn(4, 32),)])
    record = next(p for p in opt.report.passes if p.name == "quantize")
    assert record.status == "applied", record.reason
    layers = [layer for layer in opt.report.layers if layer.pass_name == "quantize"]
    assert len(layers) == 2 and all(layer.decision.startswith("quantized") for layer in layers)
    assert not opt.report.verification["exact"]
    torch.testing.assert_close(opt(x), model(x), rtol=0.1, atol=0.05)


def test_a_task_metric_budget_is_spent_on_its_own_data():
    torch.manual_seed(0)
    model = Fragile().eval()
    x = torch.randn(64, 64)
    graph = _graph(model, x)
    labels = model(x).argmax(-1)

    given = []

    def agreement(runner, inputs):  # fraction of rows whose argmax the float model agrees with
        given.append(runner)
        return float((runner(inputs).argmax(-1) == labels).float().mean())

    budget = slimline.Budget(agreement, 0.1, higher_is_better=True, inputs=x)
    result = _run(graph, quantize.Config(bits=4, method="rtn"), budget=budget)
    # the metric gets the graph's module, whose weights say where its inputs belong (cuda)
    assert given and all(isinstance(runner, nn.Module) for runner in given)
    # all three layers at 4 bits lose more than 10% agreement: the task metric, not the
    # output cosine (0.9 for task-metric budgets), is what keeps a layer dense here
    assert result.stats["cosine_all_quantized"] >= result.stats["target_cosine"]
    assert 1 <= result.stats["kept_for_budget"] <= 2
    assert result.stats["task_loss"] <= 0.1 and result.stats["max_task_loss"] == 0.1
    assert agreement(lambda i: result.graph.run((i,), {}), x) >= 0.9


def test_target_cpu_is_refused_unless_slower_is_allowed():
    graph = _graph(nn.Sequential(nn.Linear(32, 32)), torch.randn(2, 32))
    context = PassContext("cpu", "balanced", calibration=[(graph.example_args, {})], budget_share=1.0)
    result = quantize.run(graph.copy(), quantize.Config(), context)
    assert not result.changed and "allow_slower" in result.decisions[0].why_not
    assert quantize.run(graph.copy(), quantize.Config(activations="dynamic_int8"), context).changed
    context.target = "onnxruntime"
    assert quantize.run(graph.copy(), quantize.Config(), context).changed
