"""The straight-line flow: check → reference → capture → passes → tune → backend → verify → report.

``optimize`` reads top to bottom in the order it runs; each stage is timed in the report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree

from slimline.budget import MODE_BUDGETS, Budget
from slimline.errors import ConfigError, InputError, SlimlineError, VerificationError
from slimline.ir.capture import capture, locate_module, normalize_inputs
from slimline.ir.graph import Graph
from slimline.passes.base import LayerDecision, PassContext
from slimline.passes.bisect import bisect_failure
from slimline.passes.pipeline import run_pipeline, select_passes
from slimline.report import Report
from slimline.verify import Verification, compare_outputs, find_non_finite, merge_verifications

__all__ = ["optimize", "export_onnx", "OptimizedModel", "TARGETS", "TUNE_MODES"]

TARGETS = ("cpu", "cuda", "onnxruntime")
TUNE_MODES = ("lite", "max", "cache", "off")
_ONNX_RTOL = 1e-4


class OptimizedModel:
    """What :func:`optimize` returns: call it like the original model.

    ``report`` says what changed; ``graph`` is the rewritten slimline Graph; ``runner`` is the
    backend's callable. Not an ``nn.Module`` on purpose: its weights are shared with the user's
    model, and ``.to()`` / ``.half()`` on it would move the user's tensors too.
    """

    def __init__(self, runner: Any, graph: Graph, report: Report, target: str):
        self.runner = runner
        self.graph = graph
        self.report = report
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with torch.no_grad():
                return self.runner(*args, **kwargs)
        except AssertionError as error:
            if "Guard failed" not in str(error):
                raise
            raise InputError(f"inputs outside what the model was optimized for: {error}",
                             stage="run", where=self.report.model,
                             hint="sizes not declared dynamic are fixed at capture; pass "
                                  "dynamic_shapes={'x': {0: 'batch'}} to optimize()") from None

    def __repr__(self) -> str:
        return f"OptimizedModel({self.report.model}, target={self.target!r}, mode={self.report.mode!r})"


def _check_options(target: str, mode: str, tune: str, budget: Any) -> None:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}", stage="configure", where="optimize(target=...)",
                          hint=f"use one of: {', '.join(TARGETS)}")
    if tune not in TUNE_MODES:
        raise ConfigError(f"unknown tune mode {tune!r}", stage="configure", where="optimize(tune=...)",
                          hint=f"use one of: {', '.join(TUNE_MODES)}")
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(f"budget must be a slimline.Budget, got {type(budget).__name__}",
                          stage="configure", where="optimize(budget=...)",
                          hint="slimline.Budget(metric='cosine', max_loss=0.01)")


def _check_finite(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    bad_weights = find_non_finite(list(model.named_parameters()) + list(model.named_buffers()))
    if bad_weights:
        shown = ", ".join(bad_weights[:5]) + (" …" if len(bad_weights) > 5 else "")
        raise InputError(f"{len(bad_weights)} weight tensor(s) hold NaN or inf: {shown}",
                         stage="check inputs", where=bad_weights[0],
                         hint="fix or reload the checkpoint; slimline cannot verify rewrites of "
                              "non-finite weights")
    leaves, _ = pytree.tree_flatten((args, kwargs))
    bad_inputs = find_non_finite([(f"input {i}", leaf) for i, leaf in enumerate(leaves)])
    if bad_inputs:
        raise InputError(f"example inputs hold NaN or inf: {', '.join(bad_inputs)}",
                         stage="check inputs", where=bad_inputs[0],
                         hint="pass finite example inputs; they are used to verify every rewrite")


def _reference_run(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as error:
        where = locate_module(model, error) or type(model).__name__
        shapes = [tuple(t.shape) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        raise InputError(f"the model fails on the example inputs (shapes {shapes}): "
                         f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
                         stage="reference run", where=f"module {where!r}",
                         hint="check the example inputs' shapes and dtypes against what the model "
                              "expects; run model(*example_inputs) yourself first") from error


def _is_low_precision(model: torch.nn.Module) -> bool:
    from slimline.verify import LOW_PRECISION

    return any(p.dtype in LOW_PRECISION for p in model.parameters())


def _float32_references(model: torch.nn.Module, samples: list) -> list:
    """Outputs of a float32 copy of ``model`` (the user's model stays as it is)."""
    import copy

    upcast = copy.deepcopy(model).float()
    to32 = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    try:
        return [_reference_run(upcast, *pytree.tree_map_only(torch.Tensor, to32, (a, k)))
                for a, k in samples]
    finally:
        del upcast


def _calibration_inputs(model: torch.nn.Module, calibration: Any) -> list[tuple[tuple, dict]]:
    if calibration is None:
        return []
    return [normalize_inputs(model, sample) for sample in calibration]


def optimize(model: torch.nn.Module, example_inputs: Any = None, target: str = "cpu",
             mode: str = "lossless", passes: Any = None, budget: Budget | None = None,
             calibration: Any = None, tune: str = "lite", *, dynamic_shapes: Any = None,
             strict: bool = False, workdir: str | Path | None = None,
             name: str | None = None) -> OptimizedModel:
    """Capture, rewrite, tune, verify and package ``model`` for ``target``.

    ``dynamic_shapes`` names dynamic dimensions in torch.export's form, strings allowed
    (``{"x": {0: "batch"}}``); they become sympy symbols in the report's FLOPs. The user's model
    is never modified. An ONNX file path or ``onnx.ModelProto`` goes to
    :func:`slimline.onnx_in.optimize_onnx` (``target="onnxruntime"``; inputs optional).
    """
    if (isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx")) \
            or type(model).__name__ == "ModelProto":  # ONNX in
        from slimline.onnx_in import optimize_onnx
        return optimize_onnx(model, example_inputs, target=target, mode=mode, passes=passes,
                             budget=budget, calibration=calibration, tune=tune, workdir=workdir,
                             name=name, dynamic_shapes=dynamic_shapes, strict=strict)
    report = Report(model=name or type(model).__name__, target=target, mode=mode)

    with report.stage("check inputs"):
        _check_options(target, mode, tune, budget)
        steps = select_passes(mode, passes, target)
        args, kwargs = normalize_inputs(model, example_inputs)
        _check_finite(model, args, kwargs)
        if target == "cuda":
            from slimline.backends.cuda import require_cuda
            require_cuda()
        budget = budget or MODE_BUDGETS[mode] or Budget("cosine", 0.0)
        samples = [(args, kwargs)] + _calibration_inputs(model, calibration)[:4]

    # slimline optimizes for inference: the model is captured in eval mode, and every module's
    # own training flag is put back afterwards, exactly as it was
    training_flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return _optimize_in_eval(model, args, kwargs, samples, steps, budget, report, target, mode,
                                 tune, dynamic_shapes, strict, workdir)
    finally:
        for module, flag in training_flags.items():
            module.training = flag


def _optimize_in_eval(model, args, kwargs, samples, steps, budget, report, target, mode, tune,
                      dynamic_shapes, strict, workdir) -> OptimizedModel:
    with report.stage("reference run") as stage:
        references = [_reference_run(model, a, k) for a, k in samples]
        # low-precision models: judge exact rewrites against a float32 copy (see slimline.verify)
        exact_references, exact_rtol = references, None
        if _is_low_precision(model):
            exact_references = _float32_references(model, samples)
            floor = compare_outputs(exact_references[0], references[0], exact=True, rtol=0.0)
            exact_rtol = [max(2 * o.max_rel_error, 1e-3) for o in floor.outputs]
            stage.detail = (f"low precision: float32 reference; noise floor of the original "
                            f"{floor.max_rel_error:.2e}")

    with report.stage("capture") as stage:
        graph = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        report.symbols = [s.name for s in graph.symbols]
        stage.detail = f"{len(graph.fx.nodes)} nodes, {'strict' if strict else 'non-strict'} torch.export"

    def check(candidate: Graph, exact: bool, share: float = 1.0) -> Verification:
        chosen = exact_references if exact else references
        return merge_verifications(
            compare_outputs(reference, candidate.run(a, k), exact=exact,
                            rtol=exact_rtol if exact else None, min_cosine=budget.min_cosine(share))
            for (a, k), reference in zip(samples, chosen))

    with report.stage("verify capture") as stage:
        captured = check(graph, exact=True)
        stage.detail = captured.verdict
        if not captured.passed:
            raise VerificationError(f"the captured graph does not reproduce the model: {captured.verdict}",
                                    stage="capture", where=report.model,
                                    hint="try strict=True, or report the model to slimline")

    with report.stage("passes") as stage:
        context = PassContext(target=target, mode=mode, calibration=samples,
                              reference_outputs=references,
                              extra={"tune": tune, "budget": budget, "choose": tune != "off"})
        original = graph
        graph, history, decisions = run_pipeline(graph, steps, context, check, report)
        applied = [name for name, _ in history.applied]
        stage.detail = f"applied: {', '.join(applied) or 'none'}"

    with report.stage("tune") as stage:
        choice = report.tuning.get("implementations")
        if choice:
            stage.detail = (f"tune={tune!r}: implementation choice in the passes stage "
                            f"({choice['replaced']} of {choice['layers']} layers replaced, "
                            f"{choice['timing']} layer times)")
        else:
            stage.status = "skipped"
            stage.detail = (f"tune={tune!r}: kernels are chosen by the backend below (cpu: each "
                            f"dense layer's kernel; onnxruntime: session options; cuda: Inductor)")

    with report.stage("inventory"):
        _inventory(original, graph, decisions, report)

    with report.stage("backend") as stage:
        runner, facts = _build_backend(graph, target, workdir, tune)
        stage.detail = facts.get("runtime", "")
        if "kernels" in facts:
            report.tuning["kernels"] = facts["kernels"]
            report.tuning["kernel_summary"] = facts.get("kernel_summary", {})
        if "export" in facts:
            report.export = facts["export"]

    with report.stage("verify") as stage:
        exact = report.all_exact
        rtol = _ONNX_RTOL if target == "onnxruntime" and exact else (exact_rtol if exact else None)
        with torch.no_grad():
            final = merge_verifications(
                compare_outputs(reference, runner(*a, **k), exact=exact, rtol=rtol,
                                min_cosine=budget.min_cosine())
                for (a, k), reference in zip(samples, exact_references if exact else references))
        report.verification = final.to_json()
        stage.detail = final.verdict
        if not final.passed:
            report.bisect = bisect_failure(history, lambda g: not check(g, exact).passed)
            where = report.bisect["layer"] or report.bisect["pass"] if report.bisect else target
            error = VerificationError(f"the optimized model fails its final check: {final.verdict}",
                                      stage="verify", where=str(where),
                                      hint=f"exclude the pass named by bisect with passes=[...]; "
                                           f"bisect: {report.bisect}")
            error.report = report
            raise error

    return OptimizedModel(runner, graph, report, target)


def _build_backend(graph: Graph, target: str, workdir: Any, tune: str = "lite") -> tuple[Any, dict]:
    if target == "cpu":
        from slimline.backends import cpu
        return cpu.build(graph, workdir, tune=tune)
    if target == "cuda":
        from slimline.backends import cuda
        return cuda.build(graph, workdir)
    from slimline.backends import ort_target
    return ort_target.build(graph, workdir, tune=tune)


def _inventory(original: Graph, graph: Graph, decisions: list[LayerDecision], report: Report) -> None:
    """Fill the per-layer table and model cost: every linear and attention site, and its fate."""
    from slimline.ir.cost import graph_cost
    from slimline.ir.sites import find_sites

    decided = {(d.module_path, d.op): d for d in decisions}
    for site in find_sites(graph):
        decision = decided.pop((site.module_path, site.kind), None)
        if decision is None:
            decision = LayerDecision(site.module_path, site.kind, "kept", "—",
                                     params_before=site.params, params_after=site.params,
                                     flops_before=str(site.flops), flops_after=str(site.flops),
                                     why_not=_why_kept(site.kind, report.mode))
        report.layers.append(decision)
    report.layers.extend(decided.values())  # decisions for sites that no longer look like sites
    before, _, uncounted_before = graph_cost(original.module, original.rename)
    after, _, uncounted_after = graph_cost(graph.module, graph.rename)
    report.cost = {
        "params_before": original.parameter_count(), "params_after": graph.parameter_count(),
        "flops_before": str(sympy.expand(before.flops)), "flops_after": str(sympy.expand(after.flops)),
        "bytes_before": str(sympy.expand(before.bytes)), "bytes_after": str(sympy.expand(after.bytes)),
        "uncounted_ops": sorted(set(uncounted_before) | set(uncounted_after)),
    }


def _why_kept(kind: str, mode: str) -> str:
    if mode == "lossless" and kind == "linear":
        return "mode 'lossless' allows exact rewrites only"
    return "no pass for this site in the pipeline yet"


def export_onnx(optimized: OptimizedModel, path: str | Path, *, opset: int | None = None) -> dict:
    """Write the optimized graph as ONNX, after checking it in onnxruntime against torch."""
    from slimline.backends.onnx_export import export_onnx_model

    if not isinstance(optimized, OptimizedModel):
        raise InputError(f"export_onnx takes what slimline.optimize returned, got "
                         f"{type(optimized).__name__}", stage="export", where="export_onnx(optimized=...)",
                         hint="opt = slimline.optimize(model, inputs); slimline.export_onnx(opt, path)")
    graph = optimized.graph
    info = export_onnx_model(graph.module, graph.example_args, graph.example_kwargs, path,
                             dynamic_shapes=graph.dynamic_shapes, opset=opset)
    summary = info.to_json() if hasattr(info, "to_json") else dict(vars(info))
    optimized.report.export = summary
    return summary
