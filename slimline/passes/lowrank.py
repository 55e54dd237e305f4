"""Low-rank factorisation (PELA): one dense layer ``W`` becomes two thinner ones, ``W ≈ B·A``.

Approximate. Runs after ``canonicalize_linear`` (it reads only ``aten.linear(x, W, b)`` with a
constant 2-D ``W``) and ``fuse_attention``, before ``dead_code`` (which drops what it orphans).
It follows PELA (Guo, Wang, Kankanhalli, CVPR 2024: low-rank approximation of a pretrained model,
then an intermediate distillation stage that trains only the low-rank factors against the frozen
original's features, with a weight-perturbation regulariser), and activation-aware SVD for the
data-aware variant (whitening by the layer's input covariance, as SVD-LLM and ASVD do).

Shape letters: M rows (every leading dimension of ``x``), K in features, N out features, R rank.

The rule, as pattern + check + replacement::

    pattern   y_MN = linear(x_MK, W_NK, b_N)         W a constant, floating, 2-D
    check     W is read by this linear only          tied weights (a GPT head) would stay dense
              R·(K+N) < K·N                          below the break-even rank K·N/(K+N)
              module path not excluded, W not tiny
    replace   h_MR = linear(x_MK, A_RK)              # A = Σ_R^½ · Gᵀ_R · S⁻¹
              y_MN = linear(h_MR, B_NR, b_N)         # B = U_R · Σ_R^½

Both halves are plain ``aten.linear``: Inductor sees standard ops, and the ONNX exporter writes two
MatMuls. The first node's meta carries ``slimline_lowrank = "A"``, the second ``"B"``.

**Factorisation** (``method``). ``svd``: ``W = U·Σ·Gᵀ`` and ``S = I`` (needs no data).
``whitened``: ``C = E[xᵀx]`` is the layer's input covariance over the calibration samples, damped
by ``damping``·mean eigenvalue, and ``S = Q·Λ^½`` from its eigendecomposition (``S·Sᵀ = C``); the
SVD is of ``W·S`` and the right factor is un-whitened by ``S⁻¹``. Truncating ``W·S`` minimises the
layer's output error ``‖(W − B·A)·xᵀ‖`` on the data instead of ``‖W − B·A‖``. For either method and
any covariance ``C'`` the error of every rank follows from one SVD (``U`` is orthonormal)::

    ‖(W − B_R·A_R)·xᵀ‖² / ‖W·xᵀ‖²  =  Σ_{i≥R} σ_i² · g_iᵀ·C'·g_i  /  tr(W·C'·Wᵀ)      g_i = row i of Gᵀ·S⁻¹

``best`` fits both on half the calibration samples (alternate samples; alternate rows when there
is one), measures both on the other half, and per layer keeps the one with the smaller held-out
error at the rank chosen, refitted on all the data; the report says which won and by how much.

**Rank** (``rank``). ``param_reduction``: remove that fraction of the Linear parameters (0.5, the
middle of the 1/3–2/3 range PELA reports). ``allocation="uniform"`` gives every layer the same
ratio; ``"sensitivity"`` spends the reduction least-sensitive-first: each layer is probed once
(truncated alone at the uniform rank, the model's output cosine measured on the calibration
samples) to turn its reconstruction error into an estimated model loss, and a greedy walks down
the lower hull of every layer's loss-per-parameter-saved curve. ``energy``: the smallest rank
keeping that fraction of the layer's output energy on the calibration data (spectral energy
without data). ``budget``: the same greedy order, cut by bisection at the longest prefix whose
*measured* loss stays inside ``context.budget_share`` of the Budget (with ``budget_margin`` to
spare), at most ``param_reduction``. The measurement is cheap: a copy of the graph whose dense
weights are overwritten by their rank-R reconstructions (same shapes, full speed) is run on the
calibration samples and compared with ``context.reference_outputs`` in the pipeline's own terms
(output cosine), plus the task metric when the Budget names one and its inputs run on the graph.
The Budget is read from ``context.extra["budget"]``, else the mode's preset. ``ranks`` fixes
ranks per module-path pattern. Ranks are multiples of ``rank_multiple`` (kernel-friendly).

**Recovery** (``recover`` steps, 0 = off): PELA's intermediate stage. Only the factors train (Adam),
everything else is frozen; the loss is the feature MSE of every factorised layer's output against
the original model's output of that layer, each normalised by the feature's mean square, plus
``recover_perturbation`` × the weight-perturbation term that keeps the recovered matrix near the
original, measured where the inputs lie: ``tr(Δ·C·Δᵀ) / tr(W·C·Wᵀ)``, ``Δ = B·A − W`` (PELA's
plain ``‖Δ‖²`` would pull whitened factors back towards plain SVD). Samples are the calibration samples, cycled. Adam's step is
``recover_lr`` × each factor's RMS × the initial relative feature error (a factorisation that is
already close moves little), cosine-decayed to zero. When the feature loss on all samples ends
higher than it started, the factors are restored (``recover_reverted``). ``recover_loss="output"``
trains the factors on the model's *outputs* instead (relative squared error of every floating output
against the original's on the same calibration sample: for MiniLM's unit embeddings, 2·(1 − cosine));
``"both"`` sums the two terms. Per-layer feature MSE lets errors each layer tolerates add up through
the depth: on MiniLM at 30% fewer Linear parameters it was undone at the step sizes tried, while
600 steps of the output loss lifted the held-out embedding cosine from 0.936 to 0.966
(benchmarks/lowrank_quality.py). The output losses want a smaller ``recover_lr`` (MiniLM: 0.005;
0.015 was worse, 0.05 diverged). Calibration padding counts as data: a padded batch puts the
padding tokens' activations into the covariances and the losses although the model masks them out
(give the pass batches padded to their longest sequence).

Stats count layers (``factorised``, ``kept_*`` by reason), parameters of the sites seen
(``linear_params_before/after``), model evaluations, and recovery losses. Each site gets a
:class:`LowRankDecision` (a LayerDecision with rank, method and per-method held-out errors);
``error`` is the relative output error ``‖(W − B·A)·xᵀ‖ / ‖W·xᵀ‖`` on the calibration data.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from slimline.ir.graph import Graph, module_path, stamp
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable
from slimline.passes.recovery import recover_features
from slimline.passes.taps import (calibration_samples, flops_text, run_tapped, site_bias,
                                  site_params, weight_readers)

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run", "LowRankDecision", "Spectrum",
           "spectrum", "break_even_rank"]

NAME = "lowrank"
EXACT = False
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten

FACTOR_META = "slimline_lowrank"   # "A" on x·Aᵀ, "B" on h·Bᵀ + b
FACTORISED = "factorised"
KEPT = "kept"
RANK_MODES = ("param_reduction", "energy", "budget")
METHODS = ("svd", "whitened", "best")
ALLOCATIONS = ("uniform", "sensitivity")
RECOVER_LOSSES = ("features", "output", "both")
_PROBE_SAMPLES = 2           # samples used to probe each layer's sensitivity
_TINY = 1e-12
_EXTRAPOLATION = 4.0         # sensitivity allocation: error at most this × the probed error
_FEATURE_CACHE_BYTES = 512 * 2**20  # the original model's features kept for recovery, at most


@dataclass
class Config:
    rank: str = tunable("budget", RANK_MODES,
                        "how ranks are chosen: a parameter-reduction target, spectral energy "
                        "kept, or the largest reduction the accuracy budget allows")
    param_reduction: float = tunable(0.5, (0.25, 0.33, 0.4, 0.5, 0.67),
                                     "fraction of Linear parameters to remove (a cap in 'budget')")
    energy: float = tunable(0.95, (0.9, 0.95, 0.98, 0.99), "output energy kept per layer ('energy')")
    method: str = tunable("best", METHODS, "plain SVD, whitened (data-aware) SVD, or the better "
                                           "of the two per layer on held-out calibration data")
    allocation: str = tunable("sensitivity", ALLOCATIONS,
                              "'param_reduction': same ratio everywhere, or least-sensitive first")
    rank_multiple: int = tunable(8, (1, 8, 16, 64), "ranks are multiples of this")
    damping: float = tunable(0.01, (1e-3, 1e-2, 1e-1), "covariance damping, × mean eigenvalue")
    recover: int = tunable(0, (0, 50, 200, 1000), "distillation steps after factorising; 0 = off")
    recover_lr: float = tunable(0.3, (0.1, 0.3, 1.0),
                                "Adam step of the recovery, × each factor's RMS × the initial relative "
                                "feature error (cosine-decayed)")
    recover_loss: str = tunable("features", RECOVER_LOSSES,
                                "what recovery matches: each factorised layer's output (PELA), the "
                                "model's outputs, or both (summed)")
    recover_perturbation: float = tunable(0.1, (0.0, 0.1, 1.0),
                                          "weight of tr(ΔCΔᵀ)/tr(WCWᵀ), Δ = B·A − W, in the recovery loss")
    budget_margin: float = tunable(0.1, (0.0, 0.1, 0.25), "fraction of the budget share kept spare")
    min_params: int = tunable(1024, (0, 1024, 16384), "layers with fewer weights stay dense")
    exclude: tuple = tunable((), None, "module-path patterns (fnmatch) to keep dense")
    ranks: dict = field(default_factory=dict, metadata={
        "choices": None, "doc": "fixed ranks by module-path pattern, e.g. {'blocks.*.mlp.up': 32}"})
    keep_unprofitable: bool = tunable(False, (False, True),
                                      "factorise even at ranks that save nothing (studies, tests)")


@dataclass
class LowRankDecision(LayerDecision):
    """A LayerDecision with the rank, the method used and each method's held-out error."""

    rank: int | None = None
    method: str | None = None
    method_errors: dict = field(default_factory=dict)


