"""ONNX in: ``slimline.optimize("model.onnx", target="onnxruntime")`` for files from any exporter.

The flow, one stage per block of :func:`optimize_onnx`, each timed in the report:

1. **check inputs** — options; ONNX runs on ``target="onnxruntime"`` only;
2. **load** — parse without weights, run ``onnx.checker``, check the opset against what onnx
   and onnxruntime here support and every external-data file against its references (present,
   long enough). A corrupt or truncated file, missing external data or an unsupported opset is
   an :class:`~slimline.errors.InputError` naming the file and what to try;
3. **reference run** — the original file in onnxruntime (basic optimizations only) on the given
   inputs, or on inputs generated from the graph's input types and shapes (symbolic dimensions
   → small sizes; a second sample at other sizes checks that dynamic axes still work);
4. **passes** — shape inference (onnxruntime's symbolic one, onnx's as fallback); when the graph
   holds attention written out in MatMul/Softmax and its opset is below 23, the model is
   converted to the opset onnxruntime has the ``Attention`` kernel for (24 with ORT 1.32); then
   the rules of :mod:`slimline.onnx.pipeline`. The result is checked in onnxruntime against the
   reference on every sample; if the check fails, the rules are re-applied one at a time and each
   one that breaks it is rolled back (the report says which and why);
5. **tune** — session options by measurement (:mod:`slimline.onnx.session`);
6. **write** — atomically to ``output`` (default ``<workdir>/model.onnx``), weights as external
   data when the source had them or above ~1.8 GB; input and output names and dynamic axes as in
   the source;
7. **verify** — the written file, under the chosen session options, against the reference.

What comes back is an :class:`OptimizedOnnxModel`: call it with numpy arrays or torch tensors
(positional in graph input order, or by input name); ``.report`` is a :class:`~slimline.report
.Report` like the torch path's. Only exact rewrites exist at the ONNX level so far: ``mode``
``"balanced"`` / ``"max"`` apply them and say so in the report's notes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from slimline.errors import ConfigError, InputError, VerificationError
from slimline.report import PassRecord, Report

__all__ = ["optimize_onnx", "OptimizedOnnxModel", "load_onnx", "generate_inputs", "LoadedOnnx"]

STAGE_LOAD = "load"
MIN_OPSET = 7  # older files need onnx's own version converter first
BATCH_SIZE, OTHER_SIZE = 2, 16  # generated sizes for symbolic dims: first axis, the others
SECOND_SAMPLE_SIZES = (3, 12)  # a second sample, at other sizes, when dims are symbolic
ATTENTION_OPSET = 23  # ONNX Attention
_MODES = ("lossless", "balanced", "max")
_TUNE_MODES = ("lite", "max", "cache", "off")


# ---------------------------------------------------------------------------------------------
# 2. load


@dataclass
class LoadedOnnx:
    """A parsed, checked ONNX model (weights not loaded) and where it came from."""

    proto: onnx.ModelProto  # external data not loaded: tensors refer to their files
    base_dir: Path  # where external data paths are resolved
    source: str  # the path, or "<ModelProto>"
    opset: int
    external_files: tuple[Path, ...] = ()
    file_size: int = 0

    @property
    def input_names(self) -> list[str]:
        initializers = {tensor.name for tensor in self.proto.graph.initializer}
        return [value.name for value in self.proto.graph.input if value.name not in initializers]

    @property
    def output_names(self) -> list[str]:
        return [value.name for value in self.proto.graph.output]


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> LoadedOnnx:
    """Parse and check ``source``; every problem is an :class:`InputError` that says what to do."""
    if isinstance(source, onnx.ModelProto):
        proto, base_dir, where, size = source, Path.cwd(), "<ModelProto>", source.ByteSize()
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise InputError(f"no ONNX file at {where!r}", stage=STAGE_LOAD, where=where,
                             hint="check the path")
        if path.is_dir():
            raise InputError(f"{where!r} is a directory, not an ONNX file", stage=STAGE_LOAD,
                             where=where, hint="give the path of the .onnx file inside it")
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"{path.name} is empty (0 bytes)", stage=STAGE_LOAD, where=where,
                             hint="the file was not written completely: export it again")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as error:
            raise InputError(f"{path.name} is not a readable ONNX file: it is corrupt or "
                             f"truncated ({type(error).__name__}: {_first_line(error)})",
                             stage=STAGE_LOAD, where=where,
                             hint="export the model again, or check the download / copy of the "
                                  "file (compare its size with the original)") from error
        base_dir = path.parent
    if not proto.graph.node or not proto.graph.output:
        raise InputError(f"{Path(where).name} holds no graph (no nodes or no outputs): it is not "
                         f"an ONNX model, or it is truncated", stage=STAGE_LOAD, where=where,
                         hint="export the model again")
    opset = _check_opset(proto, where)
    external = _check_external_data(proto, base_dir, where)
    try:  # by path where there is one: external data is found relative to the file
        onnx.checker.check_model(proto if isinstance(source, onnx.ModelProto) else str(source))
    except Exception as error:  # ValidationError, and C++ errors on malformed protos
        raise InputError(f"{Path(where).name} is not a valid ONNX model: {_first_line(error)}",
                         stage=STAGE_LOAD, where=where,
                         hint="a truncated file often parses but fails this check: export it "
                              "again; otherwise fix the model with onnx.checker's message") from error
    return LoadedOnnx(proto, base_dir, where, opset, external,
                      size + sum(f.stat().st_size for f in external))


def _check_opset(proto: onnx.ModelProto, where: str) -> int:
    from slimline.backends.onnx_export import onnxruntime_max_opset

    versions = {entry.domain or "": entry.version for entry in proto.opset_import}
    if "" not in versions and "ai.onnx" not in versions:
        raise InputError("the model imports no default-domain (ai.onnx) opset", stage=STAGE_LOAD,
                         where=where, hint="export it with a standard exporter")
    opset = int(versions.get("", versions.get("ai.onnx")))
    newest_onnx, newest_ort = onnx.defs.onnx_opset_version(), onnxruntime_max_opset()
    if opset < MIN_OPSET:
        raise InputError(f"unsupported opset {opset}: slimline takes opset {MIN_OPSET} to "
                         f"{min(newest_onnx, newest_ort)}", stage=STAGE_LOAD, where=where,
                         hint="convert it first: onnx.version_converter.convert_version(model, 17)")
    if opset > newest_onnx or opset > newest_ort:
        raise InputError(f"unsupported opset {opset}: onnx {onnx.__version__} here knows opsets up "
                         f"to {newest_onnx}, onnxruntime up to {newest_ort}", stage=STAGE_LOAD,
                         where=where,
                         hint=f"export at opset {min(newest_onnx, newest_ort)} or lower, or upgrade "
                              f"onnx / onnxruntime")
    return opset


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, where: str) -> tuple[Path, ...]:
    files: dict[Path, int] = {}
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = _external_entries(tensor)
        location = entries.get("location", "")
        file = (base_dir / location).resolve()
        if not location or not file.is_file():
            raise InputError(f"external data file {location!r} is missing (tensor {tensor.name!r} "
                             f"refers to it)", stage=STAGE_LOAD, where=str(base_dir / location),
                             hint="copy the .data file(s) exported with the model into the "
                                  "model's directory, under the same name")
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        files[file] = max(files.get(file, 0), end)
    for file, end in files.items():
        if file.stat().st_size < end:
            raise InputError(f"external data file {file.name} is truncated: {file.stat().st_size} "
                             f"bytes, the model reads up to byte {end}", stage=STAGE_LOAD,
                             where=str(file), hint="copy the complete .data file again")
    return tuple(files)


# ---------------------------------------------------------------------------------------------
# 3. inputs


_NUMPY_OF = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def _index_bound(proto: onnx.ModelProto, name: str) -> int | None:
    """Rows of the constant table an integer input indexes with ``Gather`` (token ids), if any."""
    shapes = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    bounds = []
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                and node.input[0] in shapes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            bounds.append(shapes[node.input[0]][axis])
    return min(bounds) if bounds else None


def generate_inputs(proto: onnx.ModelProto, sizes: tuple[int, int] = (BATCH_SIZE, OTHER_SIZE),
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs from the graph's input types and shapes.

    Symbolic dimensions take small sizes: the first axis ``sizes[0]``, others ``sizes[1]``, one
    size per dimension name. Integer inputs that index a constant table with ``Gather`` (token
    ids) stay inside it; inputs named like masks are all ones (nothing masked); other integers
    are 0 or 1; floats are standard normal.
    """
    generator = np.random.default_rng(seed)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    named: dict[str, int] = {}
    feed = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _NUMPY_OF:
            raise InputError(f"input {value.name!r} has element type "
                             f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}, which "
                             f"slimline cannot generate", stage="reference run", where=value.name,
                             hint="pass example inputs: optimize(path, {name: array, ...})")
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            else:
                default = sizes[0] if axis == 0 else sizes[1]
                shape.append(named.setdefault(dim.dim_param, default) if dim.dim_param else default)
        dtype = _NUMPY_OF[tensor_type.elem_type]
        if "mask" in value.name.lower() and np.dtype(dtype).kind in "iub":
            feed[value.name] = np.ones(shape, dtype=dtype)
        elif np.dtype(dtype).kind == "b":
            feed[value.name] = generator.random(shape) < 0.5
        elif np.dtype(dtype).kind in "iu":
            high = _index_bound(proto, value.name) or 2
            feed[value.name] = generator.integers(0, high, size=shape).astype(dtype)
        else:
            feed[value.name] = generator.standard_normal(shape).astype(dtype)
    return feed


