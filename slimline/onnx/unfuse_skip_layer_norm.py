"""Un-fuse ``com.microsoft::SkipLayerNormalization`` back into ``Add`` + ``LayerNormalization``.

Exact. Runs last among the ONNX rules; it needs nothing from the others.

Why the reverse of a fusion: onnxruntime 1.32's CPU ``SkipLayerNormalization`` kernel is about
five times slower than the two ops it replaces. Measured on this project's 2-core CPU machine
(one intra-op thread, process CPU time, medians of 200 interleaved runs of ten chained ops):
(1, 128, 384) float32 takes 274 µs per SkipLayerNormalization, 55 µs per Add + LayerNormalization
left unfused; (1, 128, 768): 562 µs against 106 µs. ORT's own graph optimizer performs this
fusion at ``ORT_ENABLE_EXTENDED`` and above (``SkipLayerNormFusion``), and ORT's transformers
optimizer writes the fused op into files, so the rule undoes the second and the session options
chosen by :mod:`slimline.onnx.session` switch off the first. On MiniLM (sequence 128) that is
about 8% of the whole model's CPU time.

Shape letters: B batch, S sequence, D hidden width.

    pattern   out_BSD[, mean, inv_std, sum_BSD] = SkipLayerNormalization(input_BSD, skip_BSD,
                                                   gamma_D[, beta_D[, bias_D]], epsilon=e)
    check     the mean / inv_std_var outputs are unused (LayerNormalization's differ in shape);
              the model's opset has LayerNormalization (17+)
    replace   sum_BSD = Add(input, skip) [then Add(sum, bias)]
              out_BSD = LayerNormalization(sum, gamma[, beta], axis=-1, epsilon=e)

Counters: ``unfused`` per rewrite, ``unfused_with_bias`` when the bias input was present.
"""

from __future__ import annotations

import onnx_ir as ir

from slimline.onnx.base import Reason, attribute, stamp

__all__ = ["NAME", "EXACT", "MIN_OPSET", "pattern", "check", "replace"]

NAME = "unfuse_skip_layer_norm"
EXACT = True
MIN_OPSET = 17  # LayerNormalization
_DOMAIN = "com.microsoft"


def pattern(node: ir.Node) -> dict | Reason | None:
    if node.op_type != "SkipLayerNormalization" or node.domain != _DOMAIN:
        return None
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    input_BSD, skip_BSD, gamma_D, beta_D, bias_D = inputs[:5]
    if input_BSD is None or skip_BSD is None or gamma_D is None:
        return Reason("an input, skip or gamma is missing")
    return {"node": node, "input": input_BSD, "skip": skip_BSD, "gamma": gamma_D,
            "beta": beta_D, "bias": bias_D, "kind": "unfused_with_bias" if bias_D else "unfused"}


def check(model: ir.Model, site: dict) -> Reason | None:
    outputs = site["node"].outputs
    for index in (1, 2):  # mean, inv_std_var: shapes differ from LayerNormalization's
        if len(outputs) > index and (outputs[index].uses() or outputs[index].is_graph_output()):
            return Reason(f"output {index} (mean / inv_std_var) is used")
    return None


def replace(model: ir.Model, site: dict) -> None:
    node: ir.Node = site["node"]
    tape = ir.tape.Tape()
    sum_BSD = tape.op("Add", [site["input"], site["skip"]])
    if site["bias"] is not None:
        sum_BSD = tape.op("Add", [sum_BSD, site["bias"]])
    norm_inputs = [sum_BSD, site["gamma"]] + ([site["beta"]] if site["beta"] is not None else [])
    out_BSD = tape.op("LayerNormalization", norm_inputs,
                      attributes={"axis": -1, "epsilon": float(attribute(node, "epsilon", 1e-5))})
    stamp(tape.nodes, NAME, node)
    old_values, new_values = [node.outputs[0]], [out_BSD]
    if len(node.outputs) > 3:
        old_values.append(node.outputs[3])
        new_values.append(sum_BSD)
    out_BSD.type = node.outputs[0].type
    sum_BSD.type = node.outputs[0].type
    ir.convenience.replace_nodes_and_values(model.graph, node, [node], list(tape.nodes),
                                            old_values, new_values)