def break_even_rank(in_features: int, out_features: int) -> float:
    """The rank at which ``A`` and ``B`` together hold as many weights as ``W``."""
    return in_features * out_features / (in_features + out_features)


# ---------------------------------------------------------------------------------------------
# factorisation: one SVD per layer and method, truncated to any rank by slicing


@dataclass
class Spectrum:
    """``W = left · diag(singular) · right`` (float64); ``right`` rows live in input space."""

    method: str
    left: torch.Tensor       # (N, P)  orthonormal columns
    singular: torch.Tensor   # (P,)    descending
    right: torch.Tensor      # (P, K)  Gᵀ·S⁻¹

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_RK, B_NR)`` with ``B·A`` the rank-``rank`` approximation; Σ split evenly."""
        root = self.singular[:rank].sqrt()
        first = (root[:, None] * self.right[:rank]).to(dtype).contiguous()   # (R, K)
        second = (self.left[:, :rank] * root[None, :]).to(dtype).contiguous()  # (N, R)
        return first, second

    def reconstruction(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        first, second = self.factors(rank, torch.float64)
        return (second @ first).to(dtype)

    def relative_errors(self, weight: torch.Tensor, covariance: torch.Tensor | None) -> torch.Tensor:
        """``e[R] = ‖(W − B_R·A_R)·xᵀ‖² / ‖W·xᵀ‖²`` for R = 0..P under ``covariance`` (None: I)."""
        if covariance is None:
            spread = self.right.pow(2).sum(1)                       # g_iᵀ·g_i
            total = weight.pow(2).sum()
        else:
            spread = ((self.right @ covariance) * self.right).sum(1)  # g_iᵀ·C·g_i
            total = ((weight @ covariance) * weight).sum()
        contributions = self.singular.pow(2) * spread
        kept = torch.cat([contributions.new_zeros(1), contributions.cumsum(0)])
        return ((total - kept) / total.clamp(min=_TINY)).clamp(min=0.0)


def spectrum(weight: torch.Tensor, method: str, covariance: torch.Tensor | None = None,
             damping: float = 0.01) -> Spectrum:
    """The SVD of ``weight`` (N, K), plain or whitened by ``covariance`` (K, K), in float64."""
    weight = weight.detach().to(torch.float64)
    if method == "whitened" and covariance is not None:
        eigenvalues, basis = torch.linalg.eigh(covariance.to(torch.float64))  # C = Q·Λ·Qᵀ
        eigenvalues = eigenvalues.clamp(min=0.0)
        floor = damping * float(eigenvalues.mean())
        if floor > _TINY:
            root = (eigenvalues + floor).sqrt()                                  # S = Q·Λ^½
            left, singular, right = torch.linalg.svd(weight @ (basis * root), full_matrices=False)
            return Spectrum("whitened", left, singular, (right / root) @ basis.T)  # Gᵀ·S⁻¹
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    return Spectrum("svd", left, singular, right)


# ---------------------------------------------------------------------------------------------
# the rule: pattern + check


@dataclass
class _Layer:
    """One linear site and everything the pass learns about it."""

    node: fx.Node
    path: str
    weight: torch.Tensor                  # (N, K) as stored
    bias: torch.Tensor | None = None
    why_not: Reason | None = None
    grid: list[int] = field(default_factory=list)                    # candidate ranks, ascending
    spectra: dict[str, Spectrum] = field(default_factory=dict)       # method -> fit on all data
    curves: dict[str, torch.Tensor] = field(default_factory=dict)    # method -> e[R] for choosing
    errors: dict[str, torch.Tensor] = field(default_factory=dict)    # method -> e[R], all data
    covariance: torch.Tensor | None = None                           # (K, K) E[xᵀx], all data
    rank: int | None = None
    fixed_rank: int | None = None
    flops: tuple[str, str] = ("?", "?")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def params(self) -> int:
        return self.weight.numel()

    @property
    def bias_params(self) -> int:
        return 0 if self.bias is None else self.bias.numel()

    def params_at(self, rank: int | None) -> int:
        return self.params if rank is None else rank * (self.in_features + self.out_features)

    def error_at(self, rank: int | None) -> float:
        """Estimated relative output error energy at ``rank`` (the better method's, for 'best')."""
        if rank is None:
            return 0.0
        return min(float(curve[rank]) for curve in self.curves.values())

    def method_at(self, rank: int) -> str:
        return min(self.curves, key=lambda m: float(self.curves[m][rank]))

    def reconstruction(self, rank: int | None) -> torch.Tensor:
        if rank is None:
            return self.weight
        return self.spectra[self.method_at(rank)].reconstruction(rank, self.weight.dtype)


def _refusal(key: str, text: str) -> Reason:
    """A Reason with a short key for the stats counter (``kept_<key>``)."""
    reason = Reason(text)
    reason.key = key
    return reason


def _check(graph: Graph, node: fx.Node, config: Config, readers: dict) -> _Layer | Reason:
    """The layer behind a linear site, or why it stays dense (before any data is looked at)."""
    weight_node = node.args[1]
    weight = graph.attribute(weight_node) if isinstance(weight_node, fx.Node) else None
    if weight is None or weight.dim() != 2:
        return _refusal("not_constant", "weight is not a constant 2-D tensor")
    if not weight.is_floating_point():
        return _refusal("not_float", f"weight dtype {weight.dtype} is not floating point")
    path = module_path(node)
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in config.exclude):
        return _refusal("excluded", "excluded by Config.exclude")
    others = [u for u in readers.get(weight.untyped_storage().data_ptr(), []) if u is not node]
    if others:
        return _refusal("tied", f"tied weight: also read by {module_path(others[0]) or others[0].name} "
                                f"({others[0].target}); factorising would add parameters")
    n, k = weight.shape
    fixed = _fixed_rank(config, path)
    layer = _Layer(node, path, weight, site_bias(graph, node),
                   fixed_rank=None if fixed is None else max(1, min(fixed, n, k)))
    step = max(1, config.rank_multiple)
    limit = min(n, k) if config.keep_unprofitable else math.ceil(break_even_rank(k, n)) - 1
    layer.grid = [r for r in range(step, limit + 1, step) if config.keep_unprofitable or r * (k + n) < k * n]
    if not layer.grid and layer.fixed_rank is None:
        return _refusal("no_saving", f"saves nothing: break-even rank {break_even_rank(k, n):.1f} ≤ "
                                     f"smallest rank {step} (rank_multiple)")
    if weight.numel() < config.min_params:
        return _refusal("small", f"too small: {weight.numel()} weights < min_params {config.min_params}")
    return layer