def _has_symbolic_dims(proto: onnx.ModelProto) -> bool:
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return any(not dim.HasField("dim_value") for value in proto.graph.input
               if value.name not in initializers for dim in value.type.tensor_type.shape.dim)


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise InputError(f"input {name!r} is not a numeric array", stage="check inputs",
                         where=name, hint="pass numpy arrays or torch tensors")
    return array


def _given_feed(loaded: LoadedOnnx, inputs: Any) -> dict[str, np.ndarray]:
    names = loaded.input_names
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - set(names))
        missing = [name for name in names if name not in inputs]
        if unknown or missing:
            raise InputError(f"example inputs do not match the graph inputs {names}: "
                             f"unknown {unknown}, missing {missing}", stage="check inputs",
                             where="example_inputs", hint="key the inputs by graph input name")
        return {name: _to_numpy(inputs[name], name) for name in names}
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(values) != len(names):
        raise InputError(f"the model takes {len(names)} inputs {names}, got {len(values)}",
                         stage="check inputs", where="example_inputs",
                         hint="pass one array per graph input, in order, or a dict by name")
    return {name: _to_numpy(value, name) for name, value in zip(names, values)}


# ---------------------------------------------------------------------------------------------
# 4. passes


def _infer_shapes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Shapes for every value: onnxruntime's symbolic inference (it keeps equal symbolic
    dimensions equal), onnx's own when that fails."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True), "onnxruntime symbolic"
    except Exception:
        pass
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True), "onnx"
    except Exception as error:
        return proto, f"none ({_first_line(error)})"


