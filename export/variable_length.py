"""Text that pays for words: a padding-invariant text model exported to take each batch cut to its longest caption.

A Keras text model that masks its padding (``Embedding(mask_zero=True)`` before an ``LSTM``) gives the
same answer for a caption however much padding follows it; served at full length, its LSTM still runs
over every padded step. :func:`decide` detects such a model and exports it so the server can cut each
batch of post-padded token rows to its longest caption:

1. the Keras model itself must be padding-invariant: its answers on post-padded rows at full length
   and on the same rows cut to their batch's longest agree (masking, post-padding);
2. its unmasked twin (the same layers and weights, ``mask_zero`` off, no masks passed on, a dynamic
   time axis) converts to one ONNX ``LSTM`` (a masked model converts to a ``Loop``, which the gate refuses);
3. :func:`with_sequence_lengths` gives that LSTM a ``sequence_lens`` input counted from the tokens (the
   tokens that are not padding) and reads its final hidden state ``Y_h`` where the graph read the last
   step of ``Y`` (past a caption's end, ``Y`` is zeros): ONNX's ``sequence_lens`` is Keras' mask for
   post-padded rows;
4. the rewritten graph must equal the Keras model on captions of every length, 0 to the full length,
   batched with captions of other lengths and each batch cut to its longest, within
   :data:`TOLERANCE` of the outputs' scale (their largest magnitude, at least 1: float32 noise
   grows with it, and long random captions reach 1e-5 at full length already).

Any step that fails keeps today's full-length export, unchanged, and says why (a model without
masking, pre-padding, a GRU, a Bidirectional or a Transformer, ...). Imports TensorFlow only in
:func:`decide`; the graph rewrite needs onnx alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fusionserve.errors import ExportError
from fusionserve.export.gate import gate
from fusionserve.preprocess import Vocabulary

TOLERANCE = 1e-5  # max abs difference with Keras at full length, on cut batches, per unit of the outputs' scale
ROWS_PER_LENGTH = 2  # checked captions of each length 0 … max_length
BATCH_SIZES = (1, 3, 8, 32, 64)  # the checked batches' sizes, in turn: a lone caption, and mixed ones
CHECK_SEED = 20_231
_PASS_THROUGH = frozenset({"Squeeze", "Slice", "Gather", "Transpose", "Reshape", "Identity"})


@dataclass(frozen=True)
class Decision:
    """How the text encoder is exported: cut to each batch's longest caption (``proto``), or at full length."""

    proto: onnx.ModelProto | None  # the rewritten graph, tokens [N, T] with T up to max_length; None: full length
    reason: str  # why, in words
    max_abs_diff: float | None = None  # the rewritten graph against Keras, on cut batches
    tolerance: float = TOLERANCE  # what max_abs_diff had to stay within (TOLERANCE times the outputs' scale)
    rows: int = 0  # captions checked

    @property
    def dynamic(self) -> bool:
        """True when each batch is cut to its longest caption."""
        return self.proto is not None

    def parity(self) -> dict:
        """The check's figures, for the text encoder's config."""
        figures = {"dynamic": self.dynamic, "why": self.reason, "tolerance": self.tolerance}
        if self.max_abs_diff is not None:
            figures.update(max_abs_diff=self.max_abs_diff, rows=self.rows,
                           inputs=f"{ROWS_PER_LENGTH} random captions of every length, 0 to the full length, in "
                                  f"batches of {', '.join(map(str, BATCH_SIZES))} mixing lengths, each cut to its "
                                  "longest; against Keras at full length")  # fmt: skip
        return figures


