"""Compare onnxruntime outputs with reference outputs, output by output.

The judgement of :mod:`slimline.backends.onnx_export`: ``|actual - reference| <= atol + rtol ·
|reference|`` element-wise, per-dtype defaults (float32: rtol 1e-4, atol 1e-5), NaN equal to NaN,
and the same shape and dtype; ``max_rel_error`` is the largest error over the largest
``|reference|`` of that output.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from slimline.backends.onnx_export import OutputCheck

__all__ = ["TOLERANCES", "compare_arrays", "describe_failures"]

# (rtol, atol) by numpy dtype kind and size
TOLERANCES = {
    np.dtype(np.float64): (1e-6, 1e-8),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float16): (1e-2, 1e-3),
}


def compare_arrays(names: Sequence[str], reference: Sequence[np.ndarray],
                   actual: Sequence[np.ndarray], *, rtol: float | None = None,
                   atol: float | None = None) -> list[OutputCheck]:
    return [_compare(name, np.asarray(expected), np.asarray(found), rtol, atol)
            for name, expected, found in zip(names, reference, actual)]


def _compare(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float | None,
             atol: float | None) -> OutputCheck:
    default_rtol, default_atol = TOLERANCES.get(expected.dtype, (0.0, 0.0))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    shape = tuple(expected.shape)
    problem = ""
    if tuple(actual.shape) != shape:
        problem = f"shape {tuple(actual.shape)}, expected {shape}"
    elif actual.dtype != expected.dtype:
        problem = f"dtype {actual.dtype}, expected {expected.dtype}"
    if problem:
        return OutputCheck(name, shape, str(expected.dtype), math.inf, math.inf, rtol, atol,
                           False, problem)
    if actual.size == 0:
        return OutputCheck(name, shape, str(expected.dtype), 0.0, 0.0, rtol, atol, True)
    if expected.dtype.kind not in "fc":  # integers, booleans: equal or not
        equal = bool(np.array_equal(expected, actual))
        return OutputCheck(name, shape, str(expected.dtype), 0.0 if equal else math.inf,
                           0.0 if equal else math.inf, rtol, atol, equal,
                           "" if equal else "values differ")
    ours, theirs = actual.astype(np.float64), expected.astype(np.float64)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    difference = np.nan_to_num(np.where(same, 0.0, np.abs(ours - theirs)), nan=math.inf)
    max_abs = float(difference.max())
    finite = np.abs(theirs[np.isfinite(theirs)])
    scale = float(finite.max()) if finite.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = bool(np.all(difference <= atol + rtol * np.abs(np.nan_to_num(theirs))))
    return OutputCheck(name, shape, str(expected.dtype), max_abs, max_rel, rtol, atol, passed)


def describe_failures(checks: Sequence[OutputCheck]) -> str:
    failed = [check for check in checks if not check.passed]
    return "; ".join(
        f"{check.name}: {check.problem or f'max abs error {check.max_abs_error:.3g}, max rel error {check.max_rel_error:.3g}'}"
        f" (rtol {check.rtol:g}, atol {check.atol:g})" for check in failed)
