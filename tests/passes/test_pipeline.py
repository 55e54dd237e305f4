"""The pipeline: verification after each pass, rollback with a reason, bisect to pass and layer."""

import dataclasses

import torch

from slimline.budget import Budget
from slimline.ir.capture import capture
from slimline.ir.graph import Graph, stamp
from slimline.passes import canonicalize_linear
from slimline.passes.base import PassContext, PassResult, PassSpec, pass_spec
from slimline.passes.bisect import bisect_failure
from slimline.passes.pipeline import PipelineStep, run_pipeline, select_passes
from slimline.report import Report
from slimline.verify import compare_outputs
from tests.small_models import MatmulMLP

aten = torch.ops.aten


@dataclasses.dataclass
class _NoConfig:
    pass


def _corrupting_pass(name: str, layer: str, exact: bool = True) -> PassSpec:
    """A pass that scales the output of the linear in ``layer`` by 1.5 (a deliberate bug)."""

    def run(graph: Graph, config, context) -> PassResult:
        for node in list(graph.fx.nodes):
            if node.target == aten.linear.default and node.meta.get("nn_module_stack") \
                    and list(node.meta["nn_module_stack"].values())[-1][0] == layer:
                with graph.fx.inserting_after(node):
                    scaled = graph.fx.call_function(aten.mul.Tensor, (node, 1.5))
                node.replace_all_uses_with(scaled)
                scaled.args = (node, 1.5)
                stamp(scaled, name, node)
        graph.recompile()
        return PassResult(graph, True, {"corrupted": 1})

    return PassSpec(name, exact, frozenset({"cpu"}), _NoConfig, run, "corrupts")


def _setup():
    model = MatmulMLP().eval()
    x = torch.randn(2, 3, 8)
    graph = capture(model, (x,))
    reference = model(x)

    def check(candidate, exact, share=1.0):
        return compare_outputs(reference, candidate.run(), exact=exact,
                               min_cosine=Budget("cosine", 0.01).min_cosine(share))

    return graph, check


def test_a_pass_that_breaks_exactness_is_rolled_back_with_its_reason():
    graph, check = _setup()
    steps = [PipelineStep(pass_spec(canonicalize_linear), canonicalize_linear.Config()),
             PipelineStep(_corrupting_pass("buggy", "fc"), _NoConfig())]
    report = Report("MatmulMLP", "cpu", "lossless")
    final, history, _ = run_pipeline(graph, steps, PassContext("cpu", "lossless"), check, report)
    statuses = {p.name: (p.status, p.reason) for p in report.passes}
    assert statuses["canonicalize_linear"][0] == "applied"
    assert statuses["buggy"][0] == "rolled back"
    assert "NOT equivalent" in statuses["buggy"][1]
    assert [name for name, _ in history.applied] == ["canonicalize_linear"]
    assert check(final, True).passed


def test_a_pass_that_raises_is_rolled_back():
    graph, check = _setup()

    def explode(graph, config, context):
        raise RuntimeError("boom")

    steps = [PipelineStep(PassSpec("explodes", True, frozenset({"cpu"}), _NoConfig, explode, ""), _NoConfig())]
    report = Report("MatmulMLP", "cpu", "lossless")
    run_pipeline(graph, steps, PassContext("cpu", "lossless"), check, report)
    assert report.passes[0].status == "rolled back" and "boom" in report.passes[0].reason


def test_pass_not_serving_the_target_is_skipped():
    graph, check = _setup()
    spec = dataclasses.replace(_corrupting_pass("gpu_only", "fc"), targets=frozenset({"cuda"}))
    report = Report("MatmulMLP", "cpu", "lossless")
    run_pipeline(graph, [PipelineStep(spec, _NoConfig())], PassContext("cpu", "lossless"), check, report)
    assert report.passes[0].status == "skipped"
    assert "does not serve target 'cpu'" in report.passes[0].reason


def test_bisect_names_the_first_failing_pass_and_layer():
    graph, check = _setup()
    # approximate passes within a loose budget: each applies, the final exact check fails
    steps = [PipelineStep(pass_spec(canonicalize_linear), canonicalize_linear.Config()),
             PipelineStep(_corrupting_pass("approx_a", "fc", exact=False), _NoConfig()),
             PipelineStep(_corrupting_pass("approx_b", "fc", exact=False), _NoConfig())]

    reference = graph.run()

    def loose(candidate, exact, share=1.0):
        if exact:
            return check(candidate, exact, share)
        return compare_outputs(reference, candidate.run(), exact=False, min_cosine=-1.0)

    report = Report("MatmulMLP", "cpu", "balanced")
    _final, history, _ = run_pipeline(graph, steps, PassContext("cpu", "balanced"), loose, report)
    assert [name for name, _ in history.applied] == ["canonicalize_linear", "approx_a", "approx_b"]
    found = bisect_failure(history, lambda g: not check(g, True).passed)
    assert found["pass"] == "approx_a"
    assert found["layer"] == "fc"


def test_lossless_selects_exact_passes_only_and_cleanups_always():
    names = [s.spec.name for s in select_passes("lossless", None, "cpu")]
    assert "canonicalize_linear" in names and "dead_code" in names
    assert all(s.spec.exact for s in select_passes("lossless", None, "cpu"))
    narrowed = [s.spec.name for s in select_passes("max", [], "cpu")]
    assert set(narrowed) == {"canonicalize_linear", "dead_code"}
