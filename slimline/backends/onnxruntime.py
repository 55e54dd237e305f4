"""Run an exported ONNX file in onnxruntime (CPU) as if it were the original torch model.

:class:`OrtModule` takes the same ``*args, **kwargs`` as the model that was exported. Inputs are
flattened with ``torch.utils._pytree`` in the order ``torch.onnx.export`` flattens them (``None``
and non-tensor leaves dropped: the exporter baked those in as constants), handed to the session
as numpy arrays, and the outputs come back as torch tensors rebuilt into the model's own output
structure (tuple, dict, Hugging Face ``ModelOutput``...). That structure is the pytree spec that
:func:`~slimline.backends.onnx_export.export_onnx_model` stores in the file's metadata under
``slimline.output_spec`` (``None`` leaves, which have no ONNX output, are listed under
``slimline.output_none_leaves``); without it the outputs come back as a tuple (one output: the
tensor).

:func:`ort_op_histogram` counts the operators of the graph ORT actually runs after its own graph
optimizations (fused ``com.microsoft`` kernels included), which is what shows whether ORT fused
attention, layer norms or GEMMs; :func:`onnx_op_histogram` counts the operators in the file.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

from slimline.errors import BackendError, InputError

__all__ = [
    "OrtModule",
    "load_ort_module",
    "ort_op_histogram",
    "onnx_op_histogram",
    "make_session",
    "missing_cpu_kernels",
    "OPTIMIZATION_LEVELS",
    "OUTPUT_SPEC_KEY",
    "NONE_LEAVES_KEY",
]

OUTPUT_SPEC_KEY = "slimline.output_spec"  # ONNX metadata key: the output pytree spec as JSON
NONE_LEAVES_KEY = "slimline.output_none_leaves"  # JSON list: leaf indices that are None

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_CPU = ["CPUExecutionProvider"]


def _session_options(graph_optimization_level: str | ort.GraphOptimizationLevel,
                     intra_op_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if isinstance(graph_optimization_level, str):
        if graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level {graph_optimization_level!r}",
                stage="onnxruntime", where="graph_optimization_level",
                hint=f"use one of {sorted(OPTIMIZATION_LEVELS)}")
        graph_optimization_level = OPTIMIZATION_LEVELS[graph_optimization_level]
    options.graph_optimization_level = graph_optimization_level
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    options.log_severity_level = 3  # errors only; ORT's warnings go to stderr otherwise
    return options


def make_session(path: str | os.PathLike, *,
                 graph_optimization_level: str | ort.GraphOptimizationLevel = "all",
                 intra_op_threads: int | None = None,
                 optimized_model_path: str | os.PathLike | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for the ONNX file at ``path`` (external data next to it)."""
    options = _session_options(graph_optimization_level, intra_op_threads)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        # keep weights out of the optimized file: only its graph is read back
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            Path(optimized_model_path).name + ".data")
    return ort.InferenceSession(str(path), options, providers=_CPU)


# ---------------------------------------------------------------------------------------------
# torch <-> numpy


