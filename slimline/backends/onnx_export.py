"""Export a (rewritten) model to ONNX, check it in onnxruntime, then write it atomically.

The flow, one step per line of :func:`export_onnx_model`:

1. check the destination (a writable directory, or one that can be created) before any work;
2. run the module on the example inputs: the reference outputs, their pytree structure and the
   ONNX output names (``logits``, ``aux.0``…) come from here;
3. re-capture with ``torch.export.export(strict=False)`` — an ``ep.module()`` GraphModule
   re-exports cleanly, with the caller's ``dynamic_shapes`` translated to its signature;
4. ``torch.onnx.export(ExportedProgram, dynamo=True, optimize=True)``: translation plus the
   exporter's own optimizer (onnxscript: constant folding, dead code, function inlining);
5. save into a temporary directory next to the destination (weights as external data above
   ~1.8 GB, or when asked), load that file in an onnxruntime CPU session, run the example inputs
   and compare every output with torch;
6. only then ``os.replace`` the external data and the model into place. On any failure the
   temporary directory is removed and an existing file at the destination is left untouched.

Opset: by default the highest that torch's exporter emits (it builds at torchlib's opset 18 and
converts with onnxscript's version converter, whose maximum bounds it; 25 here), that onnxruntime
loads (probed once; 28 for ORT 1.32) and at which ORT has CPU *kernels* for the common ops
(:data:`CORE_OPS`). The last condition matters: ORT matches a kernel registered "from version
24 on" only to version 24 of an op, so a newer version with no kernel of its own (Attention-25)
runs as its ONNX function body — 80 nodes instead of one for a small attention block, and
slower. Opset 24 it is, with ORT 1.32. After conversion the graph's own ops are checked the same way and the opset
lowered when one lacks a kernel; when the file fails to load in ORT, 23 and then 18 are tried.
:attr:`ExportInfo.opset_source` says what happened. Opset ≥ 23 turns
``scaled_dot_product_attention`` into ONNX ``Attention`` and ``rms_norm`` into
``RMSNormalization`` (a hand-written RMSNorm, as in Hugging Face Llama, stays Pow/ReduceMean).

The output pytree spec is stored in the file's metadata (``slimline.output_spec``) so that
:class:`~slimline.backends.onnxruntime.OrtModule` rebuilds the model's own output structure.
The exporter's warnings and log lines are collected into :attr:`ExportInfo.warnings`, not printed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.dynamic_shapes import _DimHint

from slimline.backends.onnxruntime import (
    NONE_LEAVES_KEY,
    OUTPUT_SPEC_KEY,
    dump_output_spec,
    flat_input_tensors,
    input_feed,
    make_session,
    missing_cpu_kernels,
    onnx_op_histogram,
)
from slimline.errors import ExportError, InputError

__all__ = [
    "ExportInfo",
    "OutputCheck",
    "compare_array",
    "export_onnx_model",
    "default_opset",
    "exporter_max_opset",
    "onnxruntime_max_opset",
    "onnxruntime_kernel_opset",
]

STAGE = "export"
LARGE_MODEL_BYTES = 1_800_000_000  # protobuf caps a file at 2 GiB; leave room for the graph
FALLBACK_OPSETS = (23, 18)  # 23: first with Attention/RMSNormalization; 18: torchlib's own
TORCHLIB_OPSET = 18  # the opset torch's ONNX functions are written in

# (rtol, atol) per output dtype when the caller gives none
DEFAULT_TOLERANCES = {
    torch.float64: (1e-6, 1e-8),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


@dataclass(frozen=True)
class OutputCheck:
    """One ONNX output compared with torch on the example inputs.

    ``max_rel_error`` is ``max_abs_error`` over the largest ``|torch value|`` of that output;
    ``passed`` is the element-wise test ``|ort - torch| <= atol + rtol * |torch|`` (NaN where
    both are NaN counts as equal), plus equal shape and dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    passed: bool
    problem: str = ""  # shape or dtype mismatch, in words


