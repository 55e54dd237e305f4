"""The ONNX rule contract, and the small graph helpers the rules share.

An ONNX rule is one file in ``slimline/onnx/`` that rewrites an ``onnx_ir.Model`` in place::

    NAME = "fuse_attention"        # the name the report knows it by
    EXACT = True                   # every rule here is exact up to float reassociation
    MIN_OPSET = 23                 # default-domain opset the replacement needs (0: any)

    def pattern(node) -> dict | Reason | None   # None: not an anchor; Reason: near miss
    def check(model, site) -> Reason | None     # a refusal explains itself
    def replace(model, site) -> None            # edit the graph; stamp every new node

:func:`apply_rule` drives them over the main graph (subgraphs and functions are left alone) and
returns a :class:`RuleResult`: rewrite count, counters, and the reason for every near miss,
which the report shows in its "why not" column. Nodes a rule creates carry the rule's name and
the anchor node they replace in their metadata (``slimline.pass``, ``slimline.source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from slimline.passes.base import Reason

__all__ = [
    "Reason",
    "RuleResult",
    "apply_rule",
    "stamp",
    "producer",
    "consumers",
    "only_consumer",
    "scalar_constant",
    "constant_array",
    "dims",
    "same_dim",
    "attribute",
    "default_opset",
    "remove_unused",
]

PASS_KEY = "slimline.pass"
SOURCE_KEY = "slimline.source"


@dataclass
class RuleResult:
    """What one rule did to one model."""

    name: str
    rewrites: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (anchor node, reason)
    skipped: str = ""  # why the rule did not run at all (opset too old), else empty

    def count(self, key: str, amount: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + amount

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rewrites": self.rewrites, "stats": dict(self.stats),
                "refusals": [{"node": node, "reason": reason} for node, reason in self.refusals],
                "skipped": self.skipped}


def apply_rule(rule: ModuleType, model: ir.Model) -> RuleResult:
    """Run ``rule`` (a module following the contract above) over ``model``'s main graph."""
    result = RuleResult(rule.NAME)
    opset = default_opset(model)
    if opset < getattr(rule, "MIN_OPSET", 0):
        result.skipped = f"needs opset {rule.MIN_OPSET}, the model has {opset}"
        return result
    for node in list(model.graph):
        if node.graph is None:  # removed by an earlier rewrite in this sweep
            continue
        site = rule.pattern(node)
        if site is None:
            continue
        reason = site if isinstance(site, Reason) else rule.check(model, site)
        if reason is not None:
            result.refusals.append((node.name or node.op_type, str(reason)))
            result.count("near_miss")
            continue
        rule.replace(model, site)
        result.rewrites += 1
        for key in [site.get("kind", "rewritten")] + list(site.get("counts", ())):
            result.count(key)
    if result.rewrites:
        remove_unused(model)
    return result


# ---------------------------------------------------------------------------------------------
# graph helpers


def stamp(nodes: Iterable[ir.Node], rule_name: str, source: ir.Node) -> None:
    """Name new nodes after the anchor they replace and record the rule that made them.

    An unnamed anchor first gets a name no other node of its graph has (ONNX wants node names
    unique, and the new nodes' names derive from it)."""
    if not source.name and source.graph is not None:
        taken = {part for node in source.graph if node.name for part in (node.name, node.name.split("/")[0])}
        index = 0
        while f"{source.op_type}_{index}" in taken:
            index += 1
        source.name = f"{source.op_type}_{index}"
    for index, node in enumerate(nodes):
        node.metadata_props[PASS_KEY] = rule_name
        node.metadata_props[SOURCE_KEY] = source.name or source.op_type
        if not node.name:
            node.name = f"{source.name or source.op_type}/{rule_name}/{index}"


def producer(value: ir.Value | None, op_type: str | None = None, domain: str = "") -> ir.Node | None:
    """The node producing ``value`` (of ``op_type`` in ``domain`` when given), else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    if op_type is not None and (node.op_type != op_type or _domain(node) != domain):
        return None
    return node


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def consumers(value: ir.Value) -> list[ir.Node]:
    return list({id(node): node for node, _ in value.uses()}.values())


def only_consumer(value: ir.Value) -> ir.Node | None:
    """The single node reading ``value``, when it is read once and is not a graph output."""
    if value.is_graph_output():
        return None
    users = list(value.uses())
    return users[0].node if len(users) == 1 else None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array held by a constant (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and _domain(node) == "" \
                and "value" in node.attributes:
            tensor = node.attributes["value"].value
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # external data that cannot be read, strings
        return None


def scalar_constant(value: ir.Value | None) -> float | None:
    """The number held by a one-element constant (initializer or Constant node), else None."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    number = float(array.reshape(()))
    return number if not math.isnan(number) else None


def dims(value: ir.Value | None) -> list[Any] | None:
    """The value's dimensions (ints, or dimension names for symbolic ones); None if unknown."""
    if value is None or value.shape is None:
        return None
    found = []
    for dim in value.shape:
        if isinstance(dim, int):
            found.append(dim)
        elif dim.value is not None:
            found.append(str(dim.value))
        else:
            return None  # an anonymous dimension: cannot be compared with another
    return found


def same_dim(a: Any, b: Any) -> bool:
    return a == b and a is not None


def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    found = node.attributes.get(name)
    return default if found is None else found.value


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def remove_unused(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)
