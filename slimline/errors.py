"""Errors slimline raises for user mistakes and refused work.

Every error is a :class:`SlimlineError`. Its message says *what* failed, *where* (a stage, a module
path, a graph node or a file) and *what to try*. Internal bugs may still surface as ordinary
exceptions; a user mistake never should.
"""

from __future__ import annotations

__all__ = [
    "SlimlineError",
    "InputError",
    "ConfigError",
    "CaptureError",
    "PassError",
    "VerificationError",
    "BackendError",
    "ExportError",
]


class SlimlineError(Exception):
    """Base of every slimline error: what failed, in which stage, where, and what to try."""

    def __init__(self, message: str, *, stage: str | None = None, where: str | None = None,
                 hint: str | None = None):
        self.message = message
        self.stage = stage
        self.where = where
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.stage:
            parts.append(f"[{self.stage}]")
        parts.append(self.message)
        text = " ".join(parts)
        if self.where:
            text += f"\n  where: {self.where}"
        if self.hint:
            text += f"\n  try: {self.hint}"
        return text


class InputError(SlimlineError):
    """The model or the example inputs handed to slimline are not usable as given."""


class ConfigError(SlimlineError):
    """An unknown target, mode, pass name, budget or option."""


class CaptureError(SlimlineError):
    """torch.export could not capture the model into a graph."""


class PassError(SlimlineError):
    """A graph rewrite failed or was refused."""


class VerificationError(SlimlineError):
    """The optimized model does not compute what the original computes, within tolerance."""


class BackendError(SlimlineError):
    """The requested backend cannot run here (for example, target='cuda' without a GPU)."""


class ExportError(SlimlineError):
    """ONNX export, its onnxruntime check, or writing the file failed."""
