"""Quantize the weights of dense layers to 2–8 bits; optionally their inputs to int8 on the fly.

Approximate. Runs after ``canonicalize_linear`` (it reads only ``aten.linear(x, W, b)`` with a
constant 2-D ``W``) and after any low-rank or Monarch rewrite (the layers those leave dense are
quantized too), before ``dead_code`` (which drops the float weights nobody reads any more).

Rule, one per dense layer::

    linear(x, W, b)  ->  quantized_linear(x, packed, scales, zeros, b, bits=…, group_size=…)

``quantized_linear`` (:mod:`slimline.quant.linear`) is plain torch: unpack, ``(q - zero) *
scale``, ``F.linear``. The ONNX export lowers it to ONNX Runtime's kernels
(:mod:`slimline.backends.onnx_quant`: ``MatMulNBits``, blocked ``DequantizeLinear``,
``DynamicQuantizeMatMul``); CUDA kernels live in ``slimline/backends/cuda/quant_kernels.py``.

Checks (a failed check keeps the layer dense and says why): the weight is a constant floating
2-D tensor; its module path matches no pattern in ``Config.skip``; no other op reads the same
weight (a tied embedding would otherwise be stored twice), unless ``quantize_shared_weights``;
the target has a fast kernel for the result — not so for target ``cpu``, where torch would
dequantize on every call (measured: ~1.4x slower than float32 at 2048 rows, ~8x at one row;
torch 2.13's ``_weight_int8pack_mm`` is slower still at prefill), unless ``allow_slower`` or
``activations="dynamic_int8"`` (asked for by name, it only serves :func:`export_quantized_onnx`).

Methods: ``rtn`` rounds to nearest, group by group; ``gptq`` (Frantar et al., 2023,
:mod:`slimline.quant.gptq`) rounds column by column and feeds each error back through the
inverse Hessian ``(XᵀX)⁻¹`` of the layer's calibration inputs. GPTQ was chosen over AWQ's
activation-aware scaling: it needs no search over scaling exponents, leaves the storage format
untouched (no per-input scales to fold), and measured about half RTN's output error at 4 bits
and below on our models (``benchmarks/quant_quality.py``).

Sensitivity: every layer's output SQNR on the calibration inputs, ``10·log10(|XWᵀ|² /
|X(W − Ŵ)ᵀ|²)``, computed from ``H = XᵀX`` (with int8 activations, from a sample of the rows).
It is each layer's ``error`` (as the relative RMS output error) in the report.

Budget: the rewrite must keep the model's outputs inside this pass's share of the accuracy
budget (``context.budget_share``; the budget is ``context.extra["budget"]``, else the mode's
default). All eligible layers are tried first; when the outputs on the calibration inputs miss
the budget's cosine (or a task metric's loss, when the Budget names one with data), the most
sensitive layers are kept dense, as few as a bisection over the sensitivity order finds
necessary.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from slimline.budget import MODE_BUDGETS, Budget
from slimline.ir.graph import Graph, module_path, stamp
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable
from slimline.quant.gptq import gptq_quantize
from slimline.quant.linear import ACTIVATIONS, fake_quantize_dynamic_uint8, quantized_linear
from slimline.quant.pack import BITS, default_layout
from slimline.quant.scheme import GROUP_SIZES, QuantizedWeight, QuantScheme, quantize_rtn
from slimline.verify import compare_outputs

NAME = "quantize"
EXACT = False
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten
AUTO = "auto"
METHODS = ("rtn", "gptq")
_SAMPLE_ROWS = 2048  # input rows kept per layer to measure int8-activation error


@dataclass
class Config:
    bits: int = tunable(8, BITS, "weight bits")
    group_size: Any = tunable(AUTO, (AUTO, None, *GROUP_SIZES),
                              "inputs sharing one scale; None: one per output channel; "
                              "auto: None at 8 bits, 128 below")
    symmetric: Any = tunable(AUTO, (AUTO, True, False),
                             "auto: symmetric at 8 bits, asymmetric (with zero points) below")
    method: str = tunable(AUTO, (AUTO, *METHODS), "auto: rtn at 8 bits, gptq below")
    activations: str = tunable(AUTO, (AUTO, *ACTIVATIONS),
                               "auto: none (dynamic_int8 needs export_quantized_onnx's lowering)")
    skip: tuple = tunable((), None, "module-path globs kept dense, e.g. ('head', '*.query')")
    quantize_shared_weights: bool = tunable(False, (False, True),
                                            "quantize a weight another op also reads (tied)")
    damping: float = tunable(0.01, (0.001, 0.01, 0.1), "GPTQ: λ in H + λ·mean(diag H)·I")
    act_order: bool = tunable(True, (False, True), "GPTQ: columns by descending diag(H)")
    fit_budget: bool = tunable(True, (True, False),
                               "keep the most sensitive layers dense until the budget share holds")
    allow_slower: bool = tunable(False, (False, True),
                                 "rewrite for target cpu too: 4-8x smaller weights, but torch "
                                 "dequantizes on every call (slower matmuls)")


@dataclass
class Resolved:
    """Config with every ``auto`` decided for this target."""

    scheme: QuantScheme
    method: str
    activations: str

    @property
    def label(self) -> str:
        extra = ", int8 activations" if self.activations == "dynamic_int8" else ""
        return f"{self.scheme.label} ({self.method}{extra})"


def resolve(config: Config, target: str, has_calibration: bool = True) -> Resolved:
    from slimline.errors import ConfigError

    bits = config.bits
    group = (None if bits == 8 else 128) if config.group_size == AUTO else config.group_size
    symmetric = (bits == 8) if config.symmetric == AUTO else bool(config.symmetric)
    scheme = QuantScheme(bits, group, symmetric)
    method = config.method
    if method == AUTO:
        method = "gptq" if bits < 8 and has_calibration else "rtn"
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}", stage="quantize",
                          where="passes['quantize'].method", hint=f"use one of: {', '.join(METHODS)}")
    activations = config.activations
    if activations == AUTO:
        # int8 activations pay off only once ORT runs DynamicQuantizeMatMul: with
        # export_quantized_onnx, not yet with the onnxruntime target's plain export
        activations = "none"
    if activations not in ACTIVATIONS:
        raise ConfigError(f"unknown activations mode {activations!r}", stage="quantize",
                          where="passes['quantize'].activations",
                          hint=f"use one of: {', '.join(ACTIVATIONS)}")
    if activations == "dynamic_int8" and not (bits == 8 and symmetric and group is None):
        raise ConfigError("int8 activations need int8 symmetric per-channel weights "
                          f"(got {scheme.label})", stage="quantize",
                          where="passes['quantize'].activations",
                          hint="bits=8, symmetric=True, group_size=None; or activations='none'")
    return Resolved(scheme, method, activations)


# ---------------------------------------------------------------------------------------------
# checks


def check_site(graph: Graph, node: fx.Node, config: Config) -> Reason | None:
    """Why the dense layer at ``node`` must stay dense, or None."""
    weight_node = node.args[1] if len(node.args) > 1 else None
    weight = graph.attribute(weight_node) if isinstance(weight_node, fx.Node) else None
    if weight is None or weight.dim() != 2:
        return Reason("weight is not a constant 2-D tensor")
    if not weight.is_floating_point():
        return Reason(f"weight dtype {weight.dtype} is not floating point")
    path = module_path(node)
    for pattern in config.skip:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}"):
            return Reason(f"skipped by config: module path matches {pattern!r}")
    if not config.quantize_shared_weights:
        readers = [user for user in weight_node.users if user is not node]
        same_tensor = [n for n in graph.fx.nodes if n is not weight_node and n.op == "get_attr"
                       and graph.attribute(n) is weight and n.users]
        if readers or same_tensor:
            return Reason("weight is shared with another op (tied): quantizing this use would "
                          "store it twice; set quantize_shared_weights=True to do it anyway")
    return None


# ---------------------------------------------------------------------------------------------
# calibration: XᵀX of every quantized layer's input


@dataclass
class Observed:
    """What calibration saw at one layer's input: ``H = Σ xᵀx`` (float64), rows, a row sample."""

    hessian: torch.Tensor
    rows: int = 0
    sample: torch.Tensor | None = None  # (R, K) rows of the first call, already int8-rounded
                                        # with that call's own range when activations are

    def add(self, x: torch.Tensor, keep_sample: bool) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (M, K)
        self.hessian += flat.T @ flat
        self.rows += flat.shape[0]
        if keep_sample and self.sample is None:
            rounded = fake_quantize_dynamic_uint8(x.detach().float())
            self.sample = torch.stack([flat[:_SAMPLE_ROWS].float(),
                                       rounded.reshape(-1, x.shape[-1])[:_SAMPLE_ROWS]])