def _to_ir(proto: onnx.ModelProto, base_dir: Path) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _restore_interface(model: ir.Model, source: onnx.ModelProto) -> None:
    """Give graph inputs and outputs the source's shapes (and dimension names) back, and drop
    the inferred shapes of intermediate values: they were for the rules, not for the file."""
    declared = {info.name: ir.serde.deserialize_value_info_proto(info, None)
                for info in list(source.graph.input) + list(source.graph.output)}
    interface = list(model.graph.inputs) + list(model.graph.outputs)
    for value in interface:
        if value.name in declared:
            value.shape = declared[value.name].shape
    keep = {id(value) for value in interface}
    for node in model.graph:
        for value in node.outputs:
            if id(value) not in keep:
                value.shape = None


# ---------------------------------------------------------------------------------------------
# the result


class OptimizedOnnxModel:
    """What ``optimize("model.onnx", target="onnxruntime")`` returns: a runnable file + report.

    Call it with numpy arrays or torch tensors, positional in graph input order or by input
    name; it returns one array (or tensor, when given tensors) per graph output: the only one
    when there is one output, else a tuple.
    """

    target = "onnxruntime"

    def __init__(self, runner: Any, path: Path, report: Report):
        self.runner = runner
        self.path = path
        self.report = report

    @property
    def input_names(self) -> list[str]:
        return self.runner.input_names

    @property
    def output_names(self) -> list[str]:
        return self.runner.output_names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = self.input_names
        values = dict(zip(names, args))
        values.update(kwargs)
        missing = [name for name in names if name not in values]
        if missing or len(args) > len(names):
            raise InputError(f"the model takes inputs {names}; missing {missing}",
                             stage="run", where=str(self.path),
                             hint="pass one array per graph input, in order, or by name")
        as_torch = any(hasattr(value, "detach") for value in values.values())
        feed = {name: _to_numpy(values[name], name) for name in names}
        try:
            outputs = self.runner.run_feed(feed)
        except Exception as error:
            expected = {value.name: value.shape for value in self.runner.session.get_inputs()}
            raise InputError(f"onnxruntime rejected the inputs: {_first_line(error)}",
                             stage="run", where=str(self.path),
                             hint=f"the model takes shapes {expected} (strings are dynamic "
                                  f"axes)") from error
        if as_torch:
            import torch

            outputs = [torch.from_numpy(np.asarray(output)) for output in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __repr__(self) -> str:
        return f"OptimizedOnnxModel({str(self.path)!r}, mode={self.report.mode!r})"


# ---------------------------------------------------------------------------------------------
# the flow


@dataclass
class _Sample:
    feed: dict[str, np.ndarray]
    reference: list[np.ndarray] = field(default_factory=list)
    generated: bool = True


def optimize_onnx(source: str | os.PathLike | onnx.ModelProto, example_inputs: Any = None, *,
                  target: str = "onnxruntime", mode: str = "lossless", passes: Any = None,
                  budget: Any = None, calibration: Any = None, tune: str = "lite",
                  workdir: str | os.PathLike | None = None,
                  output: str | os.PathLike | None = None, name: str | None = None,
                  **ignored: Any) -> OptimizedOnnxModel:
    """Optimize an existing ONNX model for onnxruntime on CPU; see the module docstring.

    ``example_inputs``: ``None`` (generated), a dict by input name, or arrays / tensors in graph
    input order. ``passes``: a list of ONNX rule names (default: all). ``calibration`` and
    ``budget`` are kept for the lossy ONNX passes to come and only noted today.
    """
    from slimline.onnx.pipeline import RULE_NAMES

    label = name or (Path(source).stem if not isinstance(source, onnx.ModelProto) else "onnx-model")
    report = Report(model=label, target="onnxruntime", mode=mode)
    started = time.perf_counter()

    with report.stage("check inputs"):
        if target != "onnxruntime":
            raise ConfigError(f"an ONNX model runs on target='onnxruntime', not {target!r}",
                              stage="configure", where="optimize(target=...)",
                              hint="optimize(path, target='onnxruntime'); for target "
                                   f"{target!r} optimize the torch model instead")
        if mode not in _MODES:
            raise ConfigError(f"unknown mode {mode!r}", stage="configure",
                              where="optimize(mode=...)", hint=f"use one of: {', '.join(_MODES)}")
        if tune not in _TUNE_MODES:
            raise ConfigError(f"unknown tune mode {tune!r}", stage="configure",
                              where="optimize(tune=...)", hint=f"use one of: {', '.join(_TUNE_MODES)}")
        rule_names = _rule_names(passes, RULE_NAMES)
        if mode != "lossless":
            report.notes.append(f"mode {mode!r}: no approximate ONNX-level pass exists yet; only "
                                f"the exact rules ran")
        if budget is not None or calibration is not None:
            report.notes.append("budget / calibration are not used by the exact ONNX rules")
        for key in sorted(ignored):
            if ignored[key] not in (None, False):
                report.notes.append(f"{key}= does not apply to an ONNX model and was ignored")

    with report.stage("load") as stage:
        loaded = load_onnx(source)
        producer = f"{loaded.proto.producer_name} {loaded.proto.producer_version}".strip()
        stage.detail = (f"opset {loaded.opset}, {len(loaded.proto.graph.node)} nodes, "
                        f"{loaded.file_size / 1e6:.1f} MB, from {producer or 'unknown exporter'}"
                        + (f", external data in {len(loaded.external_files)} file(s)"
                           if loaded.external_files else ""))

    with report.stage("reference run") as stage:
        samples = _samples(loaded, example_inputs)
        original = _original_session(loaded)
        for sample in samples:
            sample.reference = _run(original, sample.feed, loaded.source, "the original model")
        del original
        shapes = "; ".join(", ".join(f"{k} {list(v.shape)}" for k, v in s.feed.items())
                           for s in samples)
        stage.detail = (f"{len(samples)} sample(s), "
                        f"{'generated' if samples[0].generated else 'given'}: {shapes}")

    with report.stage("passes") as stage:
        model, opset, opset_source = _rewrite(loaded, samples, rule_names, report)
        applied = [p.name for p in report.passes if p.status == "applied"]
        stage.detail = f"applied: {', '.join(applied) or 'none'}; opset {opset}"

    destination = Path(output) if output is not None else \
        Path(workdir or tempfile.mkdtemp(prefix="slimline-")) / "model.onnx"
    from slimline.onnx.files import staged_model
    from slimline.onnx.pipeline import add_feeds_layer_norm
    from slimline.onnx.session import TunedOrtModule, choose_settings

    with staged_model(model, destination, external_data=bool(loaded.external_files) or None) \
            as staged:
        with report.stage("tune") as stage:
            choice = choose_settings(staged.model, samples[0].feed, tune,
                                     add_feeds_norm=add_feeds_layer_norm(model))
            stage.detail = f"{choice.settings.describe()} ({choice.source})"
        with report.stage("write") as stage:
            staged.publish()
            stage.detail = str(destination)

    with report.stage("verify") as stage:
        runner = TunedOrtModule(destination, choice.settings)
        verification = _verification(runner, samples, loaded.output_names)
        report.verification = verification
        stage.detail = verification["verdict"]
        report.export = _summary(loaded, destination, staged, opset, opset_source, choice,
                                 samples, verification, producer, time.perf_counter() - started)
        if not verification["passed"]:
            error = VerificationError(f"the written model fails its final check: "
                                      f"{verification['verdict']}", stage="verify",
                                      where=str(destination),
                                      hint="exclude a rule with passes=[...] (see the report)")
            error.report = report
            raise error
    return OptimizedOnnxModel(runner, destination, report)


def _rule_names(passes: Any, known: tuple[str, ...]) -> tuple[str, ...]:
    if passes is None:
        return known
    requested = list(passes)
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise ConfigError(f"unknown ONNX rule name(s): {', '.join(map(repr, unknown))}",
                          stage="configure", where="optimize(passes=...)",
                          hint=f"ONNX rules: {', '.join(known)}")
    return tuple(name for name in known if name in requested)


def _samples(loaded: LoadedOnnx, example_inputs: Any) -> list[_Sample]:
    if example_inputs is not None:
        return [_Sample(_given_feed(loaded, example_inputs), generated=False)]
    samples = [_Sample(generate_inputs(loaded.proto))]
    if _has_symbolic_dims(loaded.proto):
        samples.append(_Sample(generate_inputs(loaded.proto, SECOND_SAMPLE_SIZES, seed=1)))
    return samples


def _original_session(loaded: LoadedOnnx) -> Any:
    from slimline.onnx.session import SessionSettings

    settings = SessionSettings(intra_op_threads=1, disabled_optimizers=(),
                               graph_optimization_level="basic")
    try:
        if isinstance(loaded.source, str) and loaded.source != "<ModelProto>":
            return settings.session(loaded.source)
        return settings.session(loaded.proto.SerializeToString())
    except Exception as error:
        raise InputError(f"onnxruntime cannot load the model: {_first_line(error)}",
                         stage="reference run", where=loaded.source,
                         hint="slimline needs a model onnxruntime's CPU provider runs; custom "
                              "domains need their kernels registered") from error


def _run(session: Any, feed: dict[str, np.ndarray], where: str, what: str) -> list[np.ndarray]:
    try:
        return session.run(None, feed)
    except Exception as error:
        shapes = {name: list(array.shape) for name, array in feed.items()}
        raise InputError(f"{what} fails in onnxruntime on inputs {shapes}: {_first_line(error)}",
                         stage="reference run", where=where,
                         hint="pass example inputs the model accepts: "
                              "optimize(path, {name: array, ...}, target='onnxruntime')") from error


def _check(model: ir.Model, samples: list[_Sample], output_names: list[str]) -> str:
    """Run ``model`` in onnxruntime on every sample; "" when all outputs match, else why not."""
    from slimline.onnx.check import compare_arrays, describe_failures
    from slimline.onnx.files import staged_model
    from slimline.onnx.session import default_settings

    external = any(_is_external(value) for value in model.graph.initializers.values())
    with tempfile.TemporaryDirectory(prefix="slimline-check-") as scratch, \
            staged_model(model, Path(scratch) / "check.onnx", external_data=external) as staged:
        try:
            session = default_settings().session(staged.model)
            for sample in samples:
                outputs = session.run(None, sample.feed)
                problem = describe_failures(compare_arrays(output_names, sample.reference, outputs))
                if problem:
                    return problem
        except Exception as error:
            return f"onnxruntime fails on the rewritten model: {_first_line(error)}"
    return ""


def _is_external(value: ir.Value) -> bool:
    return isinstance(value.const_value, ir.ExternalTensor)


def _rewrite(loaded: LoadedOnnx, samples: list[_Sample], rule_names: tuple[str, ...],
             report: Report) -> tuple[ir.Model, int, str]:
    from slimline.backends.onnx_export import default_opset
    from slimline.onnx import fuse_attention
    from slimline.onnx.pipeline import count_candidates, run_rules

    clock = time.perf_counter()
    proto, inference = _infer_shapes(loaded.proto)
    opset, opset_source = loaded.opset, "the source file's"
    if fuse_attention.NAME in rule_names and opset < ATTENTION_OPSET \
            and count_candidates(fuse_attention, _to_ir(proto, loaded.base_dir)):
        target = default_opset()
        try:
            # the converter keeps the inferred shapes; onnxruntime's symbolic inference does not
            # know every newer op, so onnx's fills in whatever the conversion added
            converted = onnx.version_converter.convert_version(proto, target)
            try:
                proto = onnx.shape_inference.infer_shapes(converted)
            except Exception:
                proto = converted
            opset_source = (f"converted from {loaded.opset} to {target} (onnx's version "
                            f"converter): ONNX Attention needs {ATTENTION_OPSET}+")
            opset = target
        except Exception as error:
            report.notes.append(f"opset {loaded.opset} kept: converting to {target} failed "
                                f"({_first_line(error)}); fuse_attention cannot run")
    report.notes.append(f"shape inference: {inference}")
    prepare = time.perf_counter() - clock
    base_dir = loaded.base_dir
    output_names = loaded.output_names
    model = _to_ir(proto, base_dir)
    results = run_rules(model, rule_names)
    changed = any(result.rewrites for result in results)
    problem = _check(model, samples, output_names) if changed else ""
    if not problem:
        _record(report, results, "applied", prepare + time.perf_counter() - clock)
        _restore_interface(model, loaded.proto)
        return model, opset, opset_source
    # one rule at a time: keep those that pass, roll back the first that breaks the check
    report.notes.append(f"all rules together failed the check ({problem}); retried one by one")
    model = _to_ir(proto, base_dir)
    for rule_name in rule_names:
        snapshot = ir.serde.serialize_model(model)  # rules edit in place
        start = time.perf_counter()
        result = run_rules(model, (rule_name,))[0]
        if not result.rewrites:
            _record(report, [result], "unchanged", time.perf_counter() - start)
            continue
        problem = _check(model, samples, output_names)
        if problem:
            model = _to_ir(snapshot, base_dir)
            _record(report, [result], "rolled back", time.perf_counter() - start, problem)
        else:
            _record(report, [result], "applied", time.perf_counter() - start)
    _restore_interface(model, loaded.proto)
    return model, opset, opset_source


def _record(report: Report, results: Sequence[Any], status: str, seconds: float,
            problem: str = "") -> None:
    share = seconds / max(1, len(results))
    for result in results:
        if result.skipped:
            record = PassRecord(result.name, True, "skipped", result.skipped, share, result.stats)
        elif not result.rewrites:
            reasons = "; ".join(sorted({reason for _, reason in result.refusals}))[:300]
            record = PassRecord(result.name, True, "unchanged", reasons, share, result.stats)
        else:
            record = PassRecord(result.name, True, status,
                                f"broke the check: {problem}" if problem else "", share,
                                dict(result.stats, rewrites=result.rewrites))
        report.passes.append(record)


def _verification(runner: Any, samples: list[_Sample], output_names: list[str]) -> dict:
    from slimline.onnx.check import compare_arrays

    checks = []
    for sample in samples:
        outputs = runner.run_feed(sample.feed)
        checks += compare_arrays(output_names, sample.reference, outputs)
    passed = all(check.passed for check in checks)
    worst = max((check.max_rel_error for check in checks), default=0.0)
    verdict = (f"equivalent (exact rewrites; max relative error {worst:.2e})" if passed else
               f"NOT equivalent: max relative error {worst:.2e} exceeds tolerance")
    return {"exact": True, "passed": passed, "verdict": verdict,
            "max_rel_error": worst if math.isfinite(worst) else None, "min_cosine": None,
            "samples": len(samples),
            "outputs": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in vars(check).items()} for check in checks],
            "task_metrics": {}}


