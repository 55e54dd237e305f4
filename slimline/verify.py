"""Verification: does the optimized model still compute what the original computes?

Two vocabularies, never mixed:

* **exact** rewrites are judged by max abs / max relative error against a per-dtype tolerance,
  and only they may be called *equivalent*;
* **approximate** rewrites are judged by SQNR, cosine similarity and a task metric against an
  accuracy :class:`~slimline.budget.Budget`; the verdict says how far, and whether inside budget.

Relative error here is ``max|out - ref| / max|ref|`` per output tensor: scale-aware, and strict.

Low-precision models (bf16/fp16 weights): two correct programs for the same function differ by
their rounding, which grows with depth. There an exact rewrite is judged against a float32 copy
of the original model: its error may be at most twice the original low-precision model's own
error against that copy (the "noise floor"), and never needs to beat 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["OutputComparison", "Verification", "compare_outputs", "exact_tolerance",
           "verify", "find_non_finite", "merge_verifications", "LOW_PRECISION"]

LOW_PRECISION = (torch.float16, torch.bfloat16)

# relative tolerance for rewrites that are exact up to floating-point reassociation
_EXACT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def exact_tolerance(dtype: torch.dtype) -> float:
    return _EXACT_RTOL.get(dtype, 0.0)


@dataclass
class OutputComparison:
    """How one output tensor of the optimized model compares with the original's."""

    index: int
    shape: list[int]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    sqnr_db: float
    tolerance: float
    within_tolerance: bool

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


@dataclass
class Verification:
    """Per-output comparison and an overall verdict in the right vocabulary."""

    exact: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    task_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    structure_matches: bool = True
    note: str = ""

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def passed(self) -> bool:
        return self.structure_matches and all(o.within_tolerance for o in self.outputs)

    @property
    def verdict(self) -> str:
        if not self.structure_matches:
            return "outputs differ in structure: " + self.note
        if self.exact:
            if self.passed:
                return f"equivalent (exact rewrites; max relative error {self.max_rel_error:.2e})"
            return f"NOT equivalent: max relative error {self.max_rel_error:.2e} exceeds tolerance"
        state = "inside" if self.passed else "OUTSIDE"
        return (f"approximate: min cosine {self.min_cosine:.6f}, max relative error "
                f"{self.max_rel_error:.2e}; {state} budget")

    def to_json(self) -> dict:
        return {"exact": self.exact, "passed": self.passed, "verdict": self.verdict,
                "max_rel_error": self.max_rel_error, "min_cosine": self.min_cosine,
                "outputs": [o.to_json() for o in self.outputs],
                "task_metrics": self.task_metrics}


def merge_verifications(results: Any) -> Verification | None:
    """One verification over several samples: every output of every sample, structure of all."""
    merged: Verification | None = None
    for result in results:
        if merged is None:
            merged = result
        else:
            merged.outputs.extend(result.outputs)
            merged.structure_matches &= result.structure_matches
    return merged


def _float_leaves(outputs: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)], spec


def compare_outputs(reference: Any, candidate: Any, *, exact: bool,
                    rtol: float | list[float] | None = None,
                    min_cosine: float | None = None) -> Verification:
    """Compare two output structures tensor by tensor.

    ``exact``: each output must be within ``rtol`` (default: per-dtype exact tolerance; a list
    gives one tolerance per output tensor).
    Approximate: each output must reach ``min_cosine`` (default 0.99) — task metrics are judged
    separately by the budget.
    """
    ref_leaves, _ = _float_leaves(reference)
    out_leaves, _ = _float_leaves(candidate)
    result = Verification(exact=exact)
    if len(ref_leaves) != len(out_leaves):
        result.structure_matches = False
        result.note = f"{len(ref_leaves)} output tensors expected, {len(out_leaves)} produced"
        return result
    for index, (ref, out) in enumerate(zip(ref_leaves, out_leaves)):
        out = out.detach().to("cpu")
        ref = ref.detach().to("cpu")
        if ref.shape != out.shape:
            result.structure_matches = False
            result.note = f"output {index}: shape {list(out.shape)} != {list(ref.shape)}"
            return result
        tolerance = rtol[index] if isinstance(rtol, (list, tuple)) else rtol
        result.outputs.append(_compare_tensor(index, ref, out, exact, tolerance, min_cosine))
    return result


def _compare_tensor(index: int, ref: torch.Tensor, out: torch.Tensor, exact: bool,
                    rtol: float | None, min_cosine: float | None) -> OutputComparison:
    if not ref.is_floating_point():
        equal = bool(torch.equal(ref, out))
        error = 0.0 if equal else float((ref.double() - out.double()).abs().max())
        return OutputComparison(index, list(ref.shape), str(ref.dtype), error, 0.0 if equal else math.inf,
                                1.0 if equal else 0.0, math.inf if equal else 0.0, 0.0, equal)
    ref64, out64 = ref.double(), out.double()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return OutputComparison(index, list(ref.shape), str(ref.dtype), math.inf, math.inf, 0.0,
                                -math.inf, rtol or 0.0, False)
    diff = (out64 - ref64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    noise = float((out64 - ref64).pow(2).sum())
    signal = float(ref64.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    denominator = math.sqrt(signal) * float(out64.pow(2).sum().sqrt())
    cosine = 1.0 if noise == 0 else (float((ref64 * out64).sum()) / denominator if denominator else 0.0)
    if exact:
        tolerance = rtol if rtol is not None else exact_tolerance(ref.dtype)
        within = max_rel <= tolerance
    else:
        tolerance = min_cosine if min_cosine is not None else 0.99
        within = cosine >= tolerance
    return OutputComparison(index, list(ref.shape), str(ref.dtype), max_abs, max_rel, cosine, sqnr,
                            tolerance, within)


def find_non_finite(named_tensors: Any) -> list[str]:
    """Names of the floating tensors holding NaN or inf, from ``(name, tensor)`` pairs."""
    return [name for name, tensor in named_tensors
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())]


def verify(model: torch.nn.Module, optimized: Any, inputs: Any, *, rtol: float | None = None,
           budget: Any = None) -> Verification:
    """Compare ``optimized`` with ``model`` on ``inputs``, per output.

    ``optimized`` is what :func:`slimline.optimize` returned (or any callable). Exact when every
    rewrite applied was exact; then the verdict may say "equivalent". With a ``budget`` whose
    metric is a task metric, its before/after figures are reported too.
    """
    from slimline.ir.capture import normalize_inputs

    args, kwargs = normalize_inputs(model, inputs)
    report = getattr(optimized, "report", None)
    exact = bool(report.all_exact) if report is not None else True
    with torch.no_grad():
        reference = model(*args, **kwargs)
        candidate = optimized(*args, **kwargs)
    result = compare_outputs(reference, candidate, exact=exact, rtol=rtol)
    if budget is not None:
        result.task_metrics[budget.metric_name] = budget.measure(model, optimized)
    return result
