"""The accuracy budget lossy passes spend.

``Budget(metric="cosine", max_loss=0.01)`` says how much worse the optimized model may be, in one
metric. A metric is a name from :data:`METRICS` or any callable ``metric(model, inputs) -> float``
(lower is better unless ``higher_is_better=True``). ``max_loss`` is a *relative* loss for task
metrics (0.01: bits/byte may rise by 1%), and ``1 - cosine`` for the output-cosine metric.

Task metrics over real data (bits/byte on held-out text, accuracy, embedding agreement) are
registered by the quality harness in ``slimline.models``; the tensor metrics here need no data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from slimline.errors import ConfigError

__all__ = ["Budget", "METRICS", "register_metric", "MODE_BUDGETS"]

# name -> (callable(model, inputs) -> float, higher_is_better); filled by the quality harness
METRICS: dict[str, tuple[Callable[..., float], bool]] = {}

_OUTPUT_METRICS = ("cosine", "rel_error")


def _register_task_metrics() -> None:
    """Import the quality harness, which registers the task metrics (bits_per_byte, accuracy…)."""
    import slimline.models.quality  # noqa: F401


def register_metric(name: str, function: Callable[..., float], *, higher_is_better: bool) -> None:
    METRICS[name] = (function, higher_is_better)


@dataclass
class Budget:
    """How much accuracy lossy rewrites may spend, measured in one metric."""

    metric: str | Callable[..., float] = "cosine"
    max_loss: float = 0.01
    higher_is_better: bool | None = None
    inputs: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_loss, (int, float)) and 0 <= self.max_loss < 1):
            raise ConfigError(f"Budget.max_loss must be a fraction in [0, 1), got {self.max_loss!r}",
                              stage="configure", where="Budget",
                              hint="write 1% as max_loss=0.01")
        if isinstance(self.metric, str) and self.metric not in _OUTPUT_METRICS \
                and self.metric not in METRICS:
            _register_task_metrics()
        if isinstance(self.metric, str) and self.metric not in _OUTPUT_METRICS \
                and self.metric not in METRICS:
            valid = ", ".join(sorted({*_OUTPUT_METRICS, *METRICS}))
            raise ConfigError(f"unknown budget metric {self.metric!r}", stage="configure",
                              where="Budget.metric", hint=f"use one of: {valid}, or a callable")

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "custom")

    @property
    def is_output_metric(self) -> bool:
        return self.metric in _OUTPUT_METRICS

    def min_cosine(self, share: float = 1.0) -> float:
        """The output cosine an approximate step must keep when it spends ``share`` of the budget."""
        return 1.0 - self.max_loss * share if self.metric == "cosine" else 0.9

    def measure(self, original: Any, optimized: Any) -> dict[str, float]:
        """The task metric on both models and the relative loss (for task metrics only)."""
        if self.is_output_metric:
            return {}
        function, higher = (self.metric, bool(self.higher_is_better)) if callable(self.metric) \
            else METRICS[self.metric]
        before = float(function(original, self.inputs))
        after = float(function(optimized, self.inputs))
        loss = (before - after) / abs(before) if higher else (after - before) / abs(before)
        return {"before": before, "after": after, "relative_loss": loss,
                "max_loss": self.max_loss, "within_budget": float(loss <= self.max_loss)}


# mode presets, like Optimum's O1–O4: which budget the lossy passes may spend by default
MODE_BUDGETS = {
    "lossless": None,
    "balanced": Budget("cosine", 0.01),
    "max": Budget("cosine", 0.05),
}
