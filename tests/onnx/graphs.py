"""Tiny ONNX graphs for the rule tests, and running them in onnxruntime.

Shape letters: B batch, S sequence, H heads, E head width, D = H·E.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h

B, S, H, E = 2, 8, 2, 4
D = H * E


def constant(name: str, array) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def model(nodes, inputs, outputs, initializers=(), opset: int = 24) -> ir.Model:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset),
                                               h.make_opsetid("com.microsoft", 1)], ir_version=10)
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    return ir.serde.deserialize_model(proto)


def tensor(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, dtype, shape)


def run(graph: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(graph)
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def op_types(graph: ir.Model) -> list[str]:
    return [node.op_type for node in graph.graph]


def copy(graph: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(graph))


def random_feed(**shapes) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    return {name: generator.standard_normal(shape).astype(np.float32)
            for name, shape in shapes.items()}