def _fixed_rank(config: Config, path: str) -> int | None:
    for pattern, rank in config.ranks.items():
        if fnmatch.fnmatchcase(path, pattern):
            return int(rank)
    return None


# ---------------------------------------------------------------------------------------------
# calibration data: run the graph node by node and read each linear's input


def _covariances(graph: Graph, layers: list[_Layer], samples: list) -> dict[str, dict[int, torch.Tensor]]:
    """Input covariances E[xᵀx] per layer: over all samples, and over two halves ('fit', 'check')."""
    sums = {part: {i: torch.zeros(l.in_features, l.in_features, dtype=torch.float64, device=l.weight.device)
                   for i, l in enumerate(layers)} for part in ("fit", "check")}
    rows = {part: dict.fromkeys(range(len(layers)), 0) for part in ("fit", "check")}
    watched = {layer.node: index for index, layer in enumerate(layers)}
    for sample_index, sample in enumerate(samples):
        def sink(index: int, x: torch.Tensor, _y: torch.Tensor) -> None:
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (M, K)
            if len(samples) > 1:
                parts = {("fit", "check")[sample_index % 2]: flat}
            else:
                parts = {"fit": flat[0::2], "check": flat[1::2]}
            for part, chunk in parts.items():
                sums[part][index] += chunk.T @ chunk
                rows[part][index] += chunk.shape[0]

        with torch.no_grad():
            run_tapped(graph.module, sample, watched, sink)
    result: dict[str, dict[int, torch.Tensor]] = {"fit": {}, "check": {}, "all": {}}
    for index in range(len(layers)):
        for part in ("fit", "check"):
            result[part][index] = sums[part][index] / max(1, rows[part][index])
        total = max(1, rows["fit"][index] + rows["check"][index])
        result["all"][index] = (sums["fit"][index] + sums["check"][index]) / total
    return result


