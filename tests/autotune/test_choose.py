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


class _Halved:
    """Budget data that halves itself: each half is the same rows, tagged with its name."""

    def __init__(self, x: torch.Tensor, name: str = "whole"):
        self.x, self.name = x, name

    def halves(self):
        return _Halved(self.x, "first"), _Halved(self.x, "second")


def test_options_are_priced_on_one_half_of_the_data_and_the_mix_checked_on_the_other():
    _model, x, graph, context = _graph_and_context()
    reference = graph.run((x,), {})
    seen: list[str] = []

    def drift(module, inputs):  # relative output error: lower is better
        seen.append(inputs.name)
        return float((module(inputs.x) - reference).norm() / reference.norm())

    specs = {s.name: s for s in (pass_spec(lowrank), pass_spec(monarch))}
    budget = Budget(drift, 0.05, higher_is_better=False, inputs=_Halved(x))
    result = choose(graph, specs, context, budget, timing="modelled",
                    options=[Option("lowrank", "low-rank 50%", (("param_reduction", 0.5),))])
    assert result.changed, "the near-low-rank tower must take some option"
    # the original once per half, each option on the first half, the chosen set on the second
    priced = sum(1 for layer in result.layers for c in layer.candidates if c.usable)
    assert seen.count("first") == 1 + priced and "whole" not in seen
    assert seen.count("second") >= 2
    assert result.measured_loss <= budget.max_loss


def test_text_halves_are_disjoint_and_keep_the_reference_rows():
    from slimline.models.quality import TextEvalSet

    text = bytes(range(256)) * 8
    whole = TextEvalSet.from_bytes(text, 64, 4, None, "bytes")
    top1 = torch.arange(whole.windows.shape[0] * 64).view(-1, 64)
    whole = TextEvalSet(whole.windows, 4, top1, "bytes")
    first, second = whole.halves()
    assert torch.equal(torch.cat([first.windows, second.windows]), whole.windows)
    assert torch.equal(torch.cat([first.reference_top1, second.reference_top1]), top1)
    assert first.windows.shape[0] == whole.windows.shape[0] // 2 and "first half" in first.description
    assert TextEvalSet.from_bytes(text[:65], 64).halves() is None
