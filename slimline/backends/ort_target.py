"""The ``onnxruntime`` target: export, ONNX-level rewrites, a check against torch, tuned sessions.

One step per line of :func:`build`:

1. export the rewritten graph with :func:`~slimline.backends.onnx_export.export_onnx_model`
   (dynamo exporter, checked in onnxruntime against torch, written atomically);
2. apply the ONNX rules of :mod:`slimline.onnx.pipeline` to the written file; when any fired,
   stage the result beside it, run it in onnxruntime (with the settings it will run under) on
   the example inputs, compare every output with torch's, and only then replace the file. A
   rewrite that fails the check is dropped, and the export stays as it was (``rolled back``);
3. choose the session options by measurement (:func:`slimline.onnx.session.choose_settings`;
   ``tune="lite"`` or ``"max"``; ``"cache"`` and ``"off"`` take the measured-once defaults);
4. return a :class:`~slimline.onnx.session.TunedOrtModule` called like the original model.

The file is ``model.onnx`` in ``workdir`` (a fresh temporary directory when none is given), with
``model.onnx.data`` for weights above ~1.8 GB. The summary (``report.export``) holds the export's
own facts plus ``onnx_rules`` (rewrite counts, refusals), ``rewrite_check`` (the check after the
rules) and ``onnxruntime_session`` (the settings chosen and what each candidate measured).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from slimline.ir.graph import Graph

__all__ = ["build", "rewrite_onnx_file"]


def build(graph: Graph, workdir: Any = None, *, tune: str = "lite") -> tuple[Callable, dict]:
    import onnxruntime

    from slimline.backends.onnx_export import export_onnx_model
    from slimline.backends.onnxruntime import input_feed
    from slimline.onnx.session import TunedOrtModule, choose_settings, default_settings

    directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="slimline-"))
    info = export_onnx_model(graph.module, graph.example_args, graph.example_kwargs,
                             directory / "model.onnx", dynamic_shapes=graph.dynamic_shapes)
    summary = info.to_json() if hasattr(info, "to_json") else dict(vars(info))

    reference = _torch_outputs(graph)
    rewrite = rewrite_onnx_file(info.path, graph.example_args, graph.example_kwargs, reference,
                                list(info.output_names), default_settings())
    summary.update(rewrite)

    probe = default_settings().session(info.path)
    feed = input_feed(probe, graph.example_args, graph.example_kwargs)
    del probe
    choice = choose_settings(info.path, feed, tune, add_feeds_norm=rewrite["add_feeds_layer_norm"])
    summary["onnxruntime_session"] = choice.to_json()
    runner = TunedOrtModule(info.path, choice.settings)
    rewrites = sum(rule["rewrites"] for rule in rewrite["onnx_rules"])
    runtime = (f"onnxruntime {onnxruntime.__version__} (CPU), opset {info.opset}, "
               f"{rewrites} ONNX rewrite{'s' if rewrites != 1 else ''}"
               f"{' (rolled back)' if rewrite['rewrite_status'] == 'rolled back' else ''}; "
               f"session: {choice.settings.describe()} ({choice.source})")
    return runner, {"runtime": runtime, "export": summary}


def _torch_outputs(graph: Graph) -> list[np.ndarray]:
    """The module's tensor outputs on the example inputs, flat, in ONNX output order."""
    with torch.no_grad():
        outputs = graph.module(*graph.example_args, **graph.example_kwargs)
    tensors = [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]
    return [t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else
            t.detach().cpu().numpy() for t in tensors]


def rewrite_onnx_file(path: str | Path, args: tuple, kwargs: dict, reference: list[np.ndarray],
                      output_names: list[str], settings: Any) -> dict[str, Any]:
    """Apply the ONNX rules to the file at ``path``; keep the result only if it passes the check.

    Returns the summary entries ``onnx_rules``, ``rewrite_status`` ("applied", "unchanged" or
    "rolled back"), ``rewrite_check`` (per-output errors), ``rewrite_seconds``,
    ``add_feeds_layer_norm`` and, when applied, the new ``op_histogram`` and ``file_size``.
    """
    import onnx_ir as ir

    from slimline.backends.onnxruntime import input_feed, onnx_op_histogram
    from slimline.onnx.check import compare_arrays, describe_failures
    from slimline.onnx.files import staged_model
    from slimline.onnx.pipeline import add_feeds_layer_norm, run_rules

    started = time.perf_counter()
    path = Path(path)
    model = ir.load(path)
    results = run_rules(model)
    summary: dict[str, Any] = {"onnx_rules": [result.to_json() for result in results],
                               "rewrite_check": [], "add_feeds_layer_norm": add_feeds_layer_norm(model)}
    if not any(result.rewrites for result in results):
        summary.update(rewrite_status="unchanged", rewrite_seconds=time.perf_counter() - started)
        return summary
    external = path.with_name(path.name + ".data").exists()
    with staged_model(model, path, external_data=external) as staged:
        try:
            session = settings.session(staged.model)
            outputs = session.run(None, input_feed(session, args, kwargs))
            checks = compare_arrays(output_names, reference, outputs)
            problem = describe_failures(checks)
        except Exception as error:  # a rewrite ORT cannot load or run: keep the export
            checks, problem = [], f"onnxruntime fails on the rewritten model: " \
                                  f"{str(error).strip().splitlines()[0][:300]}"
        summary["rewrite_check"] = [vars(check) for check in checks]
        if problem:
            summary.update(rewrite_status="rolled back", rewrite_problem=problem,
                           rewrite_seconds=time.perf_counter() - started)
            return summary
        del session
        staged.publish()
        summary.update(rewrite_status="applied", op_histogram=onnx_op_histogram(path),
                       file_size=staged.size, rewrite_seconds=time.perf_counter() - started)
    return summary