# ---------------------------------------------------------------------------------------------
# measuring what ranks cost the model: a copy with reconstructed dense weights


class _Probe:
    """Runs a copy of the graph whose eligible weights are overwritten by rank-R reconstructions.

    ``loss()`` is what the pipeline checks (``1 − min output cosine`` against the reference
    outputs, worst sample) and, when the Budget names a task metric whose inputs run on the graph,
    its relative loss.
    """

    def __init__(self, graph: Graph, layers: list[_Layer], samples: list, references: list,
                 task: Callable[[Any], float] | None):
        self.trial = graph.copy()
        by_name = {node.name: node for node in self.trial.fx.nodes}
        self.layers, self.samples, self.references = layers, samples, references
        self.buffers: list[torch.Tensor] = []
        for layer in layers:
            node = by_name[layer.node.name]
            copy = layer.weight.detach().clone()
            node.args = (node.args[0], self.trial.add_parameter("lowrank_trial", copy, before=node),
                         *node.args[2:])
            self.buffers.append(copy)
        self.trial.recompile()
        self.current: dict[int, int | None] = dict.fromkeys(range(len(layers)))
        self.evaluations = 0
        self.task = task
        self.task_baseline = task(self.trial.module) if task is not None else None

    def set(self, ranks: dict[int, int | None]) -> None:
        for index, rank in ranks.items():
            if self.current.get(index) == rank:
                continue
            with torch.no_grad():
                self.buffers[index].copy_(self.layers[index].reconstruction(rank))
            self.current[index] = rank

    def output_losses(self, samples: int | None = None) -> list[float]:
        """``1 − min cosine`` per sample (the first ``samples`` of them)."""
        from slimline.verify import compare_outputs

        self.evaluations += 1
        losses = []
        chosen = list(zip(self.samples, self.references))[:samples]
        with torch.no_grad():
            for (args, kwargs), reference in chosen:
                result = compare_outputs(reference, self.trial.module(*args, **kwargs), exact=False)
                losses.append(1.0 - result.min_cosine if result.structure_matches else 1.0)
        return losses

    def task_loss(self) -> float:
        """The task metric's relative loss (positive is worse) against the dense graph."""
        self.evaluations += 1
        after = self.task(self.trial.module)
        before = self.task_baseline
        return (after - before) / max(abs(before), _TINY)


