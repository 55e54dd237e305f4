"""Monarch: a dense layer ``W`` becomes ``P·L·Pᵀ·R``, two block-diagonal matrices and a permutation.

Approximate. Runs after ``canonicalize_linear`` (it reads only ``aten.linear(x, W, b)`` with a
constant 2-D ``W``) and after ``lowrank`` (whose factor layers it leaves alone), before
``dead_code`` (which drops the dense weights it orphans). It follows Dao et al., ICML 2022
("Monarch: Expressive Structured Matrices for Efficient and Accurate Training"): the projection of
a trained weight onto the Monarch class is a rank-T SVD of each of the b² slabs
(:mod:`slimline.monarch.projection`, which says how b, T and padding are chosen).

Shape letters: M rows (every leading dimension of ``x``), K in, N out features, b blocks,
P = K/b, S = N/b, T slab rank, Q = b·T.

The rule, as pattern + check + replacement::

    pattern   y_MN = linear(x_MK, W_NK, b_N)           W a constant, floating, 2-D
    check     W read by this linear only, not already rewritten by another lossy pass,
              module path not excluded (and included, when ``include`` is given), W not tiny,
              b·T·(K + N) < K·N                         the Monarch factors hold fewer weights
              Monarch error ≤ max_error_ratio × SVD error at equal parameters (rank b·T)
              every converted layer together inside the pass's budget share (measured)
    replace   x_bMP = reshape(x, (M, b, P))ᵀ₀₁          # [pad K first when b does not divide it]
              h_bMQ = bmm(x_bMP, R_bPQ)                 # R_k's outputs (l, j)
              h_bMQ = reshape(permute(reshape(h, (b, M, b, T)), (2, 1, 0, 3)), (b, M, Q))
              y_bMS = bmm(h_bMQ, L_bQS)
              y     = reshape(transpose(y, 0, 1), (*, N)) + b_N   # [slice N when padded]

Standard ops only: Inductor sees reshapes, permutes and ``bmm``; the ONNX exporter writes
Reshape/Transpose/MatMul. The ``bmm`` nodes carry ``meta["slimline_monarch"] = "R"`` / ``"L"`` and
the last node ``"out"``, so a backend can find the layer and run the fused Triton kernel
(:mod:`slimline.backends.cuda.monarch_kernel`) in its place.

**The gate** (``gate``), per layer, with errors measured the same way for both sides: the
relative output error ``‖(W − W')·xᵀ‖ / ‖W·xᵀ‖`` on the calibration samples (the layer's input
covariance, damped by ``damping`` × its mean diagonal so that directions the few calibration rows
miss still count), for W' the Monarch projection and for W' the truncated SVD with as many weights.
On trained weights Monarch is often several times worse than SVD at equal parameters; such a
layer stays dense with the reason ("kept dense: Monarch error 0.41 > SVD error 0.22 at equal
params (rank 96)"). Then the budget: the layers that pass are taken in order of increasing
error, and the longest prefix whose *measured* loss stays inside ``context.budget_share`` of the
Budget (``budget_margin`` kept spare) is converted — measured on a copy of the graph whose dense
weights are overwritten by the Monarch matrices, in the pipeline's own terms (output cosine
against ``context.reference_outputs``, plus the task metric when the Budget names one and has
inputs). The Budget is ``context.extra["budget"]``, else the mode's preset.

**Recovery** (``recover`` steps, 0 = off): the factors alone train (Adam) to match each converted
layer's output in the original graph on the calibration samples (feature MSE normalised by the
feature's mean square), the distillation stage the low-rank pass uses (PELA); the factors are
restored when the loss ends higher than it started. This is a local copy of that hook until the
low-rank pass exposes a shared one.

Stats count layers (``converted``, ``kept_*`` by reason), parameters of the sites seen, probe
evaluations and recovery losses. Each site gets a :class:`MonarchDecision`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from slimline.ir.graph import PROVENANCE_PASS, Graph, module_path, stamp
from slimline.monarch.projection import (UNEVEN_POLICIES, MonarchFactors, MonarchShape,
                                         lowrank_equal_params_rank, monarch_shape, project,
                                         relative_errors)
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable
from slimline.passes.recovery import recover_features
from slimline.passes.taps import (calibration_samples, flops_text, run_tapped, site_bias,
                                  site_params, weight_readers)

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run", "MonarchDecision", "FACTOR_META"]

NAME = "monarch"
EXACT = False
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten

FACTOR_META = "slimline_monarch"   # "R" on the first bmm, "L" on the second, "out" on the output
CONVERTED = "converted"
KEPT = "kept"
GATES = ("svd+budget", "svd", "budget", "none")
_TINY = 1e-12
_LOSSY_PASSES = {"lowrank", "quantize", "kv_prune"}   # their layers are theirs: not re-approximated


@dataclass
class Config:
    nblocks: int = tunable(4, (2, 4, 8, 16), "blocks b of each block-diagonal factor")
    slab_rank: int | None = tunable(None, (None, 1, 2, 4, 8, 16),
                                    "rank T of each (l, k) slab; None: from param_fraction, else min(P, S) // b")
    param_fraction: float | None = tunable(None, (None, 0.25, 0.5),
                                           "weights kept, as a fraction of the dense layer's (sets T)")
    uneven: str = tunable("divisor", UNEVEN_POLICIES,
                          "when b does not divide both sizes: the nearest divisor, or zero padding")
    gate: str = tunable("svd+budget", GATES,
                        "which checks a layer must pass: the SVD comparison, the budget, both, none")
    max_error_ratio: float = tunable(1.0, (0.8, 1.0, 1.25, 1.5, 2.0),
                                     "convert only when Monarch error ≤ this × SVD error at equal params")
    budget_margin: float = tunable(0.1, (0.0, 0.1, 0.25), "fraction of the budget share kept spare")
    damping: float = tunable(0.01, (0.0, 0.01, 0.1),
                             "input covariance damping, × its mean diagonal: errors stay defined "
                             "on directions few calibration rows reach")
    min_params: int = tunable(4096, (0, 4096, 65536), "layers with fewer weights stay dense")
    include: tuple = tunable((), None, "module-path patterns (fnmatch) to consider; empty: all")
    exclude: tuple = tunable((), None, "module-path patterns (fnmatch) to keep dense")
    recover: int = tunable(0, (0, 50, 200, 1000), "distillation steps after converting; 0 = off")
    recover_lr: float = tunable(1e-3, (3e-4, 1e-3, 3e-3, 1e-2),
                                "Adam learning rate, relative to each factor's RMS")


@dataclass
class MonarchDecision(LayerDecision):
    """A LayerDecision with the Monarch shape and the errors the gate compared."""

    nblocks: int | None = None
    slab_rank: int | None = None
    how: str | None = None
    svd_rank: int | None = None
    svd_error: float | None = None
    weight_error: float | None = None
    svd_weight_error: float | None = None


# ---------------------------------------------------------------------------------------------
# the rule: pattern + check


@dataclass
class _Layer:
    """One linear site and what the pass learns about it."""

    node: fx.Node
    path: str
    weight: torch.Tensor                     # (N, K) as stored
    shape: MonarchShape
    bias: torch.Tensor | None = None
    factors: MonarchFactors | None = None
    error: float = math.inf                  # Monarch, output error on the calibration data
    svd_error: float = math.inf              # truncated SVD at equal params, same measure
    weight_error: float = math.inf
    svd_weight_error: float = math.inf
    why_not: Reason | None = None
    convert: bool = False
    flops: tuple[str, str] = ("?", "?")

    @property
    def params(self) -> int:
        return self.weight.numel()

    @property
    def bias_params(self) -> int:
        return 0 if self.bias is None else self.bias.numel()


def _check(graph: Graph, node: fx.Node, config: Config, readers: dict) -> _Layer | Reason:
    """The layer behind a linear site, or why it stays dense (before any data is looked at)."""
    weight_node = node.args[1]
    weight = graph.attribute(weight_node) if isinstance(weight_node, fx.Node) else None
    if weight is None or weight.dim() != 2:
        return Reason("weight is not a constant 2-D tensor")
    if not weight.is_floating_point():
        return Reason(f"weight dtype {weight.dtype} is not floating point")
    rewritten_by = node.meta.get(PROVENANCE_PASS)
    if rewritten_by in _LOSSY_PASSES or "slimline_lowrank" in node.meta:
        return Reason(f"already rewritten by {rewritten_by or 'lowrank'}")
    path = module_path(node)
    if config.include and not any(fnmatch.fnmatchcase(path, p) for p in config.include):
        return Reason("not matched by Config.include")
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in config.exclude):
        return Reason("excluded by Config.exclude")
    others = [u for u in readers.get(weight.untyped_storage().data_ptr(), []) if u is not node]
    if others:
        return Reason(f"tied weight: also read by {module_path(others[0]) or others[0].name} "
                      f"({others[0].target}); converting would add parameters")
    if weight.numel() < config.min_params:
        return Reason(f"too small: {weight.numel()} weights < min_params {config.min_params}")
    out_features, in_features = weight.shape
    shape = monarch_shape(in_features, out_features, config.nblocks, config.slab_rank, config.uneven,
                          config.param_fraction)
    if shape.nblocks < 2:
        return Reason(f"no block count ≥ 2 fits in {in_features} and out {out_features}")
    if shape.params >= shape.dense_params:
        return Reason(f"saves nothing: Monarch {shape.how}, T={shape.slab_rank} holds {shape.params} "
                      f"weights ≥ dense {shape.dense_params}")
    return _Layer(node, path, weight, shape, site_bias(graph, node))


# ---------------------------------------------------------------------------------------------
# calibration data: each linear's input covariance


def _covariances(graph: Graph, layers: list[_Layer], samples: list, damping: float) -> list[torch.Tensor]:
    """E[xᵀx] (K×K, float64) of every layer's input over all calibration rows, damped."""
    sums = [torch.zeros(l.shape.in_features, l.shape.in_features, dtype=torch.float64, device=l.weight.device)
            for l in layers]
    rows = [0] * len(layers)
    watched = {layer.node: index for index, layer in enumerate(layers)}

    def sink(index: int, x: torch.Tensor, _y: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (M, K)
        sums[index] += flat.T @ flat
        rows[index] += flat.shape[0]

    with torch.no_grad():
        for sample in samples:
            run_tapped(graph.module, sample, watched, sink)
    covariances = [total / max(1, count) for total, count in zip(sums, rows)]
    for covariance in covariances:
        covariance.diagonal().add_(damping * float(covariance.diagonal().mean()))
    return covariances


def _fit(layers: list[_Layer], covariances: list[torch.Tensor]) -> None:
    """Project every layer; measure Monarch and equal-parameter SVD errors the same way."""
    for layer, covariance in zip(layers, covariances):
        weight = layer.weight.detach().to(torch.float64)
        layer.factors = project(weight, layer.shape, dtype=torch.float64)
        monarch = layer.factors.dense()
        rank = lowrank_equal_params_rank(layer.shape)
        left, singular, right = torch.linalg.svd(weight, full_matrices=False)
        truncated = (left[:, :rank] * singular[:rank]) @ right[:rank]
        layer.error = relative_errors(weight, monarch, covariance)
        layer.svd_error = relative_errors(weight, truncated, covariance)
        layer.weight_error = relative_errors(weight, monarch)
        layer.svd_weight_error = relative_errors(weight, truncated)


# ---------------------------------------------------------------------------------------------
# the budget: measure what converting a set of layers costs the model


class _Probe:
    """A copy of the graph whose candidate weights can be set to their Monarch matrices."""

    def __init__(self, graph: Graph, layers: list[_Layer], samples: list, references: list,
                 task: Callable[[Any], float] | None):
        self.trial = graph.copy()
        by_name = {node.name: node for node in self.trial.fx.nodes}
        self.layers, self.samples, self.references, self.task = layers, samples, references, task
        self.buffers: list[torch.Tensor] = []
        for layer in layers:
            node = by_name[layer.node.name]
            copy = layer.weight.detach().clone()
            node.args = (node.args[0], self.trial.add_parameter("monarch_trial", copy, before=node),
                         *node.args[2:])
            self.buffers.append(copy)
        self.trial.recompile()
        self.current = [False] * len(layers)
        self.evaluations = 0
        self.task_baseline = task(self.trial.module) if task is not None else None

    def set(self, converted: list[bool]) -> None:
        with torch.no_grad():
            for index, wanted in enumerate(converted):
                if wanted != self.current[index]:
                    layer = self.layers[index]
                    value = layer.factors.dense() if wanted else layer.weight
                    self.buffers[index].copy_(value.to(self.buffers[index].dtype))
                    self.current[index] = wanted

    def loss(self) -> tuple[float, float | None]:
        """``1 − min output cosine`` over the samples, and the task metric's relative loss."""
        from slimline.verify import compare_outputs

        self.evaluations += 1
        worst = 0.0
        with torch.no_grad():
            for (args, kwargs), reference in zip(self.samples, self.references):
                result = compare_outputs(reference, self.trial.module(*args, **kwargs), exact=False)
                worst = max(worst, 1.0 - result.min_cosine if result.structure_matches else 1.0)
        task_loss = None
        if self.task is not None:
            after = self.task(self.trial.module)
            task_loss = (after - self.task_baseline) / max(abs(self.task_baseline), _TINY)
        return worst, task_loss


@dataclass
class _Goal:
    min_cosine: float
    max_task_loss: float | None
    described: str

    def met(self, loss: float, task_loss: float | None) -> bool:
        if 1.0 - loss < self.min_cosine:
            return False
        return self.max_task_loss is None or task_loss is None or task_loss <= self.max_task_loss


def _goal(context: PassContext, config: Config) -> tuple[_Goal, Callable | None]:
    """The budget share this pass may spend, from the Budget in context.extra or the mode preset."""
    from slimline.budget import METRICS, MODE_BUDGETS, Budget

    budget = context.extra.get("budget") or MODE_BUDGETS.get(context.mode) or Budget("cosine", 0.01)
    share = context.budget_share if context.budget_share is not None else 1.0
    spare = 1.0 - config.budget_margin
    min_cosine = 1.0 - (1.0 - budget.min_cosine(share)) * spare
    task, max_task_loss = None, None
    described = f"output cosine ≥ {min_cosine:.5f}"
    if not budget.is_output_metric and budget.inputs is not None:
        function, higher = (budget.metric, bool(budget.higher_is_better)) if callable(budget.metric) \
            else METRICS[budget.metric]
        sign = -1.0 if higher else 1.0  # relative loss: positive is worse
        task = lambda module: sign * float(function(module, budget.inputs))  # noqa: E731
        max_task_loss = budget.max_loss * share * spare
        described += f" and {budget.metric_name} loss ≤ {max_task_loss:.4f}"
    return _Goal(min_cosine, max_task_loss, described), task


def _spend_budget(graph: Graph, layers: list[_Layer], samples: list, references: list,
                  context: PassContext, config: Config, stats: dict) -> None:
    """Convert the longest prefix (by increasing error) of the candidates inside the budget share."""
    candidates = sorted((l for l in layers if l.convert), key=lambda l: (l.error, -l.params))
    if not candidates:
        return
    goal, task = _goal(context, config)
    probe = _Probe(graph, candidates, samples, references, task)

    def inside(count: int) -> tuple[bool, float]:
        probe.set([i < count for i in range(len(candidates))])
        loss, task_loss = probe.loss()
        return goal.met(loss, task_loss), loss

    best, best_loss = 0, 0.0
    ok, loss = inside(len(candidates))
    if ok:
        best, best_loss = len(candidates), loss
    else:
        low, high = 0, len(candidates)          # invariant: low fits (0 always does), high does not
        while high - low > 1:
            middle = (low + high) // 2
            ok, loss = inside(middle)
            if ok:
                low, best_loss = middle, loss
            else:
                high = middle
        best = low
    for index, layer in enumerate(candidates):
        if index >= best:
            layer.convert = False
            layer.why_not = Reason(f"kept dense: the budget share ({goal.described}) is spent on "
                                   f"layers with smaller Monarch error")
    stats["budget_loss"] = round(best_loss, 8)
    stats["budget_limit"] = round(1.0 - goal.min_cosine, 8)
    stats["evaluations"] = probe.evaluations


# ---------------------------------------------------------------------------------------------
# the rule: replacement


class _Emitter:
    """Inserts stamped nodes before a site, with FakeTensor metadata (best effort)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                           if isinstance(n.meta.get("val"), torch.Tensor)])

    def __call__(self, site: fx.Node, target: Any, *args: Any) -> fx.Node:
        with self.graph.fx.inserting_before(site):
            node = self.graph.fx.call_function(target, tuple(args))
        node.meta["val"] = self._fake(target, args)
        return stamp(node, NAME, site)

    def size(self, site: fx.Node, x: fx.Node, dim: int) -> int | fx.Node:
        """Dimension ``dim`` of ``x``: an int when static, else a ``sym_size`` node."""
        value = x.meta.get("val")
        size = value.shape[dim] if isinstance(value, torch.Tensor) else None
        if isinstance(size, int):
            return size
        with self.graph.fx.inserting_before(site):
            node = self.graph.fx.call_function(aten.sym_size.int, (x, dim))
        node.meta["val"] = size
        return stamp(node, NAME, site)

    def _fake(self, target: Any, args: tuple) -> Any:
        if self.fake_mode is None:
            return None

        def value(argument: Any) -> Any:
            if isinstance(argument, (list, tuple)):
                return type(argument)(value(a) for a in argument)
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
                return target(*(value(a) for a in args))
        except Exception:  # metadata is best effort; the graph itself stays correct
            return None


def _replace(graph: Graph, emit: _Emitter, layer: _Layer, right_bPQ: torch.Tensor,
             left_bQS: torch.Tensor) -> tuple[fx.Node, list[fx.Node]]:
    """The plain form of :func:`slimline.monarch.monarch_forward`, as graph nodes."""
    site, shape = layer.node, layer.shape
    b, T, P, S = shape.nblocks, shape.slab_rank, shape.block_in, shape.block_out
    x, bias = site.args[0], (site.args[2] if len(site.args) > 2 else site.kwargs.get("bias"))
    x_value = x.meta.get("val") if isinstance(x, fx.Node) else None
    rank = x_value.dim() if isinstance(x_value, torch.Tensor) else 2
    lead = [emit.size(site, x, d) for d in range(rank - 1)]
    right = stamp(graph.add_parameter(f"{layer.path}.monarch_R", right_bPQ, before=site), NAME, site)
    left = stamp(graph.add_parameter(f"{layer.path}.monarch_L", left_bQS, before=site), NAME, site)
    if shape.padded_in != shape.in_features:
        x_MK = emit(site, aten.reshape.default, x, [-1, shape.in_features])
        x_MK = emit(site, aten.constant_pad_nd.default, x_MK, [0, shape.padded_in - shape.in_features], 0.0)
        x_MbP = emit(site, aten.reshape.default, x_MK, [-1, b, P])
    else:
        x_MbP = emit(site, aten.reshape.default, x, [-1, b, P])
    x_bMP = emit(site, aten.transpose.int, x_MbP, 0, 1)
    h_bMQ = emit(site, aten.bmm.default, x_bMP, right)                          # [k, m, (l, j)]
    h_bMbT = emit(site, aten.reshape.default, h_bMQ, [b, -1, b, T])
    h_bMbT = emit(site, aten.permute.default, h_bMbT, [2, 1, 0, 3])
    h_bMQ2 = emit(site, aten.reshape.default, h_bMbT, [b, -1, b * T])            # [l, m, (k, j)]
    y_bMS = emit(site, aten.bmm.default, h_bMQ2, left)
    y_MbS = emit(site, aten.transpose.int, y_bMS, 0, 1)
    y = emit(site, aten.reshape.default, y_MbS, [-1, b * S])
    if shape.padded_out != shape.out_features:
        y = emit(site, aten.slice.Tensor, y, 1, 0, shape.out_features)
    if bias is not None:
        y = emit(site, aten.add.Tensor, y, bias)
    if rank != 2:
        y = emit(site, aten.reshape.default, y, [*lead, shape.out_features])
    h_bMQ.meta[FACTOR_META], y_bMS.meta[FACTOR_META], y.meta[FACTOR_META] = "R", "L", "out"
    site.replace_all_uses_with(y)
    graph.fx.erase_node(site)
    return y, [right, left]


def _new_nodes(graph: Graph, output: fx.Node) -> list[fx.Node]:
    """The call nodes this pass created for one layer (walking back from its output)."""
    found, frontier = [], [output]
    while frontier:
        node = frontier.pop()
        if node.meta.get(PROVENANCE_PASS) != NAME or node in found or node.op != "call_function":
            continue
        found.append(node)
        frontier.extend(node.all_input_nodes)
    return found


# ---------------------------------------------------------------------------------------------
# recovery: train the factors to match each layer's original output


def _recover(student: Graph, teacher: Graph, done: list[tuple[_Layer, fx.Node, list[torch.Tensor]]],
             samples: list, config: Config) -> dict[str, float]:
    """Train only the block-diagonal factors to match the original's per-layer outputs."""
    return recover_features(student, teacher, [(output, layer.node.name) for layer, output, _f in done],
                            [tensor for _l, _o, pair in done for tensor in pair], samples,
                            config.recover, lambda _before: config.recover_lr)


# ---------------------------------------------------------------------------------------------
# the entry point


def _validate(config: Config) -> None:
    from slimline.errors import ConfigError

    if config.gate not in GATES:
        raise ConfigError(f"unknown monarch gate {config.gate!r}", stage="passes",
                          where="passes['monarch'].gate", hint=f"use one of: {', '.join(GATES)}")
    if config.nblocks < 2:
        raise ConfigError(f"monarch needs nblocks ≥ 2, got {config.nblocks!r}", stage="passes",
                          where="passes['monarch'].nblocks", hint="use one of 2, 4, 8, 16")
    if config.uneven not in UNEVEN_POLICIES:
        raise ConfigError(f"unknown monarch uneven policy {config.uneven!r}", stage="passes",
                          where="passes['monarch'].uneven", hint=f"use one of: {', '.join(UNEVEN_POLICIES)}")


def _decision(layer: _Layer) -> MonarchDecision:
    before = layer.params + layer.bias_params
    shape = layer.shape
    common = dict(nblocks=shape.nblocks, slab_rank=shape.slab_rank, how=shape.how,
                  svd_rank=lowrank_equal_params_rank(shape), svd_error=_rounded(layer.svd_error),
                  weight_error=_rounded(layer.weight_error),
                  svd_weight_error=_rounded(layer.svd_weight_error))
    if not layer.convert:
        return MonarchDecision(layer.path, "linear", KEPT, NAME, before, before, layer.flops[0],
                               layer.flops[0], _rounded(layer.error), str(layer.why_not), **common)
    return MonarchDecision(layer.path, "linear", f"{CONVERTED} b={shape.nblocks} T={shape.slab_rank}",
                           NAME, before, shape.params + layer.bias_params, layer.flops[0],
                           layer.flops[1], _rounded(layer.error), None, **common)


_REASON_KEYS = (("tied weight", "kept_tied"), ("too small", "kept_too_small"),
                ("excluded", "kept_excluded"), ("not matched", "kept_not_included"),
                ("already rewritten", "kept_already_rewritten"), ("saves nothing", "kept_saves_nothing"),
                ("no block count", "kept_no_blocks"))


def _reason_key(reason: str) -> str:
    """A counter name for a refusal (``kept_too_small``…)."""
    return next((key for prefix, key in _REASON_KEYS if reason.startswith(prefix)), "kept_not_a_weight")


def _rounded(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 6)


def _apply_gate(layers: list[_Layer], config: Config) -> None:
    for layer in layers:
        layer.convert = True
        if config.gate in ("svd+budget", "svd") and layer.error > config.max_error_ratio * layer.svd_error:
            rank = lowrank_equal_params_rank(layer.shape)
            relation = ">" if config.max_error_ratio == 1.0 else f"> {config.max_error_ratio:g} ×"
            layer.convert = False
            layer.why_not = Reason(f"kept dense: Monarch error {layer.error:.2f} {relation} SVD error "
                                   f"{layer.svd_error:.2f} at equal params (rank {rank})")


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    _validate(config)
    stats: dict[str, float] = {"linear_sites": 0, "converted": 0, "evaluations": 0}
    readers = weight_readers(graph)
    layers: list[_Layer] = []
    refused: list[tuple[fx.Node, Reason]] = []
    for node in list(graph.fx.nodes):
        if node.op == "call_function" and node.target == aten.linear.default:
            stats["linear_sites"] += 1
            found = _check(graph, node, config, readers)
            if isinstance(found, _Layer):
                found.flops = (flops_text([node], graph),) * 2
                layers.append(found)
            else:
                refused.append((node, found))
    all_params = sum(site_params(graph, n) for n, _reason in refused)
    all_params += sum(layer.params + layer.bias_params for layer in layers)

    samples, references = calibration_samples(graph, context)
    if layers:
        _fit(layers, _covariances(graph, layers, samples, config.damping))
        _apply_gate(layers, config)
        if config.gate in ("svd+budget", "budget"):
            _spend_budget(graph, layers, samples, references, context, config, stats)

    teacher = graph.copy() if config.recover > 0 else None
    emit = _Emitter(graph)
    done = []
    for layer in layers:
        if not layer.convert:
            continue
        factors = layer.factors.to(dtype=layer.weight.dtype, device=layer.weight.device)
        output, tensors = _replace(graph, emit, layer, factors.right_bPQ, factors.left_bQS)
        layer.flops = (layer.flops[0], flops_text(_new_nodes(graph, output), graph))
        done.append((layer, output, [graph.attribute(t) for t in tensors]))
    if done and config.recover > 0:
        graph.recompile()
        stats.update(_recover(graph, teacher, done, samples, config))
    graph.fx.eliminate_dead_code()
    graph.recompile()

    decisions: list[LayerDecision] = [_decision(layer) for layer in layers]
    for node, reason in refused:
        params, flops = site_params(graph, node), flops_text([node], graph)
        decisions.append(MonarchDecision(module_path(node), "linear", KEPT, NAME, params, params,
                                         flops, flops, None, str(reason)))
        key = _reason_key(str(reason))
        stats[key] = stats.get(key, 0) + 1
    stats["kept_by_gate"] = sum(1 for l in layers if not l.convert and "SVD error" in str(l.why_not))
    stats["kept_by_budget"] = sum(1 for l in layers if not l.convert and "budget" in str(l.why_not))
    stats["converted"] = len(done)
    removed = sum(layer.params - layer.shape.params for layer in layers if layer.convert)
    stats["linear_params_before"] = all_params
    stats["linear_params_after"] = all_params - removed
    stats["linear_param_reduction"] = round(removed / max(1, all_params), 4)
    return PassResult(graph, bool(done), stats, decisions)
