"""Implementation choice: for each dense layer, dense / low-rank / Monarch / low-bit, under one budget.

The lossy passes each know one technique; none of them knows whether another technique would buy
more speed for the same accuracy at a given layer. This module asks that question per layer and
answers it for the whole model at once:

1. **Options.** For each linear site (grouped by module path) and each technique the target serves
   (:func:`default_options`), the technique's own pass is run on a private copy of the graph,
   restricted to that one layer (its ``exclude`` / ``include`` / ``skip`` knobs, a fixed size:
   rank for ``lowrank``, blocks for ``monarch``, bits for ``quantize``), with its own budget gate
   off: the chooser is the gate.
2. **Cost of an option** in the budget's metric: the task metric on the budget's data (relative
   loss, as :class:`~slimline.budget.Budget` defines it) or ``1 - cosine`` of the outputs on the
   calibration samples, with only that layer replaced.
3. **Gain of an option**: the layer alone, timed on the target against the dense layer. The nodes
   the pass created for the layer (their provenance stamps say which) are cut out as a small FX
   graph and called on the values they receive in the full model; dense and options are timed
   interleaved, medians compared. ``tune="cache"`` never measures: a roofline estimate from the
   cost model (FLOPs and bytes at the example shapes) stands in.
4. **Selection**: a multiple-choice knapsack, solved greedily on each layer's convex hull: the
   move with the best gain per unit of loss is taken while the summed losses stay inside
   ``budget × (1 - margin)``.
5. **Check**: all chosen options applied together (each technique's pass once, restricted to its
   layers), the real loss measured; if the layers' losses did not add up and the budget is broken,
   the last moves are undone (bisection on the move list) until it holds. When the budget's data
   can be halved (:func:`split_inputs`), the options are priced on the first half and the check
   runs on the second: the moves taken are those whose first-half losses came out lowest, so a
   check on the same data would share their luck (on gpt-small at batch 32, 24 layers priced and
   checked on one 8 KiB slice read +0.66%; held-out text said +2.0%).

The result says, per layer, every option with its loss and time, and which one won and why.
"""

from __future__ import annotations

import glob
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from slimline.errors import SlimlineError
from slimline.ir.graph import PROVENANCE_PASS, PROVENANCE_SOURCE, Graph, module_path
from slimline.passes.base import PassContext, PassResult

__all__ = ["Option", "LayerChoice", "ChoiceResult", "default_options", "choose", "split_inputs", "TECHNIQUES"]

aten = torch.ops.aten

TECHNIQUES = ("lowrank", "monarch", "quantize")   # in pipeline order: applied in this order