@dataclass
class _Goal:
    """What the rewrite may cost: the pipeline's cosine check, and maybe a task-metric loss."""

    min_cosine: float
    max_task_loss: float | None = None
    metric: str = "cosine"

    def met(self, probe: _Probe) -> tuple[bool, float]:
        worst = max(probe.output_losses())
        if 1.0 - worst < self.min_cosine:
            return False, worst
        if self.max_task_loss is not None and probe.task is not None:
            loss = probe.task_loss()
            return loss <= self.max_task_loss, loss
        return True, worst


def _goal_and_task(context: PassContext, config: Config) -> tuple[_Goal, Callable | None, str]:
    """The budget share this pass may spend, from the Budget in context.extra or the mode preset."""
    from slimline.budget import METRICS, MODE_BUDGETS, Budget

    budget = context.extra.get("budget") or MODE_BUDGETS.get(context.mode) or Budget("cosine", 0.01)
    share = context.budget_share if context.budget_share is not None else 1.0
    spare = 1.0 - config.budget_margin
    min_cosine = 1.0 - (1.0 - budget.min_cosine(share)) * spare
    goal = _Goal(min_cosine, metric=budget.metric_name)
    task = None
    note = "output cosine"
    if not budget.is_output_metric and budget.inputs is not None:
        function, higher = (budget.metric, bool(budget.higher_is_better)) if callable(budget.metric) \
            else METRICS[budget.metric]
        sign = -1.0 if higher else 1.0  # task_loss: positive is worse
        task = lambda module: sign * float(function(module, budget.inputs))  # noqa: E731
        goal.max_task_loss = budget.max_loss * share * spare
        note = f"{budget.metric_name} (relative) and output cosine"
    elif budget.metric == "rel_error":
        note = "output cosine (rel_error budgets are checked by the pipeline as cosine ≥ 0.9)"
    return goal, task, note


# ---------------------------------------------------------------------------------------------
# rank selection


def _uniform_rank(layer: _Layer, reduction: float) -> int | None:
    """The grid rank whose weights come nearest to ``(1 − reduction)`` of the layer's."""
    if not layer.grid:
        return None
    wanted = (1.0 - reduction) * layer.params
    return min(layer.grid, key=lambda r: (abs(layer.params_at(r) - wanted), r))


def _greedy_moves(layers: list[_Layer], weights: list[float]) -> list[tuple[int, int]]:
    """Moves ``(layer, rank)`` cheapest first: estimated model loss per parameter saved.

    Each layer steps down the lower hull of its (parameters, weights[l]·error) curve, so a move
    may skip ranks that are poor value; a layer's rank after a prefix of moves is its last move.
    """
    def next_move(index: int, current: int | None) -> tuple[float, int, int] | None:
        layer = layers[index]
        params, error = layer.params_at(current), layer.error_at(current)
        best = None
        for rank in reversed(layer.grid):
            if current is not None and rank >= current:
                continue
            saved = params - layer.params_at(rank)
            if saved <= 0:
                continue
            ratio = weights[index] * (layer.error_at(rank) - error) / saved
            if best is None or ratio < best[0]:
                best = (ratio, index, rank)
        return best

    heap = [move for move in (next_move(i, None) for i in range(len(layers))) if move is not None]
    heapq.heapify(heap)
    moves = []
    while heap:
        _ratio, index, rank = heapq.heappop(heap)
        moves.append((index, rank))
        following = next_move(index, rank)
        if following is not None:
            heapq.heappush(heap, following)
    return moves


def _ranks_after(moves: list[tuple[int, int]], count: int, layers: int) -> dict[int, int | None]:
    ranks: dict[int, int | None] = dict.fromkeys(range(layers))
    for index, rank in moves[:count]:
        ranks[index] = rank
    return ranks


def _saved(layers: list[_Layer], ranks: dict[int, int | None]) -> int:
    return sum(layer.params - layer.params_at(ranks[i]) for i, layer in enumerate(layers))