def flat_input_tensors(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The tensors of ``(args, kwargs)`` in the order the ONNX graph takes them as inputs."""
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _to_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    if tensor.dtype == torch.bfloat16 or tensor.is_complex():
        raise InputError(
            f"input {name!r} has dtype {tensor.dtype}, which onnxruntime's CPU provider cannot "
            f"take from numpy", stage="onnxruntime", where=f"input {name!r}",
            hint="export and run the model in float32 (model.float()) for the CPU provider")
    return tensor.detach().to("cpu").contiguous().numpy()


def input_feed(session: ort.InferenceSession, args: tuple,
               kwargs: dict | None) -> dict[str, np.ndarray]:
    """Map the torch inputs onto the session's input names, in order."""
    tensors = flat_input_tensors(args, kwargs)
    names = [value.name for value in session.get_inputs()]
    if len(tensors) != len(names):
        raise InputError(
            f"the ONNX model takes {len(names)} tensor inputs {names}, got {len(tensors)} tensors",
            stage="onnxruntime", where="inputs",
            hint="pass the same arguments (same structure, same keywords) as the exported model")
    return {name: _to_numpy(tensor, name) for name, tensor in zip(names, tensors)}


# ---------------------------------------------------------------------------------------------
# output structure


def dump_output_spec(spec: pytree.TreeSpec) -> str | None:
    """The spec as JSON, or ``None`` when a node type has no serialized name."""
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # unregistered node types or keys JSON cannot hold
        return None


def load_output_spec(text: str) -> pytree.TreeSpec | None:
    """Parse a stored output spec; ``None`` when a node type in it cannot be resolved here.

    Types such as ``transformers.modeling_outputs.CausalLMOutput`` register with pytree when
    their module is imported. A module named in the spec is imported only when its top-level
    package already is (a file never makes slimline import a package the caller did not).
    """
    try:
        return pytree.treespec_loads(text)
    except Exception:
        pass
    try:
        type_names = _spec_type_names(json.loads(text)[1])
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    for type_name in type_names:
        module = type_name.rpartition(".")[0]
        if module and module not in sys.modules and module.split(".")[0] in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                return None
    try:
        return pytree.treespec_loads(text)
    except Exception:  # still unresolved: the caller gets flat outputs
        return None


def _spec_type_names(node: dict) -> list[str]:
    names = [node["type"]] if node.get("type") else []
    for child in node.get("children_spec", []):
        names += _spec_type_names(child)
    return names


# ---------------------------------------------------------------------------------------------


class OrtModule:
    """An onnxruntime session that is called like the torch model it was exported from.

    ``OrtModule(path)`` loads the file on the CPU provider; ``output_spec`` (a pytree
    ``TreeSpec``) overrides the structure stored in the file.
    """

    def __init__(self, path: str | os.PathLike, *, output_spec: pytree.TreeSpec | None = None,
                 graph_optimization_level: str | ort.GraphOptimizationLevel = "all",
                 intra_op_threads: int | None = None):
        self._open(path, lambda file: make_session(
            file, graph_optimization_level=graph_optimization_level,
            intra_op_threads=intra_op_threads),
            output_spec, hint="re-export with slimline.export_onnx (it checks the file in ORT), "
                              "or try graph_optimization_level='basic'")

    def _open(self, path: str | os.PathLike, make: Callable[[Path], Any],
              output_spec: pytree.TreeSpec | None, hint: str) -> None:
        """Load the session with ``make(path)``; read the output structure from the metadata."""
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no ONNX file at {str(self.path)!r}", stage="onnxruntime",
                             where=str(self.path), hint="check the path, or export first")
        try:
            self.session = make(self.path)
        except InputError:
            raise
        except Exception as error:
            raise BackendError(f"onnxruntime cannot load {self.path.name}: {_first_line(error)}",
                               stage="onnxruntime", where=str(self.path), hint=hint) from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        if output_spec is None and OUTPUT_SPEC_KEY in metadata:
            output_spec = load_output_spec(metadata[OUTPUT_SPEC_KEY])
        none_leaves = tuple(json.loads(metadata.get(NONE_LEAVES_KEY, "[]")))
        if output_spec is not None and \
                output_spec.num_leaves != len(self.output_names) + len(none_leaves):
            output_spec = None  # not this file's structure: fall back to a tuple
        self.output_spec = output_spec
        self.none_leaves = none_leaves if output_spec is not None else ()

    @property
    def input_names(self) -> list[str]:
        return [value.name for value in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [value.name for value in self.session.get_outputs()]

    def run_numpy(self, args: tuple, kwargs: dict | None = None) -> list[np.ndarray]:
        """Run on torch inputs; the outputs as numpy arrays, flat, in ONNX output order."""
        feed = input_feed(self.session, args, kwargs)
        try:
            return self.session.run(None, feed)
        except Exception as error:
            expected = {value.name: value.shape for value in self.session.get_inputs()}
            given = {name: list(array.shape) for name, array in feed.items()}
            raise InputError(
                f"onnxruntime rejected the inputs: {_first_line(error)}", stage="onnxruntime",
                where=f"{self.path.name}: inputs {given}",
                hint=f"the model takes shapes {expected} (strings are dynamic axes); export "
                     f"with dynamic_shapes to vary a fixed axis") from error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arrays = self.run_numpy(args, kwargs)
        device = next((t.device for t in flat_input_tensors(args, kwargs)), torch.device("cpu"))
        tensors = [torch.from_numpy(np.asarray(array)).to(device) for array in arrays]
        if self.output_spec is not None:
            leaves: list[torch.Tensor | None] = list(tensors)
            for index in self.none_leaves:
                leaves.insert(index, None)
            return pytree.tree_unflatten(leaves, self.output_spec)
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def __repr__(self) -> str:
        return (f"OrtModule({str(self.path)!r}, inputs={self.input_names}, "
                f"outputs={self.output_names})")


def load_ort_module(path: str | os.PathLike, *, output_spec: pytree.TreeSpec | None = None,
                    graph_optimization_level: str | ort.GraphOptimizationLevel = "all",
                    intra_op_threads: int | None = None) -> OrtModule:
    """Load an exported ONNX file as an :class:`OrtModule` on the CPU provider."""
    return OrtModule(path, output_spec=output_spec,
                     graph_optimization_level=graph_optimization_level,
                     intra_op_threads=intra_op_threads)


# ---------------------------------------------------------------------------------------------
# kernels


@functools.lru_cache(maxsize=None)
def _cpu_kernel_ranges() -> dict[str, tuple[tuple[int, int], ...]]:
    from onnxruntime.capi import _pybind_state

    ranges: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.provider == "CPUExecutionProvider" and kernel.domain in ("", "ai.onnx"):
            ranges[kernel.op_name].append(tuple(kernel.version_range))
    return {op: tuple(found) for op, found in ranges.items()}


def _has_cpu_kernel(op_type: str, since_version: int) -> bool:
    # ORT's matching rule: an open-ended kernel range only matches the version it starts at, so
    # a new version of an op (Attention-25) has no kernel until ORT registers one
    open_ended = 2**31 - 1
    for start, end in _cpu_kernel_ranges().get(op_type, ()):
        if start == since_version or (start < since_version <= end and end != open_ended):
            return True
    return False


def missing_cpu_kernels(op_types: Any, opset: int) -> list[str]:
    """Default-domain ops that ORT's CPU provider implements, but not in the version ``opset``
    selects (``Attention-25``): ORT then runs the op's ONNX function body, slower, or refuses
    the model. Ops ORT never has a kernel for (``Constant``, function-only ops) are left out."""
    missing = []
    for op_type in sorted(set(op_types)):
        if op_type not in _cpu_kernel_ranges():
            continue
        try:
            since_version = onnx.defs.get_schema(op_type, opset, "").since_version
        except onnx.defs.SchemaError:
            continue  # not a standard op: nothing to check here
        if not _has_cpu_kernel(op_type, since_version):
            missing.append(f"{op_type}-{since_version}")
    return missing


# ---------------------------------------------------------------------------------------------
# operator histograms


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _count_graph(graph: onnx.GraphProto, counts: collections.Counter) -> None:
    for node in graph.node:
        counts[_op_key(node)] += 1
        for attribute in node.attribute:  # If / Loop / Scan bodies
            if attribute.type == onnx.AttributeProto.GRAPH:
                _count_graph(attribute.g, counts)
            for subgraph in attribute.graphs:
                _count_graph(subgraph, counts)


def onnx_op_histogram(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Operator counts of an ONNX graph (subgraphs included), most frequent first.

    Ops outside the default domain are keyed ``domain::OpType`` (``com.microsoft::FusedMatMul``).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts: collections.Counter = collections.Counter()
    _count_graph(model.graph, counts)
    for function in model.functions:
        for node in function.node:
            counts[_op_key(node)] += 1
    return dict(counts.most_common())


def ort_op_histogram(onnx_path: str | os.PathLike, *,
                     graph_optimization_level: str | ort.GraphOptimizationLevel = "all"
                     ) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs (CPU) after its graph optimizations."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"no ONNX file at {str(onnx_path)!r}", stage="onnxruntime",
                         where=str(onnx_path), hint="check the path, or export first")
    with tempfile.TemporaryDirectory(prefix="slimline-ort-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        try:
            session = make_session(onnx_path, graph_optimization_level=graph_optimization_level,
                                   optimized_model_path=optimized)
        except InputError:
            raise
        except Exception as error:
            raise BackendError(
                f"onnxruntime cannot load {onnx_path.name}: {_first_line(error)}",
                stage="onnxruntime", where=str(onnx_path),
                hint="try graph_optimization_level='basic'") from error
        del session
        return onnx_op_histogram(optimized)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