@dataclass(frozen=True)
class Option:
    """One way to implement a layer: a technique and its size."""

    technique: str
    label: str
    settings: tuple = ()      # (key, value) pairs; see _layer_config

    def setting(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


def default_options(target: str) -> list[Option]:
    """The options offered per layer on ``target``.

    Low-bit weights pay on a GPU (fused dequant kernels) and in ONNX Runtime; in torch on a CPU
    they are dequantized on every call, so they are not offered there.
    """
    options = [Option("lowrank", "low-rank 50%", (("param_reduction", 0.5),)),
               Option("lowrank", "low-rank 25%", (("param_reduction", 0.25),)),
               Option("monarch", "Monarch b=4", (("nblocks", 4),))]
    if target == "cuda":
        options += [Option("quantize", "int8", (("bits", 8),)),
                    Option("quantize", "int4 g128", (("bits", 4), ("group_size", 128)))]
    return options


@dataclass
class Candidate:
    option: Option
    loss: float = math.inf
    ms: float = math.inf
    params: int = 0
    why_not: str = ""

    @property
    def usable(self) -> bool:
        return not self.why_not


@dataclass
class LayerChoice:
    path: str
    dense_ms: float
    params: int
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    why: str = ""

    def to_json(self) -> dict:
        return {"module_path": self.path, "dense_ms": self.dense_ms, "params": self.params,
                "chosen": self.chosen.option.label if self.chosen else "dense", "why": self.why,
                "options": [{"option": c.option.label, "technique": c.option.technique,
                             "loss": None if math.isinf(c.loss) else c.loss,
                             "ms": None if math.isinf(c.ms) else c.ms, "params": c.params,
                             "why_not": c.why_not} for c in self.candidates]}


@dataclass
class ChoiceResult:
    graph: Graph
    layers: list[LayerChoice]
    limit: float
    estimated_loss: float
    measured_loss: float
    timing: str
    results: list[tuple[str, PassResult]] = field(default_factory=list)
    undone: int = 0
    evaluations: int = 0

    @property
    def changed(self) -> bool:
        return any(layer.chosen is not None for layer in self.layers)

    def summary(self) -> dict:
        chosen = [layer for layer in self.layers if layer.chosen]
        by_option: dict[str, int] = {}
        for layer in chosen:
            by_option[layer.chosen.option.label] = by_option.get(layer.chosen.option.label, 0) + 1
        dense = sum(layer.dense_ms for layer in self.layers)
        after = sum(layer.chosen.ms if layer.chosen else layer.dense_ms for layer in self.layers)
        return {"layers": len(self.layers), "replaced": len(chosen), "by_option": by_option,
                "budget_limit": self.limit, "estimated_loss": self.estimated_loss,
                "measured_loss": self.measured_loss, "layers_ms_before": dense,
                "layers_ms_after": after, "timing": self.timing, "undone_moves": self.undone,
                "evaluations": self.evaluations}

    def to_json(self) -> dict:
        return {**self.summary(), "per_layer": [layer.to_json() for layer in self.layers]}


# ---------------------------------------------------------------------------------------------
# layers and restricted pass configs


def linear_layers(graph: Graph) -> dict[str, list[fx.Node]]:
    """The graph's ``aten.linear`` sites by module path (a path may hold several)."""
    found: dict[str, list[fx.Node]] = {}
    for node in graph.fx.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            found.setdefault(module_path(node), []).append(node)
    return found


def _escape(path: str) -> str:
    return glob.escape(path)


def _rank_for(node: fx.Node, graph: Graph, reduction: float, multiple: int = 8) -> int:
    weight = graph.attribute(node.args[1])
    out_features, in_features = weight.shape
    rank = int((1.0 - reduction) * in_features * out_features / (in_features + out_features))
    return max(multiple, rank // multiple * multiple)


def _layer_config(spec: Any, option_by_path: dict[str, Option], graph: Graph,
                  layers: dict[str, list[fx.Node]]) -> Any:
    """The technique's config restricted to ``option_by_path``'s layers, its own gate off."""
    paths = set(option_by_path)
    others = tuple(_escape(p) for p in layers if p not in paths)
    config = spec.config_type()
    technique = spec.name
    if technique == "lowrank":
        ranks = {_escape(p): _rank_for(layers[p][0], graph, o.setting("param_reduction", 0.5))
                 for p, o in option_by_path.items()}
        return replace(config, rank="param_reduction", param_reduction=0.0, ranks=ranks,
                       exclude=others, recover=0, keep_unprofitable=False)
    if technique == "monarch":
        blocks = {o.setting("nblocks", 4) for o in option_by_path.values()}
        if len(blocks) > 1:  # one config per block count: the caller splits by option
            raise ValueError("one Monarch block count per call")
        return replace(config, include=tuple(_escape(p) for p in paths), exclude=(), gate="none",
                       nblocks=blocks.pop(), recover=0)
    if technique == "quantize":
        schemes = {(o.setting("bits", 8), o.setting("group_size", None)) for o in option_by_path.values()}
        if len(schemes) > 1:
            raise ValueError("one quantization scheme per call")
        bits, group = schemes.pop()
        changes = dict(bits=bits, skip=others, fit_budget=False)
        if group is not None:
            changes["group_size"] = group
        return replace(config, **changes)
    raise ValueError(f"no layer restriction for pass {technique!r}")


def _apply(graph: Graph, assignment: dict[str, Option], specs: dict[str, Any],
           context: PassContext, layers: dict[str, list[fx.Node]]) -> tuple[Graph, list]:
    """Every chosen option applied: one pass run per (technique, size), in pipeline order."""
    results = []
    for technique in TECHNIQUES:
        groups: dict[tuple, dict[str, Option]] = {}
        for path, option in assignment.items():
            if option.technique == technique:
                groups.setdefault(option.settings, {})[path] = option
        for _settings, group in groups.items():
            config = _layer_config(specs[technique], group, graph, layers)
            candidate = graph.copy()
            result = specs[technique].run(candidate, config, context)
            results.append((technique, result))
            if result.changed:
                graph = result.graph
    return graph, results


# ---------------------------------------------------------------------------------------------
# loss


def split_inputs(inputs: Any) -> tuple[Any, Any] | None:
    """Two disjoint halves of a budget's data, or None where it cannot be halved.

    Only data that says how to halve itself, through ``halves()`` (the quality harness's
    evaluation sets: first half, second half, so that neighbouring text stays on one side): a
    user's metric may tie its inputs to other data (labels), which a blind split would break.
    """
    halve = getattr(inputs, "halves", None)
    return halve() if callable(halve) else None


class _Judge:
    """The budget's metric on a graph, as a loss: positive is worse, 0 is the original.

    ``inputs`` replaces the budget's data (one half of it, see :func:`split_inputs`).
    """

    def __init__(self, budget: Any, context: PassContext, original: Graph, inputs: Any = None):
        from slimline.budget import METRICS

        if inputs is not None:
            budget = replace(budget, inputs=inputs)
        self.budget = budget
        self.samples = context.calibration or [(original.example_args, original.example_kwargs)]
        self.references = context.reference_outputs or [original.run(a, k) for a, k in self.samples]
        self.task = None
        if not budget.is_output_metric and budget.inputs is not None:
            function, higher = (budget.metric, bool(budget.higher_is_better)) \
                if callable(budget.metric) else METRICS[budget.metric]
            self.task = (function, higher)
            with torch.no_grad():
                self.before = float(function(original.module, budget.inputs))
        self.evaluations = 0

    @property
    def describes(self) -> str:
        return (f"relative {self.budget.metric_name}" if self.task
                else "1 - output cosine on the calibration samples")

    def limit(self) -> float:
        return self.budget.max_loss

    def __call__(self, graph: Graph) -> float:
        self.evaluations += 1
        with torch.no_grad():
            if self.task is not None:
                function, higher = self.task
                after = float(function(graph.module, self.budget.inputs))
                change = (self.before - after) if higher else (after - self.before)
                return change / abs(self.before) if self.before else change
            worst = 1.0
            for (args, kwargs), reference in zip(self.samples, self.references):
                worst = min(worst, _cosine(reference, graph.run(args, kwargs)))
            return 1.0 - worst


def _cosine(reference: Any, found: Any) -> float:
    flat_a = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    flat_b = [t for t in torch.utils._pytree.tree_leaves(found) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    if not flat_a or len(flat_a) != len(flat_b):
        return 0.0
    a = torch.cat([t.detach().double().flatten() for t in flat_a])
    b = torch.cat([t.detach().double().flatten() for t in flat_b])
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else float(torch.equal(a, b))


# ---------------------------------------------------------------------------------------------
# time


def _layer_program(graph: Graph, nodes: list[fx.Node]) -> Callable[[], Any]:
    """A callable that runs ``nodes`` alone on the values they get in the full model."""
    from slimline.passes.taps import run_tapped

    inside = set(nodes)
    outside: list[fx.Node] = []
    for node in nodes:
        for source in node.all_input_nodes:
            if source not in inside and source not in outside:
                outside.append(source)
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        run_tapped(graph.module, (graph.example_args, graph.example_kwargs),
                   {node: node for node in outside}, lambda node, _x, y: values.__setitem__(node, y))
    sub = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    for index, node in enumerate(outside):
        mapping[node] = sub.placeholder(f"input_{index}")
    for node in nodes:
        mapping[node] = sub.node_copy(node, lambda n: mapping[n])
    results = [mapping[n] for n in nodes if any(user not in inside for user in n.users)]
    sub.output(results[0] if len(results) == 1 else tuple(results))
    module = fx.GraphModule(torch.nn.Module(), sub)
    inputs = [values[n] for n in outside]

    def call() -> Any:
        with torch.no_grad():
            return module(*inputs)
    return call


def _created_nodes(graph: Graph, technique: str, path: str) -> list[fx.Node]:
    return [n for n in graph.fx.nodes
            if n.meta.get(PROVENANCE_PASS) == technique and n.meta.get(PROVENANCE_SOURCE) == path
            and n.op == "call_function"]


def _interleaved_ms(calls: list[Callable[[], Any]], device: str, rounds: int = 9) -> list[float]:
    """Per-call time of each callable, timed round-robin so load swings hit all of them alike.

    On a GPU: the autotuner's CUDA timer (events, L2 flush, CUDA graphs for short calls), median.
    On a CPU, on one thread (the options are ranked, and on a shared machine a pool thread that
    is descheduled stalls every parallel op), a sample is a loop of calls lasting about a
    millisecond, and the estimate is the fastest sample: preemption only ever adds time, so the
    minimum is the least disturbed reading (a median there measures the neighbours).
    """
    import time

    if device == "cuda":
        from slimline.autotune.measure import CudaTimer
        from slimline.autotune.space import DeviceLimits

        timer = CudaTimer(DeviceLimits.from_torch().l2_bytes)
        samples: list[list[float]] = [[] for _ in calls]
        for _ in range(rounds):
            for index, call in enumerate(calls):
                samples[index].extend(timer.samples(call, 3))
        return [statistics.median(s) for s in samples]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a descheduled pool thread stalls every parallel op: time alone
    try:
        return _cpu_best_ms(calls, rounds)
    finally:
        torch.set_num_threads(threads)


def _cpu_best_ms(calls: list[Callable[[], Any]], rounds: int) -> list[float]:
    import time

    loops = []
    for call in calls:
        call()  # warm
        start = time.perf_counter()
        call()
        once = max(time.perf_counter() - start, 1e-6)
        loops.append(max(1, min(1000, int(1e-3 / once))))
    best = [math.inf] * len(calls)
    for _ in range(rounds):
        for index, (call, count) in enumerate(zip(calls, loops)):
            start = time.perf_counter()
            for _ in range(count):
                call()
            best[index] = min(best[index], (time.perf_counter() - start) * 1e3 / count)
    return best


def _size_hints(nodes: list[fx.Node]) -> dict[str, int]:
    """Example values of every size symbol the nodes' fake tensors know of (their shape env)."""
    for node in nodes:
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            mode = getattr(value, "fake_mode", None)
            env = getattr(mode, "shape_env", None)
            if env is not None:
                known = getattr(env, "backed_var_to_val", None)   # torch >= 2.13's name
                known = known if known is not None else env.var_to_val
                return {str(symbol): int(size) for symbol, size in known.items()}
    return {}


def _modelled_ms(graph: Graph, nodes: list[fx.Node], target: str) -> float:
    """Roofline time of ``nodes`` at the example shapes (``tune='cache'``: nothing is measured).

    A rough device (GPU: H200-class bf16 and HBM; CPU: a few cores) plus a launch cost per op;
    only the ranking of options at one layer matters.
    """
    from slimline.ir.cost import evaluate, node_cost
    from slimline.ir.shapes import symbol_values

    flops_per_s, bytes_per_s, launch_s = ((400e12, 3.0e12, 4e-6) if target == "cuda"
                                          else (5e10, 1.5e10, 2e-6))
    flat = torch.utils._pytree.tree_leaves((graph.example_args, graph.example_kwargs))
    values: dict = _size_hints(nodes)   # sizes of symbols a pass's fake run introduced
    values.update(symbol_values(graph.module, flat, graph.rename))
    seconds = 0.0
    for node in nodes:
        cost = node_cost(node, graph.rename)
        seconds += max(float(evaluate(cost.flops, values)) / flops_per_s,
                       float(evaluate(cost.bytes, values)) / bytes_per_s) + launch_s
    return seconds * 1e3


# ---------------------------------------------------------------------------------------------
# selection


def _select(layers: list[LayerChoice], limit: float) -> tuple[list[tuple[int, Candidate]], float]:
    """Greedy multiple-choice knapsack: the best gain per loss, per layer on its convex hull.

    Returns the moves in the order taken (layer index, option moved to) and the summed loss.
    """
    current: dict[int, Candidate | None] = {i: None for i in range(len(layers))}
    spent = 0.0
    moves: list[tuple[int, Candidate]] = []
    while True:
        best: tuple[float, int, Candidate] | None = None
        for i, layer in enumerate(layers):
            now = current[i]
            now_ms = now.ms if now else layer.dense_ms
            now_loss = now.loss if now else 0.0
            for candidate in layer.candidates:
                if not candidate.usable or candidate.ms >= now_ms:
                    continue
                gain = now_ms - candidate.ms
                extra = max(candidate.loss - now_loss, 0.0)
                if spent + extra > limit:
                    continue
                efficiency = gain / max(extra, 1e-9)
                if best is None or efficiency > best[0]:
                    best = (efficiency, i, candidate)
        if best is None:
            return moves, spent
        _efficiency, i, candidate = best
        previous = current[i]
        spent += max(candidate.loss - (previous.loss if previous else 0.0), 0.0)
        current[i] = candidate
        moves.append((i, candidate))


def _assignment(layers: list[LayerChoice], moves: list[tuple[int, Candidate]]) -> dict[str, Option]:
    chosen: dict[int, Candidate] = {}
    for i, candidate in moves:
        chosen[i] = candidate
    return {layers[i].path: c.option for i, c in chosen.items()}


def choose(graph: Graph, specs: dict[str, Any], context: PassContext, budget: Any, *,
           options: list[Option] | None = None, timing: str = "measured", margin: float = 0.1,
           progress: Callable[[str], None] | None = None) -> ChoiceResult:
    """Pick one implementation per linear layer under ``budget`` (see the module docstring).

    ``specs`` maps technique name → :class:`~slimline.passes.base.PassSpec` (the passes that
    serve this target); ``timing`` is ``"measured"`` or ``"modelled"``.
    """
    options = [o for o in (options or default_options(context.target)) if o.technique in specs]
    layers_by_path = linear_layers(graph)
    halves = split_inputs(budget.inputs) if not budget.is_output_metric else None
    judge = _Judge(budget, context, graph, halves[0] if halves else None)      # prices the options
    checker = _Judge(budget, context, graph, halves[1]) if halves else judge   # checks the set
    trial_context = replace(context, budget_share=1.0,
                            extra={**context.extra, "budget": budget})
    device = "cuda" if context.target == "cuda" and torch.cuda.is_available() else "cpu"
    choices: list[LayerChoice] = []
    for path, nodes in layers_by_path.items():
        params = sum(graph.attribute(n.args[1]).numel() for n in nodes)
        choice = LayerChoice(path, 0.0, params)
        programs: list[tuple[Candidate, Callable[[], Any]]] = []   # measured: the timed options
        for option in options:
            candidate = Candidate(option)
            choice.candidates.append(candidate)
            try:
                trial, _results = _apply(graph, {path: option}, specs, trial_context, layers_by_path)
            except (SlimlineError, ValueError) as error:
                candidate.why_not = f"refused: {getattr(error, 'message', str(error))[:120]}"
                continue
            created = _created_nodes(trial, option.technique, path)
            if not created:
                reasons = [d.why_not for _, r in _results for d in r.decisions
                           if d.module_path == path and d.why_not]
                candidate.why_not = reasons[0] if reasons else "the pass left the layer dense"
                continue
            candidate.loss = judge(trial)
            candidate.params = sum(t.numel() for t in _new_weights(trial, created))
            if timing == "measured":
                programs.append((candidate, _layer_program(trial, created)))
            else:
                candidate.ms = _modelled_ms(trial, created, context.target)
        if timing == "measured":
            times = _interleaved_ms([_layer_program(graph, nodes)] + [call for _c, call in programs],
                                    device)
            choice.dense_ms = times[0]
            for (candidate, _call), ms in zip(programs, times[1:]):
                candidate.ms = ms
        else:
            choice.dense_ms = _modelled_ms(graph, nodes, context.target)
        choices.append(choice)
        if progress:
            progress(path)

    limit = judge.limit() * (1.0 - margin)
    moves, estimate = _select(choices, limit)
    undone = 0
    applied, results = graph, []
    measured = 0.0
    if moves:
        # the losses may not add up: check the whole set, undo the last moves until it holds
        count = len(moves)
        applied, results = _apply(graph, _assignment(choices, moves), specs, trial_context,
                                  layers_by_path)
        measured = checker(applied)
        if measured > checker.limit():
            low, high = 0, count - 1       # the longest prefix inside the budget, by bisection
            best = (graph, [], 0.0, 0)
            while low <= high:
                middle = (low + high + 1) // 2 if low < high else low
                if middle == 0:
                    break
                candidate_graph, candidate_results = _apply(
                    graph, _assignment(choices, moves[:middle]), specs, trial_context, layers_by_path)
                loss = checker(candidate_graph)
                if loss <= checker.limit():
                    best = (candidate_graph, candidate_results, loss, middle)
                    low = middle + 1
                else:
                    high = middle - 1
            applied, results, measured, kept = best
            undone = count - kept
            moves = moves[:kept]
    assignment = _assignment(choices, moves)
    for choice in choices:
        option = assignment.get(choice.path)
        choice.chosen = next((c for c in choice.candidates if c.option == option), None) \
            if option else None
        choice.why = _why(choice)
    return ChoiceResult(applied, choices, limit, estimate, measured,
                        timing, results, undone,
                        judge.evaluations + (checker.evaluations if checker is not judge else 0))


def _new_weights(graph: Graph, nodes: list[fx.Node]) -> list[torch.Tensor]:
    found, seen = [], set()
    for node in nodes:
        for source in node.all_input_nodes:
            if source.op == "get_attr" and source.name not in seen:
                tensor = graph.attribute(source)
                if tensor is not None:
                    seen.add(source.name)
                    found.append(tensor)
    return found


def _why(choice: LayerChoice) -> str:
    usable = [c for c in choice.candidates if c.usable]
    if choice.chosen is not None:
        return (f"{choice.chosen.option.label}: {choice.dense_ms / max(choice.chosen.ms, 1e-12):.2f}x "
                f"faster than dense at loss {choice.chosen.loss:.2e}")
    if not usable:
        return "kept dense: no technique applies here"
    if all(c.ms >= choice.dense_ms for c in usable):
        return "kept dense: no option is faster than the dense layer here"
    return "kept dense: the budget was spent where it buys more time per unit of loss"
