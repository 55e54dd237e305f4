"""CPU backend: each dense layer's kernel chosen by the autotuner, exact, reported, cached."""

from __future__ import annotations

import torch
from torch import nn

import slimline
from slimline.backends import cpu
from slimline.ir.capture import capture


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_forced_implementations_are_exact_and_leave_the_weights_alone():
    model = Mlp().eval()
    x = torch.randn(3, 16, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = capture(model, (x,), dynamic_shapes={"x": {0: "batch"}})
    sites = cpu.linear_instances(graph)
    assert [instance.problem["M"] for _n, instance in sites] == [48, 48]
    assert [(instance.problem["N"], instance.problem["K"]) for _n, instance in sites] == [(256, 64), (64, 256)]
    for impl in ("matmul_t", "mkldnn"):
        tuned = graph.copy()
        counts = cpu._apply(tuned, {node.name: impl for node, _i in sites})
        assert counts == {impl: 2}
        assert not any(n.target == torch.ops.aten.linear.default for n in tuned.fx.nodes)
        with torch.no_grad():
            expected, found = model(x), tuned.module(x)
        assert torch.allclose(found, expected, rtol=1e-5, atol=1e-6), impl
        other = torch.randn(5, 16, 64)  # another batch size than the example's
        with torch.no_grad():
            assert torch.allclose(tuned.module(other), model(other), rtol=1e-5, atol=1e-6), impl
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_optimize_reports_every_kernel_instance_and_caches_the_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMLINE_CACHE_DIR", str(tmp_path))
    model, x = Mlp().eval(), torch.randn(8, 64)
    first = slimline.optimize(model, (x,), target="cpu", tune="lite")
    rows = first.report.tuning["kernels"]
    assert [row["instance"] for row in rows] == ["up", "down"]
    for row in rows:
        assert row["family"] == "cpu_linear" and row["tried"] >= 2 and row["source"] == "measured"
        assert row["baseline"] == "torch.nn.functional.linear" and row["winner"]
        assert row["winner_ms"] > 0 and row["baseline_ms"] > 0 and not row["cache_hit"]
    assert "kernel instance" in first.report.table()
    assert first.report.verification["passed"]
    second = slimline.optimize(model, (x,), target="cpu", tune="lite")
    assert all(row["cache_hit"] for row in second.report.tuning["kernels"])
    assert [r["winner"] for r in second.report.tuning["kernels"]] == [r["winner"] for r in rows]
    torch.testing.assert_close(second(x), model(x), rtol=1e-5, atol=1e-6)
    off = slimline.optimize(model, (x,), target="cpu", tune="off")
    assert "kernels" not in off.report.tuning
