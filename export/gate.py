"""The graph gate every exported or imported model passes (no TensorFlow).

Control flow (``Loop``, ``Scan``, ``If``) falls back to host code and kills batching throughput;
ops outside the allow-list may not run on onnxruntime's CUDA execution provider. A graph holding
either is refused, naming the ops and where they come from: the Keras layers (tf2onnx names nodes
after the layer path) or, for an imported graph, the nodes.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from fusionserve.errors import ExportError

# Ops onnxruntime's CUDA execution provider runs (a conservative subset). Loop/Scan/If are left
# out on purpose: they fall back to host control flow and kill batching throughput.
ALLOWED_OPS = frozenset(
    {
        "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
        "ConstantOfShape", "Conv", "Div", "Dropout", "Equal", "Erf", "Exp", "Expand", "Flatten",
        "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "Identity", "LSTM", "GRU",
        "LeakyRelu", "Less", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Pad", "Pow",
        "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceProd", "ReduceSum", "Relu", "Reshape",
        "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile",
        "Transpose", "Unsqueeze", "Where",
    }
)  # fmt: skip
FORBIDDEN_OPS = frozenset({"Loop", "Scan", "If"})
_COPY_SUFFIX = re.compile(r"_\d+$")  # tf2onnx's node paths name a layer "dense" as "dense" or "dense_1"


def _origins(model_proto, ops: Collection[str], layers: Collection[str]) -> str:
    """Where the nodes of ``ops`` come from: the Keras layers named in their node names, else the nodes."""
    nodes = [n.name or n.op_type for n in model_proto.graph.node if n.op_type in ops]
    parts = {part for name in nodes for part in name.split("/")}
    named = sorted({p for p in parts if p in layers} | {_COPY_SUFFIX.sub("", p) for p in parts} & set(layers))
    if named:
        return f" (from layer{'s' if len(named) > 1 else ''} {', '.join(repr(n) for n in named)})"
    return f" (nodes {nodes[:5]})" if nodes else ""


def gate(model_proto, name: str, layers: Collection[str] = ()) -> tuple[str, ...]:
    """The graph's op types, sorted; ExportError when it holds control flow or ops outside the allow-list.

    Args:
        model_proto: the ONNX model.
        name: the model's name, for the message.
        layers: the Keras layer names the graph was converted from, to name the culprits by.
    """
    ops = sorted({n.op_type for n in model_proto.graph.node})
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{name}: graph holds control-flow ops {bad}{_origins(model_proto, bad, layers)}; "
                          "export a model without loops (a recurrent layer tf2onnx does not turn into one ONNX op, "
                          "such as Keras 3's GRU, converts without one when built with unroll=True)")  # fmt: skip
    unknown = sorted(set(ops) - ALLOWED_OPS)
    if unknown:
        raise ExportError(f"{name}: graph holds ops outside the CUDA-provider allow-list: {unknown}"
                          f"{_origins(model_proto, unknown, layers)}")  # fmt: skip
    return tuple(ops)
