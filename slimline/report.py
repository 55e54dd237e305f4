"""The report: what slimline changed, what it cost, what it gained, and the proof.

``Report.to_json()`` schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "model": str, "target": str, "mode": str,
      "versions": {"slimline", "torch", "onnx", "onnxruntime", "python"},
      "symbols": [str],                       # dynamic dimensions, e.g. ["batch", "seq"]
      "stages": [{"name", "seconds", "status": "ok"|"failed"|"skipped", "detail"}],
      "passes": [{"name", "exact", "status": "applied"|"unchanged"|"skipped"|"rolled back",
                  "reason", "seconds", "stats": {str: number}, "verification": {...}|null}],
      "layers": [{"module_path", "op": "linear"|"attention"|..., "decision", "pass_name",
                  "params_before", "params_after", "flops_before", "flops_after",   # sympy text
                  "error", "why_not"}],
      "cost": {"params_before", "params_after", "flops_before", "flops_after",
               "bytes_before", "bytes_after", "uncounted_ops": [str]},   # sympy text
      "verification": {... see slimline.verify.Verification.to_json ...} | null,
      "bisect": {"pass", "layer", "detail"} | null,
      "export": {...} | null,
      "notes": [str],
      "tuning": {"implementations": {...}, "kernels": [...]}   # see slimline.autotune; {} if none
    }

``Report.table()`` renders the same as text for a terminal.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from slimline.passes.base import LayerDecision

__all__ = ["Report", "StageRecord", "PassRecord", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    status: str = "ok"
    detail: str = ""


@dataclass
class PassRecord:
    name: str
    exact: bool
    status: str
    reason: str = ""
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    verification: dict | None = None


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("slimline", "torch", "onnx", "onnxruntime", "onnxscript", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass
class Report:
    model: str
    target: str
    mode: str
    symbols: list[str] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    layers: list[LayerDecision] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    verification: dict | None = None
    bisect: dict | None = None
    export: dict | None = None
    notes: list[str] = field(default_factory=list)
    tuning: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=_versions)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time a stage; a stage that raises is recorded as failed and the error propagates."""
        record = StageRecord(name)
        self.stages.append(record)
        start = time.perf_counter()
        try:
            yield record
        except BaseException as error:
            record.status = "failed"
            record.detail = record.detail or str(error).splitlines()[0][:200]
            raise
        finally:
            record.seconds = time.perf_counter() - start

    @property
    def all_exact(self) -> bool:
        """True when every pass that changed the graph is exact."""
        return all(p.exact for p in self.passes if p.status == "applied")

    # -- output --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model, "target": self.target, "mode": self.mode,
            "versions": self.versions, "symbols": self.symbols,
            "stages": [asdict(s) for s in self.stages],
            "passes": [asdict(p) for p in self.passes],
            "layers": [layer.to_json() for layer in self.layers],
            "cost": self.cost, "verification": self.verification, "bisect": self.bisect,
            "export": self.export, "notes": self.notes, "tuning": self.tuning,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str)

    def write_json(self, path) -> None:
        from slimline.fileio import atomic_write_text

        atomic_write_text(path, self.dumps() + "\n", stage="report")

    def table(self, max_layers: int = 40) -> str:
        """The report as text: stages, passes, layers, verification."""
        lines = [f"slimline report — {self.model} → target={self.target}, mode={self.mode}"]
        if self.symbols:
            lines.append(f"dynamic dimensions: {', '.join(self.symbols)}")
        lines.append("")
        lines.append(_grid(["stage", "status", "seconds", "detail"],
                           [[s.name, s.status, f"{s.seconds:.2f}", s.detail] for s in self.stages]))
        lines.append("")
        lines.append(_grid(["pass", "kind", "status", "stats / reason"],
                           [[p.name, "exact" if p.exact else "approx", p.status,
                             p.reason or _stats_text(p.stats)] for p in self.passes]))
        if self.layers:
            lines.append("")
            shown = self.layers[:max_layers]
            rows = [[d.module_path or "(top)", d.op, d.decision, f"{d.params_before}→{d.params_after}",
                     _short(d.flops_after), "" if d.error is None else f"{d.error:.1e}",
                     d.why_not or ""] for d in shown]
            lines.append(_grid(["layer", "op", "decision", "params", "FLOPs", "error", "why not"], rows))
            if len(self.layers) > max_layers:
                lines.append(f"… {len(self.layers) - max_layers} more layers in report.json")
        if self.cost:
            lines.append("")
            lines.append(f"parameters: {self.cost.get('params_before')} → {self.cost.get('params_after')}"
                         f"   FLOPs: {_short(self.cost.get('flops_before', ''))} → "
                         f"{_short(self.cost.get('flops_after', ''))}")
        choice = self.tuning.get("implementations")
        if choice:
            mix = ", ".join(f"{label}: {count}" for label, count in choice["by_option"].items())
            lines.append(f"implementation choice: {choice['replaced']} of {choice['layers']} layers "
                         f"replaced ({mix or 'none'}); loss {choice['measured_loss']:.2e} of "
                         f"{choice['budget_limit']:.2e} ({choice['timing']} layer times "
                         f"{choice['layers_ms_before']:.3g} → {choice['layers_ms_after']:.3g} ms)")
        kernels = self.tuning.get("kernels")
        if kernels:
            lines.append("")
            rows = [[k["instance"], k["family"], k["winner"], k["baseline"],
                     "" if k.get("gain") is None else f"{k['gain']:.2f}x", str(k.get("tried", 0)),
                     "hit" if k.get("cache_hit") else k.get("source", "")] for k in kernels[:max_layers]]
            lines.append(_grid(["kernel instance", "family", "winner", "baseline", "gain", "tried",
                                "cache"], rows))
        if self.verification:
            lines.append(f"verification: {self.verification.get('verdict')}")
        if self.bisect:
            lines.append(f"bisect: first failing pass {self.bisect.get('pass')!r}, "
                         f"layer {self.bisect.get('layer')!r} — {self.bisect.get('detail')}")
        if self.export:
            checks = self.export.get("output_checks") or []
            worst = max((c.get("max_rel_error") or 0.0 for c in checks), default=float("nan"))
            lines.append(f"onnx: {self.export.get('path')} (opset {self.export.get('opset')}, "
                         f"checked in onnxruntime: max relative error {worst:.1e})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _short(text: Any, width: int = 34) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _stats_text(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if v) or "—"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(header)]
    widths = [min(w, 48) for w in widths]

    def fmt(row):
        return "  ".join(_short(c, widths[i]).ljust(widths[i]) for i, c in enumerate(row)).rstrip()

    return "\n".join([fmt(header), fmt(["─" * w for w in widths])] + [fmt(r) for r in rows])