@dataclass
class ExportInfo:
    """What :func:`export_onnx_model` wrote and how it checked out."""

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # name -> {axis: symbol}, inputs and outputs
    output_checks: tuple[OutputCheck, ...]  # empty when check=False
    op_histogram: dict[str, int]  # ONNX op type -> count, in the written graph
    file_size: int  # bytes: the model file plus its external data
    seconds: float
    external_data_path: Path | None = None
    opset_source: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # capture, convert, check, write
    warnings: tuple[str, ...] = ()
    output_spec: pytree.TreeSpec | None = field(default=None, repr=False, compare=False)

    @property
    def max_abs_error(self) -> float:
        return max((check.max_abs_error for check in self.output_checks), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((check.max_rel_error for check in self.output_checks), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, like ``Report.to_json`` (paths as strings, the spec as JSON text)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["external_data_path"] = (str(self.external_data_path)
                                      if self.external_data_path else None)
        data["output_spec"] = dump_output_spec(self.output_spec) if self.output_spec else None
        data["dynamic_axes"] = {name: {str(axis): symbol for axis, symbol in axes.items()}
                                for name, axes in self.dynamic_axes.items()}
        return data


# ---------------------------------------------------------------------------------------------
# opsets


def exporter_max_opset() -> int:
    """The highest opset ``torch.onnx.export(dynamo=True)`` can emit here."""
    try:  # the exporter reaches opsets above torchlib's through this converter
        from onnxscript.version_converter import _version_converter
        converter_max = int(_version_converter.SUPPORTED_MAX_ONNX_OPSET)
    except (ImportError, AttributeError):
        converter_max = int(torch.onnx._constants.ONNX_MAX_OPSET)
    return min(converter_max, onnx.defs.onnx_opset_version())


@functools.lru_cache(maxsize=None)
def onnxruntime_max_opset() -> int:
    """The highest default-domain opset the installed onnxruntime loads (probed once)."""
    for version in range(onnx.defs.onnx_opset_version(), 17, -1):
        value_x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        value_y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                       "probe", [value_x], [value_y])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", version)],
                                       ir_version=10)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception:  # "opset N is not supported": try the next lower one
            continue
        return version
    return 17


# Ops torch's exporter emits for common models. ORT registers a kernel per op version, and a new
# version without a kernel runs as its ONNX function body (Attention-25 in ORT 1.32: a 4x larger,
# slower graph), so the default opset is the highest at which ORT has CPU kernels for all of them.
CORE_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf",
    "Tanh", "Sigmoid", "Relu", "Gelu", "Clip", "Max", "Min", "MatMul", "Gemm", "Conv",
    "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "RMSNormalization", "Attention", "Softmax",
    "LogSoftmax", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
    "Slice", "Gather", "GatherElements", "GatherND", "ScatterND", "Expand", "Tile", "Pad",
    "Shape", "Size", "Cast", "ConstantOfShape", "Identity", "Range", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "Not", "And", "Or", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceMin", "ArgMax", "CumSum", "Trilu", "TopK", "Einsum", "Resize", "If",
)


def onnxruntime_kernel_opset(op_types: Any = CORE_OPS, *, below: int | None = None) -> int | None:
    """The highest opset (at most ``below``, at least torchlib's 18) at which ORT's CPU provider
    has a kernel for the version of every op in ``op_types``; ``None`` when there is none."""
    top = min(exporter_max_opset(), onnxruntime_max_opset())
    if below is not None:
        top = min(top, below)
    for version in range(top, TORCHLIB_OPSET - 1, -1):
        if not missing_cpu_kernels(op_types, version):
            return version
    return None


def default_opset() -> int:
    """The highest opset that torch's exporter emits and the installed onnxruntime both loads
    and has CPU kernels for (for :data:`CORE_OPS`)."""
    return onnxruntime_kernel_opset() or min(exporter_max_opset(), onnxruntime_max_opset())


def _default_opset_source() -> str:
    return (f"default: the exporter emits up to opset {exporter_max_opset()}, onnxruntime "
            f"{ort.__version__} loads up to {onnxruntime_max_opset()} and has CPU kernels for "
            f"the common ops up to {default_opset()}")


def _graph_op_types(model: ir.Model) -> set[str]:
    """Default-domain op types in the graph, subgraphs and functions included."""
    found = {node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph)
             if node.domain in ("", "ai.onnx")}
    for function in model.functions.values():
        found |= {node.op_type for node in function if node.domain in ("", "ai.onnx")}
    return found


