"""Compare onnxruntime outputs with reference outputs, output by output.

The judgement of :mod:`slimline.backends.onnx_export`: ``|actual - reference| <= atol + rtol ·
|reference|`` element-wise, per-dtype defaults (float32: rtol 1e-4, atol 1e-5), NaN equal to NaN,
and the same shape and dtype; ``max_rel_error`` is the largest error over the largest
``|reference|`` of that output.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slimline.backends.onnx_export import OutputCheck, compare_array

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
    return compare_array(name, expected, actual, default_rtol if rtol is None else rtol,
                         default_atol if atol is None else atol)


def describe_failures(checks: Sequence[OutputCheck]) -> str:
    failed = [check for check in checks if not check.passed]
    return "; ".join(
        f"{check.name}: {check.problem or f'max abs error {check.max_abs_error:.3g}, max rel error {check.max_rel_error:.3g}'}"
        f" (rtol {check.rtol:g}, atol {check.atol:g})" for check in failed)