def _sensitivities(layers: list[_Layer], probe: _Probe, reduction: float) -> list[float]:
    """Model loss per unit of layer error, each layer truncated alone at its uniform rank.

    The estimate ``weight · e(R)`` is linear in the layer's error, so it is trusted only near the
    probe: ranks whose error exceeds ``_EXTRAPOLATION`` × the probed error leave the layer's grid
    (gpt-small lost its first block's Q/K/V to ranks 3–5 without this bound).
    """
    weights = []
    for index, layer in enumerate(layers):
        rank = _uniform_rank(layer, reduction)
        limit = _EXTRAPOLATION * layer.error_at(rank)
        layer.grid = [r for r in layer.grid if r >= rank or layer.error_at(r) <= limit] or layer.grid
        probe.set({i: (rank if i == index else None) for i in range(len(layers))})
        loss = sum(probe.output_losses(_PROBE_SAMPLES)) / min(len(probe.samples), _PROBE_SAMPLES)
        weights.append(max(loss, _TINY) / max(layer.error_at(rank), _TINY))
    probe.set(dict.fromkeys(range(len(layers))))
    return weights


def _longest_prefix(moves: list, count: int, probe: _Probe, goal: _Goal, fixed: dict[int, int],
                    layers: int) -> tuple[int, float]:
    """The longest prefix of ``moves[:count]`` inside the goal, by bisection (loss ~ monotone)."""
    def inside(k: int) -> tuple[bool, float]:
        probe.set({**_ranks_after(moves, k, layers), **fixed})
        return goal.met(probe)

    ok, loss = inside(count)
    if ok:
        return count, loss
    low, high, low_loss = 0, count, 0.0
    while high - low > 1:
        middle = (low + high) // 2
        ok, loss = inside(middle)
        if ok:
            low, low_loss = middle, loss
        else:
            high = middle
    return low, low_loss


# ---------------------------------------------------------------------------------------------
# the rule: replacement


class _Emitter:
    """Inserts stamped nodes before a site, with FakeTensor metadata (best effort)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                           if isinstance(n.meta.get("val"), torch.Tensor)])

    def linear(self, site: fx.Node, *args: Any) -> fx.Node:
        with self.graph.fx.inserting_before(site):
            node = self.graph.fx.call_function(aten.linear.default, tuple(args))
        node.meta["val"] = self._fake(args)
        return stamp(node, NAME, site)

    def _fake(self, args: tuple) -> Any:
        if self.fake_mode is None:
            return None

        def value(argument: Any) -> Any:
            if not isinstance(argument, fx.Node):
                return argument
            found = argument.meta.get("val")
            if found is None and argument.op == "get_attr":
                found = self.graph.attribute(argument)
            if isinstance(found, torch.Tensor) and not isinstance(found, torch._subclasses.FakeTensor):
                found = self.fake_mode.from_tensor(found)
            return found

        try:
            with self.fake_mode:
                return aten.linear.default(*(value(a) for a in args))
        except Exception:  # metadata is best effort; the graph itself stays correct
            return None


def _replace(graph: Graph, emit: _Emitter, layer: _Layer, first: torch.Tensor, second: torch.Tensor
             ) -> tuple[fx.Node, fx.Node, torch.Tensor, torch.Tensor]:
    """Rewrite the site; returns the two new linears and the factor tensors the graph reads."""
    site = layer.node
    x, bias = site.args[0], (site.args[2] if len(site.args) > 2 else None)
    first_node = stamp(graph.add_parameter(f"{layer.path}.lowrank_A", first, before=site), NAME, site)
    second_node = stamp(graph.add_parameter(f"{layer.path}.lowrank_B", second, before=site), NAME, site)
    hidden = emit.linear(site, x, first_node)                       # h_MR = x_MK · A_RKᵀ
    output = emit.linear(site, hidden, second_node, *(() if bias is None else (bias,)))  # h·B_NRᵀ + b
    hidden.meta[FACTOR_META], output.meta[FACTOR_META] = "A", "B"
    site.replace_all_uses_with(output)
    graph.fx.erase_node(site)
    return hidden, output, graph.attribute(first_node), graph.attribute(second_node)


# ---------------------------------------------------------------------------------------------
# recovery: PELA's intermediate stage


def _recover(student: Graph, teacher: Graph, done: list[tuple[_Layer, fx.Node, torch.Tensor, torch.Tensor]],
             samples: list, references: list, config: Config) -> dict[str, float]:
    """Train only the factors to match the original's per-layer outputs; returns loss stats."""
    originals = [layer.weight.detach().to(torch.float32) for layer, _o, _a, _b in done]
    # ‖B·A − W‖ is measured where the inputs lie, tr(Δ·C·Δᵀ) / tr(W·C·Wᵀ) with C the layer's input
    # covariance: plain Frobenius would pull whitened factors back towards plain SVD
    metrics = [layer.covariance.to(torch.float32) if layer.covariance is not None
               else torch.eye(layer.in_features, device=layer.weight.device) for layer, _o, _a, _b in done]
    norms = [float(((w @ c) * w).sum()) for w, c in zip(originals, metrics)]

    def drift() -> torch.Tensor:
        terms = []
        for (_layer, _o, a, b), w, c, n in zip(done, originals, metrics, norms):
            delta = b.float() @ a.float() - w  # (N, K)
            terms.append(((delta @ c) * delta).sum() / max(n, _TINY))
        return torch.stack(terms).mean()

    # Adam moves every element by about lr per step: scale it to each factor's own size and to
    # how far the factors are from their optimum (the relative feature error), then decay it
    return recover_features(
        student, teacher, [(output, layer.node.name) for layer, output, _a, _b in done],
        [t for _l, _o, a, b in done for t in (a, b)], samples, config.recover,
        lambda before: config.recover_lr * math.sqrt(before), decay=True, regulariser=drift,
        regulariser_weight=config.recover_perturbation, cache_bytes=_FEATURE_CACHE_BYTES,
        output_weight=1.0 if config.recover_loss in ("output", "both") else 0.0, references=references,
        feature_weight=1.0 if config.recover_loss in ("features", "both") else 0.0)


