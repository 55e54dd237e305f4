"""Fuse attention written out in ONNX ops into one ONNX ``Attention`` node (opset 23+).

Exact. Runs first among the ONNX rules; :mod:`slimline.onnx.attention_heads_3d` then removes
the head split/merge around what it creates. For files from any exporter (ONNX in): torch's
legacy exporter and the dynamo exporter below opset 23 write SDPA and hand-written attention as
MatMul / Softmax chains, which onnxruntime 1.32 leaves unfused (its own ``AttentionFusion`` and
its transformers optimizer both missed them on dynamo exports, see DESIGN.md). slimline's own
exports already carry ``Attention`` (from ``aten.scaled_dot_product_attention`` at opset 24).

Shape letters: B batch, H query heads, Hk key/value heads, S query length, L key length,
E query/key head width, Ev value head width.

    pattern   scores_BHSL = MatMul(query_BHSE [· c], keyT_BHEL [· c])     keyT: Transpose(0,1,3,2)
                            [· c | / c ...] [+ mask ...]                       of key_BHkLE, or
              probs_BHSL  = Softmax(scores, axis=-1)                           Transpose(0,2,3,1) of
                            [Where(IsNaN(probs), 0, probs)]                    key_BLHkE, or torch's
              out_BHSEv   = MatMul(probs, value_BHkLEv)                        Reshape·Transpose·Reshape
    check     every intermediate value is read once; scales are one-element constants; no mask is
              added before a scale (it would be scaled too); masks are float, of rank 2 to 4, and
              their shapes known; ranks are 4; ORT has a CPU kernel for Attention at this opset
    replace   out_BHSEv = Attention(query, key, value, Σ masks [Expand to S rows], scale=Π c)
              [Where(IsNaN(out), 0, out) when a mask may hold -inf: see below]

The mask: ``Attention`` adds it to ``scale·QKᵀ`` like the original; onnxruntime requires its
query dimension spelled out (a (B, 1, 1, L) padding mask is expanded to (B, 1, S, L), a view).
The NaN guard: torch writes SDPA as ``Where(IsNaN(p), 0, p)`` so that a query row whose keys are
all masked with -inf gives zeros. When every mask term is provably finite (no mask, or masks made
by ``Where`` from two finite constants, torch's form of a boolean mask) no row can be NaN and
the guard is dropped (``nan_guard_dropped``); otherwise it is kept on the output, which gives the
same zeros for such rows (``nan_guard_kept``).

Counters: ``fused`` (no mask), ``fused_mask``, ``fused_masks`` (several mask terms summed),
``near_miss``; a refused Softmax gets its reason.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from slimline.onnx.base import (Reason, attribute, default_opset, dims, only_consumer, producer,
                                same_dim, scalar_constant, stamp)

__all__ = ["NAME", "EXACT", "MIN_OPSET", "pattern", "check", "replace"]

NAME = "fuse_attention"
EXACT = True
MIN_OPSET = 23  # ONNX Attention
_MAX_CHAIN = 8  # scale and mask nodes between the QK MatMul and the Softmax


def pattern(node: ir.Node) -> dict | Reason | None:
    if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return None
    scores_BHSL = node.inputs[0]
    shape = dims(scores_BHSL)
    if shape is None:
        return Reason("the scores' shape is unknown (run shape inference)")
    if len(shape) != 4:
        return Reason(f"softmax over a rank-{len(shape)} tensor, not (B, H, S, L)")
    if attribute(node, "axis", -1) not in (-1, 3):
        return Reason("softmax is not over the last axis")

    site = {"softmax": node}
    output = _match_output(node.outputs[0], site)
    if isinstance(output, Reason):
        return output
    scores = _match_scores(scores_BHSL, site)
    if isinstance(scores, Reason):
        return scores
    return site


def _match_output(probs_BHSL: ir.Value, site: dict) -> Reason | None:
    """Softmax → [Where(IsNaN(p), 0, p)] → MatMul(p, value)."""
    users = [use.node for use in probs_BHSL.uses()]
    site["guard"] = None
    if probs_BHSL.is_graph_output():
        return Reason("the probabilities are a graph output")
    if len(users) == 2 and {n.op_type for n in users} == {"IsNaN", "Where"}:
        is_nan = next(n for n in users if n.op_type == "IsNaN")
        where = next(n for n in users if n.op_type == "Where")
        if not (only_consumer(is_nan.outputs[0]) is where and where.inputs[0] is is_nan.outputs[0]
                and where.inputs[2] is probs_BHSL and scalar_constant(where.inputs[1]) == 0.0):
            return Reason("the probabilities feed an IsNaN/Where that is not a NaN guard")
        site["guard"] = (is_nan, where)
        probs_BHSL = where.outputs[0]
    elif len(users) != 1:
        return Reason("the probabilities feed more than one node")
    matmul = only_consumer(probs_BHSL)
    if matmul is None or matmul.op_type != "MatMul" or matmul.inputs[0] is not probs_BHSL:
        return Reason("the probabilities do not feed a MatMul with the values")
    site["output_matmul"] = matmul
    site["value"] = matmul.inputs[1]
    return None


def _match_scores(scores_BHSL: ir.Value, site: dict) -> Reason | None:
    """Walk back from the Softmax through masks and scales to the QK MatMul."""
    masks: list[ir.Value] = []
    scale = 1.0
    scaled = False  # a scale was met: a mask before it would be scaled too
    value = scores_BHSL
    for _ in range(_MAX_CHAIN):
        node = producer(value)
        if node is None:
            return Reason("the scores do not come from a MatMul")
        if value is not scores_BHSL and only_consumer(value) is None:
            return Reason(f"an intermediate score value ({value.name}) is read elsewhere")
        if node.op_type == "MatMul":
            site["qk_matmul"] = node
            site["masks"] = masks[::-1]  # in the order they were added
            return _match_query_key(node, scale, site)
        if node.op_type in ("Mul", "Div"):
            factor, other = _scalar_operand(node)
            if factor is None:
                return Reason(f"the scores are scaled by a {node.op_type} with a non-constant")
            if factor == 0.0 or not math.isfinite(factor):
                return Reason(f"the scale {factor} is not a finite non-zero number")
            scale = scale * factor if node.op_type == "Mul" else scale / factor
            scaled = True
            value = other
            continue
        if node.op_type == "Add":
            path, mask = _split_add(node)
            if path is None:
                return Reason("neither operand of a score Add leads back to a MatMul")
            if scaled:
                return Reason("a mask is added before a scale (the scale would apply to it)")
            masks.append(mask)
            value = path
            continue
        return Reason(f"the scores pass through {node.op_type}, which the rule does not know")
    return Reason("too many nodes between the MatMul and the Softmax")


def _scalar_operand(node: ir.Node) -> tuple[float | None, ir.Value | None]:
    left, right = node.inputs
    factor = scalar_constant(right)
    if factor is not None:
        return factor, left
    if node.op_type == "Mul":
        factor = scalar_constant(left)
        if factor is not None:
            return factor, right
    return None, None


def _leads_to_matmul(value: ir.Value, depth: int = _MAX_CHAIN) -> bool:
    node = producer(value)
    if node is None or depth == 0 or only_consumer(value) is None:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type in ("Mul", "Div"):
        factor, other = _scalar_operand(node)
        return factor is not None and _leads_to_matmul(other, depth - 1)
    if node.op_type == "Add":
        return any(_leads_to_matmul(operand, depth - 1) for operand in node.inputs)
    return False


def _split_add(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    left, right = node.inputs
    if _leads_to_matmul(left):
        return left, right
    if _leads_to_matmul(right):
        return right, left
    return None, None


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """``x · c`` (c a one-element constant, the product read once) → ``(x, c)``."""
    node = producer(value)
    if node is not None and node.op_type in ("Mul", "Div") and only_consumer(value) is not None:
        factor, other = _scalar_operand(node)
        if factor is not None and factor != 0.0 and math.isfinite(factor):
            return other, factor if node.op_type == "Mul" else 1.0 / factor
    return value, 1.0


def _match_query_key(qk_matmul: ir.Node, scale: float, site: dict) -> Reason | None:
    query_BHSE, query_scale = _strip_scale(qk_matmul.inputs[0])
    key_t, key_scale = _strip_scale(qk_matmul.inputs[1])
    key = _untranspose_key(key_t)
    if isinstance(key, Reason):
        return key
    site["query"] = query_BHSE
    site["key"], site["key_layout"] = key
    site["scale"] = scale * query_scale * key_scale
    return None


def _untranspose_key(key_t_BHEL: ir.Value) -> tuple[ir.Value, str] | Reason:
    """The key (B, Hk, L, E) — or (B, L, Hk, E), layout "BLHE" — behind ``Kᵀ``."""
    transpose = producer(key_t_BHEL, "Transpose")
    if transpose is not None:
        perm = list(attribute(transpose, "perm", []) or [])
        if perm == [0, 1, 3, 2]:
            return transpose.inputs[0], "BHLE"
        if perm == [0, 2, 3, 1]:
            return transpose.inputs[0], "BLHE"
        return Reason(f"the key is transposed with perm {perm}, not as Kᵀ")
    # torch's SDPA decomposition: Reshape(Transpose(Reshape(key, (-1, L, E)), (0, 2, 1)), (B, H, E, L))
    outer = producer(key_t_BHEL, "Reshape")
    middle = producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = producer(middle.inputs[0], "Reshape") if middle is not None else None
    if inner is None or list(attribute(middle, "perm", []) or []) != [0, 2, 1]:
        return Reason("the key is not a transposed tensor (Transpose, or Reshape·Transpose·Reshape)")
    key_BHLE, key_t = dims(inner.inputs[0]), dims(key_t_BHEL)
    if key_BHLE is None or key_t is None or len(key_BHLE) != 4 or len(key_t) != 4 or not all(
            same_dim(a, b) for a, b in zip(key_BHLE, [key_t[0], key_t[1], key_t[3], key_t[2]])):
        return Reason("the key's Reshape·Transpose·Reshape is not Kᵀ of a 4-D key (shapes)")
    return inner.inputs[0], "BHLE"


# ---------------------------------------------------------------------------------------------


def check(model: ir.Model, site: dict) -> Reason | None:
    from slimline.backends.onnxruntime import missing_cpu_kernels

    opset = default_opset(model)
    if missing_cpu_kernels(["Attention"], opset):
        return Reason(f"onnxruntime has no CPU kernel for Attention at opset {opset}")
    query, key, value = dims(site["query"]), dims(site["key"]), dims(site["value"])
    if query is None or key is None or value is None:
        return Reason("query, key or value shape unknown")
    if site["key_layout"] == "BLHE" and len(key) == 4:
        key = [key[0], key[2], key[1], key[3]]
    if len(query) != 4 or len(key) != 4 or len(value) != 4:
        return Reason("query, key and value are not all 4-D (B, H, S, E)")
    dtype = site["query"].dtype
    if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return Reason(f"the query has dtype {dtype}, not a float type Attention takes")
    mask_dims = []
    for mask in site["masks"]:
        if mask.dtype != dtype:
            return Reason(f"a mask has dtype {mask.dtype}, the scores {dtype}")
        shape = dims(mask)
        if shape is None:
            return Reason("a mask's shape is unknown")
        if not 2 <= len(shape) <= 4:
            return Reason(f"a mask of rank {len(shape)} (Attention takes rank 2 to 4)")
        mask_dims.append(shape)
    if mask_dims:
        combined = _broadcast(mask_dims)
        if combined is None:
            return Reason("the masks' shapes do not broadcast to one shape")
        site["mask_dims"] = combined
    site["kind"] = "fused" if not site["masks"] else \
        ("fused_mask" if len(site["masks"]) == 1 else "fused_masks")
    return None


def _broadcast(shapes: list[list]) -> list | None:
    rank = max(len(shape) for shape in shapes)
    padded = [[1] * (rank - len(shape)) + list(shape) for shape in shapes]
    result = []
    for column in zip(*padded):
        sizes = {size for size in column if size != 1}
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else 1)
    return result


def _finite_mask(mask: ir.Value) -> bool:
    """True when ``mask`` provably holds no infinity: a finite constant, or Where of two."""
    if mask.const_value is not None:
        try:
            return bool(np.all(np.isfinite(mask.const_value.numpy())))
        except Exception:
            return False
    node = producer(mask, "Where")
    if node is None:
        return False
    values = [scalar_constant(node.inputs[1]), scalar_constant(node.inputs[2])]
    return all(v is not None and math.isfinite(v) for v in values)


def replace(model: ir.Model, site: dict) -> None:
    tape = ir.tape.Tape()
    query_BHSE, key, value_BHLEv = site["query"], site["key"], site["value"]
    if site["key_layout"] == "BLHE":
        key = tape.op("Transpose", [key], attributes={"perm": [0, 2, 1, 3]})
    inputs = [query_BHSE, key, value_BHLEv]
    if site["masks"]:
        mask = site["masks"][0]
        for term in site["masks"][1:]:
            mask = tape.op("Add", [mask, term])
        shape = site["mask_dims"]
        if shape[-2] == 1:  # ORT wants the query rows spelled out: expand (…, 1, L) to (…, S, L)
            rows = tape.op("Shape", [query_BHSE], attributes={"start": 2, "end": 3})
            ones = ir.tensor(np.ones(len(shape) - 2, dtype=np.int64))
            lead = tape.op("Constant", [], attributes={"value": ones})
            last = tape.op("Constant", [], attributes={"value": ir.tensor(np.ones(1, np.int64))})
            target = tape.op("Concat", [lead, rows, last], attributes={"axis": 0})
            mask = tape.op("Expand", [mask, target])
        inputs.append(mask)
    output = tape.op("Attention", inputs, attributes={"scale": float(site["scale"])})
    keep_guard = site["guard"] is not None and not all(_finite_mask(m) for m in site["masks"])
    if keep_guard:
        zero = tape.op("Constant", [], attributes={
            "value": ir.tensor(np.zeros((), dtype=query_BHSE.dtype.numpy()))})
        output = tape.op("Where", [tape.op("IsNaN", [output]), zero, output])
    if site["guard"] is not None:
        site["counts"] = ["nan_guard_kept" if keep_guard else "nan_guard_dropped"]
    matmul: ir.Node = site["output_matmul"]
    old = matmul.outputs[0]
    output.type, output.shape = old.type, old.shape
    stamp(tape.nodes, NAME, site["softmax"])
    ir.convenience.replace_nodes_and_values(model.graph, matmul, [matmul], list(tape.nodes),
                                            [old], [output])
