"""Implementation choice: per-layer options, the budgeted greedy selection, the pipeline hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimline
from slimline.autotune.choose import Candidate, LayerChoice, Option, _select, choose
from slimline.budget import Budget
from slimline.ir.capture import capture
from slimline.passes import canonicalize_linear, lowrank, monarch
from slimline.passes.base import PassContext, pass_spec


class Tower(nn.Module):
    """Three dense layers whose weights are close to low rank (so low-rank options are cheap)."""

    def __init__(self, width: int = 64, rank: int = 6):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                left = torch.randn(width, rank, generator=generator)
                right = torch.randn(rank, width, generator=generator)
                noise = torch.randn(width, width, generator=generator) * (0.002 * (index + 1))
                layer.weight.copy_((left @ right) / width + noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _graph_and_context():
    model = Tower().eval()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    graph = capture(model, (x,))
    context = PassContext("cpu", "balanced", calibration=[((x,), {})])
    graph = canonicalize_linear.run(graph, canonicalize_linear.Config(), context).graph
    context.reference_outputs = [graph.run((x,), {})]
    return model, x, graph, context


def _layer(path: str, dense: float, *options: tuple[str, float, float]) -> LayerChoice:
    choice = LayerChoice(path, dense, 100)
    for label, loss, ms in options:
        choice.candidates.append(Candidate(Option("lowrank", label), loss=loss, ms=ms))
    return choice


def test_select_takes_best_gain_per_loss_inside_the_limit():
    layers = [_layer("a", 10.0, ("cheap", 0.01, 5.0), ("deep", 0.05, 2.0)),
              _layer("b", 10.0, ("costly", 0.04, 9.0)),
              _layer("c", 10.0, ("free", 0.0, 8.0))]
    moves, spent = _select(layers, limit=0.06)
    taken = [(layers[i].path, c.option.label) for i, c in moves]
    # "free" first (no loss), then a's cheap step (500 ms per unit), then a's upgrade to "deep"
    # (3 ms for 0.04: 75/unit) beats b (1 ms for 0.04: 25/unit); b no longer fits
    assert taken == [("c", "free"), ("a", "cheap"), ("a", "deep")]
    assert spent == pytest.approx(0.05)
    assert spent <= 0.06


def test_select_never_takes_a_slower_option_or_one_over_the_limit():
    layers = [_layer("a", 1.0, ("slower", 0.0, 2.0)), _layer("b", 10.0, ("too lossy", 0.5, 1.0))]
    moves, spent = _select(layers, limit=0.1)
    assert moves == [] and spent == 0.0


@pytest.mark.parametrize("timing", ["modelled", "measured"])
def test_choose_stays_inside_the_budget_and_explains_every_layer(timing):
    _model, x, graph, context = _graph_and_context()
    specs = {s.name: s for s in (pass_spec(lowrank), pass_spec(monarch))}
    budget = Budget("cosine", 0.01)
    result = choose(graph, specs, context, budget, timing=timing,
                    options=[Option("lowrank", "low-rank 50%", (("param_reduction", 0.5),)),
                             Option("monarch", "Monarch b=4", (("nblocks", 4),))])
    assert len(result.layers) == 3
    for layer in result.layers:
        assert layer.why
        assert {c.option.technique for c in layer.candidates} == {"lowrank", "monarch"}
        for candidate in layer.candidates:
            if candidate.usable:
                assert candidate.loss >= 0.0 and math.isfinite(candidate.ms)
    # the measured loss of the whole mix, on the calibration data, is inside the budget
    out = result.graph.run((x,), {})
    reference = context.reference_outputs[0]
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert 1.0 - float(cosine) <= budget.max_loss + 1e-9
    assert result.measured_loss <= budget.max_loss
    if result.changed:  # every replaced layer is one the pass rewrote, and the report says how
        summary = result.summary()
        assert summary["replaced"] == sum(summary["by_option"].values()) > 0


def test_balanced_optimize_reports_the_choice_and_tune_off_skips_it():
    model = Tower().eval()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    chosen = slimline.optimize(model, (x,), mode="balanced", tune="cache")
    choice = chosen.report.tuning["implementations"]
    assert choice["timing"] == "modelled" and choice["layers"] == 3
    assert chosen.report.verification["passed"]
    assert "implementation choice" in chosen.report.table()
    plain = slimline.optimize(model, (x,), mode="balanced", tune="off")
    assert "implementations" not in plain.report.tuning
