"""canonicalize_linear: Before (linear, matmul+add, addmm) → Expected (three aten.linear)."""

import torch

from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.passes import canonicalize_linear
from slimline.passes.base import PassContext
from tests.small_models import MatmulMLP

aten = torch.ops.aten


def _targets(graph):
    return [n.target for n in graph.fx.nodes if n.op == "call_function"]


def test_three_forms_become_linear_and_stay_exact():
    model = MatmulMLP().eval()
    x = torch.randn(2, 3, 8)
    graph = capture(model, (x,))
    before = _targets(graph)
    assert aten.addmm.default in before and aten.matmul.default in before or aten.mm.default in before

    result = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(), PassContext("cpu", "lossless"))

    after = _targets(result.graph)
    assert after.count(aten.linear.default) == 3
    assert aten.addmm.default not in after and aten.matmul.default not in after and aten.mm.default not in after
    assert result.stats["addmm"] == 1 and result.stats["bias_add_folded"] == 1
    linears = [n for n in result.graph.fx.nodes if n.target == aten.linear.default]
    assert all(len(n.args) == 3 for n in linears), "every bias folded into its linear"
    created = [n for n in linears if n.meta.get(PROVENANCE_PASS) == "canonicalize_linear"]
    assert len(created) == 2 and all(module_path(n) == "" for n in created)
    torch.testing.assert_close(result.graph.run(), model(x), rtol=1e-5, atol=1e-6)


def test_input_graph_untouched_by_copy():
    graph = capture(MatmulMLP().eval(), (torch.randn(1, 2, 8),))
    before = _targets(graph)
    canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(), PassContext("cpu", "lossless"))
    assert _targets(graph) == before


def test_vector_matmul_is_not_a_linear():
    class VectorTimesMatrix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3))

        def forward(self, v):
            return torch.matmul(v, self.w)

    graph = capture(VectorTimesMatrix(), (torch.randn(4),))
    result = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(), PassContext("cpu", "lossless"))
    assert aten.linear.default not in _targets(result.graph)
    assert not result.changed
