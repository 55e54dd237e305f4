"""The Graph every slimline pass reads and writes.

A :class:`Graph` is the captured FX ``GraphModule`` (ATen ops, from ``torch.export``) plus what
the passes need beside it: the example inputs, the dynamic dimensions as sympy symbols named by
the user (``batch``, ``seq``), and helpers for node provenance and module paths.

Shapes live on ``node.meta["val"]`` (FakeTensors whose sizes are ints or SymInts); the internal
symbols (``s77``) are renamed to the user's names through :attr:`Graph.rename`.

Parameters are shared with the user's model, read-only: a pass that changes a weight registers a
new tensor (:meth:`Graph.add_parameter`) and never writes into an existing one.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import sympy
import torch
import torch.fx as fx

__all__ = ["Graph", "module_path", "stamp", "PROVENANCE_PASS", "PROVENANCE_SOURCE"]

PROVENANCE_PASS = "slimline_pass"
PROVENANCE_SOURCE = "slimline_source"

_NEW_PARAM_PREFIX = "slimline_"


def module_path(node: fx.Node) -> str:
    """The source module path of a node (``blocks.3.mlp.fc``), or ``""`` for the top module.

    Nodes created by a pass carry the path of the nodes they replaced (:func:`stamp`).
    """
    source = node.meta.get(PROVENANCE_SOURCE)
    if source is not None:
        return source
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _type = list(stack.values())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # strict export writes "L['self'].blocks[0].mlp"; non-strict writes "blocks.0.mlp"
    path = path.replace("L['self']", "").replace("L__self__", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


def stamp(node: fx.Node, pass_name: str, source: fx.Node | str) -> fx.Node:
    """Record provenance on a node a pass created: the pass name and the source module path."""
    node.meta[PROVENANCE_PASS] = pass_name
    node.meta[PROVENANCE_SOURCE] = source if isinstance(source, str) else module_path(source)
    if isinstance(source, fx.Node) and "nn_module_stack" in source.meta:
        node.meta.setdefault("nn_module_stack", source.meta["nn_module_stack"])
    return node


@dataclass
class Graph:
    """A captured model: the FX GraphModule and what passes need to reason about it."""

    module: fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    rename: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)
    dynamic_shapes: Any = None
    source_name: str = "model"
    strict: bool = False

    def __post_init__(self) -> None:
        # the graph was captured in eval mode and computes as such; its module says so too, so
        # task metrics that refuse models in training mode accept it. (An exported module refuses
        # .eval(); its ops are fixed at capture, so only the flag is set.)
        for submodule in self.module.modules():
            submodule.training = False

    # -- structure -----------------------------------------------------------------------------
    @property
    def fx(self) -> fx.Graph:
        return self.module.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.module.graph.nodes)

    @property
    def symbols(self) -> list[sympy.Symbol]:
        """The user-named dynamic dimensions, in a stable order."""
        return sorted(set(self.rename.values()), key=lambda s: s.name)

    def call_nodes(self, *targets) -> list[fx.Node]:
        """``call_function`` nodes whose target is one of ``targets`` (all of them when empty)."""
        found = [n for n in self.fx.nodes if n.op == "call_function"]
        if targets:
            found = [n for n in found if n.target in targets]
        return found

    def to_networkx(self) -> nx.DiGraph:
        """A networkx view for analysis: one vertex per node, an edge per data dependency."""
        view = nx.DiGraph()
        for node in self.fx.nodes:
            view.add_node(node.name, op=node.op, target=str(node.target), module=module_path(node))
            for user in node.users:
                view.add_edge(node.name, user.name)
        return view

    # -- tensors -------------------------------------------------------------------------------
    def attribute(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor behind a ``get_attr`` node, or None when the node is not one."""
        if node.op != "get_attr":
            return None
        value: Any = self.module
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None

    def add_parameter(self, hint: str, tensor: torch.Tensor, *, before: fx.Node) -> fx.Node:
        """Register a new constant tensor on the module and return a ``get_attr`` node for it.

        Inserted before ``before``; the name is unique and starts with ``slimline_``.
        """
        base = _NEW_PARAM_PREFIX + "".join(c if c.isalnum() else "_" for c in hint).strip("_")
        name = base
        for index in itertools.count(1):
            if not hasattr(self.module, name):
                break
            name = f"{base}_{index}"
        self.module.register_buffer(name, tensor.detach(), persistent=True)
        with self.fx.inserting_before(before):
            node = self.fx.get_attr(name)
        node.meta["val"] = tensor
        return node

    def parameter_count(self) -> int:
        """Elements in every tensor the graph reads through ``get_attr`` (weights and buffers)."""
        seen: set[int] = set()
        total = 0
        for node in self.fx.nodes:
            tensor = self.attribute(node)
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
        return total

    # -- life cycle ----------------------------------------------------------------------------
    def copy(self) -> "Graph":
        """A structural copy that passes may edit freely; weight tensors stay shared (read-only)."""
        old_graph = self.module.graph
        new_graph = fx.Graph(tracer_cls=old_graph._tracer_cls)
        with warnings.catch_warnings():  # pytree's deprecation notice on copying its specs
            warnings.simplefilter("ignore", FutureWarning)
            new_graph._codegen = copy.deepcopy(old_graph._codegen)
        value_map: dict[fx.Node, fx.Node] = {}
        output = new_graph.graph_copy(old_graph, value_map, return_output_node=True)
        if isinstance(output, tuple):  # (value, output node) on newer torch
            output_value, old_output = output
            new_graph.output(output_value, type_expr=getattr(old_output, "type", None))
        module = fx.GraphModule(self.module, new_graph, class_name=type(self.module).__name__)
        for attr in ("_in_spec", "_out_spec", "meta"):
            if hasattr(self.module, attr):
                setattr(module, attr, getattr(self.module, attr))
        for name, buffer in self.module.named_buffers(recurse=False):
            if name.startswith(_NEW_PARAM_PREFIX) and not hasattr(module, name):
                module.register_buffer(name, buffer)
        return Graph(module, self.example_args, self.example_kwargs, dict(self.rename),
                     self.dynamic_shapes, self.source_name, self.strict)

    def recompile(self) -> None:
        """Lint and regenerate code after a pass edited the graph."""
        self.fx.lint()
        self.module.recompile()

    def run(self, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        """Run the graph in torch on the given (default: example) inputs."""
        args = self.example_args if args is None else args
        kwargs = self.example_kwargs if kwargs is None else kwargs
        with torch.no_grad():
            return self.module(*args, **kwargs)