# ---------------------------------------------------------------------------------------------
# the entry point


def _validate(config: Config) -> None:
    from slimline.errors import ConfigError

    for name, value, allowed in (("rank", config.rank, RANK_MODES), ("method", config.method, METHODS),
                                 ("allocation", config.allocation, ALLOCATIONS),
                                 ("recover_loss", config.recover_loss, RECOVER_LOSSES)):
        if value not in allowed:
            raise ConfigError(f"unknown lowrank {name} {value!r}", stage="passes",
                              where=f"passes['lowrank'].{name}", hint=f"use one of: {', '.join(allowed)}")
    if not 0.0 <= config.param_reduction < 1.0:
        raise ConfigError(f"param_reduction must be in [0, 1), got {config.param_reduction!r}",
                          stage="passes", where="passes['lowrank'].param_reduction",
                          hint="0.5 removes half of the Linear parameters")


def _fit(graph: Graph, layers: list[_Layer], samples: list, config: Config) -> None:
    """Per layer: the spectra to factor with, error curves to choose ranks by, errors to report."""
    covariances = _covariances(graph, layers, samples)
    for index, layer in enumerate(layers):
        weight = layer.weight.detach().to(torch.float64)
        every, fit, check = (covariances[p][index] for p in ("all", "fit", "check"))
        layer.covariance = every
        if config.method == "best":
            plain, whitened_half = spectrum(weight, "svd"), spectrum(weight, "whitened", fit, config.damping)
            layer.spectra = {"svd": plain, "whitened": spectrum(weight, "whitened", every, config.damping)}
            layer.curves = {"svd": plain.relative_errors(weight, check),
                            "whitened": whitened_half.relative_errors(weight, check)}
        else:
            chosen = spectrum(weight, config.method, every, config.damping)
            layer.spectra = {chosen.method: chosen}
            layer.curves = {chosen.method: chosen.relative_errors(weight, every)}
        layer.errors = {m: s.relative_errors(weight, every) for m, s in layer.spectra.items()}


def _choose_ranks(graph: Graph, layers: list[_Layer], samples: list, references: list,
                  config: Config, context: PassContext, all_params: int, stats: dict) -> None:
    """Set ``layer.rank`` (None: dense, with ``why_not``) by the configured rank mode."""
    free = [i for i, layer in enumerate(layers) if layer.fixed_rank is None]
    for layer in layers:
        layer.rank = layer.fixed_rank
    free_params = sum(layers[i].params for i in free)
    target = config.param_reduction * all_params               # weights to remove, all sites
    uniform = min(0.99, target / max(1, free_params))           # the same ratio on every free layer

    if config.rank == "energy":
        for i in free:
            layer = layers[i]
            fitting = [r for r in layer.grid if layer.error_at(r) <= 1.0 - config.energy]
            if fitting:
                layer.rank = fitting[0]
            else:
                layer.why_not = Reason(f"kept dense: energy {config.energy} needs a rank ≥ break-even "
                                       f"{break_even_rank(layer.in_features, layer.out_features):.1f}")
        return
    if config.param_reduction <= 0.0:
        for i in free:
            layers[i].why_not = Reason("kept dense: param_reduction is 0")
        return
    if config.rank == "param_reduction" and config.allocation == "uniform":
        for i in free:
            layers[i].rank = _uniform_rank(layers[i], uniform)
        return

    goal, task, judged_by = _goal_and_task(context, config)
    probe = _Probe(graph, layers, samples, references, task if config.rank == "budget" else None)
    fixed = {i: layer.fixed_rank for i, layer in enumerate(layers) if layer.fixed_rank is not None}
    free_layers = [layers[i] for i in free]
    if config.allocation == "sensitivity":
        weights = _sensitivities(free_layers, _SubProbe(probe, free, fixed), uniform)
    else:
        weights = [1.0] * len(free)
    moves = [(free[i], rank) for i, rank in _greedy_moves(free_layers, weights)]
    cap = len(moves)
    for count in range(len(moves) + 1):
        ranks = {**_ranks_after(moves, count, len(layers)), **fixed}
        if _saved(layers, ranks) >= target:
            cap = count
            break
    if config.rank == "budget":
        count, loss = _longest_prefix(moves, cap, probe, goal, fixed, len(layers))
        stats["budget_loss"] = round(loss, 8)
        stats["budget_limit"] = round(goal.max_task_loss if goal.max_task_loss is not None
                                      else 1.0 - goal.min_cosine, 8)
        stats["budget_moves"] = count
        stats["budget_moves_possible"] = cap
        reason = Reason(f"kept dense: the budget share ({judged_by}) is spent on less sensitive layers")
    else:
        count, reason = cap, Reason("kept dense: the reduction target is met by less sensitive layers")
    final = {**_ranks_after(moves, count, len(layers)), **fixed}
    for i in free:
        layers[i].rank = final[i]
        if final[i] is None:
            layers[i].why_not = reason
    stats["evaluations"] = probe.evaluations