# ---------------------------------------------------------------------------------------------
# the entry point


def export_onnx_model(gm: torch.nn.Module | torch.export.ExportedProgram, args: tuple,
                      kwargs: dict | None, path: str | os.PathLike, *,
                      dynamic_shapes: Any = None, opset: int | None = None, check: bool = True,
                      rtol: float | None = None, atol: float | None = None,
                      external_data: bool | None = None, optimize: bool = True) -> ExportInfo:
    """Export ``gm`` to ONNX at ``path``, checked in onnxruntime against torch before writing.

    ``gm`` is usually the rewritten ``ep.module()`` GraphModule (any ``nn.Module`` or an
    ``ExportedProgram`` works); ``args``/``kwargs`` are example inputs of the same structure the
    model was captured with; ``dynamic_shapes`` is in ``torch.export``'s form (``Dim`` objects or
    plain strings as dimension names), as used at capture. ``opset=None`` picks
    :func:`default_opset`. ``rtol``/``atol`` of ``None`` use :data:`DEFAULT_TOLERANCES` per
    output dtype. ``external_data=None`` writes weights to ``<path>.data`` only above
    :data:`LARGE_MODEL_BYTES`. Every failure raises :class:`~slimline.errors.ExportError`.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    path = _check_destination(path)
    args, kwargs = tuple(args), dict(kwargs or {})
    module = gm.module() if isinstance(gm, torch.export.ExportedProgram) else gm

    reference, output_paths, output_spec, none_leaves = _reference_outputs(module, args, kwargs)

    clock = time.perf_counter()
    exported, input_names, axis_names = _capture(gm, args, kwargs, dynamic_shapes)
    timings["capture"] = time.perf_counter() - clock
    output_names = _output_names(output_paths, input_names)

    version = int(opset) if opset is not None else default_opset()
    opset_source = "requested" if opset is not None else _default_opset_source()
    tried: list[int] = []
    caught: list[str] = []
    created = _make_directories(path.parent)
    staged = None
    try:
        while True:
            tried.append(version)
            clock = time.perf_counter()
            program, messages = _convert(exported, version, output_names, optimize)
            caught += messages
            program.model.metadata_props.update(_metadata(output_spec, none_leaves))
            if axis_names:
                program.rename_axes(axis_names)
            timings["convert"] = timings.get("convert", 0.0) + time.perf_counter() - clock
            graph_ops = _graph_op_types(program.model)
            missing = missing_cpu_kernels(graph_ops, version)
            if missing:
                lower = None if opset is not None else \
                    onnxruntime_kernel_opset(graph_ops, below=version - 1)
                if lower is not None:
                    opset_source += (f"; lowered from {version} to {lower}: ORT has no CPU kernel "
                                     f"for {', '.join(missing)}")
                    version = lower
                    continue
                caught.append(f"onnxruntime has no CPU kernel for {', '.join(missing)} at opset "
                              f"{version}: it runs them as their ONNX function bodies (slower)")
            use_external = external_data if external_data is not None else \
                _initializer_bytes(program.model) > LARGE_MODEL_BYTES
            with _staged(program.model, path, use_external) as staged:
                clock = time.perf_counter()
                try:
                    checks = _check_in_onnxruntime(staged.model, args, kwargs, reference,
                                                   output_names, rtol, atol) if check else []
                except _LoadFailure as failure:
                    lower_opsets = [v for v in FALLBACK_OPSETS if v < version and v not in tried]
                    if opset is None and lower_opsets:
                        opset_source += (f"; fell back from {version} to {lower_opsets[0]}: "
                                         f"{failure.reason}")
                        version = lower_opsets[0]
                        continue
                    raise failure.error from failure.__cause__
                finally:
                    timings["check"] = timings.get("check", 0.0) + time.perf_counter() - clock
                clock = time.perf_counter()
                proto = onnx.load(str(staged.model), load_external_data=False)
                staged.publish()
                timings["write"] = time.perf_counter() - clock
            break
    finally:
        if staged is None or not staged.published:
            _remove_directories(created)

    return ExportInfo(
        path=path,
        opset=version,
        input_names=tuple(value.name for value in proto.graph.input),
        output_names=tuple(value.name for value in proto.graph.output),
        dynamic_axes=_dynamic_axes(proto),
        output_checks=tuple(checks),
        op_histogram=onnx_op_histogram(proto),
        file_size=staged.size,
        seconds=time.perf_counter() - started,
        external_data_path=staged.final_data,
        opset_source=opset_source,
        timings=timings,
        warnings=tuple(dict.fromkeys(caught)),
        output_spec=output_spec,
    )


# ---------------------------------------------------------------------------------------------
# 1. destination


def _check_destination(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"the destination {str(path)!r} is a directory", stage=STAGE,
                          where=str(path), hint="give a file path such as model.onnx")
    existing = path.parent if str(path.parent) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(
            f"cannot write {str(path)!r}: {str(existing)!r} is a file, not a directory",
            stage=STAGE, where=str(path), hint="choose a path inside a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(
            f"cannot write {str(path)!r}: directory {str(existing)!r} is not writable",
            stage=STAGE, where=str(path),
            hint="choose a writable output directory or fix its permissions")
    return path


# ---------------------------------------------------------------------------------------------
# 2. reference outputs and output names


def _reference_outputs(module: torch.nn.Module, args: tuple, kwargs: dict
                       ) -> tuple[list[torch.Tensor], list[str], pytree.TreeSpec, list[int]]:
    """Tensor outputs, their names (pytree paths), the output spec, indices of None leaves."""
    try:
        with torch.no_grad():
            outputs = module(*args, **kwargs)
    except Exception as error:
        raise ExportError(
            f"the module fails on the example inputs: {type(error).__name__}: {_first_line(error)}",
            stage=STAGE, where=type(module).__name__,
            hint="pass example inputs of the structure the model was captured with") from error
    leaves_with_paths, spec = pytree.tree_flatten_with_path(outputs)
    tensors, paths, none_leaves = [], [], []
    for index, (key_path, leaf) in enumerate(leaves_with_paths):
        name = _path_name(key_path)
        if leaf is None:  # no ONNX output; OrtModule puts the None back
            none_leaves.append(index)
        elif isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            paths.append(name)
        else:
            raise ExportError(
                f"output {name!r} is a {type(leaf).__name__}, not a tensor; ONNX outputs are "
                f"tensors", stage=STAGE, where=f"output {name!r}",
                hint="return only tensors (or containers of tensors) from forward()")
    if not tensors:
        raise ExportError("the module returns no tensor", stage=STAGE, where="outputs",
                          hint="return the model's result from forward()")
    return tensors, paths, spec, none_leaves


def _path_name(key_path: tuple) -> str:
    parts = []
    for key in key_path:
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def _output_names(paths: list[str], input_names: list[str]) -> list[str]:
    """ONNX output names from pytree paths: ``logits``, ``aux.0``; ``output`` / ``output_1``."""
    names: list[str] = []
    taken = set(input_names)
    for path in paths:
        name = re.sub(r"[^A-Za-z0-9_.]", "_", path) or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        unique, counter = name, 1
        while unique in taken:
            unique, counter = f"{name}_{counter}", counter + 1
        taken.add(unique)
        names.append(unique)
    return names


# ---------------------------------------------------------------------------------------------
# 3. capture


def _capture(gm: torch.nn.Module | torch.export.ExportedProgram, args: tuple, kwargs: dict,
             dynamic_shapes: Any) -> tuple[torch.export.ExportedProgram, list[str], dict[str, str]]:
    """The ExportedProgram, its input names, and ``{symbol: dimension name}`` (``s77: batch``)."""
    if isinstance(gm, torch.export.ExportedProgram):
        return gm, list(gm.graph_signature.user_inputs), {}
    shapes = _translate_dynamic_shapes(gm, args, kwargs, dynamic_shapes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(gm, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as error:
        raise ExportError(
            f"torch.export cannot re-capture the module for ONNX: {type(error).__name__}: "
            f"{_first_line(error)}", stage=STAGE, where=type(gm).__name__,
            hint="check that dynamic_shapes is the one the model was captured with; a pass "
                 "that made a dynamic axis static needs that axis dropped") from error
    input_names = list(exported.graph_signature.user_inputs)
    return exported, input_names, _axis_names(exported, gm, args, kwargs, shapes)


def _axis_names(exported: torch.export.ExportedProgram, module: torch.nn.Module, args: tuple,
                kwargs: dict, shapes: Any) -> dict[str, str]:
    """Map torch's symbols (``s77``) to the caller's dimension names (``batch``)."""
    if shapes is None:
        return {}
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    pairs = shapes.items() if isinstance(shapes, dict) else zip(bound, shapes)
    by_tensor: dict[int, Any] = {}
    for name, spec in pairs:
        _collect_tensor_specs(bound.get(name), spec, by_tensor)
    placeholders = {node.name: node for node in exported.graph.nodes if node.op == "placeholder"}
    names: dict[str, str] = {}
    tensors = flat_input_tensors(args, kwargs)
    for tensor, input_name in zip(tensors, exported.graph_signature.user_inputs):
        spec, node = by_tensor.get(id(tensor)), placeholders.get(input_name)
        value = node.meta.get("val") if node is not None else None
        if spec is None or not isinstance(value, torch.Tensor):
            continue
        for axis, dim in (spec.items() if isinstance(spec, dict) else enumerate(spec)):
            dim_name = getattr(dim, "__name__", None)
            size = value.shape[axis] if isinstance(axis, int) and axis < value.dim() else None
            if isinstance(dim_name, str) and re.fullmatch(r"\w+", dim_name) \
                    and isinstance(size, torch.SymInt) and re.fullmatch(r"\w+", str(size)):
                names[str(size)] = dim_name
    return names


def _collect_tensor_specs(value: Any, spec: Any, found: dict[int, Any]) -> None:
    if spec is None:
        return
    if isinstance(value, torch.Tensor):
        found.setdefault(id(value), spec)
    elif isinstance(value, dict) and isinstance(spec, dict):
        for key, item in value.items():
            _collect_tensor_specs(item, spec.get(key), found)
    elif isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
        for item, item_spec in zip(value, spec):
            _collect_tensor_specs(item, item_spec, found)


def _names_to_dims(spec: Any, dims: dict[str, Dim]) -> Any:
    # a plain string names a dimension, as slimline's capture accepts: one Dim per name
    if isinstance(spec, str):
        return dims.setdefault(spec, Dim(spec))
    if isinstance(spec, dict):
        return {key: _names_to_dims(value, dims) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_names_to_dims(value, dims) for value in spec)
    return spec


def _is_tensor_spec(spec: Any) -> bool:
    """A spec for one tensor: ``None``, ``{axis: dim}``, or a sequence of dims."""
    if spec is None:
        return True
    if isinstance(spec, dict):
        return all(isinstance(key, int) for key in spec)
    if isinstance(spec, (list, tuple)):
        return all(item is None or isinstance(item, (int, Dim, _DimHint)) for item in spec)
    return False


def _tensor_specs(spec: Any) -> list[Any]:
    if _is_tensor_spec(spec):
        return [spec]
    items = spec.values() if isinstance(spec, dict) else spec
    return [leaf for item in items for leaf in _tensor_specs(item)]


def _translate_dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict,
                              dynamic_shapes: Any) -> Any:
    """The caller's ``dynamic_shapes`` (written for the original model) for ``module``'s forward.

    Passed through when it fits ``module``'s signature (the usual case: ``ep.module()`` keeps the
    original argument names); otherwise re-keyed tensor by tensor (``forward(*xs)`` becomes
    ``forward(xs_0, xs_1)`` in the GraphModule).
    """
    if dynamic_shapes is None:
        return None
    spec = _names_to_dims(dynamic_shapes, {})
    try:
        names = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except TypeError as error:
        raise ExportError(
            f"the example inputs do not fit {type(module).__name__}.forward: {error}",
            stage=STAGE, where=f"{type(module).__name__}.forward",
            hint="pass inputs with the structure the model was captured with") from None
    if isinstance(spec, dict) and all(key in names or value is None for key, value in spec.items()):
        return {name: spec.get(name) for name in names}
    if isinstance(spec, (list, tuple)) and len(spec) == len(names):
        return spec
    tensors = flat_input_tensors(args, kwargs)
    specs = _tensor_specs(spec)
    if len(specs) != len(tensors):
        raise ExportError(
            f"dynamic_shapes names {len(specs)} tensors but the inputs hold {len(tensors)}",
            stage=STAGE,
            where=f"{type(module).__name__}.forward{inspect.signature(module.forward)}",
            hint="give dynamic_shapes keyed by these argument names, one entry per tensor")
    collection = torch.export.ShapesCollection()
    for tensor, tensor_spec in zip(tensors, specs):
        if tensor_spec is not None:
            collection[tensor] = tensor_spec
    return collection.dynamic_shapes(module, args, kwargs)


# ---------------------------------------------------------------------------------------------
# 4. convert


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "torchvision is not installed" not in message:  # one per registry build, noise
            self.messages.append(_first_line(message))


@contextlib.contextmanager
def _exporter_logs_into(messages: list[str]) -> Iterator[None]:
    """Collect the exporter's (and its optimizer's) log warnings instead of printing them."""
    # below torch.onnx, which has its own stderr handler
    loggers = [logging.getLogger("torch.onnx._internal"), logging.getLogger("onnxscript")]
    handler = _Collect(messages)
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.propagate = propagate


def _convert(exported: torch.export.ExportedProgram, opset: int, output_names: list[str],
             optimize: bool) -> tuple[torch.onnx.ONNXProgram, list[str]]:
    """``torch.onnx.export(exported, dynamo=True)``, with the torchlib registry built once."""
    logged: list[str] = []
    with warnings.catch_warnings(record=True) as caught, _exporter_logs_into(logged):
        warnings.simplefilter("always")
        try:
            core_export, registry = _cached_registry_export(opset)
            if core_export is not None:
                program = core_export(exported, registry=registry, output_names=output_names,
                                      optimize=optimize, opset_version=opset, verbose=False)
            else:
                program = torch.onnx.export(exported, (), dynamo=True, opset_version=opset,
                                            output_names=output_names, optimize=optimize,
                                            verbose=False)
        except Exception as error:
            raise _conversion_error(error, exported, opset) from error
    messages = [_first_line(item.message) for item in caught
                if not issubclass(item.category, (DeprecationWarning, FutureWarning))]
    return program, messages + logged


@functools.lru_cache(maxsize=4)
def _cached_registry_export(opset: int) -> tuple[Any, Any]:
    """``(exporter core, registry)`` or ``(None, None)`` where torch's internals differ.

    ``torch.onnx.export`` rebuilds the torchlib registry on every call: 2.3 s of a 3.5 s export
    of a small MLP, spent re-parsing ~500 onnxscript functions. The registry is read-only during
    export, so it is built once per opset and handed to the exporter's core, which is what
    ``torch.onnx.export`` does for an ExportedProgram after building it.
    """
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:
        return None, None
    if "registry" not in inspect.signature(_core.export).parameters:
        return None, None
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, TORCHLIB_OPSET))
    return _core.export, registry


def _conversion_error(error: Exception, exported: torch.export.ExportedProgram,
                      opset: int) -> ExportError:
    cause = _root_cause(error)
    text = _strip_ansi(str(error))
    match = re.search(r"translating node %?([\w.]+)", text)
    target = re.search(r"target=([\w.]+)", text)
    where = f"opset {opset}"
    if match:
        node = match.group(1)
        where = f"graph node {node!r}"
        if target:
            where += f" ({target.group(1).replace('torch.ops.', '')})"
        path = _module_path_of(exported, node)
        if path:
            where += f" in module {path!r}"
    return ExportError(
        f"torch.onnx cannot translate the graph: {type(cause).__name__}: {_first_line(cause)}",
        stage=STAGE, where=where,
        hint="write the rewrite in standard torch ops the exporter knows (DESIGN: structural "
             "rewrites stay plain torch), or try another opset (opset=23 or 18)")


def _module_path_of(exported: torch.export.ExportedProgram, node_name: str) -> str:
    # the failing node is named in the decomposed program (``_linalg_eigh``); the captured one
    # may hold it under the undecomposed name (``linalg_eigh``)
    from slimline.ir.graph import module_path

    nodes = list(exported.graph.nodes)
    for node in nodes:
        if node.name == node_name:
            return module_path(node)
    for node in nodes:
        if node.name.lstrip("_") == node_name.lstrip("_"):
            return module_path(node)
    return ""


# ---------------------------------------------------------------------------------------------
# 5. stage, check


class _Staged:
    """Files saved in a temporary directory next to the destination, not yet in place."""

    def __init__(self, directory: Path, destination: Path, data_name: str | None):
        self.directory = directory
        self.destination = destination
        self.model = directory / destination.name
        self.data = directory / data_name if data_name else None
        self.final_data = destination.parent / data_name if data_name else None
        self.size = 0
        self.published = False

    def publish(self) -> None:
        try:
            self.size = self.model.stat().st_size
            if self.data is not None and self.data.exists():
                self.size += self.data.stat().st_size
                _fsync(self.data)
                os.replace(self.data, self.final_data)  # the data first: the model refers to it
            else:
                self.final_data = None
            _fsync(self.model)
            os.replace(self.model, self.destination)
            self.published = True
            _fsync_directory(self.destination.parent)
        except OSError as error:
            raise ExportError(
                f"cannot write {str(self.destination)!r}: {error.strerror or error}",
                stage=STAGE, where=str(self.destination),
                hint="check free disk space and the directory's permissions") from error


@contextlib.contextmanager
def _staged(model: ir.Model, destination: Path, use_external: bool) -> Iterator[_Staged]:
    """Save ``model`` into a fresh temporary directory beside ``destination``; always removed."""
    try:
        directory = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp",
                                          dir=destination.parent))
    except OSError as error:
        raise ExportError(f"cannot write next to {str(destination)!r}: {error.strerror or error}",
                          stage=STAGE, where=str(destination),
                          hint="choose a writable output directory") from error
    try:
        staged = _Staged(directory, destination,
                         f"{destination.name}.data" if use_external else None)
        try:
            ir.save(model, staged.model,
                    external_data=staged.data.name if staged.data is not None else None)
        except Exception as error:
            raise ExportError(
                f"cannot save the ONNX model: {type(error).__name__}: {_first_line(error)}",
                stage=STAGE, where=str(destination),
                hint="models over 2 GB need external_data=True (the default decides by size); "
                     "check free disk space") from error
        yield staged
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _LoadFailure(Exception):
    """onnxruntime could not load the exported file (an opset or kernel it lacks)."""

    def __init__(self, error: ExportError, reason: str):
        super().__init__(reason)
        self.error, self.reason = error, reason


def _check_in_onnxruntime(model_path: Path, args: tuple, kwargs: dict,
                          reference: list[torch.Tensor], output_names: list[str],
                          rtol: float | None, atol: float | None) -> list[OutputCheck]:
    try:
        session = make_session(model_path)
    except Exception as error:
        reason = _first_line(error)
        node = re.search(r"node with name '([^']+)'", reason)
        raise _LoadFailure(ExportError(
            f"onnxruntime cannot load the exported model: {reason}", stage=STAGE,
            where=f"ONNX node {node.group(1)!r}" if node else model_path.name,
            hint="ORT's CPU provider lacks some kernels (bfloat16 GEMM, for one): export in "
                 "float32, or pick another opset (opset=23 or 18)"), reason) from error
    try:
        feed = input_feed(session, args, kwargs)
    except InputError as error:
        raise ExportError(error.message, stage=STAGE, where=model_path.name,
                          hint="report this: the exporter's inputs differ from the example "
                               "tensors") from error
    try:
        outputs = session.run(None, feed)
    except Exception as error:
        raise ExportError(f"onnxruntime fails running the exported model: {_first_line(error)}",
                          stage=STAGE, where=model_path.name,
                          hint="export with check=False and inspect the file, or try another "
                               "opset (opset=23 or 18)") from error
    if len(outputs) != len(reference):
        raise ExportError(
            f"the ONNX model has {len(outputs)} outputs, torch returns {len(reference)}",
            stage=STAGE, where="outputs",
            hint="report this: the exporter dropped or added an output")
    checks = [_compare(name, expected, actual, rtol, atol)
              for name, expected, actual in zip(output_names, reference, outputs)]
    failed = [check for check in checks if not check.passed]
    if failed:
        detail = "; ".join(f"{check.name}: {_describe(check)}" for check in failed)
        error = ExportError(
            f"onnxruntime disagrees with torch on {len(failed)} of {len(checks)} outputs: {detail}",
            stage=STAGE, where=f"output {failed[0].name!r}",
            hint="loosen rtol/atol if the difference is expected (float16), check that the "
                 "module is deterministic (eval mode, no Python-side state), or bisect the passes")
        error.output_checks = tuple(checks)
        raise error
    return checks


def _describe(check: OutputCheck) -> str:
    found = check.problem or (f"max abs error {check.max_abs_error:.3g}, "
                              f"max rel error {check.max_rel_error:.3g}")
    return f"{found} (rtol {check.rtol:g}, atol {check.atol:g})"


def _compare(name: str, expected: torch.Tensor, actual: np.ndarray, rtol: float | None,
             atol: float | None) -> OutputCheck:
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(expected.dtype, (0.0, 0.0))
    expected_array = expected.detach().cpu()
    if expected_array.dtype == torch.bfloat16:  # numpy has no bfloat16: ORT returns float32
        expected_array = expected_array.float()
    return compare_array(name, expected_array.numpy(), np.asarray(actual),
                         default_rtol if rtol is None else rtol,
                         default_atol if atol is None else atol, dtype_label=str(expected.dtype),
                         check_dtype=expected.dtype != torch.bfloat16)


def compare_array(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float,
                  *, dtype_label: str | None = None, check_dtype: bool = True) -> OutputCheck:
    """``|actual - expected| <= atol + rtol · |expected|`` element-wise, NaN equal to NaN; the
    same shape (and dtype, with ``check_dtype``); integers and booleans must be equal."""
    label = dtype_label or str(expected.dtype)
    shape = tuple(expected.shape)
    problem = ""
    if tuple(actual.shape) != shape:
        problem = f"shape {tuple(actual.shape)}, expected {shape}"
    elif check_dtype and actual.dtype != expected.dtype:
        problem = f"dtype {actual.dtype}, expected {expected.dtype}"
    if problem:
        return OutputCheck(name, shape, label, math.inf, math.inf, rtol, atol, False, problem)
    if actual.size == 0:
        return OutputCheck(name, shape, label, 0.0, 0.0, rtol, atol, True)
    if expected.dtype.kind not in "fc":  # integers, booleans: equal or not
        equal = bool(np.array_equal(expected, actual))
        error = 0.0 if equal else math.inf
        return OutputCheck(name, shape, label, error, error, rtol, atol, equal,
                           "" if equal else "values differ")
    ours, theirs = actual.astype(np.float64), expected.astype(np.float64)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))  # covers equal infinities
    difference = np.nan_to_num(np.where(same, 0.0, np.abs(ours - theirs)), nan=math.inf)
    max_abs = float(difference.max())
    finite = np.abs(theirs[np.isfinite(theirs)])
    scale = float(finite.max()) if finite.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = bool(np.all(difference <= atol + rtol * np.abs(np.nan_to_num(theirs))))
    return OutputCheck(name, shape, label, max_abs, max_rel, rtol, atol, passed)


# ---------------------------------------------------------------------------------------------
# helpers


def _metadata(output_spec: pytree.TreeSpec, none_leaves: list[int]) -> dict[str, str]:
    text = dump_output_spec(output_spec)
    if text is None:
        return {}
    if none_leaves:
        return {OUTPUT_SPEC_KEY: text, NONE_LEAVES_KEY: json.dumps(none_leaves)}
    return {OUTPUT_SPEC_KEY: text}


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def _dynamic_axes(proto: onnx.ModelProto) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        symbolic = {axis: dim.dim_param for axis, dim in enumerate(dims) if dim.dim_param}
        if symbolic:
            axes[value.name] = symbolic
    return axes


def _make_directories(directory: Path) -> list[Path]:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created = []
    for made in reversed(missing):
        try:
            made.mkdir()
        except OSError as error:
            _remove_directories(created)
            raise ExportError(f"cannot create directory {str(made)!r}: {error.strerror or error}",
                              stage=STAGE, where=str(made),
                              hint="choose a writable output path") from error
        created.append(made)
    return created


def _remove_directories(created: list[Path]) -> None:
    for made in reversed(created):
        with contextlib.suppress(OSError):  # only empty ones go
            made.rmdir()


def _fsync(file_path: Path) -> None:
    with open(file_path, "rb+") as stream:
        os.fsync(stream.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _first_line(error: Any) -> str:
    text = _strip_ansi(str(error)).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__