# ----------------------------------------------------------------------------------- the graph rewrite


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def with_sequence_lengths(proto: onnx.ModelProto, tokens: str, pad_value: int) -> onnx.ModelProto:
    """A copy of ``proto`` whose one LSTM skips each row's padding: ``sequence_lens`` from ``tokens``, ``Y_h`` read.

    The row's length is its count of tokens other than ``pad_value``: the caption's length when rows
    are padded at the back. The graph's reading of the last step of the LSTM's ``Y`` (single-consumer
    Squeeze/Slice/Gather/Transpose/Reshape/Identity nodes down to a rank-2 tensor) becomes
    ``Squeeze(Y_h, axes=[0])``, under the same name. Whether the result computes what the model
    did is for the numbers to tell (:func:`decide` checks them).

    Raises:
        ExportError: the graph is not one this rewrite covers, saying why.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    recurrent = [n for n in graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan")]
    if len(recurrent) != 1 or recurrent[0].op_type != "LSTM":
        raise ExportError(f"the graph's recurrent ops are {[n.op_type for n in recurrent]}, not one LSTM")
    lstm = recurrent[0]
    if _attribute(lstm, "direction", b"forward") != b"forward" or _attribute(lstm, "layout", 0) != 0:
        raise ExportError("the LSTM is not a forward one with its time axis first")
    if len(lstm.input) > 4 and lstm.input[4]:
        raise ExportError("the LSTM already has sequence lengths")
    token_input = next((i for i in graph.input if i.name == tokens), None)
    if token_input is None:
        raise ExportError(f"the graph has no input {tokens!r}")
    ranks = _ranks(proto)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    chain, tensor = [], lstm.output[0] if lstm.output else ""
    while ranks.get(tensor) != 2:
        users = consumers.get(tensor, [])
        if not tensor or tensor in outputs or len(users) != 1 or users[0].op_type not in _PASS_THROUGH \
                or users[0].input[0] != tensor:  # fmt: skip
            raise ExportError("the LSTM's output Y is not read only at its last step (return_sequences, or a "
                              f"reading this rewrite does not know: {[u.op_type for u in users]})")  # fmt: skip
        chain.append(users[0])
        tensor = users[0].output[0]
    if not chain:
        raise ExportError("the LSTM's output Y is read as it is")
    opset, prefix = _opset(proto), f"{lstm.name or 'lstm'}/sequence_lens"
    while len(lstm.output) < 2:
        lstm.output.append("")
    if not lstm.output[1]:
        lstm.output[1] = f"{prefix}/Y_h"
    lstm.output[0] = ""  # the steps are no longer read
    while len(lstm.input) < 5:
        lstm.input.append("")
    lstm.input[4] = f"{prefix}/lengths"
    dtype = helper.tensor_dtype_to_np_dtype(token_input.type.tensor_type.elem_type)
    inits = [numpy_helper.from_array(np.array(pad_value, dtype), f"{prefix}/pad")]

    def axes(name: str, values: list[int], op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array(values, np.int64), f"{prefix}/{name}"))
            return helper.make_node(op, [*inputs, f"{prefix}/{name}"], [output], **attrs)
        return helper.make_node(op, inputs, [output], axes=values, **attrs)

    before = [
        helper.make_node("Equal", [tokens, f"{prefix}/pad"], [f"{prefix}/is_pad"]),
        helper.make_node("Not", [f"{prefix}/is_pad"], [f"{prefix}/is_token"]),
        helper.make_node("Cast", [f"{prefix}/is_token"], [f"{prefix}/is_token_int"], to=TensorProto.INT32),
        axes("time_axis", [1], "ReduceSum", [f"{prefix}/is_token_int"], f"{prefix}/lengths", keepdims=0),
    ]
    after = [axes("direction_axis", [0], "Squeeze", [lstm.output[1]], tensor)]
    dropped = {id(n) for n in chain}
    nodes = []
    for node in graph.node:
        if node is lstm:
            nodes += [*before, node, *after]
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]  # the last-step reading's constants go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    dims = token_input.type.tensor_type.shape.dim
    if len(dims) == 2 and not dims[1].HasField("dim_value"):
        dims[1].dim_param = "length"
    onnx.checker.check_model(proto)
    return proto


# -------------------------------------------------------------------------------------------- checks


def check_batches(vocab: Vocabulary, token_range: tuple[int, int], dtype: np.dtype,
                  seed: int = CHECK_SEED) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """Rows to check, at full length, and the same rows in batches each cut to its longest.

    :data:`ROWS_PER_LENGTH` rows of random token ids of every length 0 … max_length, padded at the
    back; taken twice, in batches of :data:`BATCH_SIZES` sizes in turn: in random order (short captions
    beside long ones), then by length (each batch a band of neighbouring lengths, cut short).
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(max(token_range[0], 0), min(token_range[1], vocab.max_words))
    ids = ids[ids != vocab.pad_value]
    lengths = np.repeat(np.arange(vocab.max_length + 1), ROWS_PER_LENGTH)
    rows = vocab.pad([rng.choice(ids, n).tolist() for n in lengths]).astype(dtype, copy=False)
    orders = [rng.permutation(len(rows)), np.argsort(lengths, kind="stable")]
    batches = []
    for order in orders:
        start, k = 0, 0
        while start < len(order):
            size = BATCH_SIZES[k % len(BATCH_SIZES)]
            batches.append(vocab.cut(rows[order[start : start + size]]))
            start, k = start + size, k + 1
    return np.concatenate([rows[order] for order in orders]), batches


