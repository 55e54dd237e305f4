"""The ``onnxruntime`` target: export the rewritten graph, check it in ORT, run it there.

The ONNX file is written (atomically) into ``workdir`` (a fresh temporary directory when none is
given), compared with torch on the example inputs by the exporter, and wrapped in an
:class:`~slimline.backends.onnxruntime.OrtModule` that takes the original model's inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from slimline.ir.graph import Graph

__all__ = ["build"]


def build(graph: Graph, workdir: Any = None) -> tuple[Callable, dict]:
    import onnxruntime

    from slimline.backends.onnx_export import export_onnx_model
    from slimline.backends.onnxruntime import load_ort_module

    directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="slimline-"))
    info = export_onnx_model(graph.module, graph.example_args, graph.example_kwargs,
                             directory / "model.onnx", dynamic_shapes=graph.dynamic_shapes)
    runner = load_ort_module(info.path)
    summary = info.to_json() if hasattr(info, "to_json") else dict(vars(info))
    return runner, {"runtime": f"onnxruntime {onnxruntime.__version__} (CPU), opset {info.opset}",
                    "export": summary}