def _summary(loaded: LoadedOnnx, destination: Path, staged: Any, opset: int, opset_source: str,
             choice: Any, samples: list[_Sample], verification: dict, producer: str,
             seconds: float) -> dict:
    from slimline.backends.onnxruntime import onnx_op_histogram

    written = onnx.load(str(destination), load_external_data=False)
    return {
        "path": str(destination),
        "source": loaded.source,
        "source_producer": producer,
        "source_opset": loaded.opset,
        "opset": opset,
        "opset_source": opset_source,
        "input_names": loaded.input_names,
        "output_names": loaded.output_names,
        "dynamic_axes": _dynamic_axes(written),
        "source_dynamic_axes": _dynamic_axes(loaded.proto),
        "op_histogram_before": onnx_op_histogram(loaded.proto),
        "op_histogram": onnx_op_histogram(written),
        "file_size": staged.size,
        "external_data_path": str(staged.final_data) if staged.data is not None else None,
        "onnxruntime_session": choice.to_json(),
        "inputs": [{"generated": s.generated,
                    "shapes": {k: list(v.shape) for k, v in s.feed.items()}} for s in samples],
        "output_checks": verification["outputs"],
        "seconds": seconds,
    }


def _dynamic_axes(proto: onnx.ModelProto) -> dict[str, dict[str, str]]:
    axes: dict[str, dict[str, str]] = {}
    initializers = {tensor.name for tensor in proto.graph.initializer}
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name in initializers:
            continue
        symbolic = {str(axis): dim.dim_param or "?" for axis, dim in
                    enumerate(value.type.tensor_type.shape.dim) if not dim.HasField("dim_value")}
        if symbolic:
            axes[value.name] = symbolic
    return axes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(error: Any) -> str:
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