def _why(error: Exception) -> str:
    """An exception's first line (TensorFlow's run on for pages)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _max_diff(run: Callable[[np.ndarray], np.ndarray], batches: Sequence[np.ndarray], expected: np.ndarray) -> float:
    got = np.concatenate([np.asarray(run(batch)) for batch in batches])
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


# ------------------------------------------------------------------------------------ the Keras side


def _traced(model, dtype: np.dtype, length: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The model as one traced function of token rows ``[N, length]`` (eager Keras runs an LSTM step by step)."""
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, length], dtype)])
    return lambda rows: np.asarray(function(rows))


def _dynamic_clone(model, length: int, *, unmask: bool):
    """The model with a dynamic axis 1 where its inputs (nested models' too) were ``length`` long, same weights.

    ``unmask``: without masking (Embedding's ``mask_zero`` off, no mask passed from layer to layer).
    """
    clone = _clone(model, length, unmask)
    clone.set_weights(model.get_weights())
    return clone


def _clone(model, length: int, unmask: bool):
    import keras

    def clone_layer(layer):
        if isinstance(layer, keras.Model):
            return _clone(layer, length, unmask)
        config = layer.get_config()
        if unmask and config.get("mask_zero"):
            config = {**config, "mask_zero": False}
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        kwargs.pop("mask", None)
        return layer(*args, **kwargs)

    inputs = [keras.Input(tuple(None if axis == 0 and dim == length else dim for axis, dim in enumerate(t.shape[1:])),
                          dtype=t.dtype) for t in model.inputs]  # fmt: skip
    unmasked = {"call_function": call} if unmask and not isinstance(model, keras.Sequential) else {}
    return keras.models.clone_model(model, input_tensors=inputs[0] if len(inputs) == 1 else inputs,
                                    clone_function=clone_layer, **unmasked)  # fmt: skip


def decide(model, vocab: Vocabulary, token_range: tuple[int, int], tokens: str, output: str, opset: int,
            to_onnx: Callable) -> Decision:  # fmt: skip
    """Decide how the text model is exported; see the module docstring. Never raises for a model it does not cover.

    Args:
        model: the Keras text model, token ids [N, max_length] → features.
        vocab: its tokenizer (padding side and value, length).
        token_range: the ids the model takes, ``[low, high)``.
        tokens: the ONNX graph's token input name.
        output: its features output name.
        opset: the ONNX opset.
        to_onnx: ``(model, name, input names, output names, opset) → ModelProto`` (export.convert's).
    """
    import onnxruntime as ort

    if vocab.padding != "post":
        return Decision(None, f"the tokenizer pads at the front ({vocab.padding!r}): only rows padded at the back "
                              "can be cut to their longest caption")  # fmt: skip
    if vocab.oov_index == vocab.pad_value:
        return Decision(None, f"unknown words take the padding id {vocab.pad_value}")
    dtype = np.dtype(str(model.inputs[0].dtype))
    rows, batches = check_batches(vocab, token_range, dtype)
    try:
        expected = _traced(model, dtype, vocab.max_length)(rows)
        keras_diff = _max_diff(_traced(_dynamic_clone(model, vocab.max_length, unmask=False), dtype), batches,
                               expected)  # fmt: skip
    except Exception as e:  # any layer that cannot take shorter rows (an unrolled RNN, a Flatten, ...)
        return Decision(None, f"the model cannot take rows shorter than {vocab.max_length} tokens ({_why(e)})")
    tolerance = TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if not keras_diff <= tolerance:
        return Decision(None, f"its answers depend on the padding: Keras on rows cut to their batch's longest differs "
                              f"from Keras at full length by {keras_diff:.3g}, over {tolerance:.3g}")  # fmt: skip
    try:
        twin = _dynamic_clone(model, vocab.max_length, unmask=True)
        proto = with_sequence_lengths(to_onnx(twin, "text_encoder", [tokens], [output], opset), tokens,
                                      vocab.pad_value)  # fmt: skip
        gate(proto, "text_encoder")
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # tf2onnx, the rewrite, the gate or onnxruntime: the full-length export decides
        return Decision(None, f"its unmasked twin does not become one LSTM that can skip padding ({_why(e)})")
    diff = _max_diff(lambda batch: session.run(None, {tokens: batch})[0], batches, expected)
    if not diff <= tolerance:
        return Decision(None, f"the graph cut to each batch's longest caption differs from Keras by {diff:.3g}, "
                              f"over {tolerance:.3g}")  # fmt: skip
    return Decision(proto, "its answers do not depend on the padding, and its one LSTM skips it", diff, tolerance,
                    len(rows))  # fmt: skip