class _SubProbe:
    """A view of a probe on some layers only, others held at fixed ranks (or dense)."""

    def __init__(self, probe: _Probe, indices: list[int], fixed: dict[int, int]):
        self.probe, self.indices, self.fixed = probe, indices, fixed
        self.samples = probe.samples

    def set(self, ranks: dict[int, int | None]) -> None:
        self.probe.set({**{self.indices[i]: r for i, r in ranks.items()}, **self.fixed})

    def output_losses(self, samples: int | None = None) -> list[float]:
        return self.probe.output_losses(samples)


def _decision(layer: _Layer) -> LowRankDecision:
    before = layer.params + layer.bias_params
    rank = layer.rank
    method_errors = {m: round(math.sqrt(float(c[rank])), 6) for m, c in layer.curves.items()} \
        if rank is not None and rank < len(next(iter(layer.curves.values()))) else {}
    if rank is None:
        return LowRankDecision(layer.path, "linear", KEPT, NAME, before, before, layer.flops[0],
                               layer.flops[0], None, str(layer.why_not or "kept dense"))
    method = layer.method_at(rank)
    error = math.sqrt(float(layer.errors[method][rank]))
    return LowRankDecision(layer.path, "linear", f"{FACTORISED} r={rank} {method}", NAME, before,
                           layer.params_at(rank) + layer.bias_params, layer.flops[0], layer.flops[1],
                           error, None, rank, method, method_errors)


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    _validate(config)
    stats: dict[str, float] = {"linear_sites": 0, "factorised": 0, "evaluations": 0}
    readers = weight_readers(graph)
    layers: list[_Layer] = []
    kept: list[tuple[fx.Node, Reason]] = []
    for node in list(graph.fx.nodes):
        if node.op == "call_function" and node.target == aten.linear.default:
            stats["linear_sites"] += 1
            found = _check(graph, node, config, readers)
            if isinstance(found, _Layer):
                found.flops = (flops_text([node], graph),) * 2
                layers.append(found)
            else:
                kept.append((node, found))
    all_params = sum(site_params(graph, n) for n, _reason in kept)
    all_params += sum(layer.params + layer.bias_params for layer in layers)

    samples, references = calibration_samples(graph, context)
    if layers:
        _fit(graph, layers, samples, config)
        _choose_ranks(graph, layers, samples, references, config, context, all_params, stats)

    teacher = graph.copy() if config.recover > 0 else None
    emit = _Emitter(graph)
    done = []
    for layer in layers:
        if layer.rank is None:
            continue
        first, second = layer.spectra[layer.method_at(layer.rank)].factors(layer.rank, layer.weight.dtype)
        hidden, output, first, second = _replace(graph, emit, layer, first, second)
        layer.flops = (layer.flops[0], flops_text([hidden, output], graph))
        done.append((layer, output, first, second))
    if done and config.recover > 0:
        graph.recompile()
        stats.update(_recover(graph, teacher, done, samples, references, config))
    graph.fx.eliminate_dead_code()
    graph.recompile()

    decisions: list[LayerDecision] = [_decision(layer) for layer in layers]
    for node, reason in kept:
        params, flops = site_params(graph, node), flops_text([node], graph)
        decisions.append(LowRankDecision(module_path(node), "linear", KEPT, NAME, params, params,
                                         flops, flops, None, str(reason)))
        key = "kept_" + getattr(reason, "key", "other")
        stats[key] = stats.get(key, 0) + 1
    stats["kept_by_selection"] = sum(1 for layer in layers if layer.rank is None)
    stats["factorised"] = len(done)
    removed = sum(layer.params - layer.params_at(layer.rank) for layer in layers)
    stats["linear_params_before"] = all_params
    stats["linear_params_after"] = all_params - removed
    stats["linear_param_reduction"] = round(removed / max(1, all_params), 4)
    return PassResult(graph, bool(done), stats, decisions)