class _Observer(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: dict[str, Observed], keep_sample: bool):
        super().__init__(module)
        self.wanted = wanted
        self.keep_sample = keep_sample

    def run_node(self, node: fx.Node) -> Any:
        observed = self.wanted.get(node.name)
        if observed is not None:
            x = self.env[node.args[0]]
            observed.add(x, self.keep_sample)
        return super().run_node(node)


def _flat_inputs(module: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    spec = getattr(module, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((tuple(args), dict(kwargs)), spec))
    return pytree.tree_leaves((tuple(args), dict(kwargs)))


def observe(graph: Graph, nodes: list[fx.Node], samples: list, keep_sample: bool) -> dict[str, Observed]:
    """Run the calibration samples and collect each node's input statistics (by node name).

    Layers reading the same input (q, k, v) share one ``Observed``.
    """
    by_input: dict[fx.Node, Observed] = {}
    wanted: dict[str, Observed] = {}
    for node in nodes:
        weight = graph.attribute(node.args[1])
        features = weight.shape[1]
        x = node.args[0]
        if x not in by_input:  # accumulated where the activations are (the weight's device)
            by_input[x] = Observed(torch.zeros(features, features, dtype=torch.float64, device=weight.device))
        wanted[node.name] = by_input[x]
    interpreter_wanted = {}
    for node in nodes:  # observe each shared input once
        observed = wanted[node.name]
        if all(observed is not v for v in interpreter_wanted.values()):
            interpreter_wanted[node.name] = observed
    with torch.no_grad():
        for args, kwargs in samples:
            _Observer(graph.module, interpreter_wanted, keep_sample).run(
                *_flat_inputs(graph.module, args, kwargs))
    return wanted


# ---------------------------------------------------------------------------------------------
# per-layer quantization and sensitivity


@dataclass
class LayerPlan:
    name: str  # fx node name (stable across Graph.copy)
    path: str
    weight: QuantizedWeight
    sqnr_db: float
    params: int
    bytes_before: int
    bytes_after: int
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """Relative RMS output error on calibration inputs: ``10^(-SQNR/20)``."""
        return 10 ** (-self.sqnr_db / 20) if math.isfinite(self.sqnr_db) else 0.0


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def layer_sqnr(weight: torch.Tensor, quantized: torch.Tensor, observed: Observed | None,
               activations: str) -> float:
    """Output SQNR (dB) of the quantized layer on what calibration saw at its input."""
    w = weight.detach().double()
    difference = quantized.double() - w
    if observed is None or observed.rows == 0:  # never ran: weight-space SQNR
        return _sqnr_db(float(w.pow(2).sum()), float(difference.pow(2).sum()))
    if activations == "dynamic_int8" and observed.sample is not None:
        x, rounded = observed.sample.double()  # (R, K) each
        reference = x @ w.T
        return _sqnr_db(float(reference.pow(2).sum()),
                        float((rounded @ quantized.double().T - reference).pow(2).sum()))
    hessian = observed.hessian
    return _sqnr_db(float(((w @ hessian) * w).sum()),
                    float(((difference @ hessian) * difference).sum()))


def plan_layer(graph: Graph, node: fx.Node, resolved: Resolved, observed: Observed | None,
               config: Config) -> LayerPlan:
    weight = graph.attribute(node.args[1])
    notes = []
    if resolved.method == "gptq" and observed is not None and observed.rows > 0:
        quantized = gptq_quantize(weight, observed.hessian, resolved.scheme,
                                  damping=config.damping, act_order=config.act_order)
    else:
        if resolved.method == "gptq":
            notes.append("no calibration rows reached this layer: rounded to nearest")
        quantized = quantize_rtn(weight, resolved.scheme)
    sqnr = layer_sqnr(weight, quantized.dequantize(torch.float32), observed, resolved.activations)
    bias = node.args[2] if len(node.args) > 2 else None
    bias_tensor = graph.attribute(bias) if isinstance(bias, fx.Node) else None
    params = weight.numel() + (bias_tensor.numel() if bias_tensor is not None else 0)
    bytes_before = weight.numel() * weight.element_size()
    return LayerPlan(node.name, module_path(node), quantized, sqnr, params, bytes_before,
                     quantized.storage_bytes(), notes)


# ---------------------------------------------------------------------------------------------
# the rewrite


def rewrite_layer(graph: Graph, node: fx.Node, plan: LayerPlan, activations: str) -> fx.Node:
    """``linear(x, W, b)`` -> ``quantized_linear(x, packed, scales, zeros, b, ...)``."""
    quantized = plan.weight
    scheme = quantized.scheme
    layout = default_layout(scheme.bits)
    hint = f"quant_{plan.path or node.name}"
    packed = graph.add_parameter(f"{hint}_packed", quantized.pack(layout), before=node)
    scales = graph.add_parameter(f"{hint}_scales", quantized.scales, before=node)
    zeros = graph.add_parameter(f"{hint}_zeros", quantized.zeros, before=node) \
        if quantized.zeros is not None else None
    for created in (packed, scales, zeros):
        if created is not None:
            stamp(created, NAME, node)
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    kwargs = {"bits": scheme.bits, "layout": layout, "group_size": quantized.group_size,
              "padded_features": quantized.codes.shape[1], "in_features": quantized.in_features,
              "activations": activations}
    with graph.fx.inserting_before(node):
        replacement = graph.fx.call_function(quantized_linear, (x, packed, scales, zeros, bias), kwargs)
    replacement.meta["val"] = node.meta.get("val")
    stamp(replacement, NAME, node)
    node.replace_all_uses_with(replacement)
    graph.fx.erase_node(node)
    return replacement


def _apply(graph: Graph, plans: list[LayerPlan], activations: str) -> None:
    nodes = {node.name: node for node in graph.fx.nodes}
    for plan in plans:
        rewrite_layer(graph, nodes[plan.name], plan, activations)
    graph.fx.eliminate_dead_code()
    graph.recompile()


# ---------------------------------------------------------------------------------------------
# fitting the budget


def budget_of(context: PassContext) -> Budget:
    budget = context.extra.get("budget")
    if isinstance(budget, Budget):
        return budget
    return MODE_BUDGETS.get(context.mode) or Budget("cosine", 0.01)


@dataclass
class Fit:
    chosen: list[LayerPlan]
    skipped: list[LayerPlan]
    evaluations: int
    cosine_all: float | None  # output cosine with every eligible layer quantized
    cosine_chosen: float | None
    target: float
    task_loss: float | None = None  # relative task-metric loss of the chosen rewrite


@dataclass
class Goal:
    """What a candidate must keep: the output cosine, and a task metric's loss when the budget
    names one with data (``Budget("bits_per_byte", 0.005, inputs=...)``)."""

    min_cosine: float
    task: Any = None  # callable(runner) -> float, oriented so that lower is better
    task_baseline: float | None = None
    max_task_loss: float | None = None

    def task_loss(self, graph: Graph) -> float | None:
        if self.task is None:
            return None
        return (self.task(_runner(graph)) - self.task_baseline) / abs(self.task_baseline)


def _runner(graph: Graph) -> Any:
    """The graph's module itself: a metric finds the device to put its inputs on from its weights."""
    return graph.module


def goal_of(context: PassContext, graph: Graph) -> Goal:
    """The budget share this pass may spend, from ``context.extra["budget"]`` or the mode preset."""
    from slimline.budget import METRICS

    budget = budget_of(context)
    share = context.budget_share if context.budget_share is not None else 1.0
    goal = Goal(budget.min_cosine(share))
    if not budget.is_output_metric and budget.inputs is not None:
        function, higher = (budget.metric, bool(budget.higher_is_better)) if callable(budget.metric) \
            else METRICS[budget.metric]
        sign = -1.0 if higher else 1.0
        goal.task = lambda runner: sign * float(function(runner, budget.inputs))  # noqa: E731
        goal.task_baseline = goal.task(_runner(graph))
        goal.max_task_loss = budget.max_loss * share
    return goal


def _holds(graph: Graph, samples: list, references: list, goal: Goal) -> tuple[bool, float, float | None]:
    passed, lowest = True, 1.0
    for (args, kwargs), reference in zip(samples, references):
        result = compare_outputs(reference, graph.run(args, kwargs), exact=False,
                                 min_cosine=goal.min_cosine)
        passed &= result.passed
        lowest = min(lowest, result.min_cosine)
    loss = goal.task_loss(graph)
    if loss is not None and loss > goal.max_task_loss:
        passed = False
    return passed, lowest, loss


def fit_budget(graph: Graph, plans: list[LayerPlan], activations: str, samples: list,
               references: list, goal: Goal) -> Fit:
    """Quantize as many layers as keep ``goal``, skipping the most sensitive first (lowest
    SQNR); the count to skip is bisected (one run of the calibration samples per probe)."""
    order = sorted(plans, key=lambda plan: plan.sqnr_db)  # most sensitive first
    results: dict[int, tuple[bool, float, float | None]] = {}

    def probe(skip: int) -> bool:
        if skip not in results:
            candidate = graph.copy()
            _apply(candidate, order[skip:], activations)
            results[skip] = _holds(candidate, samples, references, goal)
        return results[skip][0]

    if probe(0):
        skip = 0
    else:
        low, high = 0, len(order)  # probe(low) fails; skipping everything trivially holds
        while high - low > 1:
            middle = (low + high) // 2
            if probe(middle):
                high = middle
            else:
                low = middle
        skip = high
    chosen = order[skip:]
    final = results.get(skip)
    return Fit(chosen, order[:skip], len(results), results[0][1], final[1] if final else None,
               goal.min_cosine, final[2] if final else None)


# ---------------------------------------------------------------------------------------------


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    samples = list(context.calibration or []) or [(graph.example_args, graph.example_kwargs)]
    resolved = resolve(config, context.target, has_calibration=bool(samples))
    stats: dict[str, float] = {"bits": resolved.scheme.bits,
                               "group_size": resolved.scheme.group_size or 0,
                               "linear_sites": 0, "quantized": 0, "refused": 0,
                               "kept_for_budget": 0, "budget_evaluations": 0,
                               "weight_bytes_before": 0, "weight_bytes_after": 0}
    decisions: list[LayerDecision] = []
    eligible: list[fx.Node] = []
    for node in graph.call_nodes(aten.linear.default):
        stats["linear_sites"] += 1
        reason = check_site(graph, node, config) or _target_reason(context.target, config, resolved)
        if reason is not None:
            stats["refused"] += 1
            params = _params(graph, node)
            decisions.append(LayerDecision(module_path(node), "linear", "kept", NAME, params, params,
                                           why_not=str(reason)))
            continue
        eligible.append(node)
    if not eligible:
        return PassResult(graph, False, stats, decisions)

    observed = observe(graph, eligible, samples, keep_sample=resolved.activations == "dynamic_int8")
    plans = [plan_layer(graph, node, resolved, observed.get(node.name), config) for node in eligible]
    stats["calibration_rows"] = max((o.rows for o in observed.values()), default=0)

    references = context.reference_outputs
    if references is None or len(references) < len(samples):
        references = [graph.run(args, kwargs) for args, kwargs in samples]
    goal = goal_of(context, graph)
    target = goal.min_cosine
    if config.fit_budget:
        fit = fit_budget(graph, plans, resolved.activations, samples, references, goal)
    else:
        fit = Fit(plans, [], 0, None, None, target)
    stats["budget_evaluations"] = fit.evaluations
    if fit.cosine_all is not None:
        stats["cosine_all_quantized"] = fit.cosine_all
    stats["target_cosine"] = target
    if fit.task_loss is not None:
        stats["task_loss"] = fit.task_loss
        stats["max_task_loss"] = goal.max_task_loss

    chosen = {plan.name for plan in fit.chosen}
    for rank, plan in enumerate(sorted(plans, key=lambda p: p.sqnr_db)):
        error = plan.relative_error
        if plan.name in chosen:
            stats["quantized"] += 1
            stats["weight_bytes_before"] += plan.bytes_before
            stats["weight_bytes_after"] += plan.bytes_after
            note = f"; {'; '.join(plan.notes)}" if plan.notes else ""
            decisions.append(LayerDecision(plan.path, "linear", f"quantized: {resolved.label}, "
                                           f"SQNR {plan.sqnr_db:.1f} dB{note}", NAME,
                                           plan.params, plan.params, error=error))
        else:
            stats["kept_for_budget"] += 1
            decisions.append(LayerDecision(
                plan.path, "linear", "kept", NAME, plan.params, plan.params, error=error,
                why_not=f"budget: among the {len(fit.skipped)} most sensitive layers (rank "
                        f"{rank + 1}, SQNR {plan.sqnr_db:.1f} dB); quantizing all "
                        f"{len(plans)} misses the budget share (output cosine "
                        f"{fit.cosine_all:.5f}, needs {fit.target:.5f}"
                        f"{', and the task metric' if goal.task is not None else ''})"))
    finite = [plan.sqnr_db for plan in plans if math.isfinite(plan.sqnr_db)]
    if finite:
        stats["min_sqnr_db"] = min(finite)
    if not fit.chosen:
        return PassResult(graph, False, stats, decisions)
    _apply(graph, fit.chosen, resolved.activations)
    return PassResult(graph, True, stats, decisions)


def _target_reason(target: str, config: Config, resolved: Resolved) -> Reason | None:
    # int8 activations are asked for by name only to export (export_quantized_onnx): allowed
    if target == "cpu" and not config.allow_slower and resolved.activations != "dynamic_int8":
        return Reason("target cpu: torch has no fast low-bit matmul for the rewritten layer (it "
                      "would dequantize on every call, slower than float32); set "
                      "allow_slower=True for 4-8x smaller weights anyway, or use target "
                      "onnxruntime / export_quantized_onnx")
    return None


def _params(graph: Graph, node: fx.Node) -> int:
    total = 0
    for argument in node.args[1:3]:
        tensor = graph.attribute(argument) if isinstance(argument, fx.Node) else None
        total += tensor.numel() if tensor is not None else 0
    return total
